//! The stream job engine: full mode ([`StreamJob`]) and one-unit mode ([`step`]).
//!
//! The job scans block status in windows, skips what is local, a hole, or in
//! the base, and hands unit-aligned chunks to [`Image::populate`], several in
//! flight. Only chunks that hold data count against the rate limit. Between
//! chunks it reads its control channel (pause, resume, cancel, speed), so
//! control takes effect within one chunk per copy in flight. When the scan is
//! done it re-checks that nothing above the base is remote, then relinks.
//!
//! Failed copies follow `on-error`, except one kind: a backing that is
//! [`image::ErrorKind::Unavailable`] (a remote outage past its reconnect
//! window) is not a bad range, so whatever the policy the job pauses itself,
//! probes the backing with backoff, and resumes when it answers (DESIGN.md's
//! outage policy).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::device::block_status_all;
use image::image::PopulateOutcome;
use image::{BlockDevice, Extent, ExtentKind, Image};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::base::Base;
use crate::policy::{
    Controller, GuestSample, HoldReason, Inputs, OwnSample, Policy, PolicyKind, PsiSample,
};
use crate::throttle::TokenBucket;

/// The copy rate is measured over about this much recent time.
const RATE_WINDOW: Duration = Duration::from_secs(3);
/// No rate is reported over less time than this (it would be noise).
const MIN_RATE_SPAN: Duration = Duration::from_millis(200);

/// Block status is asked for this much of the device at a time.
const SCAN_WINDOW: u64 = 1 << 30;
/// The whole device is re-scanned at most this many times after the first
/// pass finds ranges that are still remote (copies that failed and were
/// ignored are not retried; this covers ranges that changed under the scan).
const MAX_PASSES: u32 = 3;
/// First and longest pause between probes of an unavailable backing.
const OUTAGE_PROBE_MIN: Duration = Duration::from_millis(100);
const OUTAGE_PROBE_MAX: Duration = Duration::from_secs(2);

/// What a failed copy does to the job (QEMU's `on-error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Pause the job; resuming retries from the failed range.
    Stop,
    /// Skip the range and go on; the job then ends with an error and keeps
    /// the backing link, since the image still needs it.
    Ignore,
    /// Pause as `Stop` when the copy failed for lack of space
    /// ([`image::ErrorKind::NoSpace`]: freeing space and resuming helps),
    /// fail the job as `Report` on any other error.
    Enospc,
}

impl OnError {
    /// Whether a failed copy with error `kind` pauses the job (rather than
    /// failing it or being skipped).
    pub fn stops_on(self, kind: image::ErrorKind) -> bool {
        match self {
            OnError::Stop => true,
            OnError::Enospc => kind == image::ErrorKind::NoSpace,
            OnError::Report | OnError::Ignore => false,
        }
    }
}

/// How to stream.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Name shown in job info.
    pub device: String,
    pub base: Base,
    /// Bytes per second of copied data; 0 = unlimited.
    pub speed: u64,
    pub on_error: OnError,
    /// Copies in flight at once (QEMU has one).
    pub max_in_flight: usize,
    /// Bytes per copy (rounded up to the image's allocation unit).
    pub chunk_size: u64,
    /// Drop (or move to the base) the backing link as the last step. A
    /// job that waits to be finalized (QMP `auto-finalize: false`) leaves
    /// it to [`finish`], called at finalize, as QEMU changes the link in
    /// its prepare phase.
    pub relink: bool,
    /// How the copy rate is chosen; changeable while the job runs.
    pub policy: Policy,
    /// Keep a log of every copy's issue and end time ([`StreamJob::copy_log`]).
    pub record_copies: bool,
    /// Ranges to copy first, in this order (an access profile).
    pub profile: Option<Arc<image::access::Profile>>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            device: String::new(),
            base: Base::default(),
            speed: 0,
            on_error: OnError::Report,
            max_in_flight: 8,
            chunk_size: 1 << 20,
            relink: true,
            policy: Policy::default(),
            record_copies: false,
            profile: None,
        }
    }
}

/// Job states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Paused,
    Completed,
    Cancelled,
    Failed,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Cancelled | JobState::Failed
        )
    }
}

/// The original proposal's `virDomainStreamDiskInfo`, and a little more.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    pub device: String,
    pub state: JobState,
    /// Scan position: everything below it has been handed to a copy.
    pub offset: u64,
    pub size: u64,
    /// Bytes copied from below so far.
    pub copied: u64,
    /// Bytes made zero units (zeros above a base).
    pub zeroed: u64,
    /// Bytes of data still remote (above the base), as counted when the job
    /// started minus what it copied since; exact again at completion.
    pub remote: u64,
    /// Copy rate over the last few seconds, bytes per second.
    pub rate: u64,
    /// The speed limit; 0 = none.
    pub speed: u64,
    pub in_flight: usize,
    /// The policy in force.
    pub policy: Policy,
    /// Copies the policy allows in flight now (0: waiting).
    pub allowed_in_flight: usize,
    /// Rate the policy allows now, bytes per second; 0 = unlimited.
    pub allowed_rate: u64,
    /// Why the policy holds the stream back.
    pub held_by: HoldReason,
    pub eta_seconds: Option<f64>,
    pub errors_ignored: u64,
    pub error: Option<String>,
    /// What kind of error `error` is (a paused `on-error=stop|enospc` job
    /// reports `nospace` or `failed` from it).
    #[serde(skip)]
    pub error_kind: Option<image::ErrorKind>,
}

