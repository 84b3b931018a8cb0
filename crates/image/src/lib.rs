//! Block devices and on-disk image formats.
//!
//! Layers, bottom to top: [`storage`] (positional blocking file I/O, cache
//! modes), format engines ([`raw`], [`qcow2`], [`qed`]) implementing
//! [`format::Format`], [`image::Image`] which stacks a format on its backing
//! chain and implements [`device::BlockDevice`], and [`open`](mod@open), the one entry
//! point that opens or creates any image. Nothing here knows the network:
//! URI backings come in through [`open::Opener`].

pub mod access;
pub mod device;
pub mod error;
pub mod format;
pub mod identity;
pub mod image;
pub mod iobuf;
pub mod lane;
pub mod lock;
pub mod open;
pub mod qcow2;
pub mod qed;
pub mod rangelock;
pub mod raw;
pub mod stats;
pub mod storage;
pub mod testing;
pub mod tracking;

pub use device::{BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags};
pub use error::{Error, ErrorKind, Result};
pub use format::{BackingSpec, Format};
pub use image::Image;
pub use open::{CreateOptions, FormatKind, OpenOptions, create, open};
pub use storage::CacheMode;
