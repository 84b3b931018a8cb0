//! `diskstream stream` through the binary: the step loop, JSON output,
//! Ctrl-C (SIGINT) cancelling resumably, and SIGKILL at random moments —
//! after each kill the image checks clean (leaks allowed) and a rerun
//! completes to the same content.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_diskstream");
const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A qcow2 base with `runs` 1 MiB runs of pseudo-random data (written by
/// qemu-io with seeded patterns) and a qcow2 top over it.
fn fixture(dir: &Path, size_mib: u64, runs: u64) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            p(&base),
            &format!("{size_mib}M"),
        ],
    );
    let mut cmds = Vec::new();
    for i in 0..runs {
        let slot = (i * 7919) % size_mib;
        cmds.push("-c".to_string());
        cmds.push(format!("write -P {} {}M 1M", (i % 250) + 1, slot));
    }
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    args.extend(cmds.iter().map(String::as_str));
    args.push(p(&base));
    run("qemu-io", &args);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    (base, top)
}

fn has_backing(img: &Path) -> bool {
    let out = run("qemu-img", &["info", "-U", "--output=json", p(img)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.get("backing-filename").is_some()
}

fn check_no_corruption(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", p(img)])
        .output()
        .unwrap();
    // 0 = clean, 3 = leaks only (allowed after a kill).
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check {} exited {code:?}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn compare(a: &Path, b: &Path) {
    run("qemu-img", &["compare", p(a), p(b)]);
}

#[test]
fn step_loop_through_the_cli_completes() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = fixture(d.path(), 16, 6);
    let mut offset = 0u64;
    let mut calls = 0;
    loop {
        let out = run(
            BIN,
            &[
                "stream",
                "--step",
                &offset.to_string(),
                "--output",
                "json",
                p(&top),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let next = v["next-offset"].as_u64().unwrap();
        assert!(
            next > offset || v["completed"] == true,
            "offsets strictly increase: {offset} -> {next}"
        );
        offset = next;
        calls += 1;
        assert!(calls <= 64, "too many steps");
        if v["completed"] == true {
            assert_eq!(next, 16 * MIB);
            break;
        }
    }
    assert!(!has_backing(&top));
    compare(&top, &base);
    run("qemu-img", &["check", p(&top)]);
}

#[test]
fn sigint_cancels_resumably() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = fixture(d.path(), 64, 40);
    let child = Command::new(BIN)
        .args(["stream", "--speed", "8M", "--output", "json", p(&top)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on the pid of a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "cancelled");
    assert!(has_backing(&top), "a cancelled stream keeps the link");
    run("qemu-img", &["check", p(&top)]);
    run(BIN, &["stream", p(&top)]);
    assert!(!has_backing(&top));
    compare(&top, &base);
}

#[test]
fn sigkill_at_random_moments_leaves_a_valid_resumable_image() {
    let iters: u64 = std::env::var("DS_CRASH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let d = tempfile::tempdir().unwrap();
    let (base, top) = fixture(d.path(), 64, 48);
    // Deterministic pseudo-random kill delays.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(50 + x % 400);
        let mut child = Command::new(BIN)
            .args(["stream", "--speed", "64M", p(&top)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        check_no_corruption(&top);
        if !has_backing(&top) {
            // The stream finished before the kill: start over from a fresh top.
            compare(&top, &base);
            std::fs::remove_file(&top).unwrap();
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    p(&base),
                    "-F",
                    "qcow2",
                    p(&top),
                ],
            );
        }
    }
    // Whatever state the last kill left, a rerun completes it.
    run(BIN, &["stream", p(&top)]);
    assert!(!has_backing(&top));
    compare(&top, &base);
    // Clusters allocated by a killed process before its metadata reached
    // the file may leak; corruption never.
    check_no_corruption(&top);
}

/// An overlay whose backing is an NBD export (as qemu-img writes it:
/// `-b nbd+unix:///?socket=... -F raw`): `info` follows the chain and
/// `stream` copies it all, over the network opener.
#[test]
fn stream_and_info_over_an_nbd_backing() {
    let d = tempfile::tempdir().unwrap();
    let (base, _) = fixture(d.path(), 16, 6);
    let raw = d.path().join("base.raw");
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(&base), p(&raw)],
    );
    let sock = d.path().join("base.sock");
    let mut server = Command::new("qemu-nbd")
        .args([
            "-r",
            "-f",
            "raw",
            "--persistent",
            "--shared=8",
            "-k",
            p(&sock),
            p(&raw),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let top = d.path().join("nbd-top.qcow2");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &uri,
            "-F",
            "raw",
            p(&top),
        ],
    );
    let info = run(BIN, &["info", "--output", "json", p(&top)]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["backing-filename"], uri.as_str(), "{v}");
    run(BIN, &["stream", "--output", "json", p(&top)]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(!has_backing(&top));
    check_no_corruption(&top);
    compare(&raw, &top);
}
