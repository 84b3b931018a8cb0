//! Post-copy migration end to end, both sides as separate processes on Unix
//! sockets: the source disk in a `diskstream daemon` (written by a
//! "source VM" over NBD, then `migrate send`), the destination
//! `migrate receive --verify` with a guest (qemu-io) writing during the
//! stream, the source killed and brought back mid-way as
//! `diskstream serve --read-only`. Also `deploy` (serving before any data
//! is read, at two sizes) and `--verify` catching a source changed behind
//! its back.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Dir, ds_ok, qemu, qemu_ok};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Every wait in these tests is bounded by this.
const LIMIT: Duration = Duration::from_secs(60);

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_diskstream")
}

/// A child process killed if the test ends before it does.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < LIMIT, "process did not exit within {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A diskstream command printing JSON events on stdout, read by a thread.
struct Events {
    proc: Proc,
    rx: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Events {
    fn start(d: &Dir, args: &[&str]) -> Events {
        let mut child = Command::new(bin())
            .args(args)
            .current_dir(d.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn diskstream");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON event: {line}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Events {
            proc: Proc(child),
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for the next event called `name` (bounded), keeping all seen.
    fn wait_for(&mut self, name: &str) -> Value {
        let end = Instant::now() + LIMIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == name {
                        return v;
                    }
                }
                Err(e) => panic!("no '{name}' event ({e}); seen: {:?}", self.seen),
            }
        }
    }

    /// Waits for the process to exit and collects the remaining events.
    fn finish(&mut self) -> std::process::ExitStatus {
        let st = self.proc.wait_exit();
        while let Ok(v) = self.rx.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(v);
        }
        st
    }

    fn names(&self) -> Vec<String> {
        self.seen
            .iter()
            .map(|v| v["event"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

/// SIGTERM to a child: the clean way to stop a server.
fn term(p: &Proc) {
    // SAFETY: kill(2) with our own child's pid; no memory is involved.
    let r = unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0);
}

fn wait_socket(p: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(t.elapsed() < LIMIT, "{} never listened", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw source: data in [0, 8M) and [16M, 24M) (a different byte per
/// 64 KiB so misplaced data shows), holes elsewhere.
fn source_raw(path: &Path, size: u64) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (range, salt) in [(0..8 * MIB, 1u64), (16 * MIB..24 * MIB, 7)] {
        for o in range.step_by(65536) {
            if o >= size {
                break;
            }
            let b = ((o >> 16) * salt % 251 + 1) as u8;
            d[o as usize..(o + 65536) as usize].fill(b);
        }
    }
    std::fs::write(path, &d).unwrap();
    d
}

fn qio(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", "60", "qemu-io", "-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri).output().unwrap()
}

fn qio_ok(uri: &str, cmds: &[&str]) {
    let o = qio(uri, cmds);
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"),
        "qemu-io {cmds:?} on {uri}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn assert_independent_and_clean(d: &Dir, img: &str) {
    qemu_ok(d, "qemu-img", &["check", img]);
    let info: Value =
        serde_json::from_str(&qemu_ok(d, "qemu-img", &["info", "--output", "json", img])).unwrap();
    assert!(
        info.get("backing-filename").is_none(),
        "{img} still has a backing: {info}"
    );
}

#[test]
fn post_copy_migration_survives_a_source_restart_and_verifies() {
    let d = Dir::new();
    let size = 32 * MIB;
    let src = d.path("src.raw");
    let mut expect = source_raw(&src, size);
    let (qmp, src_sock, dst_sock) = (d.path("qmp.sock"), d.path("src.sock"), d.path("dst.sock"));
    let src_uri = format!("nbd+unix:///vm0?socket={}", src_sock.display());
    let dst_uri = format!("nbd+unix:///dst?socket={}", dst_sock.display());
    let q = qmp.to_str().unwrap();

    // Source host: the VM's disk in a daemon, written by the VM over NBD.
    let daemon = Proc(
        Command::new(bin())
            .args(["daemon", "--qmp", q])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_socket(&qmp);
    for req in [
        format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"raw","node-name":"vm0","file":{{"driver":"file","filename":"{}"}}}}}}"#,
            src.display()
        ),
        format!(
            r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{}"}}}}}}}}"#,
            src_sock.display()
        ),
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"vm0","node-name":"vm0","writable":true}}"#.to_string(),
    ] {
        ds_ok(&d, &["qmp", "--qmp", q, &req]);
    }
    qio_ok(&src_uri, &["write -P 0x5a 4M 1M"]);
    expect[(4 * MIB) as usize..(5 * MIB) as usize].fill(0x5a);

    // Switchover: the source stops changing and is exported read-only.
    let out = ds_ok(&d, &["migrate", "send", "--qmp", q, "vm0"]);
    assert!(out.contains("read-only"), "{out}");
    let o = qio(&src_uri, &["write -P 0x66 0 64k"]);
    assert!(
        !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("fail"),
        "the source export still takes writes after migrate send"
    );

    // Destination host.
    let mut recv = Events::start(
        &d,
        &[
            "migrate",
            "receive",
            "--from",
            &src_uri,
            "--to",
            "dst.qcow2",
            "--serve",
            &format!("unix:{}", dst_sock.display()),
            "--speed",
            "4M",
            "--verify",
            "--persistent",
            "--output",
            "json",
        ],
    );
    let ready = recv.wait_for("ready");
    assert_eq!(ready["source-bytes-read"], 0, "{ready}");
    // The guest, at once: the source VM's last write, and its own writes
    // over source data and over a hole.
    qio_ok(
        &dst_uri,
        &[
            "read -P 0x5a 4M 1M",
            "write -P 0xc3 20M 1M",
            "write -P 0x3c 30M 64k",
        ],
    );
    expect[(20 * MIB) as usize..(21 * MIB) as usize].fill(0xc3);
    expect[(30 * MIB) as usize..(30 * MIB + 65536) as usize].fill(0x3c);

    // The source host goes away mid-stream.
    drop(daemon);
    recv.wait_for("source-lost");
    // A guest read of remote data waits for the source instead of failing.
    let uri = dst_uri.clone();
    let want = format!("read -P {} 23M 64k", expect[(23 * MIB) as usize]);
    let held = std::thread::spawn(move || qio(&uri, &[&want]));
    std::thread::sleep(Duration::from_millis(300));
    // ... and comes back as a plain read-only server of the same disk.
    let _server = Proc(
        Command::new(bin())
            .args([
                "serve",
                "--read-only",
                "--persistent",
                "--shared",
                "8",
                "-f",
                "raw",
                "-x",
                "vm0",
                "-k",
            ])
            .arg(&src_sock)
            .arg(&src)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    recv.wait_for("source-back");
    let o = held.join().unwrap();
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"),
        "guest read across the outage: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    recv.wait_for("complete");
    // --persistent: still serving the guest; SIGTERM ends it cleanly.
    qio_ok(&dst_uri, &["read -P 0xc3 20M 1M"]);
    term(&recv.proc);
    let st = recv.finish();
    let names = recv.names();
    assert!(
        st.success(),
        "migrate receive failed: {names:?} {:?}",
        recv.seen
    );
    for e in ["stream-end", "verified", "complete"] {
        assert!(
            names.iter().any(|n| n == e),
            "no {e} event: {:?}",
            recv.seen
        );
    }
    let v = recv.seen.iter().find(|v| v["event"] == "verified").unwrap();
    assert_eq!(v["written"], MIB + 65536, "{v}");

    let dst = d.s("dst.qcow2");
    assert_independent_and_clean(&d, &dst);
    std::fs::write(d.path("expect.raw"), &expect).unwrap();
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &d.s("expect.raw"),
            &dst,
        ],
    );
}

