//! `diskstream daemon`'s `http` / `https` protocol nodes (QEMU's curl driver
//! names and options) against a real nginx, driven over the QMP socket:
//! raw and qcow2 format nodes on them read what the file holds, back an
//! overlay and stream into it; bad options get QEMU's messages; an
//! untrusted certificate is refused unless `sslverify` is off or the CA is
//! trusted through `SSL_CERT_FILE`.
//!
//! Every wait is bounded; servers listen on loopback or Unix sockets.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Dir, qemu_ok};
use http::testing::Nginx;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_diskstream");
const SIZE: usize = 4 << 20;

/// Patterned data with a zero cluster every fourth 64 KiB.
fn base_data() -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v = vec![0u8; SIZE];
    for (i, chunk) in v.chunks_mut(65536).enumerate() {
        if i % 4 == 2 {
            continue;
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

/// base.raw and base.qcow2 (the same content) in a new directory.
fn bases() -> Dir {
    let d = Dir::new();
    std::fs::write(d.path("base.raw"), base_data()).unwrap();
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &d.s("base.raw"),
            &d.s("base.qcow2"),
        ],
    );
    d
}

/// A running `diskstream daemon`, killed when dropped.
struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Daemon {
    fn start(d: &Dir, name: &str, env: &[(&str, &Path)]) -> Daemon {
        let sock = d.path(&format!("{name}.qmp"));
        let mut c = Command::new(BIN);
        c.args(["daemon", "--qmp"])
            .arg(&sock)
            .stdin(Stdio::null())
            .current_dir(d.dir.path());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("start diskstream daemon");
        let end = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("daemon exited early: {st}");
            }
            assert!(Instant::now() < end, "QMP socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, sock }
    }

    /// Runs one command: `Ok(return)` or `Err("Class: description")`.
    fn qmp(&self, execute: &str, arguments: Value) -> Result<Value, String> {
        let req = json!({"execute": execute, "arguments": arguments}).to_string();
        let o = Command::new(BIN)
            .args(["qmp", "--qmp"])
            .arg(&self.sock)
            .arg(&req)
            .output()
            .expect("run diskstream qmp");
        if o.status.success() {
            Ok(serde_json::from_slice(&o.stdout).expect("reply is JSON"))
        } else {
            let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
            Err(e.strip_prefix("diskstream: ").unwrap_or(&e).to_string())
        }
    }

    fn ok(&self, execute: &str, arguments: Value) -> Value {
        self.qmp(execute, arguments.clone())
            .unwrap_or_else(|e| panic!("{execute} {arguments}: {e}"))
    }

    /// The GenericError description of a command that must fail.
    fn err(&self, execute: &str, arguments: Value) -> String {
        match self.qmp(execute, arguments.clone()) {
            Ok(v) => panic!("{execute} {arguments} succeeded: {v}"),
            Err(e) => e
                .strip_prefix("GenericError: ")
                .unwrap_or_else(|| panic!("not a GenericError: {e}"))
                .to_string(),
        }
    }

    fn node(&self, name: &str) -> Value {
        let nodes = self.ok("query-named-block-nodes", json!({}));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .unwrap_or_else(|| panic!("no node {name} in {nodes}"))
            .clone()
    }

    /// Exports `node` read-only on `sock` (starting the server the first
    /// time) and checks with qemu-img that it reads exactly as base.raw.
    fn assert_reads_as_base(&self, d: &Dir, node: &str) {
        let nbd = d.path("nbd.sock");
        if !nbd.exists() {
            self.ok(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
            );
        }
        self.ok(
            "block-export-add",
            json!({"type": "nbd", "id": node, "node-name": node}),
        );
        let uri = format!("nbd+unix:///{node}?socket={}", nbd.display());
        qemu_ok(
            d,
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &uri, &d.s("base.raw")],
        );
        self.ok("block-export-del", json!({"id": node}));
    }

    /// Waits (bounded) until no block job is left.
    fn wait_jobs_gone(&self) {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let jobs = self.ok("query-block-jobs", json!({}));
            if jobs.as_array().unwrap().is_empty() {
                return;
            }
            assert!(Instant::now() < end, "jobs never finished: {jobs}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `http` nodes with raw and qcow2 format nodes on top: each reads as the
/// file, backs a qcow2 overlay given by node name, and block-stream makes
/// that overlay an independent copy (qemu-img compare and check).
#[test]
fn http_nodes_read_back_an_overlay_and_stream_through_qmp() {
    let d = bases();
    let nginx = Nginx::start(d.dir.path(), "").expect("nginx");
    let daemon = Daemon::start(&d, "daemon", &[]);
    for fmt in ["raw", "qcow2"] {
        let (web, base, top) = (
            format!("web-{fmt}"),
            format!("base-{fmt}"),
            format!("top-{fmt}"),
        );
        let url = nginx.url(&format!("base.{fmt}"));
        daemon.ok(
            "blockdev-add",
            json!({"driver": "http", "node-name": web, "url": url, "read-only": true,
                   "timeout": 20, "readahead": 65536}),
        );
        let n = daemon.node(&web);
        assert_eq!(n["drv"], "http", "{n}");
        assert_eq!(n["file"], url.as_str(), "{n}");
        let file_size = std::fs::metadata(d.path(&format!("base.{fmt}")))
            .unwrap()
            .len();
        assert_eq!(n["image"]["virtual-size"], file_size, "{n}");
        // The format node inherits read-only from its http file.
        daemon.ok(
            "blockdev-add",
            json!({"driver": fmt, "node-name": base, "file": web}),
        );
        let n = daemon.node(&base);
        assert_eq!(n["drv"], fmt, "{n}");
        assert_eq!(n["ro"], true, "{n}");
        assert_eq!(n["image"]["virtual-size"], SIZE, "{n}");
        daemon.assert_reads_as_base(&d, &base);

        // An overlay on the format node, then the stream into it.
        let top_path = d.s(&format!("{top}.qcow2"));
        qemu_ok(
            &d,
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", &url, "-F", fmt, &top_path, "4M",
            ],
        );
        daemon.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": top, "backing": base,
                   "file": {"driver": "file", "filename": top_path}}),
        );
        let e = daemon.err("blockdev-del", json!({"node-name": web}));
        assert_eq!(
            e,
            format!("Node '{web}' is busy: node is used as file of '{base}'")
        );
        daemon.ok("block-stream", json!({"job-id": top, "device": top}));
        daemon.wait_jobs_gone();
        daemon.ok("blockdev-del", json!({"node-name": top}));
        daemon.ok("blockdev-del", json!({"node-name": base}));
        daemon.ok("blockdev-del", json!({"node-name": web}));
        let info = qemu_ok(&d, "qemu-img", &["info", "--output=json", &top_path]);
        let v: Value = serde_json::from_str(&info).unwrap();
        assert!(v.get("backing-filename").is_none(), "{info}");
        qemu_ok(
            &d,
            "qemu-img",
            &["compare", "-F", "raw", &top_path, &d.s("base.raw")],
        );
        qemu_ok(&d, "qemu-img", &["check", &top_path]);
    }
    // The data came by range requests through nginx.
    let log = nginx.access_log();
    assert!(log.contains("GET /base.qcow2 206"), "{log}");
    assert!(log.contains("GET /base.raw 206"), "{log}");
}

