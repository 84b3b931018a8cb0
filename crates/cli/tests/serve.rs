//! `diskstream serve` end to end, driven like qemu-nbd: qemu-img and qemu-io
//! over a Unix socket; exit after the last client without `--persistent`;
//! `--read-only`; graceful stop on SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_diskstream")
}

fn tool(prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", "60", prog])
        .args(args)
        .output()
        .unwrap()
}

/// Starts `serve`; with `probe` waits until it accepts a connection (which
/// counts as a client), otherwise only until the socket file exists.
fn start(args: &[&str], sock: &Path, probe: bool) -> Child {
    let child = Command::new(bin())
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !(if probe {
        std::os::unix::net::UnixStream::connect(sock).is_ok()
    } else {
        sock.exists()
    }) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Probing the socket above counted as a client; wait for exit, bounded.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("diskstream serve did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    let mut d = vec![0u8; 4 << 20];
    for (i, b) in d.iter_mut().enumerate().skip(1 << 20).take(1 << 20) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&p, d).unwrap();
    p
}

#[test]
fn serve_is_compatible_with_qemu_img_and_exits_after_the_last_client() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("s.sock");
    let mut child = start(
        &[
            "--persistent",
            "-k",
            sock.to_str().unwrap(),
            "-f",
            "raw",
            "-x",
            "vm0",
            img.to_str().unwrap(),
        ],
        &sock,
        true,
    );
    let uri = format!("nbd+unix:///vm0?socket={}", sock.display());
    let o = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let o = tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 65536", &uri],
    );
    assert!(o.status.success(), "{o:?}");
    // SIGTERM: graceful stop, exit status 0, the write is in the file.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    assert!(
        std::fs::read(&img).unwrap()[..65536]
            .iter()
            .all(|&b| b == 0x77)
    );
    assert!(!sock.exists(), "socket file left behind");

    // Without --persistent: one client, then exit by itself. Read-only refuses writes.
    let mut child = start(
        &[
            "-r",
            "-k",
            sock.to_str().unwrap(),
            "-f",
            "raw",
            img.to_str().unwrap(),
        ],
        &sock,
        false,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let o = tool("qemu-io", &["-f", "raw", "-c", "write 0 512", &uri]);
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{o:?}"
    );
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn serve_reports_a_missing_image_and_a_bad_format() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args(["serve", "-k"])
        .arg(dir.path().join("x.sock"))
        .arg(dir.path().join("missing.raw"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing.raw"),
        "{o:?}"
    );
    let img = image(dir.path());
    let o = Command::new(bin())
        .args(["serve", "-f", "vmdk", "-k"])
        .arg(dir.path().join("x.sock"))
        .arg(&img)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("vmdk"), "{o:?}");
}

/// Bytes of `[off, off + len)` that `qemu-img map` says `top` itself holds
/// (depth 0) as data (`data`) or as zeros (`!data`).
fn local_bytes(top: &Path, off: u64, len: u64, data: bool) -> u64 {
    let o = tool(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", top.to_str().unwrap()],
    );
    assert!(o.status.success(), "{o:?}");
    let map: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    map.iter()
        .filter(|e| e["depth"] == 0 && e["data"] == data)
        .map(|e| {
            let s = e["start"].as_u64().unwrap();
            let end = s + e["length"].as_u64().unwrap();
            end.min(off + len).saturating_sub(s.max(off))
        })
        .sum()
}

/// Serves `top` (with `extra` options), reads `[1 MiB, 2 MiB)` and 5000
/// bytes at 300000 through qemu-io, then stops the server with SIGTERM.
fn serve_and_read(top: &Path, sock: &Path, extra: &[&str]) {
    let mut args = vec!["-k", sock.to_str().unwrap(), "-f", "qcow2"];
    args.extend(extra);
    args.push(top.to_str().unwrap());
    let mut child = start(&args, sock, false);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let o = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 1M 1M",
            "-c",
            "read 300000 5000",
            &uri,
        ],
    );
    assert!(o.status.success(), "{o:?}");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn serve_copy_on_read_keeps_what_clients_read_in_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path());
    let sock = dir.path().join("s.sock");
    let overlay = |name: &str| {
        let top = dir.path().join(name);
        let o = tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "raw",
                top.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{o:?}");
        top
    };
    // Without the option, reads leave the overlay as it was.
    let plain = overlay("plain.qcow2");
    serve_and_read(&plain, &sock, &[]);
    assert_eq!(local_bytes(&plain, 0, 4 << 20, true), 0);
    assert_eq!(local_bytes(&plain, 0, 4 << 20, false), 0);

    let top = overlay("cor.qcow2");
    serve_and_read(&top, &sock, &["--copy-on-read"]);
    // What was read is local now, what was not is not. The small read fell
    // in zeros of the base: its cluster is kept as a zero cluster (as QEMU's
    // copy-on-read does), not as data.
    assert_eq!(local_bytes(&top, 1 << 20, 1 << 20, true), 1 << 20);
    assert_eq!(local_bytes(&top, 300000, 5000, false), 5000);
    assert_eq!(local_bytes(&top, 0, 1 << 20, true), 0);
    assert_eq!(local_bytes(&top, 2 << 20, 2 << 20, true), 0);
    assert_eq!(local_bytes(&top, 2 << 20, 2 << 20, false), 0);
    let o = tool("qemu-img", &["check", "-q", top.to_str().unwrap()]);
    assert!(o.status.success(), "qemu-img check: {o:?}");
    let o = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            top.to_str().unwrap(),
            base.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{o:?}");
    // Local data is the base's: detached from its backing, the overlay
    // still holds the bytes that were read.
    let o = tool(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "",
            "-f",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let raw = dir.path().join("cor.raw");
    let o = tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            top.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let got = std::fs::read(&raw).unwrap();
    let want = std::fs::read(&base).unwrap();
    assert!(got[1 << 20..2 << 20] == want[1 << 20..2 << 20]);
    assert!(got[2 << 20..].iter().all(|&b| b == 0));

    // Copy-on-read writes into the image: not with --read-only.
    let o = Command::new(bin())
        .args(["serve", "--read-only", "--copy-on-read", "-k"])
        .arg(&sock)
        .arg(&top)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--copy-on-read"),
        "{o:?}"
    );
}