/// How a job ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Nothing above the base is remote and the link was rewritten.
    Completed,
    /// Stopped on request; the image keeps its link and can resume.
    Cancelled,
}

/// What a finished job did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StreamSummary {
    pub outcome: Outcome,
    pub copied: u64,
    pub zeroed: u64,
    /// Bytes the scan passed over: local already, holes, in the base.
    pub skipped: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Image(Arc<image::Error>),
    #[error(
        "{count} range(s) could not be copied (first at offset {first}: {message}); the backing link is kept"
    )]
    Incomplete {
        count: u64,
        first: u64,
        message: String,
        /// The kind of the first failure.
        kind: image::ErrorKind,
    },
}

impl StreamError {
    /// The kind of the underlying image error (`Io` for skipped ranges).
    pub fn kind(&self) -> image::ErrorKind {
        match self {
            StreamError::Image(e) => e.kind(),
            StreamError::Incomplete { kind, .. } => *kind,
        }
    }
}

impl From<image::Error> for StreamError {
    fn from(e: image::Error) -> Self {
        StreamError::Image(Arc::new(e))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Control {
    paused: bool,
    cancelled: bool,
    speed: u64,
    policy: Policy,
}

/// One copy as the job issued it: `[issued, ended)` for `len` bytes at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyRecord {
    pub offset: u64,
    pub len: u64,
    pub issued: std::time::Instant,
    pub ended: std::time::Instant,
}

#[derive(Debug)]
struct Status {
    info: JobInfo,
    /// (time, copied) samples for the rate.
    samples: VecDeque<(Instant, u64)>,
    skipped: u64,
    /// Filled when `record_copies` is set.
    copies: Vec<CopyRecord>,
}

#[derive(Debug)]
struct Shared {
    status: Mutex<Status>,
    state_tx: watch::Sender<JobState>,
    /// The job's own handle sends control too: `on-error=stop` pauses itself.
    control: watch::Sender<Control>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
    }

    fn set_state(&self, state: JobState) {
        self.update(|st| st.info.state = state);
        self.state_tx.send_replace(state);
    }

    fn add_done(&self, out: PopulateOutcome) {
        let now = Instant::now();
        self.update(|st| {
            st.info.copied += out.copied;
            st.info.zeroed += out.zeroed;
            st.info.remote = st.info.remote.saturating_sub(out.copied);
            st.samples.push_back((now, st.info.copied));
            // Keep about RATE_WINDOW of history, and always the sample that
            // starts it.
            while st.samples.len() > 2
                && now.saturating_duration_since(st.samples[1].0) > RATE_WINDOW
            {
                st.samples.pop_front();
            }
        });
    }
}

/// A running (or finished) full-mode stream.
#[derive(Debug)]
pub struct StreamJob {
    shared: Arc<Shared>,
    result: tokio::sync::Mutex<Option<tokio::task::JoinHandle<Result<StreamSummary, StreamError>>>>,
    finished: Mutex<Option<Result<StreamSummary, StreamError>>>,
}

