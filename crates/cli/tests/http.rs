//! Overlays on HTTP and NBD backings through the CLI: created with the
//! backing's identity recorded, streamed to completion against a real nginx,
//! and refused — nothing copied — when the backing changed underneath.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Dir, ds, ds_ok, qemu_ok, stderr};
use http::testing::Nginx;

const SIZE: usize = 4 << 20;

fn base_data() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = vec![0u8; SIZE];
    for (i, chunk) in v.chunks_mut(65536).enumerate() {
        if i % 4 == 1 {
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

/// A directory with base.raw and base.qcow2 (same content), served by nginx.
fn served() -> (Dir, Nginx) {
    let d = bases();
    let n = Nginx::start(d.dir.path(), "").expect("nginx");
    (d, n)
}

/// A directory with base.raw and base.qcow2 (same content).
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

/// `json:` name of a qcow2 image opened without its backing (this QEMU has
/// no curl driver; check, amend and map do not need the backing).
fn no_backing(img: &str) -> String {
    format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{img}"}},"backing":null}}"#
    )
}

/// Allocated clusters of a qcow2 image, from `qemu-img check` (which leaves
/// the field out when it is zero).
fn allocated_clusters(d: &Dir, img: &str) -> u64 {
    let out = qemu_ok(d, "qemu-img", &["check", "--output=json", &no_backing(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["check-errors"], 0, "{out}");
    assert!(v["total-clusters"].as_u64().unwrap() > 0, "{out}");
    v["allocated-clusters"].as_u64().unwrap_or(0)
}

/// The JSON payload of the backing identity header extension ("dsID").
fn identity_ext(img: &Path) -> serde_json::Value {
    let data = std::fs::read(img).unwrap();
    let head = &data[..4096];
    let at = head
        .windows(4)
        .position(|w| w == [0x64, 0x73, 0x49, 0x44])
        .expect("identity header extension present");
    let len = u32::from_be_bytes(head[at + 4..at + 8].try_into().unwrap()) as usize;
    serde_json::from_slice(&head[at + 8..at + 8 + len]).unwrap()
}

fn replace(path: &Path, at: usize) {
    let mut data = std::fs::read(path).unwrap();
    data[at] ^= 0x5a;
    std::fs::write(path, &data).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
}

#[test]
fn overlays_on_raw_and_qcow2_http_backings_stream_to_completion() {
    let (d, nginx) = served();
    for (name, fmt) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        let url = nginx.url(name);
        let ov = d.s(&format!("ov-{fmt}.qcow2"));
        // No size given: it comes from the backing over HTTP.
        ds_ok(
            &d,
            &["create", "-q", "-f", "qcow2", "-b", &url, "-F", fmt, &ov],
        );
        let id = identity_ext(Path::new(&ov));
        assert!(id["etag"].is_string(), "{id}");
        assert_eq!(allocated_clusters(&d, &ov), 0);
        let info = qemu_ok(&d, "qemu-img", &["info", "-U", "--output=json", &ov]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"], SIZE as u64);
        assert_eq!(v["backing-filename"], url.as_str());

        ds_ok(&d, &["stream", &ov]);
        let info = qemu_ok(&d, "qemu-img", &["info", "--output=json", &ov]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert!(v.get("backing-filename").is_none(), "{info}");
        qemu_ok(
            &d,
            "qemu-img",
            &["compare", "-F", "raw", &ov, &d.s("base.raw")],
        );
        qemu_ok(&d, "qemu-img", &["check", &ov]);
    }
}

#[test]
fn qemu_keeps_the_identity_extension() {
    let (d, nginx) = served();
    let url = nginx.url("base.raw");
    let ov = d.s("ov.qcow2");
    ds_ok(
        &d,
        &["create", "-q", "-f", "qcow2", "-b", &url, "-F", "raw", &ov],
    );
    let id = identity_ext(Path::new(&ov));
    // Header rewrites by QEMU: amend, rebase -u (away and back), check -r all.
    qemu_ok(
        &d,
        "qemu-img",
        &["amend", "-o", "lazy_refcounts=on", &no_backing(&ov)],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &["rebase", "-u", "-b", "base.raw", "-F", "raw", &ov],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &["rebase", "-u", "-b", &url, "-F", "raw", &ov],
    );
    qemu_ok(&d, "qemu-img", &["check", "-r", "all", &no_backing(&ov)]);
    assert_eq!(identity_ext(Path::new(&ov)), id);
    let info = qemu_ok(&d, "qemu-img", &["info", "--output=json", &ov]);
    assert!(info.contains("\"lazy-refcounts\": true"), "{info}");
    // And it still works: a changed file is noticed through it.
    replace(&d.path("base.raw"), 0);
    let o = ds(&d, &["stream", &ov]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("changed: ETag"), "{}", stderr(&o));
}

#[test]
fn a_changed_http_backing_stops_the_stream_and_nothing_is_copied() {
    let (d, nginx) = served();
    let url = nginx.url("base.raw");
    let ov = d.s("ov.qcow2");
    ds_ok(
        &d,
        &["create", "-q", "-f", "qcow2", "-b", &url, "-F", "raw", &ov],
    );
    let old = identity_ext(Path::new(&ov))["etag"]
        .as_str()
        .unwrap()
        .to_string();
    replace(&d.path("base.raw"), 12345);
    let o = ds(&d, &["stream", &ov]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&format!("backing {url} changed: ETag {old} → \"")),
        "{e}"
    );
    assert_eq!(allocated_clusters(&d, &ov), 0);
}

/// qemu-nbd exporting `img` read-only on a Unix socket.
fn qemu_nbd(d: &Dir, img: &str, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "raw", "-x", "base", "-k"])
        .arg(sock)
        .arg(img)
        .current_dir(d.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("qemu-nbd did not listen on {}", sock.display());
}

#[test]
fn an_nbd_backing_restarted_over_other_data_is_refused() {
    let d = Dir::new();
    std::fs::write(d.path("base.raw"), base_data()).unwrap();
    let sock = d.path("nbd.sock");
    let mut srv = qemu_nbd(&d, &d.s("base.raw"), &sock);
    let uri = format!("nbd+unix:///base?socket={}", sock.display());
    let ov = d.s("ov.qcow2");
    ds_ok(
        &d,
        &["create", "-q", "-f", "qcow2", "-b", &uri, "-F", "raw", &ov],
    );
    let id = identity_ext(Path::new(&ov));
    assert_eq!(id["size"], SIZE as u64);
    assert!(
        id["sample"].as_str().unwrap().starts_with("fnv1a64:"),
        "{id}"
    );
    assert!(id["nbd_flags"].is_u64(), "{id}");
    srv.kill().unwrap();
    srv.wait().unwrap();

    // Same data again: the identity matches and the stream completes.
    let mut srv = qemu_nbd(&d, &d.s("base.raw"), &sock);
    let mut copy = std::fs::read(d.path("base.raw")).unwrap();
    std::fs::write(d.path("copy.raw"), &copy).unwrap();
    let ov2 = d.s("ov2.qcow2");
    ds_ok(
        &d,
        &["create", "-q", "-f", "qcow2", "-b", &uri, "-F", "raw", &ov2],
    );
    srv.kill().unwrap();
    srv.wait().unwrap();

    // Other data at the first sample range: refused, nothing copied.
    copy[10] ^= 0xff;
    std::fs::write(d.path("other.raw"), &copy).unwrap();
    let mut srv = qemu_nbd(&d, &d.s("other.raw"), &sock);
    let o = ds(&d, &["stream", &ov]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&format!("backing {uri} changed: data sample")),
        "{e}"
    );
    assert_eq!(allocated_clusters(&d, &ov), 0);
    srv.kill().unwrap();
    srv.wait().unwrap();

    let mut srv = qemu_nbd(&d, &d.s("base.raw"), &sock);
    ds_ok(&d, &["stream", &ov2]);
    qemu_ok(
        &d,
        "qemu-img",
        &["compare", "-F", "raw", &ov2, &d.s("copy.raw")],
    );
    srv.kill().unwrap();
    srv.wait().unwrap();
}

/// Runs diskstream with `env` set; returns its output.
fn ds_env(d: &Dir, env: &[(&str, &Path)], args: &[&str]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_diskstream"));
    c.args(args).current_dir(d.dir.path());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run diskstream")
}

/// HTTPS: raw and qcow2 backings behind nginx with a certificate from a
/// private CA stream to completion when that CA is trusted (`SSL_CERT_FILE`,
/// read by the system-roots loader the HTTP client uses), and are refused
/// with a clear error, nothing created, when it is not.
#[test]
fn https_backings_work_with_a_trusted_ca_and_are_refused_without_it() {
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
    let ca = certs.join("ca-cert.pem");

    // Not trusted: a clear error naming the URL and the certificate problem.
    let url = nginx.url("base.raw");
    let ov = d.s("untrusted.qcow2");
    let o = ds(
        &d,
        &["create", "-q", "-f", "qcow2", "-b", &url, "-F", "raw", &ov],
    );
    assert!(!o.status.success(), "an untrusted server was accepted");
    let err = stderr(&o);
    assert!(
        err.contains(&url) && err.to_lowercase().contains("certificate"),
        "unclear error: {err}"
    );
    assert!(
        !d.path("untrusted.qcow2").exists(),
        "a failed create left a file"
    );

    for (name, fmt) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        let url = nginx.url(name);
        assert!(url.starts_with("https://"), "{url}");
        let ov = d.s(&format!("ov-{fmt}.qcow2"));
        let env = [("SSL_CERT_FILE", ca.as_path())];
        let o = ds_env(
            &d,
            &env,
            &["create", "-q", "-f", "qcow2", "-b", &url, "-F", fmt, &ov],
        );
        assert!(o.status.success(), "create over https: {}", stderr(&o));
        let o = ds_env(&d, &env, &["stream", &ov]);
        assert!(o.status.success(), "stream over https: {}", stderr(&o));
        let info = qemu_ok(&d, "qemu-img", &["info", "--output=json", &ov]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert!(v.get("backing-filename").is_none(), "{info}");
        qemu_ok(
            &d,
            "qemu-img",
            &["compare", "-F", "raw", &ov, &d.s("base.raw")],
        );
        qemu_ok(&d, "qemu-img", &["check", &ov]);
    }
    assert!(
        nginx.access_log().contains("206"),
        "no range request reached nginx: {}",
        nginx.access_log()
    );
}
