//! `diskstream stream` through the binary: the step loop, JSON output,
//! Ctrl-C (SIGINT) cancelling resumably, and SIGKILL at random moments —
//! after each kill the image checks clean (leaks allowed) and a rerun
//! completes to the same content.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_diskstream");
const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Longest any one tool run may take before `timeout` kills it.
const RUN_LIMIT_SECS: u32 = 300;

/// Runs `cmd` (bounded by `timeout`) and asserts success.
fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new("timeout")
        .args(["-k", "5", &RUN_LIMIT_SECS.to_string(), cmd])
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

/// A peer NBD server process, killed (and reaped) on drop, so it goes
/// even when an assertion fails.
struct Peer {
    name: &'static str,
    child: Child,
}

impl Peer {
    /// Spawns `cmd args` and waits (bounded) until `sock` accepts a
    /// connection; fails early if the process exits first.
    fn start(name: &'static str, cmd: &str, args: &[&str], sock: &Path) -> Peer {
        // Stderr to a file (a pipe nobody reads could fill and block it).
        let log = sock.with_extension("log");
        let child = Command::new(cmd)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        let mut peer = Peer { name, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(sock).is_err() {
            if let Some(st) = peer.child.try_wait().unwrap() {
                let err = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{name} exited ({st}) before listening: {err}");
            }
            assert!(Instant::now() < deadline, "{name} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        peer
    }

    /// Kills the server now and checks it was still running.
    fn stop(mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{} died during the test",
            self.name
        );
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nbd_uri(export: &str, sock: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// The 64 KiB clusters of a raw image that hold only zeros.
fn zero_clusters(raw: &Path) -> Vec<bool> {
    let data = std::fs::read(raw).unwrap();
    data.chunks(CLUSTER as usize)
        .map(|c| c.iter().all(|&b| b == 0))
        .collect()
}

const CLUSTER: u64 = 64 << 10;

/// What every NBD peer must give: an overlay of `uri` (whose export holds
/// the bytes of `base_raw`) reads the same as the base, `info` follows the
/// chain, `stream` copies it all over the network opener, and afterwards
/// the overlay stands alone, checks clean, equals the base, and allocates
/// no data where the base was zero.
fn overlay_streams_over(d: &Path, base_raw: &Path, uri: &str) {
    let top = d.join("nbd-top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            uri,
            "-F",
            "raw",
            p(&top),
        ],
    );
    // Through the backing, before any copy: identical to the base.
    compare(&top, base_raw);
    let info = run(BIN, &["info", "--output", "json", p(&top)]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["backing-filename"], uri, "{v}");
    let out = run(BIN, &["stream", "--output", "json", p(&top)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "completed", "{v}");
    assert!(!has_backing(&top), "the backing link is still there");
    // Clean: no leaks either (nothing was killed).
    let chk = Command::new("timeout")
        .args(["-k", "5", "60", "qemu-img", "check", p(&top)])
        .output()
        .unwrap();
    assert_eq!(
        chk.status.code(),
        Some(0),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&chk.stdout),
        String::from_utf8_lossy(&chk.stderr)
    );
    compare(base_raw, &top);
    // Zero clusters of the base are not data in the top.
    let zeros = zero_clusters(base_raw);
    assert!(zeros.iter().any(|&z| z), "the base has no zero clusters");
    assert!(zeros.iter().any(|&z| !z), "the base has no data");
    let out = run("qemu-img", &["map", "--output=json", p(&top)]);
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut data_bytes = 0;
    for e in &map {
        if e["data"] != true {
            continue;
        }
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        data_bytes += len;
        for c in start / CLUSTER..(start + len).div_ceil(CLUSTER) {
            assert!(
                !zeros[c as usize],
                "cluster at {} is data in the top but zero in the base: {e}",
                c * CLUSTER
            );
        }
    }
    let base_data = zeros.iter().filter(|&&z| !z).count() as u64 * CLUSTER;
    assert_eq!(
        data_bytes, base_data,
        "data in the top differs from the base"
    );
}

/// A 16 MiB sparse raw image: pseudo-random data in 64 KiB-aligned runs of
/// assorted lengths, holes elsewhere.
fn random_sparse_raw(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(16 * MIB).unwrap();
    let runs: [(u64, u64); 7] = [
        (0, 256 << 10),
        (MIB + CLUSTER, 512 << 10),
        (3 * MIB, CLUSTER),
        (5 * MIB, 2 * MIB),
        (9 * MIB + 3 * CLUSTER, 2 * CLUSTER),
        (12 * MIB + 7 * CLUSTER, 5 * CLUSTER),
        (16 * MIB - CLUSTER, CLUSTER),
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for (off, len) in runs {
        let buf: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        f.write_all_at(&buf, off).unwrap();
    }
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
    let server = Peer::start(
        "qemu-nbd",
        "qemu-nbd",
        &[
            "-r",
            "-f",
            "raw",
            "--persistent",
            "--shared=8",
            "-k",
            p(&sock),
            p(&raw),
        ],
        &sock,
    );
    overlay_streams_over(d.path(), &raw, &nbd_uri("", &sock));
    server.stop();
}

/// The same over a named export of qemu-storage-daemon (a raw file node).
#[test]
fn stream_over_a_qemu_storage_daemon_export() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("base.raw");
    random_sparse_raw(&raw);
    let sock = d.path().join("qsd.sock");
    let server = Peer::start(
        "qemu-storage-daemon",
        "qemu-storage-daemon",
        &[
            "--blockdev",
            &format!("driver=file,node-name=f,filename={},read-only=on", p(&raw)),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", p(&sock)),
            "--export",
            "type=nbd,id=e,node-name=f,name=base,writable=off",
        ],
        &sock,
    );
    overlay_streams_over(d.path(), &raw, &nbd_uri("base", &sock));
    server.stop();
}

/// The same over nbdkit's memory plugin, filled from the base by nbdcopy
/// (its holes stay holes in the plugin's sparse array).
#[test]
fn stream_over_an_nbdkit_memory_export() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("base.raw");
    random_sparse_raw(&raw);
    let sock = d.path().join("nbdkit.sock");
    let server = Peer::start(
        "nbdkit",
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "-U",
            p(&sock),
            "memory",
            "size=16M",
        ],
        &sock,
    );
    let uri = nbd_uri("", &sock);
    run("nbdcopy", &[p(&raw), &uri]);
    // The export now reads as the base, and its holes are holes.
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&raw), &uri],
    );
    let map = run("nbdinfo", &["--map", &uri]);
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(
        map.lines().any(|l| l.contains("hole")),
        "nbdkit memory holds no holes: {map}"
    );
    overlay_streams_over(d.path(), &raw, &uri);
    server.stop();
}

