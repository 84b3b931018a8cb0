//! `diskstream serve` end to end, driven like qemu-nbd: qemu-img, qemu-io,
//! nbdinfo, nbdcopy and fio's nbd engine over a Unix socket, with and
//! without TLS; exit after the last client without `--persistent`;
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
    ok(tool(
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
    ));
    ok(tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 65536", &uri],
    ));
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
    let out = ok(tool(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", top.to_str().unwrap()],
    ));
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
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
    ok(tool(
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
    ));
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn serve_copy_on_read_keeps_what_clients_read_in_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path());
    let sock = dir.path().join("s.sock");
    let overlay = |name: &str| {
        let top = dir.path().join(name);
        ok(tool(
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
        ));
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
    ok(tool(
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
    ));
    // Local data is the base's: detached from its backing, the overlay
    // still holds the bytes that were read.
    ok(tool(
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
    ));
    let raw = dir.path().join("cor.raw");
    ok(tool(
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
    ));
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

// ---------------------------------------------------------------------------
// The NBD clients used with qemu-nbd (nbdinfo, nbdcopy, fio's nbd engine,
// qemu-img, qemu-io, over TLS too) against the `diskstream serve` binary;
// results compared byte for byte with the image behind the export.

const MIB: u64 = 1 << 20;

/// A `serve --persistent` child on a Unix socket. `stop` sends SIGTERM and
/// asserts a clean exit; a test that fails first kills it on drop.
struct Server {
    child: Child,
    sock: std::path::PathBuf,
    stopped: bool,
}

impl Server {
    fn start(sock: &Path, args: &[&str]) -> Server {
        let mut all = vec!["--persistent", "-k", sock.to_str().unwrap()];
        all.extend(args);
        Server {
            child: start(&all, sock, true),
            sock: sock.to_path_buf(),
            stopped: false,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = wait_exit(&mut self.child, Duration::from_secs(10));
        self.stopped = true;
        assert!(status.success(), "serve exited with {status}");
        assert!(!self.sock.exists(), "socket file left behind");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts the tool succeeded; its stdout.
fn ok(o: Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// Deterministic bytes without long zero runs.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A sparse raw file of `size` bytes with `len` bytes of noise at `off`
/// (the rest a hole); its content.
fn sparse_raw(path: &Path, size: u64, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let data = noise(len, off ^ size);
    f.write_all_at(&data, off).unwrap();
    let mut content = vec![0u8; size as usize];
    content[off as usize..off as usize + len].copy_from_slice(&data);
    content
}

/// (start, length, NBD base:allocation type: 1 = hole, 2 = zero), adjacent
/// runs of one type merged.
type Run = (u64, u64, u32);

fn merged(runs: impl IntoIterator<Item = Run>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (s, l, t) in runs {
        if let Some(last) = out.last_mut()
            && last.2 == t
            && last.0 + last.1 == s
        {
            last.1 += l;
            continue;
        }
        out.push((s, l, t));
    }
    out
}

/// `qemu-img map --output=json` of `target` (a file or an NBD URI) as
/// runs: what is not data is a hole, zero reads are zero.
fn qemu_map(fmt: &str, target: &str) -> Vec<Run> {
    let o = tool("qemu-img", &["map", "--output=json", "-f", fmt, target]);
    let out = ok(o);
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    merged(map.iter().map(|e| {
        let t = u32::from(e["data"] != true) | u32::from(e["zero"] == true) << 1;
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            t,
        )
    }))
}

/// `nbdinfo --map URI` (base:allocation) as runs.
fn nbdinfo_map(uri: &str) -> Vec<Run> {
    let out = ok(tool("nbdinfo", &["--map", uri]));
    merged(out.lines().map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f.len() >= 3, "{out}");
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    }))
}

/// `nbdinfo --can FLAG` / `--is FLAG`: true for exit 0, false for exit 2
/// (the answer is no); any other outcome fails the test.
fn nbdinfo_flag(kind: &str, flag: &str, uri: &str) -> bool {
    let o = tool("nbdinfo", &[kind, flag, uri]);
    match o.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo {kind} {flag}: {o:?}"),
    }
}

