//! The one trait: everything that holds blocks is a [`BlockDevice`].
//!
//! An image file, a backing chain, an NBD export seen from the client side, an
//! HTTP URL and the copy-on-read overlay all implement it. The trait is async,
//! object-safe and takes owned buffers, so an implementation can hand the I/O
//! to a blocking thread (or a socket task) without borrowing from its caller.
//!
//! Block status is what makes everything cheap: it says, per extent, whether
//! the range reads as data or zeros and *which layer* of a chain holds it.
//! Layers are numbered from the top, `0` = this device; `None` means the range
//! is allocated nowhere in the chain. The two outside conventions (qemu-img
//! map's `depth`, NBD's `qemu:allocation-depth`) are derived from that in
//! [`Extent::qemu_map_depth`] and [`Extent::nbd_allocation_depth`].

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::Result;

/// What a range reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Allocated, reads as whatever was written.
    Data,
    /// Allocated (or a raw hole), known to read as zeros.
    Zero,
    /// Allocated in no layer of the chain: reads as zeros.
    Hole,
}

/// One run of block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes, never zero.
    pub length: u64,
    pub kind: ExtentKind,
    /// The layer that holds the range, 0 = this device, 1 = its backing ...;
    /// `None` for [`ExtentKind::Hole`].
    pub depth: Option<u32>,
    /// Where the bytes are inside that layer's file, when it is a file whose
    /// data is stored uncompressed (what `qemu-img map` prints as `offset`).
    pub host_offset: Option<u64>,
    /// The range is stored compressed.
    pub compressed: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// `depth` as `qemu-img map` reports it: an unallocated range reports the
    /// depth of the bottom layer (`chain_layers - 1`).
    pub fn qemu_map_depth(&self, chain_layers: u32) -> u32 {
        self.depth.unwrap_or(chain_layers.saturating_sub(1))
    }

    /// `qemu:allocation-depth` as NBD reports it: 0 = unallocated, 1 = top.
    pub fn nbd_allocation_depth(&self) -> u32 {
        self.depth.map_or(0, |d| d + 1)
    }

    /// The same extent seen from one layer further up the chain.
    pub fn one_layer_down(mut self) -> Self {
        self.depth = self.depth.map(|d| d + 1);
        self
    }

    /// Whether two extents can be merged into one run.
    pub fn continues(&self, next: &Extent) -> bool {
        self.end() == next.offset
            && self.kind == next.kind
            && self.depth == next.depth
            && self.compressed == next.compressed
            && match (self.host_offset, next.host_offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Appends `e` to `out`, merging it with the last extent where possible.
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.continues(&e)
    {
        last.length += e.length;
        return;
    }
    out.push(e);
}

/// Static facts about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// A short description for messages: a path, a URI.
    pub name: String,
    /// `qcow2`, `raw`, `nbd`, `overlay` ...
    pub format: String,
    pub read_only: bool,
    /// Number of layers in the chain this device presents (1 for a lone image).
    pub layers: u32,
    /// Allocation granularity in bytes (cluster or sub-cluster size; 512 for
    /// raw). Block status never reports a finer split than this.
    pub granularity: u64,
    /// Whether flush (and FUA) do anything: false for read-only devices.
    pub can_flush: bool,
}

/// Flags for [`BlockDevice::write`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
}

/// A device of blocks. All offsets and lengths are in bytes; requests beyond
/// [`BlockDevice::size`] fail with [`crate::ErrorKind::OutOfRange`].
///
/// `Any` is a supertrait so a chain walker can recognise its own layers
/// (`(&*dev as &dyn Any).downcast_ref::<Image>()`).
#[async_trait]
pub trait BlockDevice: std::any::Any + Send + Sync + Debug {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    fn info(&self) -> DeviceInfo;

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// Writes `data` at `offset`.
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()>;

    /// Makes the range read as zeros. `may_unmap` allows deallocating the
    /// space; an image with a backing never lets backing data show through.
    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;

    /// Hints that the range is no longer needed. After a discard the range
    /// reads as zeros or keeps its old content; never as older backing data.
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Allocation status of `[offset, offset + len)`: extents in order, covering
    /// a prefix of the range (at least one byte when `len > 0`); callers loop.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// The device directly below this one in its chain, if it has one.
    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
}

/// The layers of a chain from the top: `chain[0]` is `top`, `chain[d]` the
/// device at depth `d`.
pub fn chain(top: Arc<dyn BlockDevice>) -> Vec<Arc<dyn BlockDevice>> {
    let mut out = vec![top];
    while let Some(next) = out.last().and_then(|d| d.backing_device()) {
        out.push(next);
    }
    out
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange { offset, len, size }),
    }
}

/// Collects the full block status of `[offset, offset + len)`, looping over
/// partial answers.
pub async fn block_status_all(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let part = dev.block_status(pos, end - pos).await?;
        let Some(last) = part.last() else {
            return Err(crate::Error::Internal(format!(
                "{}: block status at {pos} returned no extent",
                dev.info().name
            )));
        };
        let next = last.end().min(end);
        if next <= pos {
            return Err(crate::Error::Internal(format!(
                "{}: block status at {pos} did not advance",
                dev.info().name
            )));
        }
        for mut e in part {
            if e.end() > end {
                e.length = end - e.offset;
            }
            push_extent(&mut out, e);
        }
        pos = next;
    }
    Ok(out)
}
