//! HTTP(S) range-read source: a remote file as a read-only block device.
//!
//! [`source::HttpSource`] does the protocol work (HEAD for size and
//! validators, conditional range GETs on a reused connection pool, retries
//! with backoff inside a bounded window). [`device::HttpDevice`] presents a
//! raw file as a [`image::BlockDevice`]; [`device::HttpStorage`] lets any
//! format engine (qcow2) run over the remote file. [`opener::HttpOpener`]
//! plugs `http://` / `https://` backing names into [`image::open()`].
//!
//! This crate knows nothing of the daemon or the stream job (DESIGN.md
//! boundaries); [`testing`] starts a real nginx for tests of any crate.

pub mod device;
pub mod opener;
pub mod source;
pub mod testing;

pub use device::{HttpDevice, HttpStorage};
pub use opener::HttpOpener;
pub use source::{HttpError, HttpOptions, HttpSource, is_http_url};
