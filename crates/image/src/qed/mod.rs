//! QED (QEMU Enhanced Disk): the engine.
//!
//! QED has no reference counts: a cluster belongs to whoever points at it,
//! space is only ever appended at the end of the file, and nothing is freed
//! (a discarded or zeroed data cluster is punched in place, so it keeps its
//! owner). That makes the write path simple: look up, append new clusters,
//! write the data without the metadata lock, then point the L2 entries at
//! it. The metadata (header copy, L1 table, cached L2 tables) lives in one
//! `Meta` behind one mutex; tables are written back lazily by
//! `Meta::flush_meta` in crash-safe order (DESIGN.md invariant 2): sync (the
//! data), dirty L2 tables, sync, L1 table, sync. So an entry never reaches
//! the disk before the data or the table it points at. A user's flush does
//! the last sync without the mutex unless the need-check flag waits for it.
//!
//! The need-check flag (`QED_F_NEED_CHECK`) is what the spec uses instead of
//! that ordering: it is set, and made durable, before the first write that
//! changes the tables, and cleared by a flush once no such write has run for
//! [`NEED_CHECK_QUIET`] (and always on close). An image found with the flag
//! set is checked on a read-write open: invalid entries are cleared, leaks
//! (appended clusters a crash left unreferenced) are tolerated.

mod check;
pub mod header;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::format::{BackingSpec, CheckReport, CowFill, Format, MappedRange, Mapping, Repair};
use crate::qcow2::cache::TableCache;
use crate::storage::Storage;
use crate::{Error, Result};

use header::{F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, Header};

pub use header::MAGIC;

/// Default bytes of L2 tables kept in memory (256 KiB tables with the default
/// geometry: 16 tables, mapping 32 GiB).
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 20;
/// How long table-changing writes must have been quiet before a flush clears
/// the need-check flag; qemu's `QED_NEED_CHECK_TIMEOUT` is the same 5 s.
pub const NEED_CHECK_QUIET: Duration = Duration::from_secs(5);
/// The L2 entry of a zero cluster (the spec's special offset 1).
pub const ZERO_CLUSTER: u64 = 1;

#[derive(Clone, Debug, Default)]
pub struct QedOptions {
    pub writable: bool,
    /// Bytes of L2 tables to cache.
    pub cache_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    pub size: u64,
    /// 4 KiB to 64 MiB, a power of two; `None` for 64 KiB (as qemu-img).
    pub cluster_size: Option<u64>,
    /// 1 to 16 clusters, a power of two; `None` for 4 (as qemu-img).
    pub table_size: Option<u32>,
    pub backing: Option<BackingSpec>,
}

/// One L2 entry, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    Unallocated,
    Zero,
    Data(u64),
}

impl Entry {
    fn decode(raw: u64) -> Entry {
        match raw {
            0 => Entry::Unallocated,
            ZERO_CLUSTER => Entry::Zero,
            host => Entry::Data(host),
        }
    }
}

