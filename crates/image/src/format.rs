//! The contract between an on-disk format engine and the layer above it.
//!
//! A [`Format`] knows one image file and nothing else: not its backing, not
//! the async runtime, not the network. Its methods block and are called from
//! blocking threads. The one decision to know: where a write only partly
//! covers an allocation unit (a cluster, or a sub-cluster with extended L2)
//! that is not allocated in this file, the format needs the rest of that unit
//! from below. It does not fetch it; [`crate::image::Image`] reads the backing
//! first and hands the bytes in as [`CowFill`]s. Copy-on-write, copy-on-read,
//! streaming and block status all go through the same [`Format::map`] lookup.

use std::fmt::Debug;
use std::sync::Arc;

use crate::Result;
use crate::storage::Storage;

/// Where one range of guest data lives in this file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Stored uncompressed at `host_offset` (of the range's first byte).
    Data { host_offset: u64 },
    /// Stored compressed; read it through [`Format::read`].
    Compressed,
    /// Allocated in this layer as zeros (a zero cluster, a raw hole).
    /// `host_offset` is where the range sits in the file when it has a place
    /// there (a raw hole; a qcow2 zero cluster that keeps its allocation),
    /// as qemu-img map reports it.
    Zero { host_offset: Option<u64> },
    /// Not allocated in this layer: the backing (or zeros) shows through.
    Unallocated,
}

/// A run of guest bytes with one [`Mapping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRange {
    pub offset: u64,
    pub length: u64,
    pub mapping: Mapping,
}

impl MappedRange {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Backing data for an allocation unit that a write covers only in part.
#[derive(Clone, Copy, Debug)]
pub struct CowFill<'a> {
    /// Start of the unit (a multiple of [`Format::granularity`]).
    pub offset: u64,
    /// The unit's content below this layer: `granularity` bytes, or fewer for
    /// the last unit of an image whose size is not a multiple of it.
    pub data: &'a [u8],
}

/// Name and format of a backing file as recorded in an image header.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackingSpec {
    /// The name exactly as stored: a path (maybe relative) or a URI.
    pub name: String,
    /// `qcow2`, `raw`, `qed` ...; `None` when the header does not say.
    pub format: Option<String>,
}

/// How `check` may repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    Leaks,
    All,
}

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u64,
    pub vm_clock_nsec: u64,
    /// `None` where the snapshot records none (qemu: -1 or no field).
    pub icount: Option<u64>,
}

/// The result of a consistency check, with qemu-img's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: Option<u64>,
    pub total_clusters: Option<u64>,
    pub allocated_clusters: Option<u64>,
    pub fragmented_clusters: Option<u64>,
    pub compressed_clusters: Option<u64>,
    /// One line per problem found, for humans.
    #[serde(skip)]
    pub messages: Vec<String>,
}

/// An open image file of one format.
pub trait Format: Send + Sync + Debug {
    /// `qcow2`, `raw`, `qed`.
    fn format_name(&self) -> &'static str;

    fn virtual_size(&self) -> u64;

    /// Allocation unit in bytes: a power of two, the cluster (or sub-cluster)
    /// size, 512 for raw.
    fn granularity(&self) -> u64;

    fn read_only(&self) -> bool;

    /// The backing named by the header.
    fn backing(&self) -> Option<BackingSpec>;

    fn storage(&self) -> &Arc<dyn Storage>;

    /// The identity of a remote backing recorded in the image itself (JSON
    /// of [`crate::identity::BackingIdentity`]), for formats that have a
    /// place for it (qcow2: a header extension). `None` otherwise; then
    /// [`crate::open()`] looks for the sidecar file.
    fn recorded_backing_identity(&self) -> Option<Vec<u8>> {
        None
    }

    /// The mapping of `[offset, offset + len)`: ranges in order, covering it
    /// exactly, adjacent ranges with the same mapping merged.
    fn map(&self, offset: u64, len: u64) -> Result<Vec<MappedRange>>;