/// Bad options get QEMU's messages (GenericError); nothing is added.
#[test]
fn http_node_options_are_checked_as_qemu_checks_them() {
    let d = bases();
    let nginx = Nginx::start(d.dir.path(), "").expect("nginx");
    let daemon = Daemon::start(&d, "daemon", &[]);
    let url = nginx.url("base.raw");
    let http = |extra: Value| {
        let mut a = json!({"driver": "http", "node-name": "web", "read-only": true, "url": url});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                a.as_object_mut().unwrap().remove(k);
            } else {
                a[k] = v.clone();
            }
        }
        a
    };
    let cases = [
        (
            json!({"url": null}),
            "Parameter 'url' is missing".to_string(),
        ),
        (
            json!({"read-only": null}),
            "curl driver does not support writes".into(),
        ),
        (
            json!({"sslverify": false}),
            "Parameter 'sslverify' is unexpected".into(),
        ),
        (
            json!({"readahead": 1000}),
            "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512".into(),
        ),
        (
            json!({"timeout": 10001}),
            "timeout parameter is too large or negative".into(),
        ),
        (
            json!({"timeout": -1}),
            "timeout parameter is too large or negative".into(),
        ),
        (
            json!({"timeout": "5"}),
            "Invalid parameter type for 'timeout', expected: integer".into(),
        ),
        (
            json!({"driver": "https"}),
            format!(
                "https curl driver cannot handle the URL '{url}' (does not start with 'https://')"
            ),
        ),
        (
            json!({"cookie": "a=b"}),
            "Parameter 'cookie' is not supported by diskstream's http driver".into(),
        ),
        (
            json!({"bogus": 1}),
            "Parameter 'bogus' is unexpected".into(),
        ),
    ];
    for (extra, want) in cases {
        let args = http(extra);
        assert_eq!(daemon.err("blockdev-add", args.clone()), want, "{args}");
    }
    // Nested in a format node, names carry the prefix.
    let e = daemon.err(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "b", "read-only": true,
               "file": {"driver": "http", "url": url, "read-only": true, "bogus": 1}}),
    );
    assert_eq!(e, "Parameter 'file.bogus' is unexpected");
    // A missing file and an unreachable server name the URL and the cause.
    let missing = nginx.url("no-such.img");
    let e = daemon.err("blockdev-add", http(json!({"url": missing})));
    assert!(e.contains(&missing) && e.contains("404"), "{e}");
    let gone = format!(
        "http://127.0.0.1:{}/base.raw",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let e = daemon.err("blockdev-add", http(json!({"url": gone})));
    assert!(e.contains(&gone), "{e}");
    // A format node on a format node is refused; an http node is not
    // writable by copy-on-read.
    daemon.ok("blockdev-add", http(json!({})));
    daemon.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "b", "file": "web"}),
    );
    let e = daemon.err(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "c", "file": "b"}),
    );
    assert!(e.contains("'file' must name a protocol"), "{e}");
    let nodes = daemon.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
}

