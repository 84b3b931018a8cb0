//! The two faces of an [`HttpSource`]: a raw read-only [`BlockDevice`], and a
//! read-only [`Storage`] that any format engine can run over.
//!
//! A raw backing is the source itself ([`HttpDevice`]): async reads straight
//! to range requests, block status "all data, at this device". A qcow2
//! backing is the qcow2 engine over [`HttpStorage`]: the engine reads its own
//! header, L1 and L2 tables through ranges like any other data. Storage is
//! blocking by contract (engines run on tokio's blocking pool), so
//! `HttpStorage` waits for the async request with `Handle::block_on` on the
//! runtime it was created on; it must never be called from an async task.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use image::device::check_range;
use image::storage::Storage;
use image::{BlockDevice, DeviceInfo, Error, Extent, ExtentKind, Result, WriteFlags};

use crate::source::{HttpError, HttpSource};

/// A remote raw file as a read-only block device.
#[derive(Debug)]
pub struct HttpDevice {
    source: Arc<HttpSource>,
}

impl HttpDevice {
    pub fn new(source: Arc<HttpSource>) -> Self {
        HttpDevice { source }
    }

    pub fn source(&self) -> &Arc<HttpSource> {
        &self.source
    }

    fn read_only(&self) -> Error {
        Error::ReadOnly {
            name: self.source.name().to_string(),
        }
    }
}

#[async_trait]
impl BlockDevice for HttpDevice {
    fn size(&self) -> u64 {
        self.source.size()
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.source.name().to_string(),
            format: "raw".into(),
            read_only: true,
            layers: 1,
            granularity: 512,
            can_flush: false,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        check_range(self.size(), offset, len as u64)?;
        Ok(self.source.read(offset, len).await?)
    }

    async fn write(&self, _offset: u64, _data: Bytes, _flags: WriteFlags) -> Result<()> {
        Err(self.read_only())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(self.read_only())
    }

    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(self.read_only())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// A raw remote file: everything is data held by this device (HTTP has
    /// no way to ask for holes).
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size(), offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            length: len,
            kind: ExtentKind::Data,
            depth: Some(0),
            host_offset: None,
            compressed: false,
        }])
    }
}

/// A remote file as read-only blocking [`Storage`] for a format engine.
#[derive(Debug)]
pub struct HttpStorage {
    source: Arc<HttpSource>,
    runtime: tokio::runtime::Handle,
    path: PathBuf,
}

impl HttpStorage {
    /// Must be called inside a tokio runtime, which serves the requests.
    pub fn new(source: Arc<HttpSource>) -> Self {
        HttpStorage {
            path: PathBuf::from(source.name()),
            source,
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

fn read_only_err() -> io::Error {
    io::Error::new(
        io::ErrorKind::ReadOnlyFilesystem,
        "an HTTP backing is read-only",
    )
}

impl Storage for HttpStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Bytes past the end read as zeros (the Storage contract).
        let size = self.source.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        let data = self
            .runtime
            .block_on(self.source.read(offset, inside))
            .map_err(|e| match e {
                // Past the retry window: the engine above reports the
                // outage (a stream pauses), not a plain I/O error.
                HttpError::Unavailable { .. } => image::error::unavailable_io(e.to_string()),
                e => io::Error::other(e),
            })?;
        buf[..inside].copy_from_slice(&data);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only_err())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.source.size())
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only_err())
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only_err())
    }

    fn path(&self) -> &Path {
        &self.path
    }
}
