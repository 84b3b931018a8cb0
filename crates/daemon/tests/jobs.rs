//! The daemon core driving real stream engines, in process: QEMU's job
//! states and events for pause / resume / set-speed / cancel / complete and
//! for copy errors under on-error=stop and report.
//!
//! The overlay is an in-memory format (below) over an in-memory raw
//! backing, so these tests do not need the qcow2 engine and can make a copy
//! fail on purpose; the same sequences against real qcow2 files and
//! qemu-storage-daemon are in `crates/cli/tests/daemon.rs`.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use daemon::Handle;
use daemon::qmp::codec::Event;
use image::format::{BackingSpec, CheckReport, CowFill, Format, MappedRange, Mapping, Repair};
use image::storage::{MemStorage, Storage};
use image::{BlockDevice, Image};
use serde_json::{Value, json};
use tokio::sync::broadcast;

const UNIT: u64 = 64 << 10;
const SIZE: u64 = 4 << 20;
const WAIT: Duration = Duration::from_secs(30);
/// `fail_errno` value that injects an outage ([`image::ErrorKind::Unavailable`]).
const UNAVAILABLE: i32 = -1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Unallocated,
    Data,
    Zero,
}

#[derive(Debug)]
struct MemState {
    units: Vec<Unit>,
    data: Vec<u8>,
    backing: Option<BackingSpec>,
    /// Writes touching this offset fail while the count is above zero.
    fail_at: Option<(u64, u32)>,
    /// The errno of the injected failures; 0 = a plain I/O error.
    fail_errno: i32,
}

/// A minimal overlay format in memory: one unit size, identity mapping.
#[derive(Debug)]
struct MemOverlay {
    storage: Arc<dyn Storage>,
    state: Mutex<MemState>,
}

