//! `diskstream daemon` driven over its QMP socket by the real PyPI `qemu.qmp`
//! client (scripts in `tests/qmp/`, run with `$DS_PYTHON`), and the same
//! block-stream sequence run against `qemu-storage-daemon` for comparison.
//!
//! Every wait is bounded; sockets live in temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_diskstream");

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$DS_PYTHON`, else `target/venv/bin/python`; either must import qemu.qmp.
fn python() -> PathBuf {
    let py = std::env::var_os("DS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/venv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{}: no Python with qemu.qmp; set DS_PYTHON or run: python3 -m venv target/venv && \
         target/venv/bin/pip install qemu.qmp",
        py.display()
    );
    py
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/qmp")
        .join(name)
}

fn run_py(name: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(script(name))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{name} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn wait_for_socket(child: &mut Child, sock: &Path) {
    let end = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited early: {st}");
        }
        assert!(
            Instant::now() < end,
            "{}: socket never appeared",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `diskstream daemon`; killed if a test fails before stopping it.
struct Daemon {
    child: Child,
    sock: PathBuf,
    pidfile: PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let sock = dir.join("qmp.sock");
        let pidfile = dir.join("daemon.pid");
        let mut child = Command::new(BIN)
            .args(["daemon", "--qmp"])
            .arg(&sock)
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .spawn()
            .expect("start diskstream daemon");
        wait_for_socket(&mut child, &sock);
        Daemon {
            child,
            sock,
            pidfile,
        }
    }

    fn sock(&self) -> &str {
        self.sock.to_str().unwrap()
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    fn terminate(mut self) {
        let pid: i32 = std::fs::read_to_string(&self.pidfile)
            .expect("pid file")
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid as u32, self.child.id());
        run("kill", &["-TERM", &pid.to_string()]);
        let end = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < end, "daemon did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "daemon exit status {status}");
        assert!(!self.sock.exists(), "socket left behind");
        assert!(!self.pidfile.exists(), "pid file left behind");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ds(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run diskstream")
}

#[test]
fn qmp_protocol_errors_and_job_verbs_with_qemu_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", raw.to_str().unwrap(), "4M"],
    );
    let d = Daemon::start(dir.path());
    let out = run_py("protocol.py", &[d.sock(), raw.to_str().unwrap()]);
    assert_eq!(out.trim(), "ok");
    d.terminate();
}

#[test]
fn client_commands_qmp_pull_job_and_pull_step() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let raw_s = raw.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "raw", raw_s, "4M"]);
    let d = Daemon::start(dir.path());
    let sock = d.sock();

    let out = ds(&["qmp", "--qmp", sock, r#"{"execute": "query-version"}"#]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["qemu"]["major"], 10);

    let out = ds(&["qmp", "--qmp", sock, r#"{"execute": "nope"}"#]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CommandNotFound"), "{err}");

    let add = format!(
        r#"{{"execute": "blockdev-add", "arguments": {{"driver": "raw", "node-name": "d0", "file": {{"driver": "file", "filename": "{raw_s}"}}}}}}"#
    );
    assert!(ds(&["qmp", "--qmp", sock, &add]).status.success());

    let out = ds(&["job", "d0", "--qmp", sock]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "No current block job for d0"
    );
    let out = ds(&["job", "d0", "--qmp", sock, "--pause"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DeviceNotActive: Block job 'd0' not found"),
        "{err}"
    );

    let out = ds(&["pull", "d0", "--qmp", sock, "--wait", "--timeout", "60"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Pull complete");

    let out = ds(&["pull-step", "d0", "0", "--qmp", sock]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["next-offset"], 4 << 20);
    assert_eq!(v["completed"], true);
    d.terminate();
}

/// A 32 MiB qcow2 base with 16 MiB of data (and a zeroed range), and an
/// empty qcow2 overlay over it.
fn make_chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    run("qemu-img", &["create", "-q", "-f", "qcow2", b, "32M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x22 12M 8M",
            "-c",
            "write -z 24M 1M",
            b,
        ],
    );
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
    );
    (base, top)
}

/// The overlay holds everything, reads like the base, has no backing and
/// checks clean.
fn assert_streamed(base: &Path, top: &Path) {
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    run("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", b, t]);
    run("qemu-img", &["check", "-f", "qcow2", t]);
    let info = run("qemu-img", &["info", "--output", "json", "-f", "qcow2", t]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(v.get("backing-filename").is_none(), "backing left: {v}");
}

fn job_events(out: &str) -> Vec<(String, Option<String>)> {
    serde_json::from_str(out.trim()).expect("event list")
}

#[test]
fn block_stream_pause_resume_cancel_then_complete_with_qemu_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = make_chain(dir.path());
    let d = Daemon::start(dir.path());
    let out = run_py(
        "stream_seq.py",
        &[d.sock(), base.to_str().unwrap(), top.to_str().unwrap()],
    );
    d.terminate();
    let ev = job_events(&out);
    let s = |st: &str| ("JOB_STATUS_CHANGE".to_string(), Some(st.to_string()));
    let e = |n: &str| (n.to_string(), None);
    let want = vec![
        s("created"),
        s("running"),
        s("paused"),
        s("running"),
        s("aborting"),
        e("BLOCK_JOB_CANCELLED"),
        s("concluded"),
        s("null"),
        s("created"),
        s("running"),
        s("waiting"),
        s("pending"),
        e("BLOCK_JOB_COMPLETED"),
        s("concluded"),
        s("null"),
    ];
    assert_eq!(ev, want);
    assert_streamed(&base, &top);
}

/// The same QMP sequence against qemu-storage-daemon and diskstream daemon:
/// the same job states and events, and images that compare identical.
#[test]
fn differential_block_stream_against_qemu_storage_daemon() {
    let qdir = tempfile::tempdir().unwrap();
    let (qbase, qtop) = make_chain(qdir.path());
    let qsock = qdir.path().join("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qmp0",
            qsock.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon");
    wait_for_socket(&mut qsd, &qsock);
    let q_out = run_py(
        "stream_seq.py",
        &[
            qsock.to_str().unwrap(),
            qbase.to_str().unwrap(),
            qtop.to_str().unwrap(),
        ],
    );
    let _ = qsd.kill();
    let _ = qsd.wait();

    let ddir = tempfile::tempdir().unwrap();
    let (dbase, dtop) = make_chain(ddir.path());
    let d = Daemon::start(ddir.path());
    let d_out = run_py(
        "stream_seq.py",
        &[d.sock(), dbase.to_str().unwrap(), dtop.to_str().unwrap()],
    );
    d.terminate();

    assert_eq!(job_events(&d_out), job_events(&q_out));
    assert_streamed(&qbase, &qtop);
    assert_streamed(&dbase, &dtop);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            qtop.to_str().unwrap(),
            dtop.to_str().unwrap(),
        ],
    );
}

/// SIGTERM with a job running: the daemon cancels it, flushes, exits 0; the
/// image checks clean, keeps its backing, and a new stream completes it.
#[test]
fn sigterm_with_a_running_stream_leaves_a_consistent_resumable_image() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = make_chain(dir.path());
    let t = top.to_str().unwrap();
    let d = Daemon::start(dir.path());
    let out = run_py("sigterm_start.py", &[d.sock(), t]);
    assert_eq!(out.trim(), "started");
    d.terminate();

    run("qemu-img", &["check", "-f", "qcow2", t]);
    let info = run("qemu-img", &["info", "--output", "json", "-f", "qcow2", t]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        v.get("backing-filename").is_some(),
        "stream finished before SIGTERM: {v}"
    );
    let map = run("qemu-img", &["map", "--output", "json", "-f", "qcow2", t]);
    let m: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let local: u64 = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        local > 0 && local < 16 << 20,
        "local bytes after SIGTERM: {local}"
    );

    let d = Daemon::start(dir.path());
    run_py("stream_seq.py", &[d.sock(), base.to_str().unwrap(), t]);
    d.terminate();
    assert_streamed(&base, &top);
}

/// A node exported over NBD while the daemon runs: qemu-img reads it,
/// qemu-io writes through it, and the write is in the file afterwards.
#[test]
fn nbd_export_of_a_node_serves_qemu_img_and_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let raw_s = raw.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "raw", raw_s, "8M"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 1M 2M", raw_s],
    );
    let nbd_sock = dir.path().join("nbd.sock");
    let d = Daemon::start(dir.path());
    let out = run_py(
        "exports.py",
        &[d.sock(), raw_s, "add", nbd_sock.to_str().unwrap()],
    );
    assert_eq!(out.trim(), "ok");
    let uri = format!("nbd+unix:///d0?socket={}", nbd_sock.display());
    // The daemon holds the image's write lock, as QEMU would: read it with -U.
    run(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", "raw", raw_s, &uri],
    );
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 64k", &uri]);
    let out = run_py("exports.py", &[d.sock(), raw_s, "del"]);
    assert_eq!(out.trim(), "ok");
    assert!(!nbd_sock.exists(), "NBD socket left after nbd-server-stop");
    d.terminate();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "read -P 0x3c 1M 2M",
            raw_s,
        ],
    );
}

/// `--nbd unix:PATH` starts the NBD server with the daemon.
#[test]
fn daemon_nbd_flag_starts_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let nbd_sock = dir.path().join("nbd.sock");
    let mut child = Command::new(BIN)
        .args(["daemon", "--qmp"])
        .arg(&sock)
        .arg("--nbd")
        .arg(format!("unix:{}", nbd_sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&mut child, &sock);
    wait_for_socket(&mut child, &nbd_sock);
    let out = ds(&[
        "qmp",
        "--qmp",
        sock.to_str().unwrap(),
        r#"{"execute": "nbd-server-stop"}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ds(&[
        "qmp",
        "--qmp",
        sock.to_str().unwrap(),
        r#"{"execute": "quit"}"#,
    ]);
    assert!(out.status.success());
    let end = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "daemon did not exit after quit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success());
    assert!(!sock.exists());
}

/// `pull --wait --timeout` cancels a pull that takes too long (the image
/// keeps its backing), and a second `pull --wait` completes it; `job`
/// controls a running pull.
#[test]
fn pull_wait_timeout_cancels_and_a_second_pull_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = make_chain(dir.path());
    let t = top.to_str().unwrap();
    let d = Daemon::start(dir.path());
    let sock = d.sock();
    let add = format!(
        r#"{{"execute": "blockdev-add", "arguments": {{"driver": "qcow2", "node-name": "top", "file": {{"driver": "file", "filename": "{t}"}}}}}}"#
    );
    assert!(ds(&["qmp", "--qmp", sock, &add]).status.success());

    let out = ds(&[
        "pull",
        "top",
        "--qmp",
        sock,
        "--bandwidth",
        "1M",
        "--wait",
        "--timeout",
        "1",
    ]);
    assert!(
        !out.status.success(),
        "a 16 MiB pull at 1 MiB/s ended within 1 s"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timed out") && err.contains("cancelled"),
        "{err}"
    );
    let out = ds(&["job", "top", "--qmp", sock]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "No current block job for top"
    );

    let out = ds(&["pull", "top", "--qmp", sock, "--bandwidth", "1M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ds(&["job", "top", "--qmp", sock, "--output", "json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["type"], "stream");
    assert_eq!(j["speed"], 1 << 20);
    let out = ds(&["job", "top", "--qmp", sock, "--bandwidth", "0"]);
    assert!(out.status.success());
    // The job may already be gone; what matters is how the image ends.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ds(&["job", "top", "--qmp", sock]);
        if String::from_utf8_lossy(&out.stdout).contains("No current block job") {
            break;
        }
        assert!(Instant::now() < end, "pull did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let del = r#"{"execute": "blockdev-del", "arguments": {"node-name": "top"}}"#;
    assert!(ds(&["qmp", "--qmp", sock, del]).status.success());
    d.terminate();
    assert_streamed(&base, &top);
}

fn start_qsd(dir: &Path) -> (Child, PathBuf) {
    let qsock = dir.join("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qmp0",
            qsock.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon");
    wait_for_socket(&mut qsd, &qsock);
    (qsd, qsock)
}

/// The same bad commands against qemu-storage-daemon and diskstream daemon
/// get the same error class and message (same file and node names).
#[test]
fn differential_error_replies_against_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = make_chain(dir.path());
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    let (mut qsd, qsock) = start_qsd(dir.path());
    let q_out = run_py("errors.py", &[qsock.to_str().unwrap(), b, t]);
    let _ = qsd.kill();
    let _ = qsd.wait();
    let d = Daemon::start(dir.path());
    let d_out = run_py("errors.py", &[d.sock(), b, t]);
    d.terminate();
    let q: Vec<Vec<String>> = serde_json::from_str(q_out.trim()).unwrap();
    let ds_: Vec<Vec<String>> = serde_json::from_str(d_out.trim()).unwrap();
    assert_eq!(q.len(), ds_.len());
    let diffs: Vec<_> = q.iter().zip(&ds_).filter(|(a, b)| a != b).collect();
    assert!(
        diffs.is_empty(),
        "qemu-storage-daemon vs diskstream: {diffs:#?}"
    );
}

/// One-unit mode over QMP: a management loop of `pull-step` calls, each
/// returning the next offset, streams a qcow2 overlay to completion.
#[test]
fn pull_step_loop_streams_a_qcow2_overlay_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = make_chain(dir.path());
    let t = top.to_str().unwrap();
    let d = Daemon::start(dir.path());
    let sock = d.sock();
    let add = format!(
        r#"{{"execute": "blockdev-add", "arguments": {{"driver": "qcow2", "node-name": "top", "file": {{"driver": "file", "filename": "{t}"}}}}}}"#
    );
    assert!(ds(&["qmp", "--qmp", sock, &add]).status.success());
    let mut offset = 0u64;
    let mut steps = 0;
    // Bounded: at most one step per MiB of the 32 MiB image, plus the last.
    loop {
        steps += 1;
        assert!(steps <= 40, "too many steps");
        let out = ds(&["pull-step", "top", &offset.to_string(), "--qmp", sock]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let next = v["next-offset"].as_u64().unwrap();
        assert!(next > offset || next == 32 << 20, "{v}");
        offset = next;
        if v["completed"] == true {
            break;
        }
    }
    let del = r#"{"execute": "blockdev-del", "arguments": {"node-name": "top"}}"#;
    assert!(ds(&["qmp", "--qmp", sock, del]).status.success());
    d.terminate();
    assert_streamed(&base, &top);
}

fn qmp_ok(sock: &str, request: &str) {
    let out = ds(&["qmp", "--qmp", sock, request]);
    assert!(
        out.status.success(),
        "{request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Post-copy block migration between two daemons: the source exports its
/// disk over NBD, the destination opens an overlay whose backing is that
/// export and pulls it; the result is the source's disk, with no backing.
#[test]
fn post_copy_between_two_daemons_over_nbd() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let base = src_dir.path().join("disk.raw");
    let b = base.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "raw", b, "32M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x22 12M 8M",
            b,
        ],
    );
    let nbd_sock = src_dir.path().join("nbd.sock");
    let src = Daemon::start(src_dir.path());
    qmp_ok(
        src.sock(),
        &format!(
            r#"{{"execute": "blockdev-add", "arguments": {{"driver": "raw", "node-name": "disk", "read-only": true, "file": {{"driver": "file", "filename": "{b}"}}}}}}"#
        ),
    );
    qmp_ok(
        src.sock(),
        &format!(
            r#"{{"execute": "nbd-server-start", "arguments": {{"addr": {{"type": "unix", "data": {{"path": "{}"}}}}}}}}"#,
            nbd_sock.display()
        ),
    );
    qmp_ok(
        src.sock(),
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk"}}"#,
    );

    let top = dst_dir.path().join("top.qcow2");
    let t = top.to_str().unwrap();
    let uri = format!("nbd+unix:///disk?socket={}", nbd_sock.display());
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", &uri, "-F", "raw", t, "32M",
        ],
    );
    let dst = Daemon::start(dst_dir.path());
    qmp_ok(
        dst.sock(),
        &format!(
            r#"{{"execute": "blockdev-add", "arguments": {{"driver": "qcow2", "node-name": "top", "file": {{"driver": "file", "filename": "{t}"}}}}}}"#
        ),
    );
    let out = ds(&[
        "pull",
        "top",
        "--qmp",
        dst.sock(),
        "--wait",
        "--timeout",
        "120",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qmp_ok(
        dst.sock(),
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "top"}}"#,
    );
    dst.terminate();
    src.terminate();
    run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", b, t]);
    run("qemu-img", &["check", "-f", "qcow2", t]);
    let info = run("qemu-img", &["info", "--output", "json", "-f", "qcow2", t]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(v.get("backing-filename").is_none(), "backing left: {v}");
}

/// `object-add tls-creds-x509` + `nbd-server-start tls-creds`: QEMU's tools
/// read the export over TLS with their own credentials objects, plaintext
/// is refused, and `verify-peer=on` requires a client certificate.
#[test]
fn nbd_server_with_tls_creds_serves_qemu_over_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(workspace_root().join("scripts/make-test-certs"))
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A client directory without a client certificate.
    let anon = dir.path().join("anon");
    std::fs::create_dir(&anon).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();

    let raw = dir.path().join("disk.raw");
    let raw_s = raw.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "raw", raw_s, "4M"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x6b 1M 1M", raw_s],
    );
    let nbd_sock = dir.path().join("nbd.sock");
    let d = Daemon::start(dir.path());
    let certs_s = certs.to_str().unwrap();
    let qmp = |req: String| qmp_ok(d.sock(), &req);
    let qmp_err = |req: String| -> String {
        let out = ds(&["qmp", "--qmp", d.sock(), &req]);
        assert!(!out.status.success(), "{req} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    };
    // Refusals that name the problem.
    let e = qmp_err(format!(
        r#"{{"execute":"object-add","arguments":{{"qom-type":"tls-creds-x509","id":"bad","dir":"{}","endpoint":"server","verify-peer":false}}}}"#,
        dir.path().join("nowhere").display()
    ));
    assert!(e.contains("server-cert.pem"), "{e}");
    qmp(format!(
        r#"{{"execute":"object-add","arguments":{{"qom-type":"tls-creds-x509","id":"cli","dir":"{certs_s}"}}}}"#
    ));
    let e = qmp_err(format!(
        r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{}"}}}},"tls-creds":"cli"}}}}"#,
        nbd_sock.display()
    ));
    assert!(e.contains("server endpoint"), "{e}");

    let image_opts = |dir: &Path| {
        (
            format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                dir.display()
            ),
            format!(
                "driver=nbd,server.type=unix,server.path={},export=d0,tls-creds=tls0,tls-hostname=localhost",
                nbd_sock.display()
            ),
        )
    };
    let read_over_tls = |client_dir: &Path| {
        let (object, opts) = image_opts(client_dir);
        Command::new("qemu-io")
            .args([
                "-r",
                "--object",
                &object,
                "--image-opts",
                &opts,
                "-c",
                "read -P 0x6b 1M 1M",
            ])
            .output()
            .unwrap()
    };
    for (id, verify) in [("tls0", false), ("tls1", true)] {
        qmp(format!(
            r#"{{"execute":"object-add","arguments":{{"qom-type":"tls-creds-x509","id":"{id}","dir":"{certs_s}","endpoint":"server","verify-peer":{verify}}}}}"#
        ));
        qmp(format!(
            r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{}"}}}},"tls-creds":"{id}"}}}}"#,
            nbd_sock.display()
        ));
        if id == "tls0" {
            qmp(format!(
                r#"{{"execute":"blockdev-add","arguments":{{"driver":"raw","node-name":"n0","read-only":true,"file":{{"driver":"file","filename":"{raw_s}"}}}}}}"#
            ));
        }
        qmp(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"n0","name":"d0"}}"#.into());
        let e = qmp_err(format!(
            r#"{{"execute":"object-del","arguments":{{"id":"{id}"}}}}"#
        ));
        assert!(e.contains("in use"), "{e}");

        let ok = read_over_tls(&certs);
        assert!(
            ok.status.success(),
            "{id}: qemu-io over TLS: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let plain = Command::new("qemu-img")
            .args([
                "info",
                &format!("nbd+unix:///d0?socket={}", nbd_sock.display()),
            ])
            .output()
            .unwrap();
        assert!(!plain.status.success(), "{id}: plaintext client was served");
        let anon_read = read_over_tls(&anon);
        assert_eq!(
            anon_read.status.success(),
            !verify,
            "{id}: a client without a certificate: {}",
            String::from_utf8_lossy(&anon_read.stderr)
        );
        qmp(r#"{"execute":"nbd-server-stop"}"#.into());
        qmp(format!(
            r#"{{"execute":"object-del","arguments":{{"id":"{id}"}}}}"#
        ));
    }
    d.terminate();
}

/// A QED overlay through the daemon: `blockdev-add` with driver qed, a pull
/// to the end, and the image left streamed (no backing), checked clean and
/// identical to its old chain by qemu-img.
#[test]
fn qed_overlay_pulls_to_the_end_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = make_chain(dir.path());
    let b = base.to_str().unwrap();
    let top = dir.path().join("top.qed");
    let t = top.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qed", "-b", b, "-F", "qcow2", t],
    );
    let d = Daemon::start(dir.path());
    let sock = d.sock();
    let add = format!(
        r#"{{"execute": "blockdev-add", "arguments": {{"driver": "qed", "node-name": "top", "file": {{"driver": "file", "filename": "{t}"}}}}}}"#
    );
    let out = ds(&["qmp", "--qmp", sock, &add]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ds(&["pull", "top", "--qmp", sock, "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let del = r#"{"execute": "blockdev-del", "arguments": {"node-name": "top"}}"#;
    assert!(ds(&["qmp", "--qmp", sock, del]).status.success());
    d.terminate();
    run("qemu-img", &["compare", "-f", "qcow2", "-F", "qed", b, t]);
    run("qemu-img", &["check", "-f", "qed", t]);
    let info = run("qemu-img", &["info", "--output", "json", "-f", "qed", t]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(v.get("backing-filename").is_none(), "backing left: {v}");
}