impl StreamJob {
    /// Starts streaming `image` in the background. Returns at once.
    pub fn start(image: Arc<Image>, opts: StreamOptions) -> StreamJob {
        let device = if opts.device.is_empty() {
            image.info().name
        } else {
            opts.device.clone()
        };
        let info = JobInfo {
            device,
            state: JobState::Running,
            offset: 0,
            size: image.size(),
            copied: 0,
            zeroed: 0,
            remote: 0,
            rate: 0,
            speed: opts.speed,
            in_flight: 0,
            policy: opts.policy,
            allowed_in_flight: if gentle(opts.policy.kind) {
                opts.max_in_flight.min(GENTLE_IN_FLIGHT)
            } else {
                opts.max_in_flight
            },
            allowed_rate: opts.speed,
            held_by: HoldReason::None,
            eta_seconds: None,
            errors_ignored: 0,
            error: None,
            error_kind: None,
        };
        let (state_tx, _) = watch::channel(JobState::Running);
        let (control, ctl_rx) = watch::channel(Control {
            paused: false,
            cancelled: false,
            speed: opts.speed,
            policy: opts.policy,
        });
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                info,
                // The start is a sample: the rate of a young job is measured
                // from it, not from two completions a millisecond apart.
                samples: VecDeque::from([(Instant::now(), 0)]),
                skipped: 0,
                copies: Vec::new(),
            }),
            state_tx,
            control,
        });
        let runner = Runner {
            image,
            opts,
            shared: Arc::clone(&shared),
            ctl: ctl_rx,
        };
        let handle = tokio::spawn(runner.run());
        StreamJob {
            shared,
            result: tokio::sync::Mutex::new(Some(handle)),
            finished: Mutex::new(None),
        }
    }

    /// Stops issuing copies; the job is `Paused` once the copies in flight
    /// have finished.
    pub fn pause(&self) {
        self.shared.control.send_modify(|c| c.paused = true);
    }

    pub fn resume(&self) {
        self.shared.control.send_modify(|c| c.paused = false);
    }

    /// Stops the job. The image keeps its backing link and stays resumable.
    pub fn cancel(&self) {
        self.shared.control.send_modify(|c| c.cancelled = true);
    }

    /// Changes the speed limit (bytes per second of copied data, 0 = none).
    pub fn set_speed(&self, speed: u64) {
        self.shared.control.send_modify(|c| c.speed = speed);
        self.shared.update(|st| st.info.speed = speed);
    }

    /// Changes the policy; takes effect before the next copy is issued.
    pub fn set_policy(&self, policy: Policy) {
        self.shared.control.send_modify(|c| c.policy = policy);
        self.shared.update(|st| st.info.policy = policy);
    }

    /// Every copy so far, when the job was started with `record_copies`.
    pub fn copy_log(&self) -> Vec<CopyRecord> {
        let st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        st.copies.clone()
    }

    /// A snapshot of the job's progress.
    pub fn info(&self) -> JobInfo {
        let st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        let mut info = st.info.clone();
        if let (Some(first), Some(last)) = (st.samples.front(), st.samples.back()) {
            // Up to now, not to the last completion: a stalled job's rate falls.
            let dt = Instant::now()
                .saturating_duration_since(first.0)
                .as_secs_f64();
            if dt >= MIN_RATE_SPAN.as_secs_f64() {
                info.rate = ((last.1 - first.1) as f64 / dt) as u64;
            }
        }
        if info.state == JobState::Running && info.rate > 0 {
            info.eta_seconds = Some(info.remote as f64 / info.rate as f64);
        }
        info
    }

    /// Follows the job's state changes.
    pub fn subscribe(&self) -> watch::Receiver<JobState> {
        self.shared.state_tx.subscribe()
    }

    /// Waits for the job to end and returns how it ended (every call gets
    /// the same answer). Cancellation-safe: a `wait` dropped mid-way (say, in
    /// a `select!` that Ctrl-C won) leaves the job for the next `wait`.
    pub async fn wait(&self) -> Result<StreamSummary, StreamError> {
        let mut slot = self.result.lock().await;
        if let Some(handle) = slot.as_mut() {
            let r = match handle.await {
                Ok(r) => r,
                Err(e) => Err(image::Error::Internal(format!("stream task failed: {e}")).into()),
            };
            *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            *slot = None;
        }
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .expect("result stored when the task was joined")
    }
}

/// After a guest read of remote data, this much right after it is copied
/// next (a booting guest reads on; QEMU's readahead is of this order).
const HOT_AHEAD: u64 = 4 << 20;

/// Copies are at most this big, and at most [`GENTLE_IN_FLIGHT`] run at
/// once, under a policy that shares the disk with a running guest
/// (`adaptive`, `idle`): copies issued in the guest's idle gap are still in
/// flight when its next burst starts, and each guest request waits behind
/// them. Measured with bench/policy (guest p99, stream time, medians of 3,
/// quiet machine): 8 x 1 MiB: 2.04 ms, 0.79 s; 4 x 256 KiB: 0.49 ms, 0.74 s;
/// 4 x 128 KiB: 0.38 ms, 0.86 s. A smaller `chunk_size` still applies.
const GENTLE_CHUNK: u64 = 256 << 10;
/// See [`GENTLE_CHUNK`].
const GENTLE_IN_FLIGHT: usize = 4;

/// Whether `kind` shares the disk with a guest (see [`GENTLE_CHUNK`]).
fn gentle(kind: PolicyKind) -> bool {
    matches!(kind, PolicyKind::Adaptive | PolicyKind::Idle)
}

/// The policy is asked again at least this often while it holds copies
/// back (a guest request ending is only seen by polling its counters).
const POLICY_POLL: Duration = Duration::from_millis(5);
/// PSI is read at most this often (a file read per copy would be waste).
const PSI_EVERY: Duration = Duration::from_millis(20);

/// The job's controller with what it needs from the outside world.
struct PolicyState {
    controller: Controller,
    policy: Policy,
    speed: u64,
    psi_path: Option<std::path::PathBuf>,
    psi: Option<(std::time::Instant, PsiSample)>,
}