#[test]
fn serve_nbdinfo_reports_size_map_flags_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let content = sparse_raw(&img, 16 * MIB, 3 * MIB, 2 * MIB as usize + 4096);
    let sock = dir.path().join("s.sock");
    let s = Server::start(
        &sock,
        &[
            "-f",
            "raw",
            "-x",
            "vm0",
            "-D",
            "diskstream test disk",
            img.to_str().unwrap(),
        ],
    );
    let uri = s.uri("vm0");
    assert_eq!(ok(tool("nbdinfo", &["--size", &uri])).trim(), "16777216");
    // The allocation map over NBD is the file's, as qemu-img sees it.
    let file_map = qemu_map("raw", img.to_str().unwrap());
    assert_eq!(
        file_map,
        [
            (0, 3 * MIB, 3),
            (3 * MIB, 2 * MIB + 4096, 0),
            (5 * MIB + 4096, 11 * MIB - 4096, 3)
        ]
    );
    assert_eq!(nbdinfo_map(&uri), file_map);
    // Multi-conn only where the server takes several clients (--shared
    // above 1), as qemu-nbd.
    assert!(!nbdinfo_flag("--can", "multi-conn", &uri));
    for flag in ["write", "flush", "trim", "zero", "fua"] {
        assert!(nbdinfo_flag("--can", flag, &uri), "can {flag}");
    }
    assert!(!nbdinfo_flag("--is", "read-only", &uri));
    let list = ok(tool(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", sock.display())],
    ));
    assert!(list.contains("export=\"vm0\""), "{list}");
    assert!(list.contains("description: diskstream test disk"), "{list}");
    assert!(list.contains("export-size: 16777216"), "{list}");
    // An unknown export name is refused.
    let o = tool("nbdinfo", &["--size", &s.uri("nope")]);
    assert!(!o.status.success(), "{o:?}");
    s.stop();
    assert!(std::fs::read(&img).unwrap() == content, "image changed");
}

#[test]
fn serve_read_only_qcow2_overlay_map_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_raw(&base, 16 * MIB, 3 * MIB, 2 * MIB as usize);
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    ok(tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", t],
    ));
    ok(tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 2 10M 64k",
            t,
        ],
    ));
    let sock = dir.path().join("s.sock");
    let s = Server::start(&sock, &["--read-only", "-f", "qcow2", t]);
    let uri = s.uri("");
    let file_map = qemu_map("qcow2", t);
    assert_eq!(
        file_map,
        [
            (0, MIB, 0),
            (MIB, 2 * MIB, 3),
            (3 * MIB, MIB, 0),
            (4 * MIB, 6 * MIB, 3),
            (10 * MIB, 65536, 0),
            (10 * MIB + 65536, 6 * MIB - 65536, 3)
        ]
    );
    assert_eq!(nbdinfo_map(&uri), file_map);
    assert_eq!(qemu_map("raw", &uri), file_map);
    assert!(nbdinfo_flag("--is", "read-only", &uri));
    for flag in ["write", "trim", "zero"] {
        assert!(!nbdinfo_flag("--can", flag, &uri), "can {flag}");
    }
    assert!(!nbdinfo_flag("--can", "multi-conn", &uri));
    let o = tool("qemu-io", &["-f", "raw", "-c", "write 0 512", &uri]);
    assert!(!o.status.success(), "{o:?}");
    // The served bytes are the chain's.
    ok(tool(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", t, &uri],
    ));
    s.stop();
    ok(tool("qemu-img", &["check", "-q", t]));
}

#[test]
fn serve_qemu_img_info_map_and_qemu_io_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let mut content = sparse_raw(&img, 16 * MIB, 3 * MIB, 2 * MIB as usize + 4096);
    let sock = dir.path().join("s.sock");
    let s = Server::start(&sock, &["-f", "raw", img.to_str().unwrap()]);
    let uri = s.uri("");
    let info: serde_json::Value =
        serde_json::from_str(&ok(tool("qemu-img", &["info", "--output=json", &uri]))).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB, "{info}");
    assert_eq!(info["format"], "raw", "{info}");
    let file_map = qemu_map("raw", img.to_str().unwrap());
    assert_eq!(file_map.len(), 3, "{file_map:?}");
    assert_eq!(qemu_map("raw", &uri), file_map);
    assert_eq!(nbdinfo_map(&uri), file_map);

    ok(tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "write -z 3M 4k",
            "-c",
            "write -P 0x11 16773120 4096",
            "-c",
            "flush",
            &uri,
        ],
    ));
    // Read back in another connection.
    ok(tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 1M 64k",
            "-c",
            "read -P 0 3M 4k",
            "-c",
            "read -P 0x11 16773120 4096",
            "-c",
            "read -P 0 0 1M",
            &uri,
        ],
    ));
    // A wrong pattern fails: the check above is real.
    let o = tool("qemu-io", &["-f", "raw", "-c", "read -P 0x5b 1M 4k", &uri]);
    assert!(!o.status.success(), "{o:?}");
    content[MIB as usize..MIB as usize + 65536].fill(0x5a);
    content[3 * MIB as usize..3 * MIB as usize + 4096].fill(0);
    content[16 * MIB as usize - 4096..].fill(0x11);
    s.stop();
    assert!(
        std::fs::read(&img).unwrap() == content,
        "file differs from the writes"
    );
}

