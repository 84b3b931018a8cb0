//! Jobs: QEMU's job state machine ([`state`]) and the block-stream job the
//! daemon core runs on top of the stream engine ([`stream_job`]).

pub mod state;
pub mod stream_job;

pub use state::{JobStatus, JobVerb};
