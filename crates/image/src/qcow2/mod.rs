//! qcow2 (QEMU copy-on-write v2/v3). Placeholder API: the engine is being written.

use std::sync::Arc;

use crate::format::BackingSpec;
use crate::storage::Storage;
use crate::{Error, Result};

/// "QFI\xfb"
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    pub writable: bool,
    pub cache_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: Option<u64>,
    pub backing: Option<BackingSpec>,
}

#[derive(Debug)]
pub enum Qcow2 {}

impl Qcow2 {
    pub fn open(storage: Arc<dyn Storage>, _opts: &Qcow2Options) -> Result<Self> {
        Err(Error::Unsupported {
            path: storage.path().to_owned(),
            format: "qcow2",
            feature: "not implemented yet".into(),
        })
    }
}

pub fn create(storage: &dyn Storage, _opts: &CreateOptions) -> Result<()> {
    Err(Error::Unsupported {
        path: storage.path().to_owned(),
        format: "qcow2",
        feature: "not implemented yet".into(),
    })
}

impl crate::format::Format for Qcow2 {
    fn format_name(&self) -> &'static str {
        match *self {}
    }
    fn virtual_size(&self) -> u64 {
        match *self {}
    }
    fn granularity(&self) -> u64 {
        match *self {}
    }
    fn read_only(&self) -> bool {
        match *self {}
    }
    fn backing(&self) -> Option<BackingSpec> {
        match *self {}
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        match *self {}
    }
    fn map(&self, _: u64, _: u64) -> Result<Vec<crate::format::MappedRange>> {
        match *self {}
    }
    fn read(&self, _: u64, _: &mut [u8]) -> Result<Vec<(u64, u64)>> {
        match *self {}
    }
    fn write(&self, _: u64, _: &[u8], _: &[crate::format::CowFill<'_>]) -> Result<()> {
        match *self {}
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<()> {
        match *self {}
    }
    fn discard(&self, _: u64, _: u64, _: bool) -> Result<()> {
        match *self {}
    }
    fn flush(&self) -> Result<()> {
        match *self {}
    }
    fn set_backing(&self, _: Option<&BackingSpec>) -> Result<()> {
        match *self {}
    }
    fn allocated_bytes(&self) -> Result<u64> {
        match *self {}
    }
    fn check(&self, _: Option<crate::format::Repair>) -> Result<crate::format::CheckReport> {
        match *self {}
    }
    fn format_specific(&self) -> Option<serde_json::Value> {
        match *self {}
    }
    fn close(&self) -> Result<()> {
        match *self {}
    }
}