#[test]
fn serve_nbdcopy_both_directions_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let content = sparse_raw(&img, 16 * MIB, 3 * MIB, 2 * MIB as usize + 4096);
    let sock = dir.path().join("s.sock");
    // nbdcopy opens several connections when the export offers multi-conn:
    // with the default --shared 1 it must not be offered (nbdcopy hung on
    // its second connection when it was), with -e 4 it is.
    let s = Server::start(&sock, &["-f", "raw", img.to_str().unwrap()]);
    let uri = s.uri("");
    assert!(!nbdinfo_flag("--can", "multi-conn", &uri));
    let out = dir.path().join("out.raw");
    ok(tool("nbdcopy", &[&uri, out.to_str().unwrap()]));
    assert!(
        std::fs::read(&out).unwrap() == content,
        "nbdcopy from the export differs"
    );
    s.stop();
    let s = Server::start(&sock, &["-e", "4", "-f", "raw", img.to_str().unwrap()]);
    let uri = s.uri("");
    assert!(nbdinfo_flag("--can", "multi-conn", &uri));
    let out = dir.path().join("out4.raw");
    ok(tool("nbdcopy", &[&uri, out.to_str().unwrap()]));
    assert!(
        std::fs::read(&out).unwrap() == content,
        "nbdcopy from the export (4 connections) differs"
    );
    let src = dir.path().join("src.raw");
    let fresh = noise(16 * MIB as usize, 99);
    std::fs::write(&src, &fresh).unwrap();
    ok(tool("nbdcopy", &[src.to_str().unwrap(), &uri]));
    s.stop();
    assert!(
        std::fs::read(&img).unwrap() == fresh,
        "nbdcopy into the export differs"
    );
    ok(tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    ));
}

/// Runs fio with `args` and JSON output; asserts exit 0 and no job error;
/// (bytes read, bytes written).
fn fio<S: AsRef<str> + std::fmt::Debug>(dir: &Path, args: &[S]) -> (u64, u64) {
    let json = dir.join("fio.json");
    let mut all = vec![
        "--output-format=json".to_string(),
        format!("--output={}", json.display()),
    ];
    all.extend(args.iter().map(|a| a.as_ref().to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let o = tool("fio", &all);
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    assert!(o.status.success(), "fio {args:?}: {o:?}\n{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{text}");
    (
        job["read"]["io_bytes"].as_u64().unwrap(),
        job["write"]["io_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn serve_fio_random_read_write_with_verify_on_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let t = img.to_str().unwrap();
    ok(tool("qemu-img", &["create", "-q", "-f", "qcow2", t, "16M"]));
    let sock = dir.path().join("s.sock");
    let s = Server::start(&sock, &["-f", "qcow2", t]);
    let uri = format!("--uri={}", s.uri(""));
    let nbd = [
        "--ioengine=nbd",
        &uri,
        "--bs=4k",
        "--iodepth=8",
        "--size=8m",
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        nbd.iter().chain(extra).map(|a| a.to_string()).collect()
    };
    // A short mixed random run.
    let (r, w) = fio(
        dir.path(),
        &with(&[
            "--name=randrw",
            "--rw=randrw",
            "--runtime=2",
            "--time_based",
        ]),
    );
    assert!(r > 0 && w > 0, "read {r} written {w}");
    // Random writes with checksummed blocks, verified by the same job...
    let verify = [
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
    ];
    let (r, w) = fio(
        dir.path(),
        &with(
            &[
                &["--name=write", "--rw=randwrite", "--do_verify=1"],
                &verify[..],
            ]
            .concat(),
        ),
    );
    assert_eq!((r, w), (8 * MIB, 8 * MIB));
    // ... and by a reader on a new connection.
    let (r, w) = fio(
        dir.path(),
        &with(&[&["--name=verify", "--rw=randread"], &verify[..]].concat()),
    );
    assert_eq!((r, w), (8 * MIB, 0));
    s.stop();
    ok(tool("qemu-img", &["check", "-q", t]));
    // The blocks are in the image file: verify them there too, then show
    // the verification notices a single flipped byte.
    let raw = dir.path().join("disk.raw");
    let rp = raw.to_str().unwrap();
    ok(tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", t, rp],
    ));
    let file = format!("--filename={rp}");
    let local: Vec<&str> = [
        &[
            "--name=verify",
            "--ioengine=psync",
            &file,
            "--rw=randread",
            "--bs=4k",
            "--size=8m",
        ],
        &verify[..],
    ]
    .concat();
    assert_eq!(fio(dir.path(), &local), (8 * MIB, 0));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&raw)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 5_000_000).unwrap();
        f.write_all_at(&[!b[0]], 5_000_000).unwrap();
    }
    let mut all = vec!["--output-format=terse"];
    all.extend(&local);
    let o = tool("fio", &all);
    assert!(!o.status.success(), "corruption not detected: {o:?}");
}

