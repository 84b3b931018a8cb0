//! [`Image`]: one format engine plus its backing chain, as a [`BlockDevice`].
//!
//! This is where layers meet: reads fill what the top file does not hold from
//! the backing (zeros past a shorter backing); writes that cover an
//! unallocated unit only in part read that unit from the backing first
//! (copy-on-write); write-zeroes and discard never uncover backing data; block
//! status walks down the chain. Every request that can change allocation
//! holds its unit-aligned range in [`RangeLocks`] from the allocation lookup
//! to the metadata update, so concurrent requests on one unit never lose an
//! update. File I/O runs on tokio's blocking pool; the format engine never
//! sees the async runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{
    BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags, check_range, push_extent,
};
use crate::format::{BackingSpec, CowFill, Format, Mapping};
use crate::rangelock::RangeLocks;
use crate::{Error, Result};

/// An open image: a format engine and, optionally, the device below it.
#[derive(Debug)]
pub struct Image {
    format: Arc<dyn Format>,
    backing: Option<Arc<dyn BlockDevice>>,
    locks: RangeLocks,
    name: String,
    closed: AtomicBool,
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

impl Image {
    /// Puts `format` on top of `backing`.
    pub fn new(format: Arc<dyn Format>, backing: Option<Arc<dyn BlockDevice>>) -> Self {
        let name = format.storage().path().display().to_string();
        Image {
            format,
            backing,
            locks: RangeLocks::new(),
            name,
            closed: AtomicBool::new(false),
        }
    }

    pub fn format(&self) -> &Arc<dyn Format> {
        &self.format
    }

    pub fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.backing.as_ref()
    }

    /// The backing named by the image header.
    pub fn backing_spec(&self) -> Option<BackingSpec> {
        self.format.backing()
    }

    pub fn locks(&self) -> &RangeLocks {
        &self.locks
    }

    /// Flushes and marks the image clean. Further I/O is refused.
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        blocking(&self.format, |f| f.close()).await
    }

    fn check_writable(&self) -> Result<()> {
        if self.format.read_only() {
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
    /// zeros past its end, or zeros without one.
    async fn read_below(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let Some(backing) = &self.backing else {
            return Ok(vec![0; len as usize]);
        };
        let bsize = backing.size();
        if offset >= bsize {
            return Ok(vec![0; len as usize]);
        }
        let n = len.min(bsize - offset);
        let mut data = backing.read(offset, n as usize).await?;
        data.resize(len as usize, 0);
        Ok(data)
    }

    /// The units that `[offset, end)` covers only in part and that are not
    /// allocated in this file, with their content from below.
    async fn cow_fills(&self, offset: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if self.backing.is_none() {
            return Ok(Vec::new());
        }
        let g = self.format.granularity();
        let size = self.size();
        let mut units = Vec::new();
        if offset % g != 0 {
            units.push(offset - offset % g);
        }
        if end % g != 0 && end < size {
            let u = end - end % g;
            if units.last() != Some(&u) {
                units.push(u);
            }
        }
        let mut fills = Vec::new();
        for u in units {
            let ulen = g.min(size - u);
            let map = blocking(&self.format, move |f| f.map(u, ulen)).await?;
            if map.iter().any(|r| r.mapping == Mapping::Unallocated) {
                fills.push((u, self.read_below(u, ulen).await?));
            }
        }
        Ok(fills)
    }

    /// Writes zeros through the normal write path (for partial units).
    async fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let fills = self.cow_fills(offset, offset + len).await?;
        blocking(&self.format, move |f| {
            let zeros = vec![0u8; len as usize];
            let fills: Vec<CowFill<'_>> = fills
                .iter()
                .map(|(o, d)| CowFill {
                    offset: *o,
                    data: d,
                })
                .collect();
            f.write(offset, &zeros, &fills)
        })
        .await
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
            read_only: self.format.read_only(),
            layers: 1 + self.backing.as_ref().map_or(0, |b| b.info().layers),
            granularity: self.format.granularity(),
            can_flush: !self.format.read_only(),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        check_range(self.size(), offset, len as u64)?;
        let (mut buf, holes) = blocking(&self.format, move |f| {
            let mut buf = vec![0u8; len];
            let holes = f.read(offset, &mut buf)?;
            Ok((buf, holes))
        })
        .await?;
        if self.backing.is_some() {
            for (hoff, hlen) in holes {
                let data = self.read_below(hoff, hlen).await?;
                let at = (hoff - offset) as usize;
                buf[at..at + hlen as usize].copy_from_slice(&data);
            }
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.check_writable()?;
        check_range(self.size(), offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let (s, e) = self.unit_span(offset, data.len() as u64);
        let _guard = self.locks.lock(s, e).await;
        let fills = self.cow_fills(offset, end).await?;
        blocking(&self.format, move |f| {
            let fills: Vec<CowFill<'_>> = fills
                .iter()
                .map(|(o, d)| CowFill {
                    offset: *o,
                    data: d,
                })
                .collect();
            f.write(offset, &data, &fills)?;
            if flags.fua { f.flush() } else { Ok(()) }
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (s, e) = self.unit_span(offset, len);
        let _guard = self.locks.lock(s, e).await;
        let (head, mid, tail) = self.split_units(offset, len);
        self.write_zero_bytes(head.0, head.1).await?;
        if mid.1 > 0 {
            let has_backing = self.backing.is_some();
            blocking(&self.format, move |f| {
                f.write_zeroes(mid.0, mid.1, may_unmap, has_backing)
            })
            .await?;
        }
        self.write_zero_bytes(tail.0, tail.1).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.size(), offset, len)?;
        // Partial units keep their content: discard is only a hint.
        let (_, mid, _) = self.split_units(offset, len);
        if mid.1 == 0 {
            return Ok(());
        }
        let _guard = self.locks.lock(mid.0, mid.0 + mid.1).await;
        let has_backing = self.backing.is_some();
        blocking(&self.format, move |f| f.discard(mid.0, mid.1, has_backing)).await
    }

    async fn flush(&self) -> Result<()> {
        if self.format.read_only() {
            return Ok(());
        }
        blocking(&self.format, |f| f.flush()).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size(), offset, len)?;
        let map = blocking(&self.format, move |f| f.map(offset, len)).await?;
        let mut out = Vec::new();
        for r in map {
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
                Mapping::Unallocated => self.status_below(r.offset, r.length, &mut out).await?,
            }
        }
        Ok(out)
    }
}

impl Image {
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
        let Some(backing) = &self.backing else {
            push_extent(out, hole(offset, len));
            return Ok(());
        };
        let end = offset + len;
        let bend = end.min(backing.size());
        if offset < bend {
            for e in crate::device::block_status_all(&**backing, offset, bend - offset).await? {
                push_extent(out, e.one_layer_down());
            }
        }
        if bend.max(offset) < end {
            push_extent(out, hole(bend.max(offset), end - bend.max(offset)));
        }
        Ok(())
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