/// HTTPS: a server whose certificate the daemon does not trust is refused
/// with the URL and the certificate problem; `sslverify: false` accepts it;
/// a daemon started with `SSL_CERT_FILE` naming the CA trusts it. Either
/// way a qcow2 node inline on the https file reads as the file.
#[test]
fn https_nodes_verify_the_certificate_unless_told_not_to() {
    let d = bases();
    let certs = d.path("certs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-test-certs");
    let o = Command::new(&script)
        .arg(&certs)
        .output()
        .expect("make-test-certs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let nginx = Nginx::start_tls(
        d.dir.path(),
        "",
        &certs.join("server-cert.pem"),
        &certs.join("server-key.pem"),
    )
    .expect("nginx with TLS");
    let url = nginx.url("base.qcow2");
    assert!(url.starts_with("https://"), "{url}");
    let node = |name: &str, sslverify: Option<bool>| {
        let mut file = json!({"driver": "https", "url": url, "read-only": true});
        if let Some(v) = sslverify {
            file["sslverify"] = json!(v);
        }
        json!({"driver": "qcow2", "node-name": name, "file": file})
    };

    let untrusting = Daemon::start(&d, "untrusting", &[]);
    let e = untrusting.err("blockdev-add", node("base", None));
    assert!(
        e.contains(&url) && e.to_lowercase().contains("certificate"),
        "unclear error: {e}"
    );
    untrusting.ok("blockdev-add", node("base", Some(false)));
    untrusting.assert_reads_as_base(&d, "base");
    drop(untrusting);
    std::fs::remove_file(d.path("nbd.sock")).ok();

    let ca = certs.join("ca-cert.pem");
    let trusting = Daemon::start(&d, "trusting", &[("SSL_CERT_FILE", ca.as_path())]);
    trusting.ok("blockdev-add", node("base", None));
    trusting.assert_reads_as_base(&d, "base");
}
