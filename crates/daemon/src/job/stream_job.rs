//! A `block-stream` job as the daemon core keeps it: the stream engine's
//! handle plus the QEMU-visible state (status, user pause, io-status,
//! auto-finalize/dismiss) and the JSON QEMU reports for it.
//!
//! The engine runs on its own; a small watcher task turns its state changes
//! and its end into messages for the core, which alone moves the QEMU state
//! machine and emits events. So every transition is checked against
//! [`super::state`] in one place.

use std::sync::Arc;

use serde_json::{Value, json};
use stream::{JobState, StreamError, StreamJob, StreamSummary};
use tokio::sync::mpsc;

use super::JobStatus;

/// QEMU's `BlockdevOnError`, as the user gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnErrorPolicy {
    Report,
    Stop,
    Enospc,
    Ignore,
    Auto,
}

impl OnErrorPolicy {
    pub const NAMES: &'static [&'static str] = &["report", "stop", "enospc", "ignore", "auto"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "report" => OnErrorPolicy::Report,
            "stop" => OnErrorPolicy::Stop,
            "enospc" => OnErrorPolicy::Enospc,
            "ignore" => OnErrorPolicy::Ignore,
            "auto" => OnErrorPolicy::Auto,
            _ => return None,
        })
    }

    /// The engine's policy. `auto` is `report` for a stream job, as in
    /// QEMU; `enospc` pauses on ENOSPC and fails the job on other errors.
    pub fn engine(self) -> stream::OnError {
        match self {
            OnErrorPolicy::Report | OnErrorPolicy::Auto => stream::OnError::Report,
            OnErrorPolicy::Stop => stream::OnError::Stop,
            OnErrorPolicy::Enospc => stream::OnError::Enospc,
            OnErrorPolicy::Ignore => stream::OnError::Ignore,
        }
    }

    /// The `action` of `BLOCK_JOB_ERROR` when a copy fails with `kind`.
    pub fn action(self, kind: image::ErrorKind) -> &'static str {
        if kind == image::ErrorKind::Unavailable {
            // The outage policy, whatever on-error says: the job waits.
            return "stop";
        }
        match self {
            OnErrorPolicy::Report | OnErrorPolicy::Auto => "report",
            OnErrorPolicy::Stop => "stop",
            OnErrorPolicy::Enospc if kind == image::ErrorKind::NoSpace => "stop",
            OnErrorPolicy::Enospc => "report",
            OnErrorPolicy::Ignore => "ignore",
        }
    }
}

/// QEMU's `BlockDeviceIoStatus` and the `operation` of `BLOCK_JOB_ERROR`
/// for a failed copy of kind `kind`: lack of space is a failed write (of the
/// copy into the top image), anything else is counted as a failed read.
pub fn io_status_of(kind: image::ErrorKind) -> (&'static str, &'static str) {
    if kind == image::ErrorKind::NoSpace {
        ("nospace", "write")
    } else {
        ("failed", "read")
    }
}

/// What the watcher tells the core about an engine.
#[derive(Debug)]
pub enum EngineEvent {
    State(JobState),
    Ended(Result<StreamSummary, StreamError>),
}

/// One block job.
#[derive(Debug)]
pub struct BlockJob {
    pub id: String,
    /// The node being streamed.
    pub node: String,
    pub status: JobStatus,
    pub user_paused: bool,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub on_error: OnErrorPolicy,
    /// `ok`, `failed` or `nospace` (QEMU's `BlockDeviceIoStatus`).
    pub io_status: &'static str,
    /// Set when the job failed.
    pub error: Option<String>,
    /// Set once the engine has ended: it will not change the image again.
    pub ended: bool,
    /// The node's copy-on-read setting before the job turned it on (QEMU
    /// inserts a copy-on-read filter for a stream job, and removes it after).
    pub cor_before: bool,
    /// With auto-finalize off, the link change the engine left for
    /// finalize (QEMU makes it in the job's prepare phase).
    pub deferred_link: Option<stream::Base>,
    pub engine: Arc<StreamJob>,
}

impl BlockJob {
    /// Starts the watcher that forwards the engine's state changes and end.
    pub fn watch(&self, tx: mpsc::UnboundedSender<(String, EngineEvent)>) {
        let engine = Arc::clone(&self.engine);
        let id = self.id.clone();
        tokio::spawn(async move {
            let mut rx = engine.subscribe();
            // Bounded: each turn waits for a state change, and the engine's
            // state ends final (or its sender goes away).
            loop {
                let s = *rx.borrow_and_update();
                if s.is_final() {
                    break;
                }
                if tx.send((id.clone(), EngineEvent::State(s))).is_err() {
                    return;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
            let r = engine.wait().await;
            let _ = tx.send((id, EngineEvent::Ended(r)));
        });
    }

    /// `BlockJobInfo` of `query-block-jobs`, plus diskstream's fields.
    pub fn block_job_info(&self) -> Value {
        let info = self.engine.info();
        let mut v = json!({
            "type": "stream",
            "device": self.id,
            "len": info.size,
            "offset": info.offset,
            "busy": self.status == JobStatus::Running && info.in_flight > 0,
            "paused": self.user_paused,
            "speed": info.speed,
            "io-status": self.io_status,
            "ready": false,
            "status": self.status.as_str(),
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
            "__com.diskstream_node": self.node,
            "__com.diskstream_copied": info.copied,
            "__com.diskstream_remote": info.remote,
            "__com.diskstream_rate": info.rate,
        });
        if let Some(eta) = info.eta_seconds {
            v["__com.diskstream_eta-seconds"] = json!(eta);
        }
        add_policy_fields(&mut v, &info);
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        v
    }

    /// `JobInfo` of `query-jobs`.
    pub fn job_info(&self) -> Value {
        let info = self.engine.info();
        let mut v = json!({
            "id": self.id,
            "type": "stream",
            "status": self.status.as_str(),
            "current-progress": info.offset,
            "total-progress": info.size,
        });
        add_policy_fields(&mut v, &info);
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        v
    }

    /// Data of `BLOCK_JOB_COMPLETED` / `BLOCK_JOB_CANCELLED`.
    pub fn end_event_data(&self) -> Value {
        let info = self.engine.info();
        let mut v = json!({
            "type": "stream",
            "device": self.id,
            "len": info.size,
            "offset": info.offset,
            "speed": info.speed,
        });
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        v
    }
}

/// The controller's state, in both job listings: the policy and its
/// parameters, copies in flight, what the policy allows now and why it
/// holds back.
fn add_policy_fields(v: &mut Value, info: &stream::JobInfo) {
    let p = &info.policy;
    v["__com.diskstream_policy"] = json!(p.kind.as_str());
    v["__com.diskstream_policy-params"] = json!({
        "grace-ms": p.grace.as_millis() as u64,
        "floor": p.floor,
        "latency-percent": (p.latency_factor * 100.0).round() as u64,
        "pressure-percent": (p.pressure_threshold * 100.0).round() as u64,
    });
    v["__com.diskstream_in-flight"] = json!(info.in_flight);
    v["__com.diskstream_allowed-in-flight"] = json!(info.allowed_in_flight);
    v["__com.diskstream_allowed-rate"] = json!(info.allowed_rate);
    v["__com.diskstream_held-by"] = json!(info.held_by);
}