impl MemOverlay {
    fn new(backing: Option<BackingSpec>) -> Self {
        MemOverlay {
            storage: Arc::new(MemStorage::new("mem-overlay")),
            state: Mutex::new(MemState {
                units: vec![Unit::Unallocated; (SIZE / UNIT) as usize],
                data: vec![0; SIZE as usize],
                backing,
                fail_at: None,
                fail_errno: 0,
            }),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap()
    }

    fn fail_writes_at(&self, offset: u64, times: u32) {
        self.st().fail_at = Some((offset, times));
    }

    fn fail_writes_with(&self, offset: u64, times: u32, errno: i32) {
        let mut st = self.st();
        st.fail_at = Some((offset, times));
        st.fail_errno = errno;
    }

    fn mark(&self, offset: u64, len: u64, u: Unit) {
        let mut st = self.st();
        for i in offset / UNIT..(offset + len).div_ceil(UNIT) {
            st.units[i as usize] = u;
            let (a, b) = ((i * UNIT) as usize, ((i + 1) * UNIT) as usize);
            if u != Unit::Data {
                st.data[a..b].fill(0);
            }
        }
    }
}

impl Format for MemOverlay {
    fn format_name(&self) -> &'static str {
        "memory"
    }
    fn virtual_size(&self) -> u64 {
        SIZE
    }
    fn granularity(&self) -> u64 {
        UNIT
    }
    fn read_only(&self) -> bool {
        false
    }
    fn backing(&self) -> Option<BackingSpec> {
        self.st().backing.clone()
    }
    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    fn map(&self, offset: u64, len: u64) -> image::Result<Vec<MappedRange>> {
        let st = self.st();
        let mut out: Vec<MappedRange> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let next = ((pos / UNIT) + 1) * UNIT;
            let n = next.min(end) - pos;
            let mapping = match st.units[(pos / UNIT) as usize] {
                Unit::Unallocated => Mapping::Unallocated,
                Unit::Zero => Mapping::Zero { host_offset: None },
                Unit::Data => Mapping::Data { host_offset: pos },
            };
            match out.last_mut() {
                Some(l)
                    if l.end() == pos
                        && match (l.mapping, mapping) {
                            (Mapping::Data { host_offset: h }, Mapping::Data { .. }) => {
                                h + l.length == pos
                            }
                            (a, b) => a == b,
                        } =>
                {
                    l.length += n
                }
                _ => out.push(MappedRange {
                    offset: pos,
                    length: n,
                    mapping,
                }),
            }
            pos += n;
        }
        Ok(out)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> image::Result<Vec<(u64, u64)>> {
        let mut holes = Vec::new();
        for r in self.map(offset, buf.len() as u64)? {
            let b = &mut buf[(r.offset - offset) as usize..(r.end() - offset) as usize];
            match r.mapping {
                Mapping::Unallocated => holes.push((r.offset, r.length)),
                _ => b.copy_from_slice(&self.st().data[r.offset as usize..r.end() as usize]),
            }
        }
        Ok(holes)
    }
    fn write(&self, offset: u64, data: &[u8], fill: &[CowFill<'_>]) -> image::Result<()> {
        let end = offset + data.len() as u64;
        {
            let mut st = self.st();
            if let Some((at, n)) = st.fail_at
                && n > 0
                && (offset..end).contains(&at)
            {
                st.fail_at = Some((at, n - 1));
                let e = match st.fail_errno {
                    0 => io::Error::other("injected write failure"),
                    UNAVAILABLE => {
                        return Err(image::Error::Unavailable(
                            "injected: backing unreachable past the window".into(),
                        ));
                    }
                    errno => io::Error::from_raw_os_error(errno),
                };
                return Err(image::Error::io("mem-overlay", "write", e));
            }
            for f in fill {
                let a = f.offset as usize;
                st.data[a..a + f.data.len()].copy_from_slice(f.data);
            }
            st.data[offset as usize..end as usize].copy_from_slice(data);
        }
        let (a, b) = (offset / UNIT * UNIT, end.div_ceil(UNIT) * UNIT);
        let mut st = self.st();
        for i in a / UNIT..b / UNIT {
            st.units[i as usize] = Unit::Data;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool, _b: bool) -> image::Result<()> {
        self.mark(offset, len, Unit::Zero);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64, has_backing: bool) -> image::Result<()> {
        let u = if has_backing {
            Unit::Zero
        } else {
            Unit::Unallocated
        };
        self.mark(offset, len, u);
        Ok(())
    }
    fn flush(&self) -> image::Result<()> {
        Ok(())
    }
    fn set_backing(&self, backing: Option<&BackingSpec>) -> image::Result<()> {
        self.st().backing = backing.cloned();
        Ok(())
    }
    fn allocated_bytes(&self) -> image::Result<u64> {
        Ok(self
            .st()
            .units
            .iter()
            .filter(|u| **u != Unit::Unallocated)
            .count() as u64
            * UNIT)
    }
    fn check(&self, _repair: Option<Repair>) -> image::Result<CheckReport> {
        Ok(CheckReport::default())
    }
    fn format_specific(&self) -> Option<Value> {
        None
    }
    fn close(&self) -> image::Result<()> {
        Ok(())
    }
}

fn pattern() -> Vec<u8> {
    (0..SIZE).map(|i| (i / 4096 % 251) as u8 + 1).collect()
}

struct Setup {
    handle: Handle,
    events: broadcast::Receiver<Event>,
    overlay: Arc<MemOverlay>,
    image: Arc<Image>,
    core: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    let base_storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes("mem-base", pattern()));
    let raw = image::raw::Raw::open(base_storage, false).unwrap();
    let base: Arc<dyn BlockDevice> = Arc::new(Image::new(Arc::new(raw), None));
    let overlay = Arc::new(MemOverlay::new(Some(BackingSpec {
        name: "mem-base".into(),
        format: Some("raw".into()),
    })));
    let fmt: Arc<dyn Format> = overlay.clone();
    let image = Arc::new(Image::new(fmt, Some(base)));
    let (core, handle) = daemon::core::new("test");
    let core = tokio::spawn(core.run());
    let events = handle.subscribe();
    handle
        .add_image_node("top", Arc::clone(&image))
        .await
        .unwrap();
    Setup {
        handle,
        events,
        overlay,
        image,
        core,
    }
}

async fn exec(h: &Handle, cmd: &str, args: Value) -> Value {
    h.execute(cmd, args.as_object().unwrap().clone())
        .await
        .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"))
}

/// Reads events until `name` (and `status`), recording them as
/// `NAME` or `JOB_STATUS_CHANGE:status`.
async fn until(
    rx: &mut broadcast::Receiver<Event>,
    seen: &mut Vec<String>,
    name: &str,
    status: Option<&str>,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {name} {status:?}; saw {seen:?}"))
            .unwrap();
        let st = ev.data.get("status").and_then(Value::as_str);
        seen.push(match (ev.name.as_str(), st) {
            ("JOB_STATUS_CHANGE", Some(s)) => format!("JOB_STATUS_CHANGE:{s}"),
            (n, _) => n.to_string(),
        });
        if ev.name == name && (status.is_none() || st == status) {
            return ev.data;
        }
    }
}

