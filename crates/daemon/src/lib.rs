//! The diskstream daemon: a QMP control socket compatible with QEMU's, a
//! job manager with QEMU's job state machine, and block nodes opened by
//! `blockdev-add`.
//!
//! The one decision to know: state has one owner. [`core::Core`] is a task
//! that owns every node and job; QMP connections ([`server`]) send it
//! requests carrying a reply channel and get events from a broadcast. The
//! stream engine (crate `stream`) does the copying; this crate only drives
//! it and reports it the way QEMU reports a `block-stream` job.
//! NBD exports ([`export`]) are the core's third owned table, served by the
//! `nbd` crate's server.

pub mod core;
pub mod export;
pub mod fuzzing;
pub mod job;
pub mod qmp;
pub mod server;

pub use core::{Core, Handle};

/// What `query-version` and the greeting call this build.
pub fn package() -> String {
    format!("diskstream-{}", env!("CARGO_PKG_VERSION"))
}