#[test]
fn verify_fails_when_the_source_changes_behind_its_back() {
    let d = Dir::new();
    let src = d.path("src.raw");
    source_raw(&src, 16 * MIB);
    let (src_sock, dst_sock) = (d.path("src.sock"), d.path("dst.sock"));
    let _server = Proc(
        Command::new(bin())
            .args([
                "serve",
                "--read-only",
                "--persistent",
                "--shared",
                "8",
                "-f",
                "raw",
                "-x",
                "vm0",
                "-k",
            ])
            .arg(&src_sock)
            .arg(&src)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_socket(&src_sock);
    let dst_uri = format!("nbd+unix:///dst?socket={}", dst_sock.display());
    let mut recv = Events::start(
        &d,
        &[
            "migrate",
            "receive",
            "--from",
            &format!("nbd+unix:///vm0?socket={}", src_sock.display()),
            "--to",
            "dst.qcow2",
            "--serve",
            &format!("unix:{}", dst_sock.display()),
            "--speed",
            "2M",
            "--verify",
            "--output",
            "json",
        ],
    );
    recv.wait_for("ready");
    // Once the guest has read it, the first MiB is local (copy-on-read);
    // then one source byte there changes.
    qio_ok(&dst_uri, &["read 0 1M"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&[0xee], 100).unwrap();
    }
    let st = recv.finish();
    assert!(
        !st.success(),
        "verify passed over a changed source: {:?}",
        recv.seen
    );
    let failed = recv
        .seen
        .iter()
        .find(|v| v["event"] == "verify-failed")
        .unwrap_or_else(|| panic!("no verify-failed event: {:?}", recv.seen));
    assert!(
        failed["error"].as_str().unwrap().contains("offset 100 "),
        "{failed}"
    );
    assert!(!recv.names().iter().any(|n| n == "complete"));
}

/// Ready means listening with nothing read from the source, whatever the
/// size; the export serves while the stream runs and after it completes.
#[test]
fn deploy_serves_before_reading_any_data_at_two_sizes() {
    for size in ["16M", "256M"] {
        let d = Dir::new();
        qemu_ok(
            &d,
            "qemu-img",
            &["create", "-f", "qcow2", "base.qcow2", size],
        );
        common::qemu_io(
            &d,
            "qcow2",
            "base.qcow2",
            &["write -P 0x42 1M 3M", "write -P 0x24 12M 1M"],
        );
        let sock = d.path("vm0.sock");
        let uri = format!("nbd+unix:///vm0?socket={}", sock.display());
        let mut dep = Events::start(
            &d,
            &[
                "deploy",
                "--serve",
                &format!("unix:{}", sock.display()),
                "--speed",
                "2M",
                "--output",
                "json",
                "base.qcow2",
                "vm0.qcow2",
            ],
        );
        let ready = dep.wait_for("ready");
        assert_eq!(ready["source-bytes-read"], 0, "{size}: {ready}");
        assert!(ready["ready-seconds"].as_f64().unwrap() > 0.0);
        // The client comes 300 ms after the export listens: time to ready
        // ends at the first accepted connection, so it includes the wait.
        std::thread::sleep(Duration::from_millis(300));
        qio_ok(&uri, &["read -P 0x24 12M 1M", "write -P 0x99 8M 64k"]);
        let connected = dep.wait_for("connected");
        let ttr = connected["time-to-ready-seconds"].as_f64().unwrap();
        let listening = ready["ready-seconds"].as_f64().unwrap();
        assert!(
            ttr >= listening + 0.299,
            "{size}: time to ready {ttr} s is not the first connection (listening at {listening} s)"
        );
        let end = dep.wait_for("stream-end");
        assert_eq!(end["outcome"], "completed", "{end}");
        dep.wait_for("serving");
        // Still serving, now from local data only.
        qio_ok(&uri, &["read -P 0x42 1M 3M", "read -P 0x99 8M 64k"]);
        term(&dep.proc);
        let st = dep.finish();
        assert!(st.success(), "{size}: deploy exit {st}: {:?}", dep.seen);
        assert_independent_and_clean(&d, &d.s("vm0.qcow2"));
        let o = qemu(
            &d,
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x24 12M 1M", "vm0.qcow2"],
        );
        assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"));
    }
}

/// Bad requests get one clear line and leave files as they were.
#[test]
fn deploy_and_receive_refuse_bad_input_clearly() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "4M"],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-f", "qcow2", "vm0.qcow2", "4M"],
    );
    let before = common::digest(&d.path("vm0.qcow2"));
    let sock = format!("unix:{}", d.s("s.sock"));
    let cases: &[(&[&str], &str)] = &[
        (
            &["deploy", "--serve", &sock, "base.qcow2", "vm0.qcow2"],
            "already exists",
        ),
        (
            &["deploy", "--policy", "turbo", "base.qcow2", "new.qcow2"],
            "unknown policy",
        ),
        (&["deploy", "-f", "qed", "base.qcow2", "new.qcow2"], "qed"),
        (
            &["deploy", "--serve", &sock, "missing.qcow2", "new.qcow2"],
            "missing.qcow2",
        ),
        (
            &["deploy", "--serve", &sock, "ftp://x/y", "new.qcow2"],
            "not available",
        ),
        (
            &["deploy", "--serve", "nowhere", "base.qcow2", "new.qcow2"],
            "unix:PATH or HOST:PORT",
        ),
        (
            &[
                "migrate",
                "receive",
                "--from",
                "nbd+unix:///vm0?socket=/nonexistent.sock",
                "--to",
                "new.qcow2",
                "--serve",
                &sock,
            ],
            "connect",
        ),
    ];
    for (args, want) in cases {
        let o = common::ds(&d, args);
        let err = common::stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        // One line says it (clap adds a "--help" hint below usage errors).
        let first = err.lines().next().unwrap_or_default();
        assert!(first.contains(want), "{args:?}: {err}");
    }
    assert_eq!(common::digest(&d.path("vm0.qcow2")), before);
    assert!(
        !d.path("new.qcow2").exists(),
        "a failed deploy left its overlay"
    );
}

