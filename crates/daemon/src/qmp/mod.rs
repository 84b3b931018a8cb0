//! QMP, the QEMU Machine Protocol, as QEMU speaks it.
//!
//! Three layers, as in mini-redis: [`codec`] turns bytes into requests and
//! replies/events into bytes with no I/O (it tells an incomplete message from
//! an invalid one), [`args`] checks a command's arguments the way QEMU's QAPI
//! visitor does (missing, wrong type, unexpected), and [`error`] holds the
//! error classes. The connection and dispatcher live in [`crate::server`];
//! [`client`] is the small client the CLI uses.

pub mod args;
pub mod client;
pub mod codec;
pub mod error;

pub use error::{ErrorClass, QmpError};

/// The QEMU release whose QMP this daemon follows (names, arguments, events).
pub const QEMU_VERSION: (u64, u64, u64) = (10, 0, 2);

/// The downstream extension prefix (QMP's `__RFQDN_` convention).
pub const EXT_PREFIX: &str = "__com.diskstream_";
