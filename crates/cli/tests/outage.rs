//! Backing outages, by DESIGN.md's outage policy: an overlay with
//! copy-on-read over an NBD backing served by a real peer (qemu-nbd or
//! nbdkit), streamed while a guest reads, and the peer killed, restarted,
//! frozen (SIGSTOP), slowed (`nbdkit --filter=delay`) or made to fail reads
//! (`nbdkit --filter=error`). Expected: within the reconnect window guest
//! I/O to remote data waits and nothing fails; past it those requests fail
//! with EIO while local data keeps working; the job pauses and resumes by
//! itself when the backing returns, and the stream completes; nothing local
//! is lost (`qemu-img check`, content compared at the end).
//!
//! Prints `outage.CASE.survived=N`.

mod reliab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use image::{BlockDevice, Image, OpenOptions, WriteFlags};
use nbd::client::{ClientOptions, NbdOpener};
use reliab::*;
use stream::{JobState, OnError, StreamJob, StreamOptions};

const SIZE: usize = 8 << 20;
/// Remote data the guest reads during outages (streamed last).
const REMOTE_AT: u64 = (SIZE - (1 << 20)) as u64;
const LONG: Duration = Duration::from_secs(60);

/// A backing server process, killed when dropped.
struct Peer {
    /// `None` once killed and reaped.
    child: Option<Child>,
    prog: &'static str,
    args: Vec<String>,
    sock: PathBuf,
}

impl Peer {
    fn start(sock: &Path, prog: &'static str, args: Vec<String>) -> Peer {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(prog)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {prog}: {e}"));
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(std::time::Instant::now() < end, "{prog}: no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Peer {
            child: Some(child),
            prog,
            args,
            sock: sock.to_owned(),
        }
    }

    fn qemu_nbd(sock: &Path, base: &Path) -> Peer {
        let args = ["-r", "-f", "raw", "--persistent", "--shared=8", "-k"]
            .iter()
            .map(|s| s.to_string())
            .chain([sock.display().to_string(), base.display().to_string()])
            .collect();
        Peer::start(sock, "qemu-nbd", args)
    }

    fn nbdkit(sock: &Path, base: &Path, filter: &[&str]) -> Peer {
        let mut args: Vec<String> = vec!["-f".into(), "-r".into(), "-U".into()];
        args.push(sock.display().to_string());
        let (filters, params): (Vec<&str>, Vec<&str>) =
            filter.iter().partition(|a| a.starts_with("--filter"));
        args.extend(filters.iter().map(|s| s.to_string()));
        args.push("file".into());
        args.push(base.display().to_string());
        args.extend(params.iter().map(|s| s.to_string()));
        Peer::start(sock, "nbdkit", args)
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("peer running").id();
        // SAFETY: kill(2) on the pid of a child we own and have not reaped;
        // no memory is involved.
        let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(&self.sock);
        }
    }

    /// The same server again on the same socket.
    fn restart(&mut self) {
        self.kill();
        let mut p = Peer::start(&self.sock, self.prog, self.args.clone());
        self.child = p.child.take();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SAFETY: as in `signal`: our unreaped child (it may be stopped).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.kill();
    }
}

struct Setup {
    dir: tempfile::TempDir,
    base: Vec<u8>,
    basep: PathBuf,
    sock: PathBuf,
    top: PathBuf,
}

fn setup(case: &Case) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("backing.sock");
    let backing = format!("nbd+unix:///?socket={}", sock.display());
    setup_in(case, dir, sock, &backing, "raw")
}

