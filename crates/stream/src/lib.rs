//! Stream jobs: pull an overlay's data from its backing chain into the top
//! image until it no longer needs the backing, then drop (or move) the link.
//!
//! Two modes, as the original libvirt proposal had them: [`StreamJob`] streams
//! the whole device in the background with several copies in flight, under
//! pause / resume / cancel / set-speed control; [`step`] copies the next unit
//! at or after an offset and returns the offset after it, for a management
//! loop that drives streaming itself. Both rest on the image's allocation map
//! as the only progress record ([`image::Image::populate`] re-checks it under
//! the range lock), so a cancelled, failed or crashed stream resumes where it
//! stopped without copying anything twice, and the backing link is rewritten
//! only after every copied byte is durable ([`image::Image::relink`]).

mod base;
mod job;
pub mod throttle;

pub use base::{Base, resolve_base};
pub use job::{
    JobInfo, JobState, OnError, Outcome, Remaining, StepOutcome, StreamError, StreamJob,
    StreamOptions, StreamSummary, finish, remaining_bytes, step,
};