fn get_le64(table: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(table[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

fn put_le64(table: &mut [u8], i: usize, v: u64) {
    table[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

/// The metadata of an open image; see the module comment.
#[derive(Debug)]
pub(crate) struct Meta {
    st: Arc<dyn Storage>,
    path: PathBuf,
    writable: bool,
    h: Header,
    cluster_bits: u32,
    /// log2 of the offsets in one table.
    table_bits: u32,
    l1: Vec<u64>,
    /// Indices of L1 clusters changed in memory only.
    l1_dirty: BTreeSet<usize>,
    l2: TableCache,
    /// Where the next appended cluster goes (the file length rounded up to
    /// a cluster, plus what was handed out since).
    file_end: u64,
    /// Data clusters handed out to writes that then failed (a full disk):
    /// referenced by no table, so the next allocations reuse them instead
    /// of leaving them as leaks.
    spare: Vec<u64>,
    /// Writes between allocating clusters and publishing them in L2 tables.
    allocating: u32,
    /// When the last table-changing write ran.
    last_change: Option<Instant>,
}

impl Meta {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn io(&self, op: &'static str, e: std::io::Error) -> Error {
        Error::io(&self.path, op, e)
    }

    fn corrupt(&self, message: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            message,
        }
    }

    fn sync(&self) -> Result<()> {
        self.st.flush().map_err(|e| self.io("flush", e))
    }

    /// Writes `h` as the header (one write, then a sync) and keeps it.
    fn write_header(&mut self, h: &Header) -> Result<()> {
        let buf = h.encode(&self.path)?;
        self.st
            .write_at(&buf, 0)
            .map_err(|e| self.io("write header", e))?;
        self.sync()?;
        self.h = h.clone();
        Ok(())
    }

    /// Sets the need-check flag durably before the tables change.
    fn mark_need_check(&mut self) -> Result<()> {
        self.last_change = Some(Instant::now());
        if self.h.features & F_NEED_CHECK != 0 {
            return Ok(());
        }
        let mut h = self.h.clone();
        h.features |= F_NEED_CHECK;
        self.write_header(&h)
    }

    /// Clears the need-check flag when every table change is durable: call
    /// right after `flush_meta`. `force` ignores the quiet period (close).
    fn clear_need_check(&mut self, force: bool) -> Result<()> {
        if self.h.features & F_NEED_CHECK == 0 || self.allocating > 0 {
            return Ok(());
        }
        let quiet = self
            .last_change
            .is_none_or(|t| t.elapsed() >= NEED_CHECK_QUIET);
        if !force && !quiet {
            return Ok(());
        }
        let mut h = self.h.clone();
        h.features &= !F_NEED_CHECK;
        self.write_header(&h)
    }

    /// Hands out `bytes` (whole clusters) at the end of the file.
    fn append(&mut self, bytes: u64) -> u64 {
        let at = self.file_end;
        self.file_end += bytes;
        at
    }

    /// One data cluster: a spare one left by a failed write, else a new
    /// one at the end of the file.
    fn data_cluster(&mut self) -> u64 {
        match self.spare.pop() {
            Some(c) => c,
            None => self.append(self.cluster_size()),
        }
    }

    /// Whether `off` may hold a table: aligned, past the header, and the
    /// whole table before the end of the file (qemu's
    /// `qed_check_table_offset`).
    fn table_offset_ok(&self, off: u64) -> bool {
        off % self.cluster_size() == 0
            && off >= self.h.header_bytes()
            && off
                .checked_add(self.h.table_bytes())
                .is_some_and(|end| end <= self.file_end)
    }

    /// Whether `off` may hold a data cluster (qemu's
    /// `qed_check_cluster_offset`).
    fn cluster_offset_ok(&self, off: u64) -> bool {
        off % self.cluster_size() == 0 && off >= self.h.header_bytes() && off < self.file_end
    }

    fn read_table(&self, off: u64) -> Result<Box<[u8]>> {
        let mut data = vec![0u8; self.h.table_bytes() as usize].into_boxed_slice();
        self.st
            .read_at(&mut data, off)
            .map_err(|e| self.io("read L2 table", e))?;
        Ok(data)
    }

    /// The L2 table of L1 index `i`, loaded into the cache.
    fn l2_table(&mut self, i: usize) -> Result<Option<u64>> {
        let off = match self.l1.get(i) {
            None | Some(0) => return Ok(None),
            Some(&off) => off,
        };
        if !self.l2.contains(off) {
            if !self.table_offset_ok(off) {
                return Err(self.corrupt(format!(
                    "L1 entry {i} points at an invalid L2 table offset {off:#x} (unaligned, in \
                     the header or past the end of the file)"
                )));
            }
            if self.l2.full_of_dirty() {
                self.flush_meta()?;
            }
            let data = self.read_table(off)?;
            self.l2.insert(off, data, false);
        }
        Ok(Some(off))
    }

    /// The L2 entry of guest cluster `c`.
    fn lookup(&mut self, c: u64) -> Result<Entry> {
        let Some(t) = self.l2_table((c >> self.table_bits) as usize)? else {
            return Ok(Entry::Unallocated);
        };
        let i = (c & ((1 << self.table_bits) - 1)) as usize;
        let e = Entry::decode(get_le64(self.l2.get(t).expect("loaded"), i));
        if let Entry::Data(host) = e
            && !self.cluster_offset_ok(host)
        {
            return Err(self.corrupt(format!(
                "guest cluster {c} maps to an invalid host offset {host:#x} (unaligned, in the \
                 header or past the end of the file)"
            )));
        }
        Ok(e)
    }

    /// Guest clusters `c..` that share `c`'s missing L2 table, or 0 when `c`
    /// has a table.
    fn unmapped_span(&self, c: u64) -> u64 {
        let i = (c >> self.table_bits) as usize;
        match self.l1.get(i) {
            Some(&off) if off != 0 => 0,
            _ => ((i as u64 + 1) << self.table_bits) - c,
        }
    }

    /// Sets the raw L2 entry of guest cluster `c`, appending its L2 table if
    /// it has none.
    fn set_l2(&mut self, c: u64, raw: u64) -> Result<()> {
        let i = (c >> self.table_bits) as usize;
        if i >= self.l1.len() {
            return Err(Error::Internal(format!(
                "{}: guest cluster {c} beyond the L1 table",
                self.path.display()
            )));
        }
        self.mark_need_check()?;
        let t = match self.l2_table(i)? {
            Some(t) => t,
            None if raw == 0 => return Ok(()),
            None => {
                if self.l2.full_of_dirty() {
                    self.flush_meta()?;
                }
                let t = self.append(self.h.table_bytes());
                let data = vec![0u8; self.h.table_bytes() as usize].into_boxed_slice();
                self.l2.insert(t, data, true);
                self.l1[i] = t;
                self.l1_dirty.insert((i * 8) >> self.cluster_bits);
                t
            }
        };
        let j = (c & ((1 << self.table_bits) - 1)) as usize;
        put_le64(self.l2.get_mut(t).expect("loaded"), j, raw);
        Ok(())
    }

    /// Writes every dirty table in crash-safe order and syncs.
    fn flush_meta(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.write_tables()?;
        self.sync()
    }

    /// [`Meta::flush_meta`] but the last sync: the dirty tables written in
    /// crash-safe order, with the syncs between them.
    fn write_tables(&mut self) -> Result<()> {
        let dirty_l2 = self.l2.dirty();
        if !dirty_l2.is_empty() {
            // The data (and new tables' space) before the entries that
            // point at it.
            self.sync()?;
            for off in dirty_l2 {
                let data = self.l2.peek(off).expect("dirty table is cached");
                self.st
                    .write_at(data, off)
                    .map_err(|e| self.io("write L2 table", e))?;
                self.l2.mark_clean(off);
            }
            if !self.l1_dirty.is_empty() {
                self.sync()?;
            }
        }
        let cs = self.cluster_size() as usize;
        for ci in std::mem::take(&mut self.l1_dirty) {
            let entries = &self.l1[ci * cs / 8..((ci + 1) * cs / 8).min(self.l1.len())];
            let buf: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            let off = self.h.l1_table_offset + (ci * cs) as u64;
            self.st
                .write_at(&buf, off)
                .map_err(|e| self.io("write L1 table", e))?;
        }
        Ok(())
    }
}

/// An open QED image.
#[derive(Debug)]
pub struct Qed {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    writable: bool,
    cluster_bits: u32,
    size: u64,
    meta: Mutex<Meta>,
    closed: AtomicBool,
}

/// What a write does with one guest cluster.
#[derive(Clone, Copy, Debug)]
struct Plan {
    cluster: u64,
    host: u64,
    /// `None`: allocated, written in place. `Some(old)`: a new cluster
    /// replacing `old` (unallocated or zero), written whole.
    fresh: Option<Entry>,
}

impl Qed {
    pub fn open(storage: Arc<dyn Storage>, opts: &QedOptions) -> Result<Self> {
        let path = storage.path().to_owned();
        let io = |op, e| Error::io(&path, op, e);
        let mut fixed = [0u8; header::HEADER_LEN];
        storage
            .read_at(&mut fixed, 0)
            .map_err(|e| io("read header", e))?;
        let len = storage.len().map_err(|e| io("stat", e))?;
        if len < header::HEADER_LEN as u64 {
            return Err(Error::InvalidImage {
                path,
                format: "qed",
                message: format!("file too short for a header ({len} bytes)"),
            });
        }
        let mut h = Header::decode(&fixed, &path)?;
        h.check_l1_in_file(len, &path)?;
        if let Some((at, n)) = h.backing_range() {
            let mut name = vec![0u8; n];
            storage
                .read_at(&mut name, at)
                .map_err(|e| io("read backing file name", e))?;
            h.set_backing_bytes(&name, &path)?;
        }
        let mut l1_bytes = vec![0u8; h.table_bytes() as usize];
        storage
            .read_at(&mut l1_bytes, h.l1_table_offset)
            .map_err(|e| io("read L1 table", e))?;
        let l1: Vec<u64> = (0..l1_bytes.len() / 8)
            .map(|i| get_le64(&l1_bytes, i))
            .collect();
        drop(l1_bytes);
        let cluster_bits = h.cluster_bits();
        let cache_bytes = opts.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES);
        let meta = Meta {
            st: Arc::clone(&storage),
            path: path.clone(),
            writable: opts.writable,
            h: h.clone(),
            cluster_bits,
            table_bits: h.table_bits(),
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new((cache_bytes / h.table_bytes()) as usize),
            file_end: len.next_multiple_of(u64::from(h.cluster_size)),
            spare: Vec::new(),
            allocating: 0,
            last_change: None,
        };
        let q = Qed {
            storage,
            path,
            writable: opts.writable,
            cluster_bits,
            size: h.image_size,
            meta: Mutex::new(meta),
            closed: AtomicBool::new(false),
        };
        if opts.writable && h.autoclear_features & !header::AUTOCLEAR_KNOWN != 0 {
            // The spec: unknown autoclear bits are cleared by a writer that
            // does not keep what they stand for up to date.
            let mut m = q.lock();
            let mut h = m.h.clone();
            h.autoclear_features &= header::AUTOCLEAR_KNOWN;
            m.write_header(&h)?;
        }
        if opts.writable && h.features & F_NEED_CHECK != 0 {
            // Not closed cleanly: fix invalid entries (leaks are fine). A
            // read-only open reads as is, as qemu does.
            let report = q.check(Some(Repair::All))?;
            if report.corruptions > 0 || report.check_errors > 0 {
                return Err(Error::Corrupt {
                    path: q.path.clone(),
                    message: format!(
                        "the need-check flag is set and the check found {} corruptions that \
                         cannot be repaired",
                        report.corruptions
                    ),
                });
            }
        }
        Ok(q)
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn io(&self, op: &'static str, e: std::io::Error) -> Error {
        Error::io(&self.path, op, e)
    }

    fn ensure_writable(&self) -> Result<()> {
        crate::format::ensure_writable(&self.path, self.writable, &self.closed)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        crate::device::check_range(self.size, offset, len)
    }

    /// The entries of `[offset, offset + len)` as runs `(first cluster,
    /// count, entry of the first)`; clusters without an L2 table come back
    /// as one run.
    fn entries_locked(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, Entry)>> {
        let first = offset >> self.cluster_bits;
        let end = (offset + len).div_ceil(self.cluster_size());
        let mut out = Vec::new();
        let mut c = first;
        while c < end {
            let skip = m.unmapped_span(c);
            let (n, e) = if skip > 0 {
                (skip.min(end - c), Entry::Unallocated)
            } else {
                (1, m.lookup(c)?)
            };
            out.push((c, n, e));
            c += n;
        }
        Ok(out)
    }

    /// Entries as merged mapped ranges.
    fn ranges(&self, entries: &[(u64, u64, Entry)], offset: u64, len: u64) -> Vec<MappedRange> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut out: Vec<MappedRange> = Vec::new();
        for &(c, n, e) in entries {
            let start = (c * cs).max(offset);
            let stop = ((c + n) * cs).min(end);
            let mapping = match e {
                Entry::Unallocated => Mapping::Unallocated,
                // A zero cluster has no place in the file.
                Entry::Zero => Mapping::Zero { host_offset: None },
                Entry::Data(host) => Mapping::Data {
                    host_offset: host + (start - c * cs),
                },
            };
            if let Some(last) = out.last_mut() {
                let joins = match (last.mapping, mapping) {
                    (Mapping::Data { host_offset: a }, Mapping::Data { host_offset: b }) => {
                        a + last.length == b
                    }
                    (x, y) => x == y,
                };
                if joins {
                    last.length += stop - start;
                    continue;
                }
            }
            out.push(MappedRange {
                offset: start,
                length: stop - start,
                mapping,
            });
        }
        out
    }

    /// Phase 2 of a write: the data, without the metadata lock. New clusters
    /// are written whole, their untouched bytes from `fill` (unallocated) or
    /// zeros (zero clusters); runs of contiguous host clusters go in one
    /// write.
    fn write_data(
        &self,
        offset: u64,
        data: &[u8],
        plan: &[Plan],
        fill: &[CowFill<'_>],
    ) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset + data.len() as u64;
        let mut i = 0;
        while i < plan.len() {
            let mut j = i + 1;
            while j < plan.len() && plan[j].host == plan[j - 1].host + cs {
                j += 1;
            }
            let (a, b) = (&plan[i], &plan[j - 1]);
            let g_start = offset.max(a.cluster * cs);
            let g_end = end.min((b.cluster + 1) * cs);
            let w_start = if a.fresh.is_some() {
                a.cluster * cs
            } else {
                g_start
            };
            let w_end = if b.fresh.is_some() {
                (b.cluster + 1) * cs
            } else {
                g_end
            };
            let host = a.host + (w_start - a.cluster * cs);
            let slice = &data[(g_start - offset) as usize..(g_end - offset) as usize];
            if w_start == g_start && w_end == g_end {
                self.storage
                    .write_at(slice, host)
                    .map_err(|e| self.io("write data", e))?;
            } else {
                let mut buf = vec![0u8; (w_end - w_start) as usize];
                for p in [a, b] {
                    let c0 = p.cluster * cs;
                    if p.fresh == Some(Entry::Unallocated)
                        && let Some(f) = fill.iter().find(|f| f.offset == c0)
                    {
                        let n = f.data.len().min(cs as usize);
                        let at = (c0 - w_start) as usize;
                        buf[at..at + n].copy_from_slice(&f.data[..n]);
                    }
                }
                let at = (g_start - w_start) as usize;
                buf[at..at + slice.len()].copy_from_slice(slice);
                self.storage
                    .write_at(&buf, host)
                    .map_err(|e| self.io("write data", e))?;
            }
            i = j;
        }
        Ok(())
    }

    /// Zeroes whole clusters: allocated ones are punched in place (they keep
    /// their owner; qemu writes zeros in place too), unallocated ones become
    /// zero clusters when a backing could show through.
    fn zero_clusters(&self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        let cs = self.cluster_size();
        let punch = {
            let mut m = self.lock();
            let entries = self.entries_locked(&mut m, offset, len)?;
            let mut punch = Vec::new();
            for (c, n, e) in entries {
                match e {
                    Entry::Data(host) => punch.push(host),
                    Entry::Zero => {}
                    Entry::Unallocated if has_backing => {
                        for k in c..c + n {
                            m.set_l2(k, ZERO_CLUSTER)?;
                        }
                    }
                    Entry::Unallocated => {}
                }
            }
            punch
        };
        // Merge contiguous host clusters into one punch each.
        let mut i = 0;
        while i < punch.len() {
            let mut j = i + 1;
            while j < punch.len() && punch[j] == punch[j - 1] + cs {
                j += 1;
            }
            self.storage
                .punch_hole(punch[i], (j - i) as u64 * cs)
                .map_err(|e| self.io("zero data clusters", e))?;
            i = j;
        }
        Ok(())
    }
}

impl Qed {
    /// Pushes the data range `[offset, offset + len)` at `host`, with the
    /// whole clusters that are holes in the file as zeros.
    fn split_holes(
        &self,
        offset: u64,
        len: u64,
        host: u64,
        out: &mut Vec<MappedRange>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let end = host + len;
        let mut push = |h: u64, l: u64, zero: bool| {
            if l == 0 {
                return;
            }
            let mapping = if zero {
                Mapping::Zero {
                    host_offset: Some(h),
                }
            } else {
                Mapping::Data { host_offset: h }
            };
            let g = offset + (h - host);
            if let Some(last) = out.last_mut()
                && last.end() == g
                && match (last.mapping, mapping) {
                    (Mapping::Data { host_offset: a }, Mapping::Data { host_offset: b })
                    | (
                        Mapping::Zero {
                            host_offset: Some(a),
                        },
                        Mapping::Zero {
                            host_offset: Some(b),
                        },
                    ) => a + last.length == b,
                    _ => false,
                }
            {
                last.length += l;
                return;
            }
            out.push(MappedRange {
                offset: g,
                length: l,
                mapping,
            });
        };
        let mut pos = host;
        while pos < end {
            let data = self
                .storage
                .next_data(pos)
                .map_err(|e| self.io("find data", e))?
                .unwrap_or(end)
                .min(end);
            // Only whole clusters of hole count as zeros.
            let hole_end = if data == end { end } else { data / cs * cs };
            let hole_start = pos.next_multiple_of(cs).min(end);
            if hole_end > hole_start {
                push(pos, hole_start - pos, false);
                push(hole_start, hole_end - hole_start, true);
                pos = hole_end;
                if pos >= end {
                    break;
                }
            }
            let hole = self
                .storage
                .next_hole(pos.max(data))
                .map_err(|e| self.io("find hole", e))?
                .min(end);
            let next = if hole == end {
                end
            } else {
                hole.next_multiple_of(cs).min(end)
            };
            let next = next.max(pos + 1).min(end);
            push(pos, next - pos, false);
            pos = next;
        }
        Ok(())
    }
}

/// Creates a QED image on `storage`: the header cluster (with the backing
/// name right after the fixed part) and an empty L1 table, as qemu-img does.
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    let path = storage.path();
    let cs = opts.cluster_size.unwrap_or(header::DEFAULT_CLUSTER_SIZE);
    if !cs.is_power_of_two() || !(header::MIN_CLUSTER_SIZE..=header::MAX_CLUSTER_SIZE).contains(&cs)
    {
        return Err(Error::InvalidInput(format!(
            "{}: cluster size {cs} must be a power of two from {} to {}",
            path.display(),
            header::MIN_CLUSTER_SIZE,
            header::MAX_CLUSTER_SIZE
        )));
    }
    let ts = opts.table_size.unwrap_or(header::DEFAULT_TABLE_SIZE);
    if !ts.is_power_of_two() || !(header::MIN_TABLE_SIZE..=header::MAX_TABLE_SIZE).contains(&ts) {
        return Err(Error::InvalidInput(format!(
            "{}: table size {ts} must be a power of two from {} to {} clusters",
            path.display(),
            header::MIN_TABLE_SIZE,
            header::MAX_TABLE_SIZE
        )));
    }
    if ts < 2 {
        // qemu's `qed_check_table_offset` rejects every table offset when
        // tables are one cluster (its overflow check compares the table's
        // last cluster with its first), so qemu cannot open such an image.
        // We read them; we do not make them.
        return Err(Error::InvalidInput(format!(
            "{}: table size 1 makes an image qemu cannot open; use 2 to 16 clusters",
            path.display()
        )));
    }
    // Whole sectors, as qemu-img create rounds.
    let size = opts.size.min(u64::MAX - 511).next_multiple_of(512);
    let max = Header::max_image_size(cs, ts);
    if size > max {
        return Err(Error::InvalidInput(format!(
            "{}: size {size} is above {max}, the most a QED image with {cs}-byte clusters and \
             {ts}-cluster tables can map",
            path.display()
        )));
    }
    let backing = opts.backing.as_ref();
    let raw_backing = backing.is_some_and(|b| b.format.as_deref() == Some("raw"));
    let h = Header {
        cluster_size: cs as u32,
        table_size: ts,
        header_size: 1,
        features: if raw_backing {
            F_BACKING_FORMAT_NO_PROBE
        } else {
            0
        },
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: cs,
        image_size: size,
        backing_filename_offset: 0,
        backing_filename_size: 0,
        backing_name: backing.map(|b| b.name.clone()),
    };
    let io = |op, e| Error::io(path, op, e);
    let mut image = vec![0u8; (cs + h.table_bytes()) as usize];
    let hb = h.encode(path)?;
    image[..hb.len()].copy_from_slice(&hb);
    storage.write_at(&image, 0).map_err(|e| io("write", e))?;
    storage.flush().map_err(|e| io("flush", e))
}

impl Format for Qed {
    fn format_name(&self) -> &'static str {
        "qed"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.cluster_size()
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    /// QED records no backing format, only "raw, never probe": without that
    /// bit the format is `None` and the opener probes (qcow2 or QED only).
    fn backing(&self) -> Option<BackingSpec> {
        let m = self.lock();
        m.h.backing_name.as_ref().map(|name| BackingSpec {
            name: name.clone(),
            format: (m.h.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string()),
        })
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Data clusters that were zeroed (punched in place, see
    /// `zero_clusters`) report as zeros that keep their place in the file:
    /// QED has no flag for them, so the file's holes are asked (qemu's block
    /// status asks the file layer the same way).
    fn map(&self, offset: u64, len: u64) -> Result<Vec<MappedRange>> {
        self.check_range(offset, len)?;
        let ranges = {
            let mut m = self.lock();
            let entries = self.entries_locked(&mut m, offset, len)?;
            self.ranges(&entries, offset, len)
        };
        let mut out: Vec<MappedRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match r.mapping {
                Mapping::Data { host_offset } => {
                    self.split_holes(r.offset, r.length, host_offset, &mut out)?
                }
                _ => out.push(r),
            }
        }
        Ok(out)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<(u64, u64)>> {
        self.check_range(offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        // Clusters are never freed or reused, so the data I/O needs no lock.
        let ranges = {
            let mut m = self.lock();
            let entries = self.entries_locked(&mut m, offset, len)?;
            self.ranges(&entries, offset, len)
        };
        let mut holes = Vec::new();
        for r in ranges {
            let at = (r.offset - offset) as usize;
            let dst = &mut buf[at..at + r.length as usize];
            match r.mapping {
                Mapping::Data { host_offset } => self
                    .storage
                    .read_at(dst, host_offset)
                    .map_err(|e| self.io("read data", e))?,
                Mapping::Zero { .. } | Mapping::Compressed => dst.fill(0),
                Mapping::Unallocated => holes.push((r.offset, r.length)),
            }
        }
        Ok(holes)
    }

    fn write(&self, offset: u64, data: &[u8], fill: &[CowFill<'_>]) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + data.len() as u64 - 1) >> self.cluster_bits;
        // Phase 1: look up; append runs of new clusters for what needs them.
        let plan = {
            let mut m = self.lock();
            let mut plan = Vec::with_capacity((last - first + 1) as usize);
            for c in first..=last {
                let (host, fresh) = match m.lookup(c)? {
                    Entry::Data(host) => (host, None),
                    old => (0, Some(old)),
                };
                plan.push(Plan {
                    cluster: c,
                    host,
                    fresh,
                });
            }
            let new = plan.iter().filter(|p| p.fresh.is_some()).count() as u64;
            if new > 0 {
                m.mark_need_check()?;
                m.allocating += 1;
                for p in plan.iter_mut().filter(|p| p.fresh.is_some()) {
                    p.host = m.data_cluster();
                }
            }
            plan
        };
        let allocating = plan.iter().any(|p| p.fresh.is_some());
        // Phase 2: the data, without the lock.
        let written = self.write_data(offset, data, &plan, fill);
        // Phase 3: point the L2 entries at the new data (written back at the
        // next flush, after a sync of the data). A failed write gives its new
        // clusters back for the next allocations.
        let mut m = self.lock();
        let mut result = written;
        if result.is_ok() {
            for p in plan.iter().filter(|p| p.fresh.is_some()) {
                if let Err(e) = m.set_l2(p.cluster, p.host) {
                    result = Err(e);
                    break;
                }
            }
        } else {
            let fresh = plan.iter().filter(|p| p.fresh.is_some());
            m.spare.extend(fresh.map(|p| p.host));
        }
        if allocating {
            m.allocating -= 1;
        }
        result
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool, has_backing: bool) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        self.zero_clusters(offset, len, has_backing)
    }

    /// QED cannot free a cluster (nothing counts references, and a hole in
    /// the tables would let the backing show through), so a discard zeroes:
    /// data clusters are punched in place, unallocated ones over a backing
    /// become zero clusters.
    fn discard(&self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        self.zero_clusters(offset, len, has_backing)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut m = self.lock();
        if m.h.features & F_NEED_CHECK != 0 {
            // Clearing the flag must follow the sync: all under the lock.
            m.flush_meta()?;
            return m.clear_need_check(false);
        }
        m.write_tables()?;
        // The last sync orders nothing after it: without the lock, reads
        // and writes go on while the device takes its time.
        let st = Arc::clone(&m.st);
        drop(m);
        st.flush().map_err(|e| Error::io(&self.path, "flush", e))
    }

    fn set_backing(&self, backing: Option<&BackingSpec>) -> Result<()> {
        self.ensure_writable()?;
        if let Some(b) = backing
            && b.format.as_deref() != Some("raw")
            && crate::open::is_uri(&b.name)
        {
            // Only "raw" can be recorded; anything else is found again by
            // probing a local file, which a URI is not.
            return Err(Error::Unsupported {
                path: self.path.clone(),
                format: "qed",
                feature: format!(
                    "a {} backing named by URI ({}): QED records no backing format but raw",
                    b.format.as_deref().unwrap_or("unnamed"),
                    b.name
                ),
            });
        }
        let mut m = self.lock();
        m.flush_meta()?;
        let mut h = m.h.clone();
        h.backing_name = backing.map(|b| b.name.clone());
        if backing.is_some_and(|b| b.format.as_deref() == Some("raw")) {
            h.features |= F_BACKING_FORMAT_NO_PROBE;
        } else {
            h.features &= !F_BACKING_FORMAT_NO_PROBE;
        }
        m.write_header(&h)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        let cs = self.cluster_size();
        let mut m = self.lock();
        Ok(self
            .entries_locked(&mut m, 0, self.size)?
            .iter()
            .filter(|(_, _, e)| *e != Entry::Unallocated)
            .map(|(c, n, _)| ((c + n) * cs).min(self.size) - c * cs)
            .sum())
    }

    fn check(&self, repair: Option<Repair>) -> Result<CheckReport> {
        if repair.is_some() {
            self.ensure_writable()?;
        }
        let mut m = self.lock();
        check::check(&mut m, repair)
    }

    /// qemu reports no format-specific information for QED.
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) || !self.writable {
            return Ok(());
        }
        let mut m = self.lock();
        m.flush_meta()?;
        m.clear_need_check(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn new_image(size: u64, cs: u64, ts: u32) -> Arc<dyn Storage> {
        let st: Arc<dyn Storage> = Arc::new(MemStorage::new("t.qed"));
        create(
            &*st,
            &CreateOptions {
                size,
                cluster_size: Some(cs),
                table_size: Some(ts),
                backing: None,
            },
        )
        .unwrap();
        st
    }

    fn features(st: &dyn Storage) -> u64 {
        let mut b = [0u8; 8];
        st.read_at(&mut b, 16).unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn write_sets_need_check_and_close_clears_it() {
        let st = new_image(1 << 20, 4096, 2);
        let q = Qed::open(
            Arc::clone(&st),
            &QedOptions {
                writable: true,
                cache_bytes: None,
            },
        )
        .unwrap();
        assert_eq!(features(&*st) & F_NEED_CHECK, 0);
        q.write(8192, &[7u8; 100], &[]).unwrap();
        assert_ne!(
            features(&*st) & F_NEED_CHECK,
            0,
            "set before the allocation"
        );
        // A flush right after the write keeps it (writes not quiet yet).
        q.flush().unwrap();
        assert_ne!(features(&*st) & F_NEED_CHECK, 0);
        q.close().unwrap();
        assert_eq!(features(&*st) & F_NEED_CHECK, 0);
        let q = Qed::open(st, &QedOptions::default()).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(q.read(8192, &mut buf).unwrap().is_empty());
        assert_eq!(&buf[..100], &[7u8; 100]);
        assert!(buf[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_flush_clears_need_check_once_writes_are_quiet() {
        let st = new_image(1 << 20, 4096, 2);
        let q = Qed::open(
            Arc::clone(&st),
            &QedOptions {
                writable: true,
                cache_bytes: None,
            },
        )
        .unwrap();
        q.write(0, &[3u8; 4096], &[]).unwrap();
        q.flush().unwrap();
        assert_ne!(features(&*st) & F_NEED_CHECK, 0, "not quiet yet");
        // As if the last table change were a quiet period ago (no sleeping
        // in tests).
        let past = Instant::now()
            .checked_sub(NEED_CHECK_QUIET)
            .expect("the monotonic clock runs longer than the quiet period");
        q.lock().last_change = Some(past);
        q.flush().unwrap();
        assert_eq!(features(&*st) & F_NEED_CHECK, 0);
        // The next allocating write sets it again, before its tables change.
        q.write(8192, &[4u8; 10], &[]).unwrap();
        assert_ne!(features(&*st) & F_NEED_CHECK, 0);
    }

    #[test]
    fn in_place_writes_do_not_set_need_check() {
        let st = new_image(1 << 20, 4096, 2);
        let rw = QedOptions {
            writable: true,
            cache_bytes: None,
        };
        let q = Qed::open(Arc::clone(&st), &rw).unwrap();
        q.write(0, &[1u8; 4096], &[]).unwrap();
        q.close().unwrap();
        let q = Qed::open(Arc::clone(&st), &rw).unwrap();
        q.write(0, &[2u8; 512], &[]).unwrap();
        assert_eq!(features(&*st) & F_NEED_CHECK, 0);
        q.close().unwrap();
    }

    #[test]
    fn zero_clusters_hide_the_backing_and_map_as_zero() {
        let st = new_image(1 << 20, 4096, 2);
        let q = Qed::open(
            st,
            &QedOptions {
                writable: true,
                cache_bytes: None,
            },
        )
        .unwrap();
        q.write_zeroes(0, 8192, false, true).unwrap();
        let m = q.map(0, 16384).unwrap();
        assert_eq!(m[0].mapping, Mapping::Zero { host_offset: None });
        assert_eq!(m[0].length, 8192);
        assert_eq!(m[1].mapping, Mapping::Unallocated);
        let mut buf = vec![9u8; 8192];
        assert!(q.read(0, &mut buf).unwrap().is_empty());
        assert!(buf.iter().all(|&b| b == 0));
    }
}
