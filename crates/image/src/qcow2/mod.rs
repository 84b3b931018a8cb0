//! qcow2 (QEMU copy-on-write, versions 2 and 3): the engine.
//!
//! All metadata (header copy, L1 table, refcount table, cached L2 tables and
//! refcount blocks, queued frees) lives in one `Meta` behind one mutex.
//! Requests take it only to look up or change metadata, and do data I/O
//! without it, so reads of allocated clusters and writes to disjoint ranges
//! run in parallel. Metadata is written back lazily, in the order that keeps
//! the image crash consistent (DESIGN.md invariant 2), by
//! `Meta::flush_meta`: dirty refcount blocks, sync, refcount table, sync
//! (which also makes the data of new clusters durable), dirty L2 tables,
//! sync, L1 table, sync. A flush asked for by the user (`Format::flush`)
//! does that last sync without the mutex when no free waits for it: a
//! guest's flush of data writes then stalls no other request. Clusters
//! freed by a request are only queued, and
//! their refcounts drop after the L2 change that released them is durable,
//! so a cluster is never reused while an on-disk L2 entry still points at it.
//!
//! With extended L2 entries (subclusters) the allocation unit is a
//! subcluster (cluster / 32): `entry::Entry` says what each unit is, a write
//! into an unallocated cluster gives it a host cluster but writes only the
//! subclusters it touches, and because the layer above then serialises
//! requests per subcluster only, a write that allocates a cluster claims it
//! (`Meta::allocating`) until its L2 update is in place.

//! With lazy refcounts the refcount writes are deferred instead, behind the
//! dirty bit (refcount.rs); clusters and L2 tables shared with internal
//! snapshots are copied before a write (snapshot.rs).

mod bitmaps;
pub(crate) mod cache;
mod check;
pub mod entry;
pub mod header;
mod refcount;
pub mod snapshot;
mod zstd;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use crate::format::{BackingSpec, CheckReport, CowFill, Format, MappedRange, Mapping, Repair};
use crate::storage::Storage;
use crate::{Error, Result};

use cache::TableCache;
use entry::{
    ALL_ALLOC, ALL_ZERO, COPIED, Entry, L2Entry, Unit, get_be64, l1_table, put_be64, unit_mask,
};
use header::Header;

pub use header::MAGIC;

/// Default bytes of L2 tables kept in memory: enough to map 32 GiB with 64 KiB
/// clusters (qemu's default l2-cache-size covers 8 GiB).
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 20;
/// Default cluster size for new images, as qemu-img.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    pub writable: bool,
    /// Bytes of L2 tables to cache (refcount blocks get a quarter of it).
    pub cache_bytes: Option<u64>,
    /// A read-write open of an image with persistent bitmaps discards them
    /// (frees their clusters, drops the extension and its autoclear bit)
    /// instead of refusing to open.
    pub drop_bitmaps: bool,
}

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    pub size: u64,
    /// 512 B to 2 MiB, a power of two; `None` for 64 KiB.
    pub cluster_size: Option<u64>,
    pub backing: Option<BackingSpec>,
    /// Extended L2 entries (32 subclusters per cluster; clusters of at
    /// least 16 KiB), as `qemu-img create -o extended_l2=on`.
    pub extended_l2: bool,
}

/// The `-o` options of `qemu-img create -f qcow2` that pick on-disk
/// features; the default is what qemu-img makes without options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// `compat=0.10`: a version 2 image (no zero clusters, no feature bits).
    pub version_2: bool,
    /// `refcount_bits`: 1, 2, 4, 8, 16, 32 or 64; `None` for 16.
    pub refcount_bits: Option<u32>,
    /// `lazy_refcounts=on` (version 3 only).
    pub lazy_refcounts: bool,
}

impl Features {
    /// The refcount order these features ask for, checked as qemu-img
    /// checks it.
    pub fn refcount_order(&self, path: &Path) -> Result<u32> {
        let bits = self.refcount_bits.unwrap_or(16);
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::InvalidInput(format!(
                "{}: refcount_bits {bits} must be a power of two from 1 to 64",
                path.display()
            )));
        }
        if self.version_2 && bits != 16 {
            return Err(Error::InvalidInput(format!(
                "{}: refcount widths other than 16 bits need compat=1.1",
                path.display()
            )));
        }
        if self.version_2 && self.lazy_refcounts {
            return Err(Error::InvalidInput(format!(
                "{}: lazy refcounts need compat=1.1",
                path.display()
            )));
        }
        Ok(bits.trailing_zeros())
    }
}

/// The metadata of an open image; see the module comment for the locking
/// and write ordering rules.
#[derive(Debug)]
pub(crate) struct Meta {
    st: Arc<dyn Storage>,
    path: PathBuf,
    writable: bool,
    cluster_bits: u32,
    /// Extended L2 entries: 16-byte entries with subcluster bitmaps.
    ext: bool,
    h: Header,
    l1: Vec<u64>,
    /// Indices of L1 clusters changed in memory only.
    l1_dirty: BTreeSet<usize>,
    reftable: Vec<u64>,
    /// Indices of refcount table clusters changed in memory only.
    reftable_dirty: BTreeSet<usize>,
    l2: TableCache,
    rb: TableCache,
    /// No cluster below this index is free.
    free_hint: u64,
    /// Host clusters `(offset, count)` whose references were dropped from L2
    /// tables that are not durable yet.
    pending_frees: Vec<(u64, u64)>,
    /// Nesting depth of refcount-structure changes in progress (a refcount
    /// table move, new refcount blocks not counted yet). Meanwhile a flush
    /// (cache eviction) writes refcount blocks only: no table entry, header
    /// or L2 entry may become durable before the blocks it needs are counted.
    rc_critical: u32,
    /// The largest file length `check_within_file` has seen.
    len_seen: u64,
    /// Reads hold this shared from their lookup to the end of their data
    /// I/O; queued frees are applied under it exclusively, so a cluster is
    /// never handed to a new owner while a read of its old content runs.
    gate: Arc<RwLock<()>>,
    /// Guest clusters a write is giving a new host cluster right now (with
    /// subclusters, writes to different subclusters of one cluster are not
    /// serialised above: the second one waits here instead of allocating
    /// the cluster a second time).
    allocating: BTreeSet<u64>,
    /// The snapshot table, as read at open (diskstream never changes it).
    snapshots: Vec<snapshot::Snapshot>,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    writable: bool,
    cluster_bits: u32,
    /// Extended L2 entries (subclusters).
    ext: bool,
    size: u64,
    version: u32,
    compression_type: u8,
    meta: Mutex<Meta>,
    /// Signalled when a write leaves `Meta::allocating`.
    alloc_done: Condvar,
    gate: Arc<RwLock<()>>,
    closed: AtomicBool,
    /// The largest file length a read has seen (see [`Qcow2::beyond_eof`]).
    read_len_seen: AtomicU64,
}