/// base.raw in `dir` (and base.qcow2, the same content, when `backing_fmt`
/// is qcow2) and a top of `case`'s format over `backing` in `backing_fmt`.
fn setup_in(
    case: &Case,
    dir: tempfile::TempDir,
    sock: PathBuf,
    backing: &str,
    backing_fmt: &str,
) -> Setup {
    let basep = dir.path().join("base.raw");
    let base = base_content(SIZE);
    write_base(&basep, &base);
    if backing_fmt == "qcow2" {
        let q = dir.path().join("base.qcow2");
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                basep.to_str().unwrap(),
                q.to_str().unwrap(),
            ],
        );
    }
    let top = dir.path().join(format!("top.{}", case.format));
    let mut args = vec!["create", "-q", "-u", "-f", case.format];
    if !case.options.is_empty() {
        args.extend(["-o", case.options]);
    }
    let sz = SIZE.to_string();
    args.extend(["-b", backing, "-F", backing_fmt, top.to_str().unwrap(), &sz]);
    run_ok("qemu-img", &args);
    Setup {
        dir,
        base,
        basep,
        sock,
        top,
    }
}

/// A backing server the scenarios take down and bring back.
trait Backing {
    fn down(&mut self);
    fn up(&mut self);
}

impl Backing for Peer {
    fn down(&mut self) {
        self.kill();
    }
    fn up(&mut self) {
        self.restart();
    }
}

impl Backing for http::testing::Nginx {
    fn down(&mut self) {
        self.stop();
    }
    fn up(&mut self) {
        self.start_again().expect("nginx again");
    }
}

async fn open(s: &Setup, window: Duration) -> Arc<Image> {
    let client = ClientOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Some(Duration::from_secs(1)),
        reconnect_window: Some(window),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        tls: None,
        ..ClientOptions::default()
    };
    let opts = OpenOptions {
        writable: true,
        opener: Some(Arc::new(NbdOpener { options: client })),
        ..OpenOptions::default()
    };
    let img = image::open(&s.top, &opts).await.unwrap();
    img.set_copy_on_read(true, None);
    img
}

fn start_stream(img: &Arc<Image>, speed: u64, on_error: OnError) -> Arc<StreamJob> {
    let opts = StreamOptions {
        device: "top".into(),
        base: stream::resolve_base(img, None).unwrap(),
        speed,
        on_error,
        chunk_size: 64 << 10,
        ..StreamOptions::default()
    };
    Arc::new(StreamJob::start(Arc::clone(img), opts))
}