/// `deploy --qmp`: the daemon opens the overlay with copy-on-read, exports
/// it and streams it; deploy follows the job to its end.
#[test]
fn deploy_hands_the_overlay_to_a_daemon() {
    let d = Dir::new();
    let src = d.path("src.raw");
    source_raw(&src, 16 * MIB);
    let (qmp, nbd) = (d.path("qmp.sock"), d.path("nbd.sock"));
    let daemon = Proc(
        Command::new(bin())
            .args(["daemon", "--qmp"])
            .arg(&qmp)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_socket(&qmp);
    let out = ds_ok(
        &d,
        &[
            "deploy",
            "--qmp",
            qmp.to_str().unwrap(),
            "--serve",
            &format!("unix:{}", nbd.display()),
            "-F",
            "raw",
            "src.raw",
            "vm0.qcow2",
        ],
    );
    assert!(out.contains("complete"), "{out}");
    let uri = format!("nbd+unix:///vm0?socket={}", nbd.display());
    qio_ok(&uri, &["read -P 17 1M 64k", "write -P 0x77 0 64k"]);
    term(&daemon);
    let mut daemon = daemon;
    assert!(daemon.wait_exit().success());
    assert_independent_and_clean(&d, &d.s("vm0.qcow2"));
    let mut expect = std::fs::read(&src).unwrap();
    expect[..65536].fill(0x77);
    std::fs::write(d.path("expect.raw"), &expect).unwrap();
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &d.s("expect.raw"),
            &d.s("vm0.qcow2"),
        ],
    );
}