    /// [`Format::map`], with the place each `Unallocated` range still has
    /// in this file, if any (an unallocated subcluster of an allocated
    /// qcow2 cluster): `qemu-img map` prints it as the offset of a range
    /// that nothing below holds. Adjacent unallocated ranges are merged only
    /// when those places are contiguous.
    fn map_holes(&self, offset: u64, len: u64) -> Result<Vec<(MappedRange, Option<u64>)>> {
        Ok(self
            .map(offset, len)?
            .into_iter()
            .map(|r| (r, None))
            .collect())
    }

    /// Reads what this layer holds into `buf` (data, zeros, decompressed
    /// data) and returns the sub-ranges `(offset, len)` that are
    /// [`Mapping::Unallocated`], left untouched for the caller to fill.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<(u64, u64)>>;

    /// [`Format::read`] if it can finish without blocking: the metadata it
    /// needs is in memory and no other thread holds it, and the data is in
    /// the page cache ([`Storage::read_at_nowait`]). `None` means it would
    /// block, or has something to report that the slow path words better:
    /// call `read` from a blocking thread. It changes nothing either way
    /// (`buf` may hold partial data after `None`).
    fn try_read_nowait(&self, _offset: u64, _buf: &mut [u8]) -> Option<Result<Vec<(u64, u64)>>> {
        None
    }

    /// [`Format::map`] if it can be answered from memory without waiting
    /// for a lock; `None` otherwise.
    fn map_nowait(&self, _offset: u64, _len: u64) -> Option<Vec<MappedRange>> {
        None
    }

    /// Writes `data` at `offset`. For each unit the write covers only in part
    /// and that is unallocated here, `fill` holds the unit's content from
    /// below; a missing fill means zeros (no backing).
    fn write(&self, offset: u64, data: &[u8], fill: &[CowFill<'_>]) -> Result<()>;

    /// Makes whole units read as zeros. `offset` and `len` are multiples of
    /// the granularity (`len` may end at the virtual size). With `unmap` the
    /// space may be freed. `has_backing`: something below could show through,
    /// so the units must become zero units (or written zeros), never holes.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, has_backing: bool) -> Result<()>;

    /// Frees whole units (aligned as for `write_zeroes`). With `has_backing`
    /// they become zero units where the format has them, and are left as
    /// they are where it has not; without, they become unallocated.
    fn discard(&self, offset: u64, len: u64, has_backing: bool) -> Result<()>;

    /// Makes every completed write and the metadata that points at it durable.
    fn flush(&self) -> Result<()>;

    /// Rewrites the backing link (to `backing`, or none) in one header write,
    /// after flushing everything before it.
    fn set_backing(&self, backing: Option<&BackingSpec>) -> Result<()>;

    /// Guest bytes allocated in this layer (data, compressed and zero units).
    fn allocated_bytes(&self) -> Result<u64>;

    /// Bytes of the file on disk.
    fn disk_size(&self) -> Result<u64> {
        self.storage()
            .len()
            .map_err(|e| crate::Error::io(self.storage().path(), "stat", e))
    }

    /// Checks (and with `repair`, repairs) metadata consistency.
    fn check(&self, repair: Option<Repair>) -> Result<CheckReport>;

    /// The `format-specific` object of `info --output json`, as qemu-img
    /// prints it (`{"type": "qcow2", "data": {...}}`), or `None`.
    fn format_specific(&self) -> Option<serde_json::Value>;

    /// The internal snapshots of the image (qcow2), oldest first.
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }

    /// Flushes and marks the image clean (clears dirty / need-check flags).
    /// Called once when the image is closed; later calls do nothing.
    fn close(&self) -> Result<()>;
}

/// The check every format engine makes before changing its file: opened
/// writable, and not closed yet.
pub(crate) fn ensure_writable(
    path: &std::path::Path,
    writable: bool,
    closed: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    if !writable {
        return Err(crate::Error::ReadOnly {
            name: path.display().to_string(),
        });
    }
    if closed.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(crate::Error::InvalidInput(format!(
            "{}: image is closed",
            path.display()
        )));
    }
    Ok(())
}