/// What a write does with one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Allocated, refcount one: write in place.
    InPlace,
    /// Needs a new host cluster; what the write does not cover keeps the
    /// content of the entry it replaces (with subclusters, only the units
    /// the write touches are written when the old entry had no host
    /// cluster).
    Replace,
    /// A zero cluster that keeps its own host cluster: rewritten whole.
    ReuseZero,
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    cluster: u64,
    host: u64,
    source: Source,
    /// The entry as the write found it.
    old: Entry,
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

    fn write(&self, buf: &[u8], off: u64, op: &'static str) -> Result<()> {
        self.st.write_at(buf, off).map_err(|e| self.io(op, e))
    }

    fn sync(&self) -> Result<()> {
        self.st.flush().map_err(|e| self.io("flush", e))
    }

    fn read_table(&self, off: u64) -> Result<Box<[u8]>> {
        let mut data = vec![0u8; self.cluster_size() as usize].into_boxed_slice();
        self.st
            .read_at(&mut data, off)
            .map_err(|e| self.io("read metadata table", e))?;
        Ok(data)
    }

    /// Writes `h` as the header (one write, then a sync) and keeps it.
    fn write_header(&mut self, h: &Header) -> Result<()> {
        let mut buf = h.encode(&self.path)?;
        // Clear the rest of the area a header may use, in the same write.
        let area = self.cluster_size().min(header::MAX_HEADER_WRITE) as usize;
        buf.resize(area, 0);
        self.write(&buf, 0, "write header")?;
        self.sync()?;
        self.h = h.clone();
        Ok(())
    }

    fn l2_per_table_bits(&self) -> u32 {
        self.cluster_bits - 3 - u32::from(self.ext)
    }

    /// 64-bit words per L2 entry.
    fn entry_words(&self) -> usize {
        if self.ext { 2 } else { 1 }
    }

    /// The L2 table of L1 index `i`, loaded into the cache.
    fn l2_table(&mut self, i: usize) -> Result<Option<u64>> {
        let Some(&raw) = self.l1.get(i) else {
            return Ok(None);
        };
        let Some(off) = l1_table(raw) else {
            return Ok(None);
        };
        if off % self.cluster_size() != 0 {
            return Err(self.corrupt(format!(
                "L1 entry {i} points at L2 table offset {off:#x}, not cluster aligned"
            )));
        }
        if !self.l2.contains(off) {
            self.check_within_file(off, "L2 table")?;
            if self.l2.full_of_dirty() {
                self.flush_meta()?;
            }
            if !self.l2.contains(off) {
                let data = self.read_table(off)?;
                self.l2.insert(off, data, false);
            }
        }
        Ok(Some(off))
    }

    /// Tables and data found through metadata must start inside the file:
    /// a damaged or hostile offset is an error, never a write far past the
    /// end.
    /// The file only grows while it is open (nothing here truncates it, and
    /// the image lock keeps other writers out), so an offset below a length
    /// seen before needs no `fstat`: an in-place write pays no syscall under
    /// the metadata lock.
    fn check_within_file(&mut self, off: u64, what: &str) -> Result<()> {
        if off < self.len_seen {
            return Ok(());
        }
        let len = self.st.len().map_err(|e| self.io("stat", e))?;
        self.len_seen = len;
        if off >= len {
            return Err(self.corrupt(format!(
                "{what} at offset {off:#x} is beyond the end of the file ({len} bytes)"
            )));
        }
        Ok(())
    }

    /// The L2 entry of guest cluster `c`.
    fn lookup(&mut self, c: u64) -> Result<Entry> {
        let bits = self.l2_per_table_bits();
        let Some(t) = self.l2_table((c >> bits) as usize)? else {
            return Ok(Entry::unallocated(self.ext));
        };
        self.entry_in(t, c)
    }

    /// [`Meta::lookup`] from memory only: `None` when the L2 table is not
    /// cached (or its offset is damaged: `lookup` says how).
    fn lookup_cached(&mut self, c: u64) -> Option<Result<Entry>> {
        let bits = self.l2_per_table_bits();
        let t = match self
            .l1
            .get((c >> bits) as usize)
            .copied()
            .and_then(l1_table)
        {
            None => return Some(Ok(Entry::unallocated(self.ext))),
            Some(t) => t,
        };
        if t % self.cluster_size() != 0 || !self.l2.contains(t) {
            return None;
        }
        Some(self.entry_in(t, c))
    }

    /// Guest cluster `c`'s entry in its cached L2 table at `t`.
    fn entry_in(&mut self, t: u64, c: u64) -> Result<Entry> {
        let bits = self.l2_per_table_bits();
        let words = self.entry_words();
        let at = (c & ((1 << bits) - 1)) as usize * words;
        let table = self.l2.get(t).expect("loaded");
        let raw = get_be64(table, at);
        let bitmap = if self.ext { get_be64(table, at + 1) } else { 0 };
        let e = Entry::decode(raw, bitmap, self.cluster_bits, self.ext)
            .map_err(|msg| self.corrupt(format!("guest cluster {c}: {msg}")))?;
        // Same rule as qemu ("Cluster allocation offset ... unaligned"): a
        // standard cluster's host offset is cluster aligned, or the
        // metadata is corrupt; never read or write at a skewed offset.
        if let Some(host) = e.host()
            && host & (self.cluster_size() - 1) != 0
        {
            return Err(self.corrupt(format!(
                "guest cluster {c} maps to unaligned host offset {host:#x}"
            )));
        }
        Ok(e)
    }

    /// Guest clusters `c..` that share `c`'s missing L2 table (how many can
    /// be skipped as unallocated), or 0 when `c` has a table.
    fn unmapped_span(&self, c: u64) -> u64 {
        let bits = self.l2_per_table_bits();
        let i = (c >> bits) as usize;
        match self.l1.get(i).copied().and_then(l1_table) {
            Some(_) => 0,
            None => ((i as u64 + 1) << bits) - c,
        }
    }

    /// Sets the L2 entry of guest cluster `c`, creating its L2 table.
    fn set_l2(&mut self, c: u64, e: Entry) -> Result<()> {
        let (raw, bitmap) = e.encode();
        let bits = self.l2_per_table_bits();
        let i = (c >> bits) as usize;
        if i >= self.l1.len() {
            return Err(Error::Internal(format!(
                "{}: guest cluster {c} beyond the L1 table",
                self.path.display()
            )));
        }
        let t = match self.l2_table(i)? {
            // Shared with a snapshot: copy it first (snapshot.rs).
            Some(t) if self.l1[i] & COPIED == 0 => self.cow_l2_table(i, t)?,
            Some(t) => t,
            None if raw == 0 && bitmap == 0 => return Ok(()),
            None => {
                let t = self.alloc_clusters(1)?;
                if self.l2.full_of_dirty() {
                    self.flush_meta()?;
                }
                let data = vec![0u8; self.cluster_size() as usize].into_boxed_slice();
                self.l2.insert(t, data, true);
                self.l1[i] = t | COPIED;
                self.l1_dirty.insert((i * 8) >> self.cluster_bits);
                t
            }
        };
        let words = self.entry_words();
        let at = (c & ((1 << bits) - 1)) as usize * words;
        let table = self.l2.get_mut(t).expect("loaded");
        put_be64(table, at, raw);
        if words == 2 {
            put_be64(table, at + 1, bitmap);
        }
        Ok(())
    }

    /// Queues the drop of the references `old` held; applied once the L2
    /// change that dropped them is durable.
    fn free_later(&mut self, old: L2Entry) {
        if let Some(r) = old.host_clusters(self.cluster_size()) {
            self.pending_frees.push(r);
        }
    }

    /// Outside a request, a raised `rc_critical` means a refcount update
    /// failed half-way: flushing could no longer honour its promise.
    fn ensure_consistent(&self) -> Result<()> {
        if self.rc_critical > 0 {
            return Err(self.corrupt(
                "an earlier refcount update failed half-way; metadata can no longer be \
                 flushed (reopen the image; qemu-img check -r leaks)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Writes every dirty table in crash-safe order and syncs; then applies
    /// the queued frees (whose refcount blocks go out with the next flush).
    fn flush_meta(&mut self) -> Result<()> {
        self.flush_meta_with(false)
    }

    /// [`Meta::flush_meta`]; with lazy refcounts, refcount blocks and the
    /// refcount table are written only when `all_refcounts` is set (close,
    /// check) or the cache is full of them (see `refcount.rs`).
    fn flush_meta_with(&mut self, all_refcounts: bool) -> Result<()> {
        match self.write_meta(all_refcounts)? {
            MetaWrite::Done => Ok(()),
            MetaWrite::SyncDue => {
                self.sync()?;
                self.apply_pending_frees()
            }
        }
    }

    /// The first part of [`Meta::flush_meta_with`]: every dirty table
    /// written in crash-safe order, with the syncs between them, but not
    /// the last sync (nor the frees that wait for it).
    fn write_meta(&mut self, all_refcounts: bool) -> Result<MetaWrite> {
        if !self.writable {
            return Ok(MetaWrite::Done);
        }
        let defer = self.defer_refcounts(all_refcounts)?;
        let mut wrote = !defer && self.write_dirty_refblocks()?;
        if self.rc_critical > 0 {
            self.sync()?;
            return Ok(MetaWrite::Done);
        }
        if !defer && !self.reftable_dirty.is_empty() {
            if wrote {
                self.sync()?;
            }
            let cs = self.cluster_size() as usize;
            for ci in std::mem::take(&mut self.reftable_dirty) {
                let entries =
                    &self.reftable[ci * cs / 8..((ci + 1) * cs / 8).min(self.reftable.len())];
                let buf: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                let off = self.h.refcount_table_offset + (ci * cs) as u64;
                self.write(&buf, off, "write refcount table")?;
            }
            wrote = true;
        }
        let dirty_l2 = self.l2.dirty();
        if !dirty_l2.is_empty() {
            // Data and refcounts before the L2 entries that point at them.
            self.sync()?;
            for off in dirty_l2 {
                let data = self.l2.peek(off).expect("dirty table is cached").to_vec();
                self.write(&data, off, "write L2 table")?;
                self.l2.mark_clean(off);
            }
            wrote = true;
        }
        if !self.l1_dirty.is_empty() {
            if wrote {
                self.sync()?;
            }
            let cs = self.cluster_size() as usize;
            for ci in std::mem::take(&mut self.l1_dirty) {
                let entries = &self.l1[ci * cs / 8..((ci + 1) * cs / 8).min(self.l1.len())];
                let buf: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                let off = self.h.l1_table_offset + (ci * cs) as u64;
                self.write(&buf, off, "write L1 table")?;
            }
        }
        Ok(MetaWrite::SyncDue)
    }

    /// Applies the queued frees; the caller has just synced, so the L2
    /// changes that dropped these references are durable. Reads that looked
    /// up the old entries finish first (a nested flush finds the queue
    /// empty and does not take the gate again).
    fn apply_pending_frees(&mut self) -> Result<()> {
        if self.pending_frees.is_empty() {
            return Ok(());
        }
        let gate = Arc::clone(&self.gate);
        let _no_reads = gate.write().unwrap_or_else(|e| e.into_inner());
        let frees = std::mem::take(&mut self.pending_frees);
        for (off, count) in frees {
            for i in 0..count {
                let c = (off >> self.cluster_bits) + i;
                self.change_refcount(c, false)?;
                if self.refcount(c)? == 0 {
                    // Give the space back; the cluster's content is garbage now.
                    let _ = self
                        .st
                        .punch_hole(c << self.cluster_bits, self.cluster_size());
                }
            }
        }
        Ok(())
    }
}

/// What [`Meta::write_meta`] left to do.
#[derive(Debug, PartialEq, Eq)]
enum MetaWrite {
    /// Nothing: read-only, or already synced.
    Done,
    /// The last sync, then the queued frees.
    SyncDue,
}

fn unsupported(path: &Path, feature: String) -> Error {
    Error::Unsupported {
        path: path.to_owned(),
        format: "qcow2",
        feature,
    }
}

/// Reads `count` big-endian u64s at `off`.
fn read_u64s(
    st: &dyn Storage,
    path: &Path,
    off: u64,
    count: u64,
    what: &'static str,
) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; (count * 8) as usize];
    st.read_at(&mut buf, off)
        .map_err(|e| Error::io(path, what, e))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Sets (`Some`) or removes (`None`) the header extension `ty` of the qcow2
/// image in `storage`, which nobody has open (right after [`create`]): one
/// header write, then a flush. Extensions diskstream interprets itself
/// cannot be set this way.
pub fn set_header_extension(storage: &dyn Storage, ty: u32, data: Option<&[u8]>) -> Result<()> {
    let path = storage.path().to_owned();
    if matches!(
        ty,
        header::EXT_END
            | header::EXT_BACKING_FORMAT
            | header::EXT_FEATURE_TABLE
            | header::EXT_BITMAPS
            | header::EXT_CRYPTO
            | header::EXT_DATA_FILE
    ) {
        return Err(Error::InvalidInput(format!(
            "{}: header extension {ty:#x} is not an opaque extension",
            path.display()
        )));
    }
    let mut first = vec![0u8; 512];
    storage
        .read_at(&mut first, 0)
        .map_err(|e| Error::io(&path, "read header", e))?;
    let cluster_bits = Header::peek_cluster_bits(&first, &path)?;
    let mut buf = vec![0u8; 1usize << cluster_bits];
    storage
        .read_at(&mut buf, 0)
        .map_err(|e| Error::io(&path, "read header", e))?;
    let mut h = Header::decode(&buf, &path)?;
    if h.version < 3 {
        return Err(unsupported(
            &path,
            "header extensions in a version 2 image".into(),
        ));
    }
    h.other_extensions.retain(|(t, _)| *t != ty);
    if let Some(d) = data {
        h.other_extensions.push((ty, d.to_vec()));
    }
    let mut out = h.encode(&path)?;
    let area = (1u64 << cluster_bits).min(header::MAX_HEADER_WRITE) as usize;
    out.resize(area, 0);
    storage
        .write_at(&out, 0)
        .map_err(|e| Error::io(&path, "write header", e))?;
    storage.flush().map_err(|e| Error::io(&path, "flush", e))
}

impl Qcow2 {
    /// The payload of header extension `ty`, if the image has one that
    /// diskstream does not interpret itself (kept as read, written back on
    /// every header update).
    pub fn header_extension(&self, ty: u32) -> Option<Vec<u8>> {
        self.lock()
            .h
            .other_extensions
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, d)| d.clone())
    }

    pub fn open(storage: Arc<dyn Storage>, opts: &Qcow2Options) -> Result<Self> {
        let path = storage.path().to_owned();
        let mut first = vec![0u8; 512];
        storage
            .read_at(&mut first, 0)
            .map_err(|e| Error::io(&path, "read header", e))?;
        let cluster_bits = Header::peek_cluster_bits(&first, &path)?;
        let mut buf = vec![0u8; 1usize << cluster_bits];
        storage
            .read_at(&mut buf, 0)
            .map_err(|e| Error::io(&path, "read header", e))?;
        let h = Header::decode(&buf, &path)?;
        let writable = opts.writable;
        if h.crypt_method != 0 || h.has_crypto_ext {
            return Err(unsupported(
                &path,
                format!("encryption (crypt_method {})", h.crypt_method),
            ));
        }
        let unknown = h.incompatible_features & !header::INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(unsupported(
                &path,
                format!(
                    "incompatible features: {}",
                    h.feature_names(0, unknown).join(", ")
                ),
            ));
        }
        for bit in [header::INCOMPAT_DATA_FILE] {
            if h.incompatible_features & bit != 0 {
                return Err(unsupported(&path, h.feature_names(0, bit).join(", ")));
            }
        }
        header::check_compression_type(&h, &path)?;
        if h.data_file.is_some() {
            return Err(unsupported(&path, "external data file".into()));
        }
        if writable {
            if h.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
                return Err(Error::Corrupt {
                    path,
                    message: "the corrupt bit is set; opening read-write is refused (run \
                              qemu-img check -r all)"
                        .into(),
                });
            }
            if bitmaps::valid(&h) && !opts.drop_bitmaps {
                return Err(unsupported(
                    &path,
                    "persistent dirty bitmaps on a read-write open (diskstream would leave them \
                     stale; read-only opens keep them; --drop-bitmaps discards them)"
                        .into(),
                ));
            }
        }
        let cs = 1u64 << cluster_bits;
        {
            // Tables are read (and written) in place: they must lie inside
            // the file. Hostile offsets near u64::MAX must not wrap around.
            let len = storage.len().map_err(|e| Error::io(&path, "stat", e))?;
            let l1_end = h.l1_table_offset.saturating_add(u64::from(h.l1_size) * 8);
            let rt_end = h
                .refcount_table_offset
                .saturating_add(u64::from(h.refcount_table_clusters) * cs);
            if (h.l1_size > 0 && l1_end > len)
                || h.refcount_table_offset >= len
                || rt_end > len.saturating_add(cs)
            {
                return Err(Error::InvalidImage {
                    path,
                    format: "qcow2",
                    message: format!(
                        "L1 table ({:#x}..{l1_end:#x}) or refcount table ({:#x}..{rt_end:#x}) \
                         extends past the end of the file ({len} bytes)",
                        h.l1_table_offset, h.refcount_table_offset
                    ),
                });
            }
        }
        let file_len = storage.len().map_err(|e| Error::io(&path, "stat", e))?;
        let (snapshots, _) = snapshot::read_table(&*storage, &path, &h, file_len)?;
        let l1 = read_u64s(
            &*storage,
            &path,
            h.l1_table_offset,
            u64::from(h.l1_size),
            "read L1 table",
        )?;
        let reftable = read_u64s(
            &*storage,
            &path,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs / 8,
            "read refcount table",
        )?;
        let cache_bytes = opts.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES);
        let l2_tables = (cache_bytes / cs) as usize;
        let gate = Arc::new(RwLock::new(()));
        let meta = Meta {
            st: Arc::clone(&storage),
            path: path.clone(),
            writable,
            cluster_bits,
            ext: h.extended_l2(),
            h: h.clone(),
            l1,
            l1_dirty: BTreeSet::new(),
            reftable,
            reftable_dirty: BTreeSet::new(),
            l2: TableCache::new(l2_tables),
            rb: TableCache::new(l2_tables / 4),
            free_hint: 0,
            pending_frees: Vec::new(),
            rc_critical: 0,
            len_seen: 0,
            gate: Arc::clone(&gate),
            allocating: BTreeSet::new(),
            snapshots,
        };
        let q = Qcow2 {
            storage,
            path,
            writable,
            cluster_bits,
            ext: h.extended_l2(),
            size: h.size,
            version: h.version,
            compression_type: h.compression_type,
            meta: Mutex::new(meta),
            alloc_done: Condvar::new(),
            gate,
            closed: AtomicBool::new(false),
            read_len_seen: AtomicU64::new(0),
        };
        if writable && opts.drop_bitmaps && bitmaps::valid(&h) {
            q.lock().drop_bitmaps()?;
        }
        if writable && q.lock().h.autoclear_features != 0 {
            // Autoclear bits name extensions a writer that does not keep
            // them up to date must invalidate (bitmaps were refused above).
            let mut m = q.lock();
            let mut h = m.h.clone();
            h.autoclear_features = 0;
            m.write_header(&h)?;
        }
        if writable && h.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            // Refcounts may be stale (lazy refcounts): rebuild before use.
            q.check(Some(Repair::All))?;
            let mut m = q.lock();
            let mut h = m.h.clone();
            h.incompatible_features &= !header::INCOMPAT_DIRTY;
            m.write_header(&h)?;
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

    /// The file's length if `off` is at or past it: data found there
    /// through metadata is damage. The file only grows while it is open
    /// (see `Meta::check_within_file`), so an offset below a length seen
    /// before needs no `fstat`: a read of cached data pays no syscall but
    /// its own.
    fn beyond_eof(&self, off: u64) -> Result<Option<u64>> {
        if off < self.read_len_seen.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let len = self.storage.len().map_err(|e| self.io("stat", e))?;
        self.read_len_seen.fetch_max(len, Ordering::Relaxed);
        Ok((off >= len).then_some(len))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        crate::device::check_range(self.size, offset, len)
    }

    /// Phase 1 of a write of guest clusters `first..=last`: looks them up
    /// and allocates contiguous runs for those that need a new host cluster.
    /// With subclusters, those clusters are claimed in `Meta::allocating`
    /// (the caller releases them), after waiting for other writes that
    /// claimed any of them.
    fn plan_write(&self, first: u64, last: u64) -> Result<Vec<Plan>> {
        let cs = self.cluster_size();
        let mut m = self.lock();
        while self.ext && m.allocating.range(first..=last).next().is_some() {
            m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        let mut plan = Vec::with_capacity((last - first + 1) as usize);
        for c in first..=last {
            let e = m.lookup(c)?;
            if let Some(host) = e.host() {
                m.check_within_file(host, "data cluster")?;
            }
            let (host, source) = match e.l2 {
                L2Entry::Normal { host, copied: true } => (host, Source::InPlace),
                L2Entry::Zero {
                    host: Some(host),
                    copied: true,
                } => (host, Source::ReuseZero),
                _ => (0, Source::Replace),
            };
            plan.push(Plan {
                cluster: c,
                host,
                source,
                old: e,
            });
        }
        let mut i = 0;
        while i < plan.len() {
            if plan[i].host != 0 {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < plan.len() && plan[j].host == 0 {
                j += 1;
            }
            let base = match m.alloc_clusters((j - i) as u64) {
                Ok(b) => b,
                Err(e) => {
                    release_new(&mut m, &plan[..i]);
                    return Err(e);
                }
            };
            for (k, p) in plan[i..j].iter_mut().enumerate() {
                p.host = base + k as u64 * cs;
            }
            i = j;
        }
        if self.ext {
            for p in plan.iter().filter(|p| p.source == Source::Replace) {
                m.allocating.insert(p.cluster);
            }
        }
        Ok(plan)
    }

    /// Phases 2 and 3 of a write: the data without the lock, then the L2
    /// entries pointing at it (written back later, after a sync of the data).
    fn write_planned(
        &self,
        offset: u64,
        data: &[u8],
        plan: &[Plan],
        fill: &[CowFill<'_>],
    ) -> Result<()> {
        if let Err(e) = self.write_data(offset, data, plan, fill) {
            release_new(&mut self.lock(), plan);
            return Err(e);
        }
        let end = offset + data.len() as u64;
        let mut m = self.lock();
        for p in plan {
            if p.source == Source::InPlace && !self.ext {
                continue;
            }
            let cur = m.lookup(p.cluster)?;
            let touched = if self.ext {
                self.touched_units(p.cluster, offset, end)
            } else {
                0
            };
            let new = self.written_entry(p, cur, touched);
            if new != cur {
                m.set_l2(p.cluster, new)?;
            }
            if p.source == Source::Replace {
                m.free_later(cur.l2);
            }
        }
        Ok(())
    }

    /// Bytes per allocation unit of entry `e` (a subcluster, or the whole
    /// cluster for standard entries and compressed clusters).
    fn unit_size(&self, e: Entry) -> u64 {
        match e.l2 {
            L2Entry::Compressed { .. } => self.cluster_size(),
            _ => self.cluster_size() / u64::from(e.units()),
        }
    }

    /// The L2 entries of `[offset, offset + len)`, as runs of whole clusters
    /// `(first cluster, count, entry of the first)`; runs of unallocated
    /// clusters without an L2 table come back as one run.
    fn entries(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, Entry)>> {
        self.entries_locked(&mut self.lock(), offset, len)
    }

    fn entries_locked(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, Entry)>> {
        let first = offset >> self.cluster_bits;
        let end = (offset + len).div_ceil(self.cluster_size());
        let mut out: Vec<(u64, u64, Entry)> = Vec::new();
        let mut c = first;
        while c < end {
            let skip = m.unmapped_span(c);
            let (n, e) = if skip > 0 {
                (skip.min(end - c), Entry::unallocated(self.ext))
            } else {
                (1, m.lookup(c)?)
            };
            out.push((c, n, e));
            c += n;
        }
        Ok(out)
    }

    /// [`Qcow2::entries_locked`] from cached tables only; `None` when one
    /// is not in memory.
    fn entries_cached(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Option<Result<Vec<(u64, u64, Entry)>>> {
        let first = offset >> self.cluster_bits;
        let end = (offset + len).div_ceil(self.cluster_size());
        let mut out: Vec<(u64, u64, Entry)> = Vec::new();
        let mut c = first;
        while c < end {
            let skip = m.unmapped_span(c);
            let (n, e) = if skip > 0 {
                (skip.min(end - c), Entry::unallocated(self.ext))
            } else {
                match m.lookup_cached(c)? {
                    Ok(e) => (1, e),
                    Err(e) => return Some(Err(e)),
                }
            };
            out.push((c, n, e));
            c += n;
        }
        Some(Ok(out))
    }

    /// The entries of `[offset, offset + len)` as merged mapped ranges.
    fn ranges(&self, entries: &[(u64, u64, Entry)], offset: u64, len: u64) -> Vec<MappedRange> {
        let mut out: Vec<MappedRange> = Vec::new();
        for (r, _) in self.ranges_with_holes(entries, offset, len) {
            match out.last_mut() {
                Some(last) if last.mapping == Mapping::Unallocated && r.mapping == last.mapping => {
                    last.length += r.length
                }
                _ => out.push(r),
            }
        }
        out
    }

    /// [`Qcow2::ranges`], where each unallocated range also says where it
    /// sits in the file when its cluster is allocated (an unallocated
    /// subcluster), as qemu-img map reports it; such ranges are merged only
    /// when their host offsets are contiguous.
    fn ranges_with_holes(
        &self,
        entries: &[(u64, u64, Entry)],
        offset: u64,
        len: u64,
    ) -> Vec<(MappedRange, Option<u64>)> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut out: Vec<(MappedRange, Option<u64>)> = Vec::new();
        for &(c, n, e) in entries {
            let cstart = c * cs;
            let u = if n > 1 { n * cs } else { self.unit_size(e) };
            let mut pos = cstart.max(offset);
            let stop = ((c + n) * cs).min(end);
            while pos < stop {
                let i = ((pos - cstart) / u) as u32;
                let next = (cstart + (u64::from(i) + 1) * u).min(stop);
                let within = pos - cstart;
                let (mapping, hole) = match e.unit(i) {
                    Unit::Unallocated => (Mapping::Unallocated, e.host().map(|h| h + within)),
                    Unit::Zero => (
                        Mapping::Zero {
                            host_offset: e.host().map(|h| h + within),
                        },
                        None,
                    ),
                    Unit::Data => (
                        Mapping::Data {
                            host_offset: e.host().expect("data has a host") + within,
                        },
                        None,
                    ),
                    Unit::Compressed => (Mapping::Compressed, None),
                };
                let r = MappedRange {
                    offset: pos,
                    length: next - pos,
                    mapping,
                };
                pos = next;
                if let Some((last, last_hole)) = out.last_mut() {
                    let at = |o: Option<u64>| o.map(|a| a + last.length);
                    let contiguous = match (last.mapping, r.mapping) {
                        (Mapping::Data { host_offset: a }, Mapping::Data { host_offset: b }) => {
                            a + last.length == b
                        }
                        (Mapping::Zero { host_offset: a }, Mapping::Zero { host_offset: b }) => {
                            at(a) == b
                        }
                        (Mapping::Unallocated, Mapping::Unallocated) => at(*last_hole) == hole,
                        (x, y) => x == y,
                    };
                    if contiguous {
                        last.length += r.length;
                        continue;
                    }
                }
                out.push((r, hole));
            }
        }
        out
    }

    /// Reads and inflates the compressed cluster `e` into `out` (one cluster).
    fn read_compressed(&self, e: L2Entry, out: &mut [u8]) -> Result<()> {
        let L2Entry::Compressed { host, len } = e else {
            unreachable!("read_compressed on a non-compressed entry");
        };
        let ctype = self.compression_type;
        let len = len.min(2 * self.cluster_size());
        let mut input = vec![0u8; len as usize];
        self.storage
            .read_at(&mut input, host)
            .map_err(|e| self.io("read compressed cluster", e))?;
        if ctype == header::COMPRESSION_ZSTD {
            return zstd::decompress(&input, out).map_err(|why| Error::Corrupt {
                path: self.path.clone(),
                message: format!("zstd-compressed cluster at host offset {host:#x}: {why}"),
            });
        }
        let mut d = flate2::Decompress::new(false);
        let status = d.decompress(&input, out, flate2::FlushDecompress::Finish);
        if d.total_out() as usize != out.len() || status.is_err() {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                message: format!(
                    "compressed cluster at host offset {host:#x} does not inflate to {} bytes",
                    out.len()
                ),
            });
        }
        Ok(())
    }

    /// What guest bytes `[from, from + dst.len())` of cluster `c` read as
    /// before a write changes them, unit by unit from the entry `old`: data
    /// from its host cluster, zeros, or, for unallocated units, the
    /// copy-on-write fill from below (zeros without one).
    fn old_bytes(
        &self,
        c: u64,
        old: Entry,
        from: u64,
        dst: &mut [u8],
        fill: &[CowFill<'_>],
    ) -> Result<()> {
        let cs = self.cluster_size();
        let cstart = c * cs;
        if let L2Entry::Compressed { .. } = old.l2 {
            let mut buf = vec![0u8; cs as usize];
            self.read_compressed(old.l2, &mut buf)?;
            let at = (from - cstart) as usize;
            dst.copy_from_slice(&buf[at..at + dst.len()]);
            return Ok(());
        }
        let u = self.unit_size(old);
        let end = from + dst.len() as u64;
        let mut pos = from;
        while pos < end {
            let i = ((pos - cstart) / u) as u32;
            let ustart = cstart + u64::from(i) * u;
            let n = (ustart + u).min(end) - pos;
            let d = &mut dst[(pos - from) as usize..(pos - from + n) as usize];
            match old.unit(i) {
                Unit::Data => {
                    let host = old.host().expect("data has a host") + (pos - cstart);
                    self.storage
                        .read_at(d, host)
                        .map_err(|e| self.io("read cluster", e))?;
                }
                Unit::Unallocated => {
                    d.fill(0);
                    if let Some(f) = fill.iter().find(|f| f.offset == ustart) {
                        let skip = (pos - ustart) as usize;
                        let avail = f.data.len().saturating_sub(skip).min(d.len());
                        d[..avail].copy_from_slice(&f.data[skip..skip + avail]);
                    }
                }
                Unit::Zero | Unit::Compressed => d.fill(0),
            }
            pos += n;
        }
        Ok(())
    }

    /// Whether a write replaces plan `p`'s whole cluster (its untouched
    /// bytes copied from the old entry) rather than only the units it
    /// touches.
    fn writes_whole(&self, p: &Plan) -> bool {
        match p.source {
            Source::InPlace => false,
            Source::ReuseZero => true,
            Source::Replace => {
                !self.ext || p.old.host().is_some() || p.old.unit(0) == Unit::Compressed
            }
        }
    }

    /// The guest range of plan `p`'s cluster that a write of
    /// `[g_start, g_end)` (clipped to the cluster) puts on disk: the whole
    /// cluster, or the write widened to whole units where a partly covered
    /// unit does not already hold data in place.
    fn write_span(&self, p: &Plan, g_start: u64, g_end: u64) -> (u64, u64) {
        let cs = self.cluster_size();
        let cstart = p.cluster * cs;
        if self.writes_whole(p) {
            return (cstart, cstart + cs);
        }
        if !self.ext {
            return (g_start, g_end);
        }
        let u = self.unit_size(p.old);
        let in_place = |at: u64| {
            p.source == Source::InPlace && p.old.unit(((at - cstart) / u) as u32) == Unit::Data
        };
        let ws = if (g_start - cstart) % u != 0 && !in_place(g_start) {
            g_start - (g_start - cstart) % u
        } else {
            g_start
        };
        let we = if (g_end - cstart) % u != 0 && !in_place(g_end - 1) {
            (g_end - cstart).next_multiple_of(u) + cstart
        } else {
            g_end
        };
        (ws, we)
    }

    /// Phase 2 of a write: the data, without the metadata lock.
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
            let w_start = self.write_span(a, g_start, end.min((a.cluster + 1) * cs)).0;
            let w_end = self.write_span(b, offset.max(b.cluster * cs), g_end).1;
            let host = a.host + (w_start - a.cluster * cs);
            let slice = &data[(g_start - offset) as usize..(g_end - offset) as usize];
            if w_start == g_start && w_end == g_end {
                self.storage
                    .write_at(slice, host)
                    .map_err(|e| self.io("write data", e))?;
            } else {
                let mut buf = vec![0u8; (w_end - w_start) as usize];
                let head = (g_start - w_start) as usize;
                self.old_bytes(a.cluster, a.old, w_start, &mut buf[..head], fill)?;
                let tail = (g_end - w_start) as usize;
                self.old_bytes(b.cluster, b.old, g_end, &mut buf[tail..], fill)?;
                buf[head..tail].copy_from_slice(slice);
                self.storage
                    .write_at(&buf, host)
                    .map_err(|e| self.io("write data", e))?;
            }
            i = j;
        }
        Ok(())
    }

    /// The bitmap mask of the subclusters of cluster `c` that
    /// `[offset, end)` touches.
    fn touched_units(&self, c: u64, offset: u64, end: u64) -> u64 {
        let cs = self.cluster_size();
        let u = cs / u64::from(entry::SUBCLUSTERS);
        let cstart = c * cs;
        let a = offset.max(cstart) - cstart;
        let b = end.min(cstart + cs) - cstart;
        let first = (a / u) as u32;
        let last = b.div_ceil(u) as u32;
        unit_mask(first, last - first)
    }

    /// Phase 3 of a write: the entry of plan `p` once its data is written.
    /// `cur` is the entry now (other subclusters may have changed since the
    /// write looked); `touched` the subclusters written.
    fn written_entry(&self, p: &Plan, cur: Entry, touched: u64) -> Entry {
        let l2 = L2Entry::Normal {
            host: p.host,
            copied: true,
        };
        if !self.ext {
            return Entry {
                l2,
                bitmap: 0,
                ext: false,
            };
        }
        let bitmap = if matches!(cur.l2, L2Entry::Compressed { .. }) {
            ALL_ALLOC
        } else {
            (cur.bitmap | touched) & !(touched << 32)
        };
        Entry {
            l2,
            bitmap,
            ext: true,
        }
    }

    /// Writes zeros as data (v2 images, which have no zero clusters).
    fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(CHUNK);
            self.write(pos, &zeros[..n as usize], &[])?;
            pos += n;
        }
        Ok(())
    }

    /// Sets every cluster of `[offset, offset + len)` to what `target` says
    /// (given the old entry), queueing frees for references dropped.
    fn retarget(
        &self,
        offset: u64,
        len: u64,
        target: impl Fn(L2Entry) -> Option<L2Entry>,
    ) -> Result<()> {
        let first = offset >> self.cluster_bits;
        let end = (offset + len).div_ceil(self.cluster_size());
        let mut m = self.lock();
        let mut c = first;
        while c < end {
            let skip = m.unmapped_span(c);
            if skip > 0
                && matches!(
                    target(L2Entry::Unallocated),
                    None | Some(L2Entry::Unallocated)
                )
            {
                c += skip;
                continue;
            }
            let old = m.lookup(c)?.l2;
            if let Some(new) = target(old)
                && new != old
            {
                m.set_l2(
                    c,
                    Entry {
                        l2: new,
                        bitmap: 0,
                        ext: false,
                    },
                )?;
                let keeps = new.host_clusters(self.cluster_size());
                if keeps.is_none() || keeps != old.host_clusters(self.cluster_size()) {
                    m.free_later(old);
                }
            }
            c += 1;
        }
        Ok(())
    }

    /// Write-zeroes or discard of whole subclusters with extended L2
    /// entries: the units covered become zero (`zero`) or unallocated. A
    /// whole cluster of zeros gives its host cluster back unless `keep`
    /// (write-zeroes without unmap); a partly covered cluster keeps it, as
    /// in qemu. Without a backing, unallocated units stay unallocated
    /// instead of becoming zero. Returns ranges of compressed clusters the
    /// caller must zero by writing (compressed clusters have no subclusters).
    fn retarget_units(
        &self,
        offset: u64,
        len: u64,
        zero: bool,
        keep: bool,
        has_backing: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let cs = self.cluster_size();
        let end = offset + len;
        let first = offset >> self.cluster_bits;
        let last = end.div_ceil(cs);
        let mut rewrite = Vec::new();
        let mut m = self.lock();
        let mut c = first;
        while c < last {
            let skip = m.unmapped_span(c);
            if skip > 0 && !(zero && has_backing) {
                c += skip;
                continue;
            }
            let touched = self.touched_units(c, offset, end);
            let old = m.lookup(c)?;
            let allocated = (old.bitmap | (old.bitmap >> 32)) & ALL_ALLOC;
            let new = if let L2Entry::Compressed { .. } = old.l2 {
                if touched != ALL_ALLOC {
                    if zero {
                        let a = offset.max(c * cs);
                        rewrite.push((a, end.min((c + 1) * cs).min(self.size) - a));
                    }
                    c += 1;
                    continue;
                }
                if zero {
                    Entry {
                        l2: L2Entry::Unallocated,
                        bitmap: ALL_ZERO,
                        ext: true,
                    }
                } else {
                    Entry::unallocated(true)
                }
            } else if !zero {
                // Units become unallocated (nothing below shows through).
                if touched == ALL_ALLOC {
                    Entry::unallocated(true)
                } else {
                    Entry {
                        bitmap: old.bitmap & !touched & !(touched << 32),
                        ..old
                    }
                }
            } else {
                let zeros = if has_backing {
                    touched
                } else {
                    touched & allocated
                };
                let bitmap = (old.bitmap & !touched & !(touched << 32)) | (zeros << 32);
                let copied_host = matches!(old.l2, L2Entry::Normal { copied: true, .. });
                if touched == ALL_ALLOC && !(keep && copied_host) {
                    Entry {
                        l2: L2Entry::Unallocated,
                        bitmap,
                        ext: true,
                    }
                } else {
                    Entry { bitmap, ..old }
                }
            };
            if new != old {
                m.set_l2(c, new)?;
                if new.l2 != old.l2 {
                    m.free_later(old.l2);
                }
            }
            c += 1;
        }
        Ok(rewrite)
    }
}