/// Waits (bounded) until the job's state satisfies `pred`.
async fn until_state(job: &StreamJob, pred: impl Fn(JobState) -> bool, what: &str) {
    let mut rx = job.subscribe();
    tokio::time::timeout(LONG, async {
        // Bounded by the timeout.
        loop {
            if pred(*rx.borrow_and_update()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job never {what}: {:?}", job.info()));
}

/// Ends a scenario: the stream completed, the image closes, qemu-img finds
/// it clean, without backing, and holding the base plus `local`.
async fn finish(
    case: &Case,
    s: &Setup,
    img: Arc<Image>,
    job: &StreamJob,
    local: &[(u64, Vec<u8>)],
) {
    let r = tokio::time::timeout(LONG * 2, job.wait())
        .await
        .expect("stream never ended");
    let sum = r.unwrap_or_else(|e| panic!("stream failed: {e}"));
    assert_eq!(sum.outcome, stream::Outcome::Completed);
    img.close().await.unwrap();
    drop(img);
    let (code, out) = qemu_img_check(case, &s.top);
    assert_eq!(code, 0, "qemu-img check: {out}");
    assert!(!has_backing(&s.top));
    let mut want = s.base.clone();
    for (off, d) in local {
        want[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    let got = qemu_read_all(case, &s.top, &s.dir.path().join("read.raw"));
    assert!(got == want, "content after the stream");
}

fn base_at(s: &Setup, off: u64, len: usize) -> &[u8] {
    &s.base[off as usize..off as usize + len]
}

/// Down, back within the window: guest reads of remote data wait and
/// succeed, the stream never fails.
async fn down_up_within_window(case: &Case, s: &Setup, img: Arc<Image>, peer: &mut impl Backing) {
    let job = start_stream(&img, 4 << 20, OnError::Report);
    tokio::time::sleep(Duration::from_millis(300)).await;
    peer.down();
    let reader = {
        let img = Arc::clone(&img);
        tokio::spawn(async move { img.read(REMOTE_AT, 65536).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!reader.is_finished(), "a read of remote data did not wait");
    peer.up();
    let v = reader.await.unwrap().expect("read waited and succeeded");
    assert_eq!(v, base_at(s, REMOTE_AT, 65536));
    assert!(job.info().state != JobState::Failed);
    finish(case, s, img, &job, &[]).await;
}

/// Down past the window (`img` opened with a 500 ms one): remote reads fail
/// with EIO, local data and writes work, the job pauses itself and resumes
/// when the server is back.
async fn down_past_window(case: &Case, s: &Setup, img: Arc<Image>, peer: &mut impl Backing) {
    let local = stamped(7, 0, 65536);
    img.write(0, Bytes::from(local.clone()), WriteFlags::default())
        .await
        .unwrap();
    let job = start_stream(&img, 4 << 20, OnError::Report);
    tokio::time::sleep(Duration::from_millis(300)).await;
    peer.down();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = img
        .read(REMOTE_AT, 4096)
        .await
        .expect_err("a remote read past the window must fail");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(img.read(0, 65536).await.unwrap(), local, "local data");
    let local2 = stamped(8, 65536, 4096);
    img.write(65536, Bytes::from(local2.clone()), WriteFlags::default())
        .await
        .expect("a local write during the outage");
    until_state(&job, |s| s == JobState::Paused, "paused itself").await;
    // Paused for the outage (the backing unreachable), not for a failure.
    let info = job.info();
    assert_eq!(
        info.error_kind,
        Some(image::ErrorKind::Unavailable),
        "{info:?}"
    );
    assert!(info.error.is_some(), "{info:?}");
    peer.up();
    until_state(&job, |s| s != JobState::Paused, "resumed by itself").await;
    finish(case, s, img, &job, &[(0, local), (65536, local2)]).await;
}

/// qemu-nbd killed, restarted within the window.
async fn kill_restart_within_window(case: &Case) {
    let s = setup(case);
    let mut peer = Peer::qemu_nbd(&s.sock, &s.basep);
    let img = open(&s, Duration::from_secs(30)).await;
    down_up_within_window(case, &s, img, &mut peer).await;
}

/// qemu-nbd killed past the window.
async fn dead_past_window(case: &Case) {
    let s = setup(case);
    let mut peer = Peer::qemu_nbd(&s.sock, &s.basep);
    let img = open(&s, Duration::from_millis(500)).await;
    down_past_window(case, &s, img, &mut peer).await;
}

/// Frozen (SIGSTOP, a hung peer) within the window: requests time out, the
/// client reconnects once the peer thaws, and nothing fails.
async fn frozen_within_window(case: &Case) {
    let s = setup(case);
    let peer = Peer::qemu_nbd(&s.sock, &s.basep);
    let img = open(&s, Duration::from_secs(30)).await;
    let job = start_stream(&img, 4 << 20, OnError::Report);
    tokio::time::sleep(Duration::from_millis(300)).await;
    peer.signal(libc::SIGSTOP);
    let reader = {
        let img = Arc::clone(&img);
        tokio::spawn(async move { img.read(REMOTE_AT, 65536).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !reader.is_finished(),
        "a read from a frozen peer did not wait"
    );
    peer.signal(libc::SIGCONT);
    let v = reader.await.unwrap().expect("read after the thaw");
    assert_eq!(v, base_at(&s, REMOTE_AT, 65536));
    finish(case, &s, img, &job, &[]).await;
}

/// Slowed by `nbdkit --filter=delay`: everything completes, just later.
async fn slow_backing(case: &Case) {
    let s = setup(case);
    let _peer = Peer::nbdkit(&s.sock, &s.basep, &["--filter=delay", "delay-read=20ms"]);
    let img = open(&s, Duration::from_secs(30)).await;
    let job = start_stream(&img, 0, OnError::Report);
    let v = img.read(REMOTE_AT, 65536).await.unwrap();
    assert_eq!(v, base_at(&s, REMOTE_AT, 65536));
    finish(case, &s, img, &job, &[]).await;
}

/// Failing reads (`nbdkit --filter=error` while a trigger file exists): the
/// server answers with EIO, which is not an outage. Guest reads of remote
/// data get EIO, local data works; with on-error=stop the job pauses, and
/// after the errors stop, resuming completes it.
async fn failing_reads(case: &Case) {
    let s = setup(case);
    let trigger = s.dir.path().join("fail-reads");
    let trig = format!("error-pread-file={}", trigger.display());
    let _peer = Peer::nbdkit(
        &s.sock,
        &s.basep,
        &[
            "--filter=error",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &trig,
        ],
    );
    let img = open(&s, Duration::from_secs(30)).await;
    let local = stamped(9, 0, 65536);
    img.write(0, Bytes::from(local.clone()), WriteFlags::default())
        .await
        .unwrap();
    std::fs::write(&trigger, b"").unwrap();
    let job = start_stream(&img, 0, OnError::Stop);
    until_state(&job, |s| s == JobState::Paused, "paused on EIO").await;
    let e = img
        .read(REMOTE_AT, 4096)
        .await
        .expect_err("remote read fails");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(img.read(0, 65536).await.unwrap(), local);
    std::fs::remove_file(&trigger).unwrap();
    job.resume();
    finish(case, &s, img, &job, &[(0, local)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_outages_follow_the_outage_policy() {
    for case in overlay_cases() {
        let mut survived = 0;
        kill_restart_within_window(&case).await;
        survived += 1;
        dead_past_window(&case).await;
        survived += 1;
        frozen_within_window(&case).await;
        survived += 1;
        slow_backing(&case).await;
        survived += 1;
        failing_reads(&case).await;
        survived += 1;
        println!("outage.{}.survived={survived}", case.name);
    }
}

// ---- the HTTP backing ------------------------------------------------------

/// An overlay whose backing is `base.<backing_fmt>` (raw or qcow2) served by
/// nginx over HTTP.
fn http_setup(case: &Case, backing_fmt: &str) -> (Setup, http::testing::Nginx) {
    let dir = tempfile::tempdir().unwrap();
    // Serves the directory; the base is written into it next.
    let nginx = http::testing::Nginx::start(dir.path(), "").expect("nginx");
    let url = nginx.url(&format!("base.{backing_fmt}"));
    let sock = dir.path().join("unused.sock");
    (setup_in(case, dir, sock, &url, backing_fmt), nginx)
}

async fn http_open(s: &Setup, window: Duration) -> Arc<Image> {
    let options = http::HttpOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        retry_window: Some(window),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..http::HttpOptions::default()
    };
    let opts = OpenOptions {
        writable: true,
        opener: Some(Arc::new(http::HttpOpener { options })),
        ..OpenOptions::default()
    };
    let img = image::open(&s.top, &opts).await.unwrap();
    img.set_copy_on_read(true, None);
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_backing_outages_follow_the_outage_policy() {
    for case in overlay_cases() {
        let mut survived = 0;
        let (s, mut nginx) = http_setup(&case, "raw");
        let img = http_open(&s, Duration::from_secs(30)).await;
        down_up_within_window(&case, &s, img, &mut nginx).await;
        survived += 1;
        let (s, mut nginx) = http_setup(&case, "raw");
        let img = http_open(&s, Duration::from_millis(500)).await;
        down_past_window(&case, &s, img, &mut nginx).await;
        survived += 1;
        println!("outage.http.{}.survived={survived}", case.name);
    }
}

/// A qcow2 backing over HTTP: the qcow2 engine reads the remote file through
/// a storage layer, and its outage must reach the stream as an outage too
/// (the job pauses past the window; it failed with an I/O error before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_qcow2_backing_outages_follow_the_outage_policy() {
    let case = &overlay_cases()[0];
    let (s, mut nginx) = http_setup(case, "qcow2");
    let img = http_open(&s, Duration::from_secs(30)).await;
    down_up_within_window(case, &s, img, &mut nginx).await;
    let (s, mut nginx) = http_setup(case, "qcow2");
    let img = http_open(&s, Duration::from_millis(500)).await;
    down_past_window(case, &s, img, &mut nginx).await;
    println!("outage.http_qcow2_backing.{}.survived=2", case.name);
}