impl PolicyState {
    fn new(opts: &StreamOptions, policy: Policy) -> Self {
        // Different on every host and job, so backoffs do not synchronise.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        PolicyState {
            controller: Controller::new(policy, opts.max_in_flight, opts.speed, seed),
            policy,
            speed: opts.speed,
            psi_path: crate::psi::discover(),
            psi: None,
        }
    }

    fn decide(
        &mut self,
        image: &Image,
        c: Control,
        in_flight: usize,
        copied: u64,
    ) -> crate::policy::Decision {
        if c.policy != self.policy {
            self.controller.set_policy(c.policy);
            self.policy = c.policy;
        }
        if c.speed != self.speed {
            self.controller.set_speed(c.speed);
            self.speed = c.speed;
        }
        let now = std::time::Instant::now();
        let wants_psi = matches!(
            c.policy.kind,
            crate::policy::PolicyKind::HostPressure | crate::policy::PolicyKind::Adaptive
        );
        if wants_psi
            && let Some(path) = &self.psi_path
            && self
                .psi
                .is_none_or(|(t, _)| now.saturating_duration_since(t) >= PSI_EVERY)
        {
            self.psi = crate::psi::read(path).map(|p| (now, p));
        }
        let stats = image.stats();
        let snap = stats.snapshot();
        let inputs = Inputs {
            now,
            guest: GuestSample {
                in_flight: snap.in_flight,
                idle_for: stats.idle_for(now),
                completed: snap.completed,
                latency_sum_us: snap.latency_sum_us,
            },
            psi: self.psi.map(|(_, p)| p),
            own: OwnSample { in_flight, copied },
        };
        self.controller.decide(&inputs)
    }
}

/// What the scan should do with one extent.
fn wants(e: &Extent, base_depth: Option<u32>) -> Option<ExtentKind> {
    let d = e.depth?;
    if d == 0 || base_depth.is_some_and(|b| d >= b) {
        return None;
    }
    match e.kind {
        ExtentKind::Data => Some(ExtentKind::Data),
        // Zeros above a base must hide the base's data: they become zero units.
        ExtentKind::Zero if base_depth.is_some() => Some(ExtentKind::Zero),
        _ => None,
    }
}

/// What above the base `image` still reads from below, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    /// Data to copy.
    pub data: u64,
    /// Zeros that must become zero units to hide a base.
    pub zeros: u64,
}

impl Remaining {
    pub fn is_empty(&self) -> bool {
        self.data == 0 && self.zeros == 0
    }
}

/// Scans `image`'s block status for what is still remote above the base.
pub async fn remaining_bytes(
    image: &Image,
    base_depth: Option<u32>,
) -> Result<Remaining, StreamError> {
    let size = image.size();
    let mut pos = 0;
    let mut r = Remaining::default();
    while pos < size {
        let n = (size - pos).min(SCAN_WINDOW);
        for e in block_status_all(image, pos, n).await? {
            match wants(&e, base_depth) {
                Some(ExtentKind::Data) => r.data += e.length,
                Some(_) => r.zeros += e.length,
                None => {}
            }
        }
        pos += n;
    }
    Ok(r)
}

/// Rewrites the link of a streamed image: drops it, or points it at the
/// base. Refuses while data above the base is still remote (a guest write
/// cannot make data remote, so after a completed stream this only fails on
/// I/O).
pub async fn finish(image: &Image, base: &Base) -> Result<(), StreamError> {
    let left = remaining_bytes(image, base.depth).await?;
    if !left.is_empty() {
        return Err(image::Error::Internal(format!(
            "{}: {} bytes above the base are still remote; not changing the backing link",
            image.info().name,
            left.data + left.zeros
        ))
        .into());
    }
    complete(image, base).await
}

/// Rewrites the link once nothing above the base is remote.
async fn complete(image: &Image, base: &Base) -> Result<(), StreamError> {
    if base.link.is_none() && image.backing().is_none() && image.backing_spec().is_none() {
        image.flush().await?;
        return Ok(());
    }
    image.relink(base.link.clone()).await?;
    Ok(())
}

/// Offset, length, issue time, result.
type CopyResult = (u64, u64, std::time::Instant, image::Result<PopulateOutcome>);

struct Runner {
    image: Arc<Image>,
    opts: StreamOptions,
    shared: Arc<Shared>,
    ctl: watch::Receiver<Control>,
}

/// What the control channel says to do next.
enum Next {
    Go,
    Cancel,
}

impl Runner {
    async fn run(mut self) -> Result<StreamSummary, StreamError> {
        let started = Instant::now();
        let r = self.stream().await;
        let seconds = started.elapsed().as_secs_f64();
        let st = |s: &Shared| {
            let st = s.status.lock().unwrap_or_else(|e| e.into_inner());
            (st.info.copied, st.info.zeroed, st.skipped)
        };
        match r {
            Ok(outcome) => {
                let (copied, zeroed, skipped) = st(&self.shared);
                if outcome == Outcome::Completed {
                    self.shared.update(|s| s.info.remote = 0);
                }
                self.shared.set_state(match outcome {
                    Outcome::Completed => JobState::Completed,
                    Outcome::Cancelled => JobState::Cancelled,
                });
                Ok(StreamSummary {
                    outcome,
                    copied,
                    zeroed,
                    skipped,
                    seconds,
                })
            }
            Err(e) => {
                // Whatever was copied stays valid: make it durable.
                let _ = self.image.flush().await;
                self.shared.update(|s| s.info.error = Some(e.to_string()));
                self.shared.set_state(JobState::Failed);
                Err(e)
            }
        }
    }