/// `serve --record-profile` writes the first-touch order of a client's
/// reads; `stream --policy adaptive --profile` on a fresh overlay copies
/// those ranges first (their clusters come first in the file, in order).
#[test]
fn serve_records_a_profile_and_stream_replays_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, top) = fixture(d, 16, 16);
    let sock = d.join("s.sock");
    let prof = d.join("boot.profile");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "-k",
            p(&sock),
            "--record-profile",
            p(&prof),
            p(&top),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "serve did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read 9M 4k",
            "-c",
            "read 3M 4k",
            "-c",
            "read 9M 4k",
            "-c",
            "read 12M 64k",
            &uri,
        ],
    );
    // Not persistent: the server ends when its one client leaves.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let text = std::fs::read_to_string(&prof).unwrap();
    let unit = 64 << 10;
    let want = [9 * MIB, 3 * MIB, 12 * MIB];
    let mut expect = format!("# diskstream access profile v1 unit={unit}\n");
    for o in want {
        expect.push_str(&format!("{o}\n"));
    }
    assert_eq!(text, expect);

    // A bad profile is refused, naming the line.
    let bad = d.join("bad.profile");
    std::fs::write(&bad, format!("{}7\n", expect)).unwrap();
    let top2 = d.join("top2.qcow2");
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
            p(&top2),
        ],
    );
    let out = Command::new(BIN)
        .args(["stream", "--profile", p(&bad), p(&top2)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 5") && err.contains("bad.profile"),
        "{err}"
    );

    run(
        BIN,
        &[
            "stream",
            "--policy",
            "adaptive",
            "--grace-ms",
            "10",
            "--profile",
            p(&prof),
            "--in-flight",
            "1",
            "--chunk-size",
            "64K",
            p(&top2),
        ],
    );
    assert!(!has_backing(&top2));
    compare(&base, &top2);
    check_no_corruption(&top2);
    let out = run("qemu-img", &["map", "--output=json", p(&top2)]);
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let host = |g: u64| {
        map.iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= g && g < s + e["length"].as_u64().unwrap()
            })
            .and_then(|e| Some(e["offset"].as_u64()? + g - e["start"].as_u64().unwrap()))
    };
    let hosts: Vec<u64> = want
        .iter()
        .map(|&g| host(g).expect("profiled data"))
        .collect();
    assert!(hosts.windows(2).all(|w| w[0] < w[1]), "{hosts:?}");
    for e in &map {
        if let Some(o) = e["offset"].as_u64() {
            let s = e["start"].as_u64().unwrap();
            if !want
                .iter()
                .any(|&g| g >= s && g < s + e["length"].as_u64().unwrap())
            {
                assert!(o > hosts[2], "{e} allocated before the profile");
            }
        }
    }
}