async fn query_job(h: &Handle, id: &str) -> Option<Value> {
    exec(h, "query-block-jobs", json!({}))
        .await
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["device"] == id)
        .cloned()
}

/// Waits (bounded) until the job has copied something.
async fn wait_copied(h: &Handle, id: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while query_job(h, id).await.unwrap()["__com.diskstream_copied"] == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: nothing copied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_streamed(s: &Setup) {
    assert_eq!(s.image.read(0, SIZE as usize).await.unwrap(), pattern());
    assert!(s.image.backing().is_none(), "backing still linked");
    assert!(s.overlay.backing().is_none(), "backing still in the header");
    assert_eq!(s.overlay.allocated_bytes().unwrap(), SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_set_speed_cancel_then_stream_to_completion() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "job-id": "job0", "speed": 256 << 10,
               "__com.diskstream_chunk-size": UNIT, "__com.diskstream_max-in-flight": 1}),
    )
    .await;
    until(
        &mut s.events,
        &mut seen,
        "JOB_STATUS_CHANGE",
        Some("running"),
    )
    .await;
    // Let something be copied, so the cancel below has progress to keep.
    wait_copied(&h, "job0").await;
    exec(
        &h,
        "block-job-set-speed",
        json!({"device": "job0", "speed": 128 << 10}),
    )
    .await;
    assert_eq!(query_job(&h, "job0").await.unwrap()["speed"], 128 << 10);

    exec(&h, "block-job-pause", json!({"device": "job0"})).await;
    let j = query_job(&h, "job0").await.unwrap();
    assert_eq!(j["paused"], true, "{j}");
    until(
        &mut s.events,
        &mut seen,
        "JOB_STATUS_CHANGE",
        Some("paused"),
    )
    .await;
    let j = query_job(&h, "job0").await.unwrap();
    assert_eq!(j["status"], "paused");
    assert_eq!(j["busy"], false);
    assert!(j["offset"].as_u64().unwrap() < SIZE, "{j}");
    let e = h
        .execute(
            "block-job-pause",
            json!({"device": "job0"}).as_object().unwrap().clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.desc, "Job is already paused");
    let e = h
        .execute(
            "block-job-cancel",
            json!({"device": "job0"}).as_object().unwrap().clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.desc,
        "The block job for device 'job0' is currently paused"
    );
    let e = h
        .execute(
            "blockdev-del",
            json!({"node-name": "top"}).as_object().unwrap().clone(),
        )
        .await
        .unwrap_err();
    assert!(e.desc.contains("is busy"), "{}", e.desc);

    assert!(s.image.copy_on_read(), "a stream job turns copy-on-read on");
    let nodes = exec(&h, "query-named-block-nodes", json!({})).await;
    assert_eq!(nodes[0]["__com.diskstream_copy-on-read"], true, "{nodes}");
    exec(&h, "block-job-resume", json!({"device": "job0"})).await;
    until(
        &mut s.events,
        &mut seen,
        "JOB_STATUS_CHANGE",
        Some("running"),
    )
    .await;
    exec(&h, "job-cancel", json!({"id": "job0"})).await;
    let c = until(&mut s.events, &mut seen, "BLOCK_JOB_CANCELLED", None).await;
    assert_eq!(c["device"], "job0");
    assert_eq!(c["type"], "stream");
    assert_eq!(c["len"], SIZE);
    assert!(c["offset"].as_u64().unwrap() < SIZE, "{c}");
    until(&mut s.events, &mut seen, "JOB_STATUS_CHANGE", Some("null")).await;
    assert!(query_job(&h, "job0").await.is_none());
    // Cancelled: still linked, partly local, and resumable.
    assert!(s.image.backing().is_some());
    let local = s.overlay.allocated_bytes().unwrap();
    assert!(local > 0 && local < SIZE, "local after cancel: {local}");

    exec(
        &h,
        "block-stream",
        json!({"device": "top", "job-id": "job1"}),
    )
    .await;
    let done = until(&mut s.events, &mut seen, "BLOCK_JOB_COMPLETED", None).await;
    assert!(done.get("error").is_none(), "{done}");
    assert_eq!(done["offset"], done["len"]);
    until(&mut s.events, &mut seen, "JOB_STATUS_CHANGE", Some("null")).await;
    let want: Vec<String> = [
        "JOB_STATUS_CHANGE:created",
        "JOB_STATUS_CHANGE:running",
        "JOB_STATUS_CHANGE:paused",
        "JOB_STATUS_CHANGE:running",
        "JOB_STATUS_CHANGE:aborting",
        "BLOCK_JOB_CANCELLED",
        "JOB_STATUS_CHANGE:concluded",
        "JOB_STATUS_CHANGE:null",
        "JOB_STATUS_CHANGE:created",
        "JOB_STATUS_CHANGE:running",
        "JOB_STATUS_CHANGE:waiting",
        "JOB_STATUS_CHANGE:pending",
        "BLOCK_JOB_COMPLETED",
        "JOB_STATUS_CHANGE:concluded",
        "JOB_STATUS_CHANGE:null",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(seen, want);
    assert!(
        !s.image.copy_on_read(),
        "copy-on-read left on after the job"
    );
    let nodes = exec(&h, "query-named-block-nodes", json!({})).await;
    assert_eq!(nodes[0]["__com.diskstream_remote-bytes"], 0, "{nodes}");
    assert_eq!(nodes[0]["__com.diskstream_local-bytes"], SIZE, "{nodes}");
    assert_streamed(&s).await;
    s.handle.shutdown().await;
    s.core.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_stop_pauses_with_block_job_error_and_resume_retries() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    s.overlay.fail_writes_at(SIZE / 2, 1);
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "on-error": "stop", "__com.diskstream_chunk-size": UNIT}),
    )
    .await;
    let err = until(&mut s.events, &mut seen, "BLOCK_JOB_ERROR", None).await;
    assert_eq!(
        err,
        json!({"device": "top", "operation": "read", "action": "stop"})
    );
    until(
        &mut s.events,
        &mut seen,
        "JOB_STATUS_CHANGE",
        Some("paused"),
    )
    .await;
    let j = query_job(&h, "top").await.unwrap();
    assert_eq!(j["io-status"], "failed", "{j}");
    assert_eq!(j["paused"], true);
    exec(&h, "block-job-resume", json!({"device": "top"})).await;
    until(&mut s.events, &mut seen, "BLOCK_JOB_COMPLETED", None).await;
    until(&mut s.events, &mut seen, "JOB_STATUS_CHANGE", Some("null")).await;
    assert_eq!(
        seen,
        [
            "JOB_STATUS_CHANGE:created",
            "JOB_STATUS_CHANGE:running",
            "BLOCK_JOB_ERROR",
            "JOB_STATUS_CHANGE:paused",
            "JOB_STATUS_CHANGE:running",
            "JOB_STATUS_CHANGE:waiting",
            "JOB_STATUS_CHANGE:pending",
            "BLOCK_JOB_COMPLETED",
            "JOB_STATUS_CHANGE:concluded",
            "JOB_STATUS_CHANGE:null",
        ]
    );
    assert_streamed(&s).await;
    s.handle.shutdown().await;
}