    /// Waits while paused; says whether to go on or stop.
    async fn checkpoint(
        &mut self,
        tasks: &mut JoinSet<CopyResult>,
        failures: &mut Failures,
    ) -> Result<Next, StreamError> {
        loop {
            let c = *self.ctl.borrow_and_update();
            if c.cancelled {
                self.drain(tasks, failures).await?;
                return Ok(Next::Cancel);
            }
            if !c.paused {
                if self
                    .shared
                    .status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .info
                    .state
                    == JobState::Paused
                {
                    self.shared.set_state(JobState::Running);
                }
                return Ok(Next::Go);
            }
            self.drain(tasks, failures).await?;
            self.shared.set_state(JobState::Paused);
            if self.ctl.changed().await.is_err() {
                // The job handle is gone: nobody can resume; stop cleanly.
                return Ok(Next::Cancel);
            }
        }
    }

    /// Waits until the policy lets one more copy go (reaping copies and
    /// honouring pause and cancel meanwhile); returns the rate for the
    /// token bucket, or `None` when the job was cancelled.
    async fn admit(
        &mut self,
        ctl: &mut PolicyState,
        tasks: &mut JoinSet<CopyResult>,
        failures: &mut Failures,
    ) -> Result<Option<u64>, StreamError> {
        // Bounded: each turn either returns, or waits for a copy to end, a
        // control change or the controller's retry time.
        loop {
            self.reap_finished(tasks, failures)?;
            if let Next::Cancel = self.checkpoint(tasks, failures).await? {
                return Ok(None);
            }
            let c = *self.ctl.borrow();
            let copied = self
                .shared
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .info
                .copied;
            let mut d = ctl.decide(&self.image, c, tasks.len(), copied);
            if gentle(c.policy.kind) {
                d.in_flight = d.in_flight.min(GENTLE_IN_FLIGHT);
            }
            self.shared.update(|st| {
                st.info.allowed_in_flight = d.in_flight;
                st.info.allowed_rate = d.rate;
                st.info.held_by = d.reason;
                st.info.in_flight = tasks.len();
            });
            if d.in_flight == 0 {
                let wait = d.retry_after.min(POLICY_POLL);
                self.throttle_sleep(wait, false, tasks, failures).await?;
                continue;
            }
            if tasks.len() >= d.in_flight {
                // Wait for a copy to end, but re-decide at least every poll:
                // the policy may allow more (or fewer) meanwhile.
                self.throttle_sleep(POLICY_POLL, true, tasks, failures)
                    .await?;
                continue;
            }
            return Ok(Some(d.rate));
        }
    }

