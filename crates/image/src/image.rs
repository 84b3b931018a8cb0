//! [`Image`]: one format engine plus its backing chain, as a [`BlockDevice`].
//! An image with a backing is the copy-on-read *overlay* of DESIGN.md.
//!
//! This is where layers meet: reads fill what the top file does not hold from
//! the backing (zeros past a shorter backing); writes that cover an
//! unallocated unit only in part read that unit from the backing first
//! (copy-on-write); write-zeroes and discard never uncover backing data; block
//! status walks down the chain. With copy-on-read on, data read from below is
//! also kept in the top file; [`Image::populate`] does the same without a
//! reader (the stream job's primitive), and [`Image::relink`] drops or moves
//! the backing link when nothing above the base is remote any more.
//!
//! The one decision to know: every request that can change allocation —
//! writes, write-zeroes, discard, copy-on-read and populate copies — holds
//! its unit-aligned range in [`RangeLocks`] from the allocation lookup to the
//! metadata update, and a copy re-checks allocation after taking it and only
//! fills units that are still unallocated. So a copy never overwrites what a
//! guest wrote, and two requests on one unit never lose an update. Data from
//! below goes through a bounce buffer, never a caller's buffer. File I/O runs
//! on tokio's blocking pool; the format engine never sees the runtime.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{
    BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags, block_status_all, check_range,
    push_extent,
};
use crate::format::{BackingSpec, CowFill, Format, Mapping};
use crate::iobuf::IoBuf;
use crate::lane::Lane;
use crate::rangelock::RangeLocks;
use crate::stats::{IoStats, Op};
use crate::{Error, Result};

/// The largest bounce buffer one copy uses.
const MAX_COPY_PIECE: u64 = 4 << 20;

/// Reads up to this size may be answered on the async thread when the
/// format can do it without blocking (cached metadata, page-cached data);
/// larger ones go to the blocking pool, where a long copy does not hold up
/// other requests.
const INLINE_READ_MAX: usize = 256 << 10;

/// Copy-on-read of at most this many bytes reads the backing straight away
/// ([`Image::fetch_locked`]): one round trip for the guest that waits.
/// Larger reads ask for block status first, so holes are not fetched.
const COR_FETCH_MAX: u64 = 1 << 20;

/// `AtomicU32` value meaning "no base: copy from every layer".
const NO_BASE: u32 = u32::MAX;

/// An open image: a format engine and, optionally, the device below it.
#[derive(Debug)]
pub struct Image {
    format: Arc<dyn Format>,
    backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    locks: RangeLocks,
    name: String,
    closed: AtomicBool,
    /// Set by [`Image::freeze`]: the image takes no more writes of any kind.
    frozen: AtomicBool,
    copy_on_read: AtomicBool,
    /// Depth of the layer copy-on-read stops at (`NO_BASE` = none).
    cor_base_depth: AtomicU32,
    stats: IoStats,
    access: crate::access::Access,
    /// Where page-cache writes run (see [`crate::lane`]); `None` when the
    /// image is written with O_DIRECT, whose writes each get a thread.
    write_lane: Option<Arc<Lane>>,
}

/// [`Format::read`] of `len` bytes at `offset`: on the spot when the format
/// can answer without blocking, else on the blocking pool. Returns the
/// buffer and the ranges this layer does not hold.
async fn format_read<B>(
    format: &Arc<dyn Format>,
    offset: u64,
    mut buf: B,
) -> Result<(B, Vec<(u64, u64)>)>
where
    B: std::ops::DerefMut<Target = [u8]> + Send + 'static,
{
    if buf.len() <= INLINE_READ_MAX
        && let Some(r) = format.try_read_nowait(offset, &mut buf)
    {
        return r.map(|holes| (buf, holes));
    }
    blocking(format, move |f| {
        let holes = f.read(offset, &mut buf)?;
        Ok((buf, holes))
    })
    .await
}

/// [`Format::map`], from memory when it can be, else on the blocking pool.
async fn format_map(
    format: &Arc<dyn Format>,
    offset: u64,
    len: u64,
) -> Result<Vec<crate::format::MappedRange>> {
    if let Some(map) = format.map_nowait(offset, len) {
        return Ok(map);
    }
    blocking(format, move |f| f.map(offset, len)).await
}