/// `on-error=enospc` (QEMU's semantics): out of space pauses the job with
/// io-status `nospace`, and resuming after space is freed completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_enospc_pauses_on_enospc_and_resume_completes() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    s.overlay.fail_writes_with(SIZE / 2, 1, libc::ENOSPC);
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "on-error": "enospc", "__com.diskstream_chunk-size": UNIT}),
    )
    .await;
    let err = until(&mut s.events, &mut seen, "BLOCK_JOB_ERROR", None).await;
    assert_eq!(
        err,
        json!({"device": "top", "operation": "write", "action": "stop"})
    );
    until(
        &mut s.events,
        &mut seen,
        "JOB_STATUS_CHANGE",
        Some("paused"),
    )
    .await;
    let j = query_job(&h, "top").await.unwrap();
    assert_eq!(j["io-status"], "nospace", "{j}");
    assert_eq!(j["paused"], true);
    exec(&h, "block-job-resume", json!({"device": "top"})).await;
    until(&mut s.events, &mut seen, "BLOCK_JOB_COMPLETED", None).await;
    assert_streamed(&s).await;
    s.handle.shutdown().await;
}

/// The outage policy, whatever on-error says: a copy failing because the
/// backing is unavailable pauses the job with BLOCK_JOB_ERROR, and the job
/// resumes by itself (no user resume) once the backing answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_backing_pauses_the_job_and_it_resumes_by_itself() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    // Four failed probes keep it paused for about 1.5 s (backoff from 100 ms).
    s.overlay.fail_writes_with(SIZE / 2, 5, UNAVAILABLE);
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "__com.diskstream_chunk-size": UNIT}),
    )
    .await;
    let err = until(&mut s.events, &mut seen, "BLOCK_JOB_ERROR", None).await;
    assert_eq!(
        err,
        json!({"device": "top", "operation": "read", "action": "stop"})
    );
    until(&mut s.events, &mut seen, "BLOCK_JOB_COMPLETED", None).await;
    assert!(
        seen.iter().any(|e| e == "JOB_STATUS_CHANGE:paused"),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|e| e == "JOB_STATUS_CHANGE:aborting"),
        "{seen:?}"
    );
    assert_streamed(&s).await;
    s.handle.shutdown().await;
}