/// A CA and server/client certificates in QEMU's file names.
fn make_certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-test-certs");
    let o = Command::new("timeout")
        .args(["-k", "5", "60"])
        .arg(script)
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "make-test-certs: {o:?}");
}

#[test]
fn serve_tls_serves_tls_clients_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    make_certs(&certs);
    let img = dir.path().join("disk.raw");
    let content = sparse_raw(&img, 4 * MIB, MIB, 65536 + 4096);
    let sock = dir.path().join("s.sock");
    let cert = certs.join("server-cert.pem");
    let key = certs.join("server-key.pem");
    let s = Server::start(
        &sock,
        &[
            "-r",
            "-e",
            "4",
            "-x",
            "sec",
            "-f",
            "raw",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    // libnbd (GnuTLS).
    let tls_uri = format!(
        "nbds+unix:///sec?socket={}&tls-certificates={}&tls-verify-peer=false",
        sock.display(),
        certs.display()
    );
    let info = ok(tool("nbdinfo", &[&tls_uri]));
    assert!(info.contains("newstyle-fixed with TLS"), "{info}");
    assert_eq!(ok(tool("nbdinfo", &["--size", &tls_uri])).trim(), "4194304");
    let out = dir.path().join("nbdcopy.raw");
    ok(tool("nbdcopy", &[&tls_uri, out.to_str().unwrap()]));
    assert!(std::fs::read(&out).unwrap() == content, "nbdcopy over TLS");
    // QEMU, verifying the server's certificate against the CA.
    let qemu_read = |creds: &Path, out: &Path| {
        tool(
            "qemu-img",
            &[
                "convert",
                "--object",
                &format!(
                    "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                    creds.display()
                ),
                "--image-opts",
                &format!(
                    "driver=nbd,server.type=unix,server.path={},export=sec,\
                     tls-creds=tls0,tls-hostname=localhost",
                    sock.display()
                ),
                "-O",
                "raw",
                out.to_str().unwrap(),
            ],
        )
    };
    let out = dir.path().join("qemu.raw");
    ok(qemu_read(&certs, &out));
    assert!(std::fs::read(&out).unwrap() == content, "qemu-img over TLS");
    // Plaintext clients are refused, at negotiation.
    let plain = s.uri("sec");
    let o = tool("nbdinfo", &["--size", &plain]);
    assert!(!o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("TLS"), "{o:?}");
    let o = tool("qemu-img", &["info", &plain]);
    assert!(!o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("TLS"), "{o:?}");
    // A client trusting another CA does not accept the server.
    let other = dir.path().join("other");
    make_certs(&other);
    let bad = dir.path().join("bad.raw");
    let o = qemu_read(&other, &bad);
    assert!(!o.status.success(), "{o:?}");
    // The server still serves TLS clients after those failures.
    assert_eq!(ok(tool("nbdinfo", &["--size", &tls_uri])).trim(), "4194304");
    s.stop();
}
