//! The raw format: guest offset = file offset.
//!
//! Block status comes from `SEEK_DATA` / `SEEK_HOLE`: a hole reads as zeros
//! and is reported as allocated zeros (`present: true, zero: true` in
//! qemu-img map), since a raw file has no layer below it.

use std::sync::Arc;

use crate::format::{BackingSpec, CheckReport, CowFill, Format, MappedRange, Mapping, Repair};
use crate::storage::Storage;
use crate::{Error, Result};

/// Granularity reported for raw files (the sector size).
const RAW_GRANULARITY: u64 = 512;

#[derive(Debug)]
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: u64,
    writable: bool,
}

/// Creates a raw image of `size` bytes (sparse).
pub fn create(storage: &dyn Storage, size: u64) -> Result<()> {
    storage
        .set_len(size)
        .map_err(|e| Error::io(storage.path(), "set size", e))
}

impl Raw {
    pub fn open(storage: Arc<dyn Storage>, writable: bool) -> Result<Self> {
        // Whole sectors, as QEMU counts them: a 1000-byte file is a
        // 1024-byte device whose tail reads as zeros.
        let size = storage
            .len()
            .map_err(|e| Error::io(storage.path(), "stat", e))?
            .next_multiple_of(RAW_GRANULARITY);
        Ok(Raw {
            storage,
            size,
            writable,
        })
    }

    fn io(&self, op: &'static str, e: std::io::Error) -> Error {
        Error::io(self.storage.path(), op, e)
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                name: self.storage.path().display().to_string(),
            })
        }
    }
}

impl Format for Raw {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        RAW_GRANULARITY
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    fn backing(&self) -> Option<BackingSpec> {
        None
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<MappedRange>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = self
                .storage
                .next_data(pos)
                .map_err(|e| self.io("seek data", e))?
                .unwrap_or(end)
                .min(end);
            if data > pos {
                out.push(MappedRange {
                    offset: pos,
                    length: data - pos,
                    mapping: Mapping::Zero {
                        host_offset: Some(pos),
                    },
                });
                pos = data;
                continue;
            }
            let hole = self
                .storage
                .next_hole(pos)
                .map_err(|e| self.io("seek hole", e))?
                .clamp(pos + 1, end);
            out.push(MappedRange {
                offset: pos,
                length: hole - pos,
                mapping: Mapping::Data { host_offset: pos },
            });
            pos = hole;
        }
        Ok(out)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<(u64, u64)>> {
        self.storage
            .read_at(buf, offset)
            .map_err(|e| self.io("read", e))?;
        Ok(Vec::new())
    }

    fn try_read_nowait(&self, offset: u64, buf: &mut [u8]) -> Option<Result<Vec<(u64, u64)>>> {
        match self.storage.read_at_nowait(buf, offset) {
            Ok(true) => Some(Ok(Vec::new())),
            Ok(false) => None,
            Err(e) => Some(Err(self.io("read", e))),
        }
    }

    fn write(&self, offset: u64, data: &[u8], _fill: &[CowFill<'_>]) -> Result<()> {
        self.ensure_writable()?;
        self.storage
            .write_at(data, offset)
            .map_err(|e| self.io("write", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, _has_backing: bool) -> Result<()> {
        self.ensure_writable()?;
        let r = if unmap {
            self.storage.punch_hole(offset, len)
        } else {
            crate::storage::write_zeros(&*self.storage, offset, len)
        };
        r.map_err(|e| self.io("write zeroes", e))
    }

    fn discard(&self, offset: u64, len: u64, _has_backing: bool) -> Result<()> {
        self.ensure_writable()?;
        self.storage
            .punch_hole(offset, len)
            .map_err(|e| self.io("discard", e))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.storage.flush().map_err(|e| self.io("flush", e))
    }

    fn set_backing(&self, backing: Option<&BackingSpec>) -> Result<()> {
        match backing {
            None => Ok(()),
            Some(_) => Err(Error::InvalidInput(format!(
                "{}: raw images cannot have a backing file",
                self.storage.path().display()
            ))),
        }
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self
            .map(0, self.size)?
            .iter()
            .filter(|r| matches!(r.mapping, Mapping::Data { .. }))
            .map(|r| r.length)
            .sum())
    }

    fn check(&self, _repair: Option<Repair>) -> Result<CheckReport> {
        Err(Error::Unsupported {
            path: self.storage.path().to_owned(),
            format: "raw",
            feature: "checks (the raw format has no metadata)".into(),
        })
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }

    fn close(&self) -> Result<()> {
        self.flush()
    }
}