/// `on-error=enospc` reports (fails the job on) an error that is not
/// ENOSPC, where `stop` would pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_enospc_fails_the_job_on_other_errors() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    s.overlay.fail_writes_with(SIZE / 2, u32::MAX, libc::EIO);
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "on-error": "enospc", "auto-dismiss": false,
               "__com.diskstream_chunk-size": UNIT}),
    )
    .await;
    let err = until(&mut s.events, &mut seen, "BLOCK_JOB_ERROR", None).await;
    assert_eq!(
        err,
        json!({"device": "top", "operation": "read", "action": "report"})
    );
    let done = until(&mut s.events, &mut seen, "BLOCK_JOB_COMPLETED", None).await;
    assert!(done["error"].as_str().is_some(), "{done}");
    let j = query_job(&h, "top").await.unwrap();
    assert_eq!(j["status"], "concluded", "{j}");
    assert_eq!(j["io-status"], "failed", "{j}");
    assert!(
        s.image.backing().is_some(),
        "a failed stream must keep the backing"
    );
    s.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_report_fails_the_job_and_keeps_the_backing() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    s.overlay.fail_writes_at(SIZE / 2, u32::MAX);
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "auto-dismiss": false, "__com.diskstream_chunk-size": UNIT}),
    )
    .await;
    let done = until(&mut s.events, &mut seen, "BLOCK_JOB_COMPLETED", None).await;
    let msg = done["error"]
        .as_str()
        .expect("error in BLOCK_JOB_COMPLETED");
    assert!(msg.contains("injected write failure"), "{msg}");
    until(
        &mut s.events,
        &mut seen,
        "JOB_STATUS_CHANGE",
        Some("concluded"),
    )
    .await;
    assert_eq!(
        seen,
        [
            "JOB_STATUS_CHANGE:created",
            "JOB_STATUS_CHANGE:running",
            "BLOCK_JOB_ERROR",
            "JOB_STATUS_CHANGE:aborting",
            "BLOCK_JOB_COMPLETED",
            "JOB_STATUS_CHANGE:concluded",
        ]
    );
    let j = query_job(&h, "top").await.unwrap();
    assert_eq!(j["status"], "concluded");
    assert!(j["error"].as_str().unwrap().contains("injected"), "{j}");
    let jobs = exec(&h, "query-jobs", json!({})).await;
    assert!(
        jobs[0]["error"].as_str().unwrap().contains("injected"),
        "{jobs}"
    );
    assert!(
        s.image.backing().is_some(),
        "a failed stream must keep the backing"
    );
    exec(&h, "job-dismiss", json!({"id": "top"})).await;
    until(&mut s.events, &mut seen, "JOB_STATUS_CHANGE", Some("null")).await;
    s.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_a_running_job_and_leaves_it_resumable() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "speed": 256 << 10, "__com.diskstream_chunk-size": UNIT,
               "__com.diskstream_max-in-flight": 1}),
    )
    .await;
    until(
        &mut s.events,
        &mut seen,
        "JOB_STATUS_CHANGE",
        Some("running"),
    )
    .await;
    wait_copied(&h, "top").await;
    h.shutdown().await;
    tokio::time::timeout(WAIT, s.core).await.unwrap().unwrap();
    let local = s.overlay.allocated_bytes().unwrap();
    assert!(local > 0 && local < SIZE, "local after shutdown: {local}");
    assert!(s.overlay.backing().is_some());
    // What was copied is the backing's data.
    let got = s.overlay.st().data.clone();
    let want = pattern();
    for (i, u) in s.overlay.st().units.iter().enumerate() {
        if *u == Unit::Data {
            let r = i * UNIT as usize..(i + 1) * UNIT as usize;
            assert_eq!(got[r.clone()], want[r], "unit {i}");
        }
    }
}