/// The first `.1` bytes of a buffer, as a slice of its own.
struct Prefix(IoBuf, usize);

impl std::ops::Deref for Prefix {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

impl std::ops::DerefMut for Prefix {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0[..self.1]
    }
}

/// Runs a blocking format call on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(format: &Arc<dyn Format>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn Format) -> Result<T> + Send + 'static,
{
    let format = Arc::clone(format);
    match tokio::task::spawn_blocking(move || f(&*format)).await {
        Ok(r) => r,
        Err(e) => Err(Error::Internal(format!("blocking task failed: {e}"))),
    }
}

/// What [`Image::populate`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PopulateOutcome {
    /// Bytes read from below and written into this image.
    pub copied: u64,
    /// Bytes made zero units here (zeros above the base over base data).
    pub zeroed: u64,
}

/// What one unit needs so that it no longer depends on layers above the base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UnitAction {
    /// Nothing: it is a hole everywhere, or lives in the base or below.
    Skip,
    /// Reads as zeros from above the base while the base below it may hold
    /// data: becomes a zero unit.
    Zero,
    /// Holds data above the base: copy its content.
    Copy,
}

/// A run of units with one action.
#[derive(Clone, Copy, Debug)]
struct UnitRun {
    action: UnitAction,
    start: u64,
    end: u64,
    /// Every byte of the run is a hole in every layer.
    all_hole: bool,
}

/// Where a byte range can be read from after a populate.
#[derive(Debug)]
enum Piece {
    /// Allocated here before the copy looked (a guest write won the range).
    Local(u64, u64),
    /// Copied just now: the bytes.
    Copied(u64, Arc<IoBuf>),
    /// Reads as zeros.
    Zeros(u64, u64),
    /// Left below on purpose (the base or deeper).
    Below(u64, u64),
}

impl Piece {
    fn span(&self) -> (u64, u64) {
        match self {
            Piece::Local(o, n) | Piece::Zeros(o, n) | Piece::Below(o, n) => (*o, *n),
            Piece::Copied(o, d) => (*o, d.len() as u64),
        }
    }
}

impl Image {
    /// Puts `format` on top of `backing`.
    pub fn new(format: Arc<dyn Format>, backing: Option<Arc<dyn BlockDevice>>) -> Self {
        let name = format.storage().path().display().to_string();
        let direct = format.storage().direct();
        Image {
            format,
            backing: RwLock::new(backing),
            locks: RangeLocks::new(),
            name,
            closed: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            copy_on_read: AtomicBool::new(false),
            cor_base_depth: AtomicU32::new(NO_BASE),
            stats: IoStats::default(),
            access: crate::access::Access::default(),
            write_lane: (!direct).then(|| Lane::new(crate::lane::PAGE_CACHE_WIDTH)),
        }
    }

    pub fn format(&self) -> &Arc<dyn Format> {
        &self.format
    }

    /// The device below, as it is now (the link can change on [`Image::relink`]).
    pub fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The backing named by the image header.
    pub fn backing_spec(&self) -> Option<BackingSpec> {
        self.format.backing()
    }

    pub fn locks(&self) -> &RangeLocks {
        &self.locks
    }

    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// Where the guest reads: hot-data hints for streams, access profiles.
    pub fn access(&self) -> &crate::access::Access {
        &self.access
    }

    /// Turns copy-on-read on or off. `base_depth` is the layer copy-on-read
    /// stops at (data at that depth or deeper is read, not copied).
    pub fn set_copy_on_read(&self, on: bool, base_depth: Option<u32>) {
        self.cor_base_depth
            .store(base_depth.unwrap_or(NO_BASE), Ordering::SeqCst);
        self.copy_on_read.store(on, Ordering::SeqCst);
    }

    pub fn copy_on_read(&self) -> bool {
        self.copy_on_read.load(Ordering::SeqCst)
    }