    /// The outage policy: a remote backing stopped answering (past its
    /// reconnect window). The job pauses itself, with the error in its info,
    /// probes the backing with backoff, and resumes once the probe works.
    /// Ends early on cancel; a probe failing another way fails the job.
    async fn wait_for_backing(
        &mut self,
        e: &image::Error,
        probe: Probe,
        tasks: &mut JoinSet<CopyResult>,
        failures: &mut Failures,
    ) -> Result<Next, StreamError> {
        self.drain(tasks, failures).await?;
        let say = |st: &Shared, msg: Option<String>| {
            st.update(|s| {
                s.info.error_kind = msg.as_ref().map(|_| image::ErrorKind::Unavailable);
                s.info.error = msg;
            })
        };
        say(&self.shared, Some(e.to_string()));
        self.shared.set_state(JobState::Paused);
        let mut delay = OUTAGE_PROBE_MIN;
        // Bounded by the backing coming back, a failure of another kind, or
        // a cancel; the wait itself is the policy (the reconnect window is
        // the client's, and the job has none: it resumes when it can).
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                r = self.ctl.changed() => {
                    if r.is_err() {
                        return Ok(Next::Cancel);
                    }
                }
            }
            if self.ctl.borrow().cancelled {
                say(&self.shared, None);
                return Ok(Next::Cancel);
            }
            let r = match probe {
                Probe::Copy(off, len) => {
                    let base_depth = self.opts.base.depth;
                    self.image
                        .populate(off, len, base_depth)
                        .await
                        .map(|out| self.shared.add_done(out))
                }
                Probe::Scan(off, len) => block_status_all(&*self.image, off, len).await.map(|_| ()),
            };
            match r {
                Ok(()) => break,
                Err(e) if e.kind() == image::ErrorKind::Unavailable => {
                    say(&self.shared, Some(e.to_string()));
                    delay = (delay * 2).min(OUTAGE_PROBE_MAX);
                }
                Err(e) => return Err(e.into()),
            }
        }
        say(&self.shared, None);
        if !self.ctl.borrow().paused {
            self.shared.set_state(JobState::Running);
        }
        Ok(Next::Go)
    }

    /// Waits for every copy in flight.
    async fn drain(
        &mut self,
        tasks: &mut JoinSet<CopyResult>,
        failures: &mut Failures,
    ) -> Result<(), StreamError> {
        while let Some(r) = tasks.join_next().await {
            self.reap(r, failures)?;
        }
        self.shared.update(|s| s.info.in_flight = 0);
        Ok(())
    }

    fn reap(
        &self,
        joined: Result<CopyResult, tokio::task::JoinError>,
        failures: &mut Failures,
    ) -> Result<(), StreamError> {
        let (offset, len, issued, r) =
            joined.map_err(|e| image::Error::Internal(format!("copy task failed: {e}")))?;
        if self.opts.record_copies {
            let ended = std::time::Instant::now();
            self.shared.update(|st| {
                st.copies.push(CopyRecord {
                    offset,
                    len,
                    issued,
                    ended,
                })
            });
        }
        match r {
            Ok(out) => {
                self.shared.add_done(out);
                Ok(())
            }
            // An outage of a remote backing past its reconnect window: not a
            // bad range, so no policy applies; the job waits it out.
            Err(e) if e.kind() == image::ErrorKind::Unavailable => {
                failures.add_outage(offset, &e);
                Ok(())
            }
            Err(e) if self.opts.on_error.stops_on(e.kind()) => {
                failures.add(offset, &e);
                Ok(())
            }
            Err(e) => match self.opts.on_error {
                OnError::Ignore => {
                    failures.add(offset, &e);
                    self.shared.update(|s| s.info.errors_ignored += 1);
                    Ok(())
                }
                OnError::Report | OnError::Stop | OnError::Enospc => Err(e.into()),
            },
        }
    }

    /// Sleeps `d` for the rate limit, reaping copies that finish meanwhile
    /// and waking early on a control change.
    async fn throttle_sleep(
        &mut self,
        d: Duration,
        wake_on_copy_end: bool,
        tasks: &mut JoinSet<CopyResult>,
        failures: &mut Failures,
    ) -> Result<(), StreamError> {
        if d.is_zero() {
            return Ok(());
        }
        let deadline = tokio::time::sleep(d);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return Ok(()),
                _ = self.ctl.changed() => return Ok(()),
                Some(r) = tasks.join_next(), if !tasks.is_empty() => {
                    self.reap(r, failures)?;
                    if wake_on_copy_end {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Reaps the copies that have finished, without waiting.
    fn reap_finished(
        &self,
        tasks: &mut JoinSet<CopyResult>,
        failures: &mut Failures,
    ) -> Result<(), StreamError> {
        while let Some(r) = tasks.try_join_next() {
            self.reap(r, failures)?;
        }
        Ok(())
    }

    /// Waits for the policy and the token bucket, then starts one copy of
    /// `[s, s + n)`. Returns false when the job was cancelled meanwhile.
    async fn issue(
        &mut self,
        s: u64,
        n: u64,
        kind: ExtentKind,
        io: &mut Io,
    ) -> Result<bool, StreamError> {
        let Some(rate) = self
            .admit(&mut io.ctl, &mut io.tasks, &mut io.failures)
            .await?
        else {
            return Ok(false);
        };
        if kind == ExtentKind::Data {
            if rate != io.bucket.rate() {
                io.bucket.set_rate(rate, Instant::now());
            }
            let mut d = io.bucket.charge(n, Instant::now());
            // The wait is slept in slices with the policy asked again after
            // each: a rate decided while the guest was busy must not hold
            // the copy through the guest's next idle gap (at the floor, one
            // 4 MiB piece would otherwise sleep for seconds).
            while !d.is_zero() {
                self.throttle_sleep(d.min(POLICY_POLL), false, &mut io.tasks, &mut io.failures)
                    .await?;
                let Some(rate) = self
                    .admit(&mut io.ctl, &mut io.tasks, &mut io.failures)
                    .await?
                else {
                    return Ok(false);
                };
                if rate != io.bucket.rate() {
                    io.bucket.set_rate(rate, Instant::now());
                }
                d = io.bucket.debt(Instant::now());
            }
        }
        let img = Arc::clone(&self.image);
        let base_depth = self.opts.base.depth;
        // Taken here, not in the task: the policy decided now.
        let issued = std::time::Instant::now();
        io.tasks
            .spawn(async move { (s, n, issued, img.populate(s, n, base_depth).await) });
        let in_flight = io.tasks.len();
        self.shared.update(|st| st.info.in_flight = in_flight);
        Ok(true)
    }

    /// Bytes per copy now, a multiple of the allocation unit `g`: the job's
    /// chunk size, capped by [`GENTLE_CHUNK`] under a gentle policy (which
    /// may change while the job runs).
    fn chunk(&self, g: u64) -> u64 {
        let mut chunk = self.opts.chunk_size.max(1);
        if gentle(self.ctl.borrow().policy.kind) {
            chunk = chunk.min(GENTLE_CHUNK);
        }
        chunk.next_multiple_of(g)
    }

    /// Copies what needs copying in `[start, end)` ahead of the scan (a hot
    /// range or a profile entry). Ranges the scan reaches later are found
    /// local by [`Image::populate`] and cost nothing. False when cancelled.
    async fn copy_span(
        &mut self,
        (start, end): (u64, u64),
        io: &mut Io,
    ) -> Result<bool, StreamError> {
        let image = Arc::clone(&self.image);
        let g = image.info().granularity.max(1);
        let size = image.size();
        if start >= end {
            return Ok(true);
        }
        for e in block_status_all(&*image, start, end - start).await? {
            let Some(kind) = wants(&e, self.opts.base.depth) else {
                continue;
            };
            let mut s = e.offset - e.offset % g;
            let end = e.end().next_multiple_of(g).min(size);
            while s < end {
                let n = self.chunk(g).min(end - s);
                if !self.issue(s, n, kind, io).await? {
                    return Ok(false);
                }
                s += n;
            }
        }
        Ok(true)
    }

    async fn stream(&mut self) -> Result<Outcome, StreamError> {
        let image = Arc::clone(&self.image);
        let size = image.size();
        let g = image.info().granularity.max(1);
        let base_depth = self.opts.base.depth;
        let remote = remaining_bytes(&image, base_depth).await?.data;
        self.shared.update(|s| s.info.remote = remote);
        // One borrow, copied out: a watch borrow is a read lock, and two in
        // one statement deadlock against a writer (cancel) queued between.
        let control = *self.ctl.borrow();
        let mut io = Io {
            ctl: PolicyState::new(&self.opts, control.policy),
            bucket: TokenBucket::new(control.speed, Instant::now()),
            tasks: JoinSet::new(),
            failures: Failures::default(),
        };
        // An access profile goes first, in its order.
        if let Some(profile) = self.opts.profile.clone() {
            for &o in &profile.offsets {
                if o >= size {
                    continue;
                }
                let span = (o - o % g, (o + profile.unit).next_multiple_of(g).min(size));
                if !self.copy_span(span, &mut io).await? {
                    return Ok(Outcome::Cancelled);
                }
            }
        }
        let mut pass = 0;
        let mut pos = 0u64;
        loop {
            let mut next_free = pos - pos % g;
            while pos < size {
                if let Next::Cancel = self.checkpoint(&mut io.tasks, &mut io.failures).await? {
                    return Ok(Outcome::Cancelled);
                }
                let window = (size - pos).min(SCAN_WINDOW);
                let extents = match block_status_all(&*image, pos, window).await {
                    Ok(x) => x,
                    Err(e) if e.kind() == image::ErrorKind::Unavailable => {
                        let probe = Probe::Scan(pos, g.min(size - pos));
                        if let Next::Cancel = self
                            .wait_for_backing(&e, probe, &mut io.tasks, &mut io.failures)
                            .await?
                        {
                            return Ok(Outcome::Cancelled);
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                for e in &extents {
                    let Some(kind) = wants(e, base_depth) else {
                        self.shared.update(|s| s.skipped += e.length);
                        continue;
                    };
                    let mut s = (e.offset - e.offset % g).max(next_free);
                    let end = e.end().next_multiple_of(g).min(size);
                    while s < end {
                        // Hot data first: continue right after the guest's
                        // latest read of remote data.
                        while let Some(h) = image.access().take_hint() {
                            let h = h - h % g;
                            if h < size {
                                let span = (h, (h + HOT_AHEAD).min(size));
                                if !self.copy_span(span, &mut io).await? {
                                    return Ok(Outcome::Cancelled);
                                }
                            }
                        }
                        let n = self.chunk(g).min(end - s);
                        if !self.issue(s, n, kind, &mut io).await? {
                            return Ok(Outcome::Cancelled);
                        }
                        s += n;
                        next_free = s;
                        self.shared.update(|st| st.info.offset = s);
                    }
                }
                pos += window;
                self.shared.update(|st| st.info.offset = pos);
            }
            self.drain(&mut io.tasks, &mut io.failures).await?;
            if let Some(o) = io.failures.outage.take() {
                // Wait for the backing, then go again from the first range
                // that failed for any reason.
                let e = image::Error::Unavailable(o.message.clone());
                let probe = Probe::Copy(o.offset, self.chunk(g).min(size - o.offset));
                if let Next::Cancel = self
                    .wait_for_backing(&e, probe, &mut io.tasks, &mut io.failures)
                    .await?
                {
                    return Ok(Outcome::Cancelled);
                }
                pos = io
                    .failures
                    .first
                    .take()
                    .map_or(o.offset, |f| f.offset.min(o.offset));
                io.failures.count = 0;
                continue;
            }
            if let Some(first) = io.failures.take_stopped(self.opts.on_error) {
                // on-error=stop: pause, then retry from the first failed range.
                self.shared.update(|st| {
                    st.info.error = Some(first.message.clone());
                    st.info.error_kind = Some(first.kind);
                });
                self.shared.control.send_modify(|c| c.paused = true);
                if let Next::Cancel = self.checkpoint(&mut io.tasks, &mut io.failures).await? {
                    return Ok(Outcome::Cancelled);
                }
                self.shared.update(|st| {
                    st.info.error = None;
                    st.info.error_kind = None;
                });
                pos = first.offset;
                continue;
            }
            if let Some(f) = io.failures.ignored() {
                return Err(f);
            }
            image.flush().await?;
            if remaining_bytes(&image, base_depth).await?.is_empty() {
                if self.opts.relink {
                    complete(&image, &self.opts.base).await?;
                }
                return Ok(Outcome::Completed);
            }
            pass += 1;
            if pass >= MAX_PASSES {
                return Err(image::Error::Internal(format!(
                    "{}: data above the base is still remote after {MAX_PASSES} passes",
                    image.info().name
                ))
                .into());
            }
            pos = 0;
        }
    }
}

/// The copies in flight and what paces them.
struct Io {
    ctl: PolicyState,
    bucket: TokenBucket,
    tasks: JoinSet<CopyResult>,
    failures: Failures,
}

#[derive(Clone, Debug)]
struct Failure {
    offset: u64,
    message: String,
    kind: image::ErrorKind,
}

#[derive(Debug, Default)]
struct Failures {
    count: u64,
    first: Option<Failure>,
    /// The first range that failed because the backing was unavailable.
    outage: Option<Failure>,
}

/// What [`Runner::wait_for_backing`] retries to see the backing is back.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// Copy this range (the first one that failed).
    Copy(u64, u64),
    /// Block status of this range (the scan failed).
    Scan(u64, u64),
}

impl Failures {
    fn add_outage(&mut self, offset: u64, e: &image::Error) {
        if self.outage.as_ref().is_none_or(|f| offset < f.offset) {
            self.outage = Some(Failure {
                offset,
                message: e.to_string(),
                kind: e.kind(),
            });
        }
    }

    fn add(&mut self, offset: u64, e: &image::Error) {
        self.count += 1;
        if self.first.as_ref().is_none_or(|f| offset < f.offset) {
            self.first = Some(Failure {
                offset,
                message: e.to_string(),
                kind: e.kind(),
            });
        }
    }

    fn take_stopped(&mut self, policy: OnError) -> Option<Failure> {
        // Only failures the policy stops on were recorded, except under
        // `Ignore`, which never stops.
        if policy == OnError::Ignore || policy == OnError::Report {
            return None;
        }
        self.count = 0;
        self.first.take()
    }

    fn ignored(&self) -> Option<StreamError> {
        let f = self.first.as_ref()?;
        Some(StreamError::Incomplete {
            count: self.count,
            first: f.offset,
            message: f.message.clone(),
            kind: f.kind,
        })
    }
}

/// What one [`step`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StepOutcome {
    /// Where the next step starts; the virtual size when nothing is left at
    /// or after it.
    pub next_offset: u64,
    pub copied: u64,
    pub zeroed: u64,
    /// The whole device is local above the base and the link was rewritten.
    pub completed: bool,
}

/// One-unit mode: copies the next unit (`opts.chunk_size`) at or after
/// `offset` that needs copying and returns the offset after it. At the end of
/// the device, if nothing above the base is remote anywhere, the backing link
/// is rewritten and the outcome says `completed`.
pub async fn step(
    image: &Arc<Image>,
    offset: u64,
    opts: &StreamOptions,
) -> Result<StepOutcome, StreamError> {
    let size = image.size();
    if offset > size {
        return Err(image::Error::OutOfRange {
            offset,
            len: 0,
            size,
        }
        .into());
    }
    let g = image.info().granularity.max(1);
    let chunk = opts.chunk_size.max(1).next_multiple_of(g);
    let base_depth = opts.base.depth;
    let mut pos = offset;
    while pos < size {
        let n = (size - pos).min(SCAN_WINDOW);
        for e in block_status_all(&**image, pos, n).await? {
            if wants(&e, base_depth).is_none() {
                continue;
            }
            let start = e.offset.max(offset);
            let start = start - start % g;
            // Never return an offset at or below the one given.
            let end = (start + chunk).min(size).max(offset + 1).min(size);
            let out = image.populate(start, end - start, base_depth).await?;
            return Ok(StepOutcome {
                next_offset: end,
                copied: out.copied,
                zeroed: out.zeroed,
                completed: false,
            });
        }
        pos += n;
    }
    image.flush().await?;
    let completed = remaining_bytes(image, base_depth).await?.is_empty();
    if completed {
        complete(image, &opts.base).await?;
    }
    Ok(StepOutcome {
        next_offset: size,
        copied: 0,
        zeroed: 0,
        completed,
    })
}