/// The engine may report a pause the user has already taken back; the core
/// must not read it as an on-error=stop. (The interleaving is timing
/// dependent: this guards the outcome, it does not force the race.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_pause_resume_is_never_mistaken_for_an_error_stop() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "speed": 512 << 10, "__com.diskstream_chunk-size": UNIT}),
    )
    .await;
    until(
        &mut s.events,
        &mut seen,
        "JOB_STATUS_CHANGE",
        Some("running"),
    )
    .await;
    // Bounded: a fixed number of rounds.
    for _ in 0..20 {
        exec(&h, "block-job-pause", json!({"device": "top"})).await;
        exec(&h, "block-job-resume", json!({"device": "top"})).await;
    }
    exec(
        &h,
        "block-job-set-speed",
        json!({"device": "top", "speed": 0}),
    )
    .await;
    until(&mut s.events, &mut seen, "JOB_STATUS_CHANGE", Some("null")).await;
    assert!(!seen.iter().any(|e| e == "BLOCK_JOB_ERROR"), "{seen:?}");
    assert!(
        seen.contains(&"BLOCK_JOB_COMPLETED".to_string()),
        "{seen:?}"
    );
    assert_streamed(&s).await;
    s.handle.shutdown().await;
}

/// With auto-finalize off the backing link stays until block-job-finalize
/// (QEMU changes it in the job's prepare phase), so a job cancelled while
/// pending leaves the image on its backing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backing_link_changes_at_finalize_not_before() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "job-id": "j", "auto-finalize": false}),
    )
    .await;
    until(&mut s.events, &mut seen, "BLOCK_JOB_PENDING", None).await;
    assert!(s.image.backing().is_some(), "link dropped before finalize");
    assert!(
        s.overlay.backing().is_some(),
        "header changed before finalize"
    );
    assert_eq!(s.overlay.allocated_bytes().unwrap(), SIZE);
    exec(&h, "block-job-finalize", json!({"id": "j"})).await;
    until(&mut s.events, &mut seen, "BLOCK_JOB_COMPLETED", None).await;
    assert_streamed(&s).await;

    // Cancelled while pending: the link stays.
    let mut s = setup().await;
    let h = s.handle.clone();
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "job-id": "k", "auto-finalize": false}),
    )
    .await;
    until(&mut s.events, &mut seen, "BLOCK_JOB_PENDING", None).await;
    exec(&h, "block-job-cancel", json!({"device": "k"})).await;
    until(&mut s.events, &mut seen, "BLOCK_JOB_CANCELLED", None).await;
    assert!(s.image.backing().is_some());
    assert!(s.overlay.backing().is_some());
    assert_eq!(s.image.read(0, SIZE as usize).await.unwrap(), pattern());
}