    /// Flushes and marks the image clean. Further I/O is refused.
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(lane) = &self.write_lane {
            lane.idle().await;
        }
        blocking(&self.format, |f| f.close()).await
    }

    /// Makes the image read-only from now on, for every holder: guest
    /// writes, copy-on-read and populate are refused, block status and reads
    /// keep working, and [`BlockDevice::info`] reports it read-only (so an
    /// NBD export opened afterwards advertises it). Flush first: this only
    /// stops further changes. Post-copy migration freezes the source disk
    /// this way before exporting it to the destination. There is no thaw.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Whether the image takes no writes (opened read-only, or frozen).
    pub fn read_only(&self) -> bool {
        self.format.read_only() || self.frozen.load(Ordering::SeqCst)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly {
                name: self.name.clone(),
            });
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::InvalidInput(format!(
                "{}: image is closed",
                self.name
            )));
        }
        Ok(())
    }

    /// `[start, end)` widened to whole allocation units, clipped to the size.
    fn unit_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let g = self.format.granularity();
        let start = offset - offset % g;
        let end = (offset + len).next_multiple_of(g).min(self.size());
        (start, end)
    }

    /// Reads `[offset, offset + len)` from below this layer: the backing,
    /// zeros past its end, or zeros without one. Into a pooled, aligned
    /// buffer where it can, so a copy needs no zeroed allocation and an
    /// O_DIRECT write of it no bounce: a local image below whose own read
    /// would do nothing more (no copy-on-read) is read through its format.
    async fn read_below(&self, offset: u64, len: u64) -> Result<IoBuf> {
        let backing = self.backing();
        let n = backing
            .as_ref()
            .map_or(0, |b| b.size().saturating_sub(offset).min(len));
        if n == 0 {
            let mut buf = IoBuf::take(len as usize);
            buf.fill(0);
            return Ok(buf);
        }
        let backing = backing.expect("n > 0 only with a backing");
        let direct = (&*backing as &dyn std::any::Any)
            .downcast_ref::<Image>()
            .filter(|b| !b.copy_on_read() || b.read_only());
        let buf = if let Some(below) = direct {
            let mut buf = IoBuf::take(len as usize);
            buf[n as usize..].fill(0);
            let (mut buf, holes) =
                format_read(&below.format, offset, Prefix(buf, n as usize)).await?;
            below.fill_below(&mut buf, offset, holes).await?;
            buf.0
        } else {
            let mut data = backing.read(offset, n as usize).await?;
            data.resize(len as usize, 0);
            IoBuf::from(data)
        };
        self.stats.add_backing_read(n);
        Ok(buf)
    }

    /// Fills `holes` — what a format read of `dst` (guest offset `at`) left
    /// unallocated — from below this layer.
    async fn fill_below(&self, dst: &mut [u8], at: u64, holes: Vec<(u64, u64)>) -> Result<()> {
        for (hoff, hlen) in holes {
            // Boxed: reading below may fill holes a layer further down.
            let data = Box::pin(self.read_below(hoff, hlen)).await?;
            let i = (hoff - at) as usize;
            dst[i..i + hlen as usize].copy_from_slice(&data);
        }
        Ok(())
    }

    /// The units that `[offset, end)` covers only in part and that are not
    /// allocated in this file, with their content from below.
    async fn cow_fills(&self, offset: u64, end: u64) -> Result<Vec<(u64, IoBuf)>> {
        if self.backing().is_none() {
            return Ok(Vec::new());
        }
        let g = self.format.granularity();
        let size = self.size();
        let mut units = Vec::new();
        if !offset.is_multiple_of(g) {
            units.push(offset - offset % g);
        }
        if !end.is_multiple_of(g) && end < size {
            let u = end - end % g;
            if units.last() != Some(&u) {
                units.push(u);
            }
        }
        let mut fills = Vec::new();
        for u in units {
            let ulen = g.min(size - u);
            let map = format_map(&self.format, u, ulen).await?;
            if map.iter().any(|r| r.mapping == Mapping::Unallocated) {
                fills.push((u, self.read_below(u, ulen).await?));
            }
        }
        Ok(fills)
    }

    /// Writes through the format with the copy-on-write fills it needs. The
    /// caller holds the unit-aligned range.
    async fn write_locked(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let fills = self.cow_fills(offset, offset + data.len() as u64).await?;
        let bytes = data.len() + fills.iter().map(|(_, d)| d.len()).sum::<usize>();
        self.writing(bytes as u64, move |f| {
            let fills: Vec<CowFill<'_>> = fills
                .iter()
                .map(|(o, d)| CowFill {
                    offset: *o,
                    data: d,
                })
                .collect();
            f.write(offset, &data, &fills)?;
            if fua { f.flush() } else { Ok(()) }
        })
        .await
    }

    /// Runs a write-like format call that touches `bytes` off the async
    /// threads: in the write lane when the image has one and `bytes` is at
    /// most [`crate::lane::MAX_WRITE`], else on the blocking pool.
    async fn writing<T, F>(&self, bytes: u64, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Format) -> Result<T> + Send + 'static,
    {
        match &self.write_lane {
            Some(lane) if bytes <= crate::lane::MAX_WRITE as u64 => {
                let format = Arc::clone(&self.format);
                lane.run(move || f(&*format)).await
            }
            _ => blocking(&self.format, f).await,
        }
    }

    /// Splits `[offset, offset + len)` into a partial head, whole units, and
    /// a partial tail. The tail counts as whole when it ends at the size.
    fn split_units(&self, offset: u64, len: u64) -> ((u64, u64), (u64, u64), (u64, u64)) {
        let g = self.format.granularity();
        let end = offset + len;
        let mut mid_start = offset.next_multiple_of(g);
        let mut mid_end = if end == self.size() {
            end
        } else {
            end - end % g
        };
        if mid_start >= mid_end {
            // No whole unit inside: the whole request is "head".
            mid_start = end;
            mid_end = end;
        }
        let head = (offset, mid_start.min(end) - offset);
        let mid = (mid_start, mid_end - mid_start);
        let tail = (mid_end, end - mid_end);
        (head, mid, tail)
    }

    /// Block status of a range this layer does not hold, from below.
    async fn status_below(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let hole = |offset, length| Extent {
            offset,
            length,
            kind: ExtentKind::Hole,
            depth: None,
            host_offset: None,
            compressed: false,
        };
        let Some(backing) = self.backing() else {
            push_extent(out, hole(offset, len));
            return Ok(());
        };
        let end = offset + len;
        let bend = end.min(backing.size());
        if offset < bend {
            for e in block_status_all(&*backing, offset, bend - offset).await? {
                push_extent(out, e.one_layer_down());
            }
        }
        if bend.max(offset) < end {
            push_extent(out, hole(bend.max(offset), end - bend.max(offset)));
        }
        Ok(())
    }

    /// Copies what `[offset, offset + len)` still needs from layers above
    /// `base_depth` (all layers when `None`) into this image, without
    /// returning data: the stream job's primitive. Units already allocated
    /// here are left alone, whoever allocated them; so is everything that
    /// lives in the base or below, or is a hole everywhere. Zeros above the
    /// base become zero units when a base stays below them.
    pub async fn populate(
        &self,
        offset: u64,
        len: u64,
        base_depth: Option<u32>,
    ) -> Result<PopulateOutcome> {
        self.check_writable()?;
        check_range(self.size(), offset, len)?;
        if len == 0 {
            return Ok(PopulateOutcome::default());
        }
        let (s, e) = self.unit_span(offset, len);
        let _guard = self.locks.lock(s, e).await;
        let (outcome, _) = self.populate_locked(s, e, base_depth, false).await?;
        self.stats.add_populated(outcome.copied);
        Ok(outcome)
    }

    /// [`Image::populate`] of the unit-aligned `[start, end)`, range held.
    /// With `keep_data`, also returns where every byte of the range can be
    /// read from now, with the bytes it copied, so a copy-on-read serves its
    /// reader without reading anything twice. A copy-on-read with no base
    /// (`keep_data`, `base_depth` `None`) also makes the units that read as
    /// zeros zero units here, as QEMU's copy-on-read does: the guest's next
    /// read of them is local too.
    async fn populate_locked(
        &self,
        start: u64,
        end: u64,
        base_depth: Option<u32>,
        keep_data: bool,
    ) -> Result<(PopulateOutcome, Vec<Piece>)> {
        // Re-check allocation now that the range is ours.
        let map = format_map(&self.format, start, end - start).await?;
        let mut outcome = PopulateOutcome::default();
        let mut pieces = Vec::new();
        let keep_zeros = keep_data && base_depth.is_none();
        for r in &map {
            if r.mapping != Mapping::Unallocated {
                pieces.push(Piece::Local(r.offset, r.length));
                continue;
            }
            let mut below = Vec::new();
            self.status_below(r.offset, r.length, &mut below).await?;
            for run in self.unit_actions(r.offset, r.end(), &below, base_depth) {
                let (run_start, run_end) = (run.start, run.end);
                let n = run_end - run_start;
                match run.action {
                    UnitAction::Skip if run.all_hole && !keep_zeros => {
                        pieces.push(Piece::Zeros(run_start, n))
                    }
                    UnitAction::Skip if !keep_zeros => pieces.push(Piece::Below(run_start, n)),
                    UnitAction::Skip | UnitAction::Zero => {
                        blocking(&self.format, move |f| {
                            f.write_zeroes(run_start, n, true, true)
                        })
                        .await?;
                        outcome.zeroed += n;
                        pieces.push(Piece::Zeros(run_start, n));
                    }
                    UnitAction::Copy => {
                        // Whole units only: no copy-on-write fill is needed.
                        // Bounded pieces bound the bounce buffer.
                        let step = MAX_COPY_PIECE.next_multiple_of(self.format.granularity());
                        let mut pos = run_start;
                        while pos < run_end {
                            let n = step.min(run_end - pos);
                            let data = Arc::new(self.read_below(pos, n).await?);
                            let d = Arc::clone(&data);
                            blocking(&self.format, move |f| f.write(pos, &d, &[])).await?;
                            outcome.copied += n;
                            if keep_data {
                                pieces.push(Piece::Copied(pos, data));
                            }
                            pos += n;
                        }
                    }
                }
            }
        }
        Ok((outcome, pieces))
    }

    /// Copy-on-read with no base: reads what this layer lacks in `[start,
    /// end)` from below and keeps it, units that read as zeros as zero units
    /// (as [`Image::populate_locked`] does for copy-on-read). One read of the
    /// backing, where populating asks for its block status first: a guest
    /// waiting on remote data pays one round trip, not two. The caller holds
    /// the unit-aligned range.
    async fn fetch_locked(&self, start: u64, end: u64) -> Result<(PopulateOutcome, Vec<Piece>)> {
        let map = format_map(&self.format, start, end - start).await?;
        let g = self.format.granularity();
        let step = MAX_COPY_PIECE.next_multiple_of(g);
        let mut outcome = PopulateOutcome::default();
        let mut pieces = Vec::new();
        for r in &map {
            if r.mapping != Mapping::Unallocated {
                pieces.push(Piece::Local(r.offset, r.length));
                continue;
            }
            let mut pos = r.offset;
            while pos < r.end() {
                let n = step.min(r.end() - pos);
                let data = Arc::new(self.read_below(pos, n).await?);
                let mut done = 0;
                for (a, b) in crate::iobuf::nonzero_runs(&data, g as usize) {
                    if a > done {
                        let (zo, zn) = (pos + done as u64, (a - done) as u64);
                        blocking(&self.format, move |f| f.write_zeroes(zo, zn, true, true)).await?;
                        outcome.zeroed += zn;
                    }
                    let d = Arc::clone(&data);
                    let to = pos + a as u64;
                    blocking(&self.format, move |f| f.write(to, &d[a..b], &[])).await?;
                    outcome.copied += (b - a) as u64;
                    done = b;
                }
                if done < data.len() {
                    let (zo, zn) = (pos + done as u64, (data.len() - done) as u64);
                    blocking(&self.format, move |f| f.write_zeroes(zo, zn, true, true)).await?;
                    outcome.zeroed += zn;
                }
                pieces.push(Piece::Copied(pos, data));
                pos += n;
            }
        }
        Ok((outcome, pieces))
    }

    /// Classifies the units of `[start, end)` (unallocated here) from the
    /// extents below them, merging neighbours with the same action.
    fn unit_actions(
        &self,
        start: u64,
        end: u64,
        below: &[Extent],
        base_depth: Option<u32>,
    ) -> Vec<UnitRun> {
        let g = self.format.granularity();
        let mut runs: Vec<UnitRun> = Vec::new();
        let mut i = 0;
        let mut unit = start;
        while unit < end {
            let unit_end = (unit + g).min(end);
            let (mut copy, mut zero, mut base_data, mut all_hole) = (false, false, false, true);
            while i < below.len() && below[i].end() <= unit {
                i += 1;
            }
            for x in below[i..].iter().take_while(|x| x.offset < unit_end) {
                let above_base = match (x.depth, base_depth) {
                    (None, _) => false,
                    (Some(d), Some(b)) => d < b,
                    (Some(_), None) => true,
                };
                all_hole &= x.kind == ExtentKind::Hole;
                match (x.kind, above_base) {
                    (ExtentKind::Data, true) => copy = true,
                    (ExtentKind::Zero, true) => zero = base_depth.is_some(),
                    (ExtentKind::Data, false) => base_data = true,
                    _ => {}
                }
            }
            let action = if copy || (zero && base_data) {
                UnitAction::Copy
            } else if zero {
                UnitAction::Zero
            } else {
                UnitAction::Skip
            };
            match runs.last_mut() {
                Some(last)
                    if last.action == action && last.all_hole == all_hole && last.end == unit =>
                {
                    last.end = unit_end
                }
                _ => runs.push(UnitRun {
                    action,
                    start: unit,
                    end: unit_end,
                    all_hole,
                }),
            }
            unit = unit_end;
        }
        runs
    }

    /// Copy-on-read of one unallocated run `[offset, offset + len)` of a
    /// guest read whose buffer `buf` starts at `buf_offset`: keeps what it
    /// finds below in this image and fills the buffer from the same bytes.
    async fn copy_on_read_range(
        &self,
        offset: u64,
        len: u64,
        buf: &mut [u8],
        buf_offset: u64,
    ) -> Result<()> {
        let base = match self.cor_base_depth.load(Ordering::SeqCst) {
            NO_BASE => None,
            d => Some(d),
        };
        let (s, e) = self.unit_span(offset, len);
        let pieces = {
            let _guard = self.locks.lock(s, e).await;
            let (outcome, pieces) = if base.is_none() && e - s <= COR_FETCH_MAX {
                self.fetch_locked(s, e).await?
            } else {
                self.populate_locked(s, e, base, true).await?
            };
            self.stats.add_cor(outcome.copied);
            pieces
        };
        let (want_start, want_end) = (offset, offset + len);
        for piece in pieces {
            let (p_start, p_len) = piece.span();
            let a = p_start.max(want_start);
            let b = (p_start + p_len).min(want_end);
            if a >= b {
                continue;
            }
            let dst = &mut buf[(a - buf_offset) as usize..(b - buf_offset) as usize];
            match piece {
                Piece::Zeros(..) => dst.fill(0),
                Piece::Copied(at, data) => {
                    dst.copy_from_slice(&data[(a - at) as usize..(b - at) as usize])
                }
                Piece::Below(..) => dst.copy_from_slice(&self.read_below(a, b - a).await?),
                Piece::Local(..) => {
                    // A guest write won the range meanwhile: read it back.
                    let part = vec![0u8; (b - a) as usize];
                    let (part, left) = format_read(&self.format, a, part).await?;
                    dst.copy_from_slice(&part);
                    self.fill_below(dst, a, left).await?;
                }
            }
        }
        Ok(())
    }

    /// Makes this image independent of everything above `new_backing`: after
    /// flushing every copied byte, rewrites the header's backing link to
    /// `new_backing` (or removes it) in one write, then switches the device
    /// below in memory. The caller has made sure nothing above the new
    /// backing is still remote.
    pub async fn relink(
        &self,
        new_backing: Option<(BackingSpec, Arc<dyn BlockDevice>)>,
    ) -> Result<()> {
        self.check_writable()?;
        let spec = new_backing.as_ref().map(|(s, _)| s.clone());
        blocking(&self.format, move |f| {
            f.flush()?;
            f.set_backing(spec.as_ref())
        })
        .await?;
        *self.backing.write().unwrap_or_else(|e| e.into_inner()) = new_backing.map(|(_, d)| d);
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for Image {
    fn size(&self) -> u64 {
        self.format.virtual_size()
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            format: self.format.format_name().to_string(),
            read_only: self.read_only(),
            layers: 1 + self.backing().map_or(0, |b| b.info().layers),
            granularity: self.format.granularity(),
            can_flush: !self.format.read_only(),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let _req = self.stats.begin(Op::Read, len as u64);
        check_range(self.size(), offset, len as u64)?;
        let (mut buf, holes) = format_read(&self.format, offset, vec![0u8; len]).await?;
        let remote = !holes.is_empty() && self.backing().is_some();
        self.access.guest_read(offset, len as u64, remote);
        if !remote {
            return Ok(buf);
        }
        if !self.copy_on_read() || self.read_only() {
            self.fill_below(&mut buf, offset, holes).await?;
            return Ok(buf);
        }
        for (hoff, hlen) in holes {
            self.copy_on_read_range(hoff, hlen, &mut buf, offset)
                .await?;
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let _req = self.stats.begin(Op::Write, data.len() as u64);
        self.check_writable()?;
        check_range(self.size(), offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let (s, e) = self.unit_span(offset, data.len() as u64);
        let _guard = self.locks.lock(s, e).await;
        self.write_locked(offset, data, flags.fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _req = self.stats.begin(Op::Other, 0);
        self.check_writable()?;
        check_range(self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (s, e) = self.unit_span(offset, len);
        let _guard = self.locks.lock(s, e).await;
        let (head, mid, tail) = self.split_units(offset, len);
        for (o, n) in [head, tail] {
            if n > 0 {
                self.write_locked(o, Bytes::from(vec![0u8; n as usize]), false)
                    .await?;
            }
        }
        if mid.1 > 0 {
            let has_backing = self.backing().is_some();
            self.writing(mid.1, move |f| {
                f.write_zeroes(mid.0, mid.1, may_unmap, has_backing)
            })
            .await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _req = self.stats.begin(Op::Other, 0);
        self.check_writable()?;
        check_range(self.size(), offset, len)?;
        // Partial units keep their content: discard is only a hint.
        let (_, mid, _) = self.split_units(offset, len);
        if mid.1 == 0 {
            return Ok(());
        }
        let _guard = self.locks.lock(mid.0, mid.0 + mid.1).await;
        let has_backing = self.backing().is_some();
        self.writing(mid.1, move |f| f.discard(mid.0, mid.1, has_backing))
            .await
    }

    async fn flush(&self) -> Result<()> {
        let _req = self.stats.begin(Op::Other, 0);
        if self.format.read_only() {
            return Ok(());
        }
        blocking(&self.format, |f| f.flush()).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size(), offset, len)?;
        let map = blocking(&self.format, move |f| f.map_holes(offset, len)).await?;
        let mut out = Vec::new();
        let has_backing = self.backing().is_some();
        for (r, hole_offset) in map {
            let e = |kind, depth, host_offset, compressed| Extent {
                offset: r.offset,
                length: r.length,
                kind,
                depth,
                host_offset,
                compressed,
            };
            match r.mapping {
                Mapping::Data { host_offset } => push_extent(
                    &mut out,
                    e(ExtentKind::Data, Some(0), Some(host_offset), false),
                ),
                Mapping::Compressed => {
                    push_extent(&mut out, e(ExtentKind::Data, Some(0), None, true))
                }
                Mapping::Zero { host_offset } => {
                    push_extent(&mut out, e(ExtentKind::Zero, Some(0), host_offset, false))
                }
                // With nothing below, a range that still has a place in this
                // file reports it, as qemu-img map does.
                Mapping::Unallocated if !has_backing && hole_offset.is_some() => {
                    push_extent(&mut out, e(ExtentKind::Hole, None, hole_offset, false))
                }
                Mapping::Unallocated => self.status_below(r.offset, r.length, &mut out).await?,
            }
        }
        Ok(out)
    }

    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::SeqCst)
            && let Err(e) = self.format.close()
        {
            eprintln!("diskstream: closing {}: {e}", self.name);
        }
    }
}