/// Creates an empty image (qemu-img's layout: header, refcount table,
/// refcount blocks, L1 table), version 3 unless `compat=0.10` is asked for.
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    create_with(storage, opts, &Features::default())
}

/// [`create`] with on-disk `features` (`compat`, `refcount_bits`,
/// `lazy_refcounts`).
pub fn create_with(storage: &dyn Storage, opts: &CreateOptions, features: &Features) -> Result<()> {
    let path = storage.path();
    let cs = opts.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::InvalidInput(format!(
            "{}: cluster size {cs} must be a power of two from 512 to 2097152",
            path.display()
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if opts.extended_l2 && cluster_bits < header::MIN_CLUSTER_BITS_EXTL2 {
        return Err(Error::InvalidInput(format!(
            "{}: extended L2 entries need a cluster size of at least 16384, not {cs}",
            path.display()
        )));
    }
    // Whole 512-byte sectors, as qemu-img create rounds (qemu reads a size
    // that is not a sector multiple rounded down).
    let size = opts.size.min(u64::MAX - 511).next_multiple_of(512);
    if size > (1u64 << 62) {
        return Err(Error::InvalidInput(format!(
            "{}: size {size} is above 2^62",
            path.display()
        )));
    }
    let l1_entries = Header::l1_entries_ext(size, cluster_bits, opts.extended_l2);
    if l1_entries * 8 > header::MAX_L1_BYTES {
        return Err(Error::InvalidInput(format!(
            "{}: size {size} needs an L1 table above {} bytes with {cs}-byte clusters",
            path.display(),
            header::MAX_L1_BYTES
        )));
    }
    let order = features.refcount_order(path)?;
    let v2 = features.version_2;
    if v2 && opts.extended_l2 {
        return Err(Error::InvalidInput(format!(
            "{}: extended L2 entries need compat=1.1",
            path.display()
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let per_block = (cs * 8) >> order;
    // header + reftable + refblocks + L1, sized until it covers itself.
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let rb = total.div_ceil(per_block);
        let rt = (rb * 8).div_ceil(cs);
        if rb == rb_count && rt == rt_clusters {
            break;
        }
        rb_count = rb;
        rt_clusters = rt;
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rb_count * cs;
    let total = 1 + rt_clusters + rb_count + l1_clusters;
    if rt_clusters * cs > header::MAX_REFTABLE_BYTES {
        return Err(Error::InvalidInput(format!(
            "{}: size {size} is too large for {cs}-byte clusters",
            path.display()
        )));
    }
    let h = Header {
        version: if v2 { 2 } else { 3 },
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if opts.extended_l2 {
            header::INCOMPAT_EXTL2
        } else {
            0
        },
        compatible_features: if features.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: order,
        header_length: if v2 {
            header::V2_HEADER_LEN
        } else {
            header::V3_HEADER_LEN
        },
        compression_type: 0,
        backing_name: opts.backing.as_ref().map(|b| b.name.clone()),
        backing_format: opts.backing.as_ref().and_then(|b| b.format.clone()),
        // Version 2 has no feature bits to name (qemu writes no table).
        feature_table: (!v2).then(header::default_feature_table),
        data_file: None,
        has_bitmaps_ext: false,
        has_crypto_ext: false,
        other_extensions: Vec::new(),
    };
    let io = |op, e| Error::io(path, op, e);
    let mut image = vec![0u8; (total * cs) as usize];
    let hb = h.encode(path)?;
    image[..hb.len()].copy_from_slice(&hb);
    for b in 0..rb_count {
        image[(rt_off + b * 8) as usize..(rt_off + b * 8 + 8) as usize]
            .copy_from_slice(&(rb_off + b * cs).to_be_bytes());
    }
    let blocks = &mut image[rb_off as usize..(rb_off + rb_count * cs) as usize];
    for c in 0..total {
        refcount::set_entry(blocks, order, c as usize, 1);
    }
    storage.write_at(&image, 0).map_err(|e| io("write", e))?;
    storage.flush().map_err(|e| io("flush", e))
}

impl Format for Qcow2 {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        if self.ext {
            self.cluster_size() / u64::from(entry::SUBCLUSTERS)
        } else {
            self.cluster_size()
        }
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    fn backing(&self) -> Option<BackingSpec> {
        let m = self.lock();
        m.h.backing_name.as_ref().map(|name| BackingSpec {
            name: name.clone(),
            format: m.h.backing_format.clone(),
        })
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn recorded_backing_identity(&self) -> Option<Vec<u8>> {
        self.header_extension(header::EXT_BACKING_IDENTITY)
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<MappedRange>> {
        self.check_range(offset, len)?;
        Ok(self.ranges(&self.entries(offset, len)?, offset, len))
    }

    fn map_holes(&self, offset: u64, len: u64) -> Result<Vec<(MappedRange, Option<u64>)>> {
        self.check_range(offset, len)?;
        Ok(self.ranges_with_holes(&self.entries(offset, len)?, offset, len))
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<(u64, u64)>> {
        self.check_range(offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        let (ranges, entries, _reading) = {
            let mut m = self.lock();
            let entries = self.entries_locked(&mut m, offset, len)?;
            let gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
            (self.ranges(&entries, offset, len), entries, gate)
        };
        // Data is written before the L2 entry that points at it is
        // published, so data that starts past the end of the file is damaged
        // metadata (qemu-img check calls it corruption), not a racing write.
        if let Some(start) = ranges
            .iter()
            .filter_map(|r| match r.mapping {
                Mapping::Data { host_offset } => Some(host_offset),
                _ => None,
            })
            .max()
            && let Some(file_len) = self.beyond_eof(start)?
        {
            return Err(Error::Corrupt {
                path: self.storage.path().to_owned(),
                message: format!(
                    "data at host offset {start:#x} is beyond the end of the file \
                     ({file_len} bytes)"
                ),
            });
        }
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut cluster_buf = Vec::new();
        let cs = self.cluster_size();
        for r in ranges {
            let at = (r.offset - offset) as usize;
            let dst = &mut buf[at..at + r.length as usize];
            match r.mapping {
                Mapping::Data { host_offset } => self
                    .storage
                    .read_at(dst, host_offset)
                    .map_err(|e| self.io("read data", e))?,
                Mapping::Zero { .. } => dst.fill(0),
                Mapping::Unallocated => holes.push((r.offset, r.length)),
                Mapping::Compressed => {
                    let mut pos = r.offset;
                    while pos < r.offset + r.length {
                        let c = pos / cs;
                        let n = ((c + 1) * cs).min(r.offset + r.length) - pos;
                        let e = entries
                            .iter()
                            .find(|(first, count, _)| (*first..first + count).contains(&c))
                            .map(|(_, _, e)| *e)
                            .expect("entries cover the range");
                        cluster_buf.resize(cs as usize, 0);
                        self.read_compressed(e.l2, &mut cluster_buf)?;
                        let from = (pos - c * cs) as usize;
                        let to = (pos - offset) as usize;
                        buf[to..to + n as usize]
                            .copy_from_slice(&cluster_buf[from..from + n as usize]);
                        pos += n;
                    }
                }
            }
        }
        Ok(holes)
    }

    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<Result<Vec<(u64, u64)>>> {
        let len = buf.len() as u64;
        self.check_range(offset, len).ok()?;
        // Same lookup and gate as `read`, but never waiting: a busy lock, a
        // table not in memory or anything unusual goes the slow way.
        let (ranges, _reading) = {
            let mut m = self.meta.try_lock().ok()?;
            let entries = self.entries_cached(&mut m, offset, len)?.ok()?;
            let gate = self.gate.try_read().ok()?;
            (self.ranges(&entries, offset, len), gate)
        };
        let mut last_data = None;
        for r in &ranges {
            match r.mapping {
                Mapping::Compressed => return None,
                Mapping::Data { host_offset } => last_data = Some(host_offset),
                _ => {}
            }
        }
        if let Some(start) = last_data
            && self.beyond_eof(start).ok()?.is_some()
        {
            return None; // damaged metadata: `read` reports it
        }
        let mut holes = Vec::new();
        for r in ranges {
            let at = (r.offset - offset) as usize;
            let dst = &mut buf[at..at + r.length as usize];
            match r.mapping {
                Mapping::Data { host_offset } => {
                    match self.storage.read_at_nowait(dst, host_offset) {
                        Ok(true) => {}
                        Ok(false) => return None,
                        Err(e) => return Some(Err(self.io("read data", e))),
                    }
                }
                Mapping::Zero { .. } => dst.fill(0),
                Mapping::Unallocated => holes.push((r.offset, r.length)),
                Mapping::Compressed => return None,
            }
        }
        Some(Ok(holes))
    }

    fn map_nowait(&self, offset: u64, len: u64) -> Option<Vec<MappedRange>> {
        self.check_range(offset, len).ok()?;
        let mut m = self.meta.try_lock().ok()?;
        let entries = self.entries_cached(&mut m, offset, len)?.ok()?;
        Some(self.ranges(&entries, offset, len))
    }

    fn write(&self, offset: u64, data: &[u8], fill: &[CowFill<'_>]) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + data.len() as u64 - 1) >> self.cluster_bits;
        let plan = self.plan_write(first, last)?;
        let r = self.write_planned(offset, data, &plan, fill);
        if self.ext && plan.iter().any(|p| p.source == Source::Replace) {
            let mut m = self.lock();
            for p in plan.iter().filter(|p| p.source == Source::Replace) {
                m.allocating.remove(&p.cluster);
            }
            drop(m);
            self.alloc_done.notify_all();
        }
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, has_backing: bool) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        if self.version < 3 {
            if has_backing {
                return self.write_zero_data(offset, len);
            }
            return self.retarget(offset, len, |_| Some(L2Entry::Unallocated));
        }
        if self.ext {
            let rewrite = self.retarget_units(offset, len, true, !unmap, has_backing)?;
            for (o, n) in rewrite {
                self.write(o, &vec![0u8; n as usize], &[])?;
            }
            return Ok(());
        }
        let plain = L2Entry::Zero {
            host: None,
            copied: false,
        };
        self.retarget(offset, len, |old| match old {
            L2Entry::Unallocated if !has_backing => None,
            L2Entry::Normal { host, copied: true }
            | L2Entry::Zero {
                host: Some(host),
                copied: true,
            } if !unmap => Some(L2Entry::Zero {
                host: Some(host),
                copied: true,
            }),
            _ => Some(plain),
        })
    }

    fn discard(&self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        if self.ext {
            self.retarget_units(offset, len, has_backing, false, has_backing)?;
            return Ok(());
        }
        if has_backing {
            if self.version < 3 {
                return Ok(());
            }
            return self.retarget(offset, len, |_| {
                Some(L2Entry::Zero {
                    host: None,
                    copied: false,
                })
            });
        }
        self.retarget(offset, len, |old| {
            old.is_allocated().then_some(L2Entry::Unallocated)
        })
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut m = self.lock();
        m.ensure_consistent()?;
        if m.write_meta(false)? == MetaWrite::Done {
            return Ok(());
        }
        if !m.pending_frees.is_empty() {
            m.sync()?;
            return m.apply_pending_frees();
        }
        // Every table this flush covers is written; the sync needs no lock,
        // and holding it would stall every lookup (and so every read and
        // write of the image) for as long as the device takes. A write that
        // lands meanwhile may or may not be covered, as for any flush.
        let st = Arc::clone(&m.st);
        drop(m);
        st.flush().map_err(|e| Error::io(&self.path, "flush", e))
    }

    fn set_backing(&self, backing: Option<&BackingSpec>) -> Result<()> {
        self.ensure_writable()?;
        let mut m = self.lock();
        m.ensure_consistent()?;
        m.flush_meta()?;
        let mut h = m.h.clone();
        let name = backing.map(|b| b.name.clone());
        if name != h.backing_name {
            // The recorded identity describes the old backing.
            h.other_extensions
                .retain(|(t, _)| *t != header::EXT_BACKING_IDENTITY);
        }
        h.backing_name = name;
        h.backing_format = backing.and_then(|b| b.format.clone());
        m.write_header(&h)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        let entries = self.entries(0, self.size)?;
        Ok(self
            .ranges(&entries, 0, self.size)
            .iter()
            .filter(|r| r.mapping != Mapping::Unallocated)
            .map(|r| r.length)
            .sum())
    }

    fn check(&self, repair: Option<Repair>) -> Result<CheckReport> {
        if repair.is_some() {
            self.ensure_writable()?;
        }
        let mut m = self.lock();
        check::check(&mut m, repair)
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        let m = self.lock();
        let h = &m.h;
        let mut data = serde_json::Map::new();
        let v3 = h.version >= 3;
        data.insert("compat".into(), (if v3 { "1.1" } else { "0.10" }).into());
        data.insert(
            "compression-type".into(),
            (if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            })
            .into(),
        );
        if v3 {
            data.insert(
                "lazy-refcounts".into(),
                (h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0).into(),
            );
        }
        if let Some(b) = bitmaps::info_json(&m) {
            data.insert("bitmaps".into(), b);
        }
        data.insert("refcount-bits".into(), (1u64 << h.refcount_order).into());
        if v3 {
            data.insert(
                "corrupt".into(),
                (h.incompatible_features & header::INCOMPAT_CORRUPT != 0).into(),
            );
            data.insert(
                "extended-l2".into(),
                (h.incompatible_features & header::INCOMPAT_EXTL2 != 0).into(),
            );
        }
        Some(serde_json::json!({ "type": "qcow2", "data": data }))
    }

    fn snapshots(&self) -> Vec<crate::format::SnapshotInfo> {
        self.lock().snapshots.iter().map(|s| s.info()).collect()
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) || !self.writable {
            return Ok(());
        }
        let mut m = self.lock();
        m.ensure_consistent()?;
        m.flush_meta_with(true)?;
        // The frees applied by the first flush dirtied refcount blocks.
        m.flush_meta_with(true)?;
        m.mark_clean()
    }
}

/// Gives back clusters a failed write allocated (no L2 entry points at them).
fn release_new(m: &mut Meta, plan: &[Plan]) {
    for p in plan {
        if p.source == Source::Replace && p.host != 0 {
            let _ = m.change_refcount(p.host >> m.cluster_bits, false);
        }
    }
}