/// `__com.diskstream_migrate-send`: refused while the node still changes
/// (a job runs) or with no NBD server; then flushes, freezes the image for
/// every holder, and replaces the node's exports with one read-only export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_send_freezes_the_node_and_exports_it_read_only() {
    let s = setup().await;
    let h = &s.handle;
    let send = |h: Handle| async move {
        h.execute(
            "__com.diskstream_migrate-send",
            json!({"node-name": "top"}).as_object().unwrap().clone(),
        )
        .await
    };
    let e = send(h.clone()).await.unwrap_err();
    assert!(e.desc.contains("NBD server not running"), "{}", e.desc);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    exec(
        h,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.display().to_string()}}}),
    )
    .await;
    exec(
        h,
        "block-export-add",
        json!({"type": "nbd", "id": "vm", "node-name": "top", "writable": true}),
    )
    .await;
    s.image
        .write(0, bytes::Bytes::from(vec![9u8; 4096]), Default::default())
        .await
        .unwrap();
    // A running stream would keep changing the node.
    exec(
        h,
        "block-stream",
        json!({"device": "top", "job-id": "j", "speed": 1}),
    )
    .await;
    let e = send(h.clone()).await.unwrap_err();
    assert!(e.desc.contains("block job"), "{}", e.desc);
    exec(h, "block-job-cancel", json!({"device": "j", "force": true})).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while query_job(h, "j").await.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "job did not go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    send(h.clone()).await.unwrap();
    assert!(s.image.info().read_only);
    let e = s
        .image
        .write(
            8192,
            bytes::Bytes::from(vec![1u8; 4096]),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), image::ErrorKind::ReadOnly, "{e}");
    // The guest's last write is there, and reads still work.
    assert_eq!(s.image.read(0, 4096).await.unwrap(), vec![9u8; 4096]);
    let exports = exec(h, "query-block-exports", json!({})).await;
    assert_eq!(
        exports,
        json!([{"type": "nbd", "id": "top", "node-name": "top", "shutting-down": false}])
    );
    let e = h
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "w", "node-name": "top", "name": "w", "writable": true})
                .as_object()
                .unwrap()
                .clone(),
        )
        .await
        .unwrap_err();
    assert!(e.desc.contains("read-only"), "{}", e.desc);
    h.shutdown().await;
    let _ = s.core.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_is_shown_and_changed_while_the_job_runs() {
    let mut s = setup().await;
    let h = s.handle.clone();
    let mut seen = Vec::new();
    // A guest request just now and an hour of grace: `idle` must hold.
    s.image.read(0, 512).await.unwrap();
    let bad = [
        (
            json!({"__com.diskstream_policy": "turbo"}),
            "does not accept",
        ),
        (
            json!({"__com.diskstream_grace-ms": 5}),
            "'__com.diskstream_policy' is missing",
        ),
        (
            json!({"__com.diskstream_policy": "adaptive", "__com.diskstream_floor": 0}),
            "must be positive",
        ),
    ];
    for (extra, msg) in bad {
        let mut a = json!({"device": "top", "job-id": "job0"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        let e = h
            .execute("block-stream", a.as_object().unwrap().clone())
            .await
            .unwrap_err();
        assert!(e.desc.contains(msg), "{a}: {}", e.desc);
    }
    assert!(
        query_job(&h, "job0").await.is_none(),
        "a refused job started"
    );
    exec(
        &h,
        "block-stream",
        json!({"device": "top", "job-id": "job0", "__com.diskstream_chunk-size": UNIT,
               "__com.diskstream_policy": "idle", "__com.diskstream_grace-ms": 3_600_000u64}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let j = loop {
        let j = query_job(&h, "job0").await.unwrap();
        if j["__com.diskstream_held-by"] == "guest-busy" {
            break j;
        }
        assert!(tokio::time::Instant::now() < deadline, "never held: {j}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(j["__com.diskstream_policy"], "idle", "{j}");
    assert_eq!(j["__com.diskstream_policy-params"]["grace-ms"], 3_600_000);
    assert_eq!(j["__com.diskstream_allowed-in-flight"], 0, "{j}");
    assert_eq!(j["__com.diskstream_copied"], 0, "{j}");
    let jobs = exec(&h, "query-jobs", json!({})).await;
    assert_eq!(jobs[0]["__com.diskstream_held-by"], "guest-busy", "{jobs}");

    // Parameters must come with a policy; the job is unchanged.
    let e = h
        .execute(
            "__com.diskstream_block-job-set-policy",
            json!({"device": "job0", "floor": 1})
                .as_object()
                .unwrap()
                .clone(),
        )
        .await
        .unwrap_err();
    assert!(e.desc.contains("'policy' is missing"), "{}", e.desc);
    let e = h
        .execute(
            "__com.diskstream_block-job-set-policy",
            json!({"device": "nojob", "policy": "fixed"})
                .as_object()
                .unwrap()
                .clone(),
        )
        .await
        .unwrap_err();
    assert!(e.desc.contains("nojob"), "{}", e.desc);
    assert_eq!(
        query_job(&h, "job0").await.unwrap()["__com.diskstream_policy"],
        "idle"
    );
    // Switched to fixed while running, it streams to the end.
    exec(
        &h,
        "__com.diskstream_block-job-set-policy",
        json!({"device": "job0", "policy": "fixed"}),
    )
    .await;
    until(&mut s.events, &mut seen, "BLOCK_JOB_COMPLETED", None).await;
    assert_streamed(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_records_an_access_profile_written_at_delete() {
    let s = setup().await;
    let h = s.handle.clone();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let prof = dir.path().join("p.profile");
    exec(
        &h,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .await;
    exec(
        &h,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "top",
               "__com.diskstream_record-profile": prof}),
    )
    .await;
    // What a client's reads do through the export.
    for off in [3 * UNIT, UNIT, 3 * UNIT + 512] {
        s.image.read(off, 512).await.unwrap();
    }
    exec(&h, "block-export-del", json!({"id": "e0"})).await;
    let text = std::fs::read_to_string(&prof).unwrap();
    let p = image::access::Profile::parse(&text).unwrap();
    assert_eq!(p.offsets, vec![3 * UNIT, UNIT]);
}

/// `nbdinfo --can multi-conn` on the daemon's export of `top`: 0 = offered.
async fn can_multi_conn(sock: &std::path::Path) -> Option<i32> {
    let uri = format!("nbd+unix:///top?socket={}", sock.display());
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .args(["-k", "5", "30", "nbdinfo", "--can", "multi-conn", &uri])
            .output()
            .unwrap()
            .status
            .code()
    })
    .await
    .unwrap()
}

/// Multi-conn is offered only when the server takes several clients: with
/// `max-connections` 1 (QEMU never offers it then) a client that opened a
/// second connection would wait for it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_conn_is_not_offered_with_max_connections_1() {
    let s = setup().await;
    let h = &s.handle;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let addr = json!({"type": "unix", "data": {"path": sock.display().to_string()}});
    let export = json!({"type": "nbd", "id": "vm", "node-name": "top", "writable": true});
    exec(
        h,
        "nbd-server-start",
        json!({"addr": addr, "max-connections": 1}),
    )
    .await;
    exec(h, "block-export-add", export.clone()).await;
    assert_eq!(can_multi_conn(&sock).await, Some(2));
    exec(h, "nbd-server-stop", json!({})).await;
    exec(h, "nbd-server-start", json!({"addr": addr})).await;
    exec(h, "block-export-add", export).await;
    assert_eq!(can_multi_conn(&sock).await, Some(0));
}
