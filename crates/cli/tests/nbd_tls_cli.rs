//! NBD over TLS from the command line: an overlay whose backing is a
//! TLS-only `qemu-nbd` export (`--tls-creds`, certificates made by
//! scripts/make-test-certs) is created, inspected and streamed with the
//! global `--nbd-tls-ca`, while the header keeps the plain `nbd+unix://`
//! name QEMU opens; without TLS, with the wrong host name, or named with
//! the `nbds://` scheme QEMU does not have, each is refused clearly and no
//! image is written.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_diskstream")
}

fn run(prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", "120", prog])
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn failed_with(o: &Output, what: &str) {
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(what), "expected {what:?} in: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
}

/// qemu-nbd serving `file` read-only, TLS required; killed when dropped.
struct TlsQemuNbd(Child);

impl TlsQemuNbd {
    fn start(certs: &Path, sock: &Path, file: &Path) -> Self {
        let object = format!(
            "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}",
            certs.display()
        );
        let child = Command::new("qemu-nbd")
            .args(["--object", &object, "--tls-creds", "tls0"])
            .args(["-r", "-f", "raw", "--persistent", "--shared=8", "-k"])
            .arg(sock)
            .arg(file)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsQemuNbd(child)
    }
}

impl Drop for TlsQemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_overlay_over_a_tls_only_nbd_export_streams_with_nbd_tls_ca() {
    let certs = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-test-certs");
    ok(&run(
        script.to_str().unwrap(),
        &[certs.path().to_str().unwrap()],
    ));
    let ca = certs.path().join("ca-cert.pem");
    let ca = ca.to_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    // 8 MiB: random data in the first half, a hole in the second.
    let mut data = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data[..4 << 20].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&base, &data[..4 << 20]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("q.sock");
    let _peer = TlsQemuNbd::start(certs.path(), &sock, &base);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let top = dir.path().join("top.qcow2");
    let tops = top.to_str().unwrap();

    // Plaintext: refused at create (the backing is opened for its size).
    let o = run(
        bin(),
        &["create", "-f", "qcow2", "-b", &uri, "-F", "raw", tops],
    );
    failed_with(&o, "TLS");
    assert!(!top.exists(), "a failed create left {tops}");
    // The certificate names localhost: another expected name is refused.
    let o = run(
        bin(),
        &[
            "--nbd-tls-ca",
            ca,
            "--nbd-tls-hostname",
            "other.example",
            "create",
            "-f",
            "qcow2",
            "-b",
            &uri,
            "-F",
            "raw",
            tops,
        ],
    );
    failed_with(&o, "TLS");
    assert!(!top.exists());
    // QEMU has no nbds:// scheme: never written into a header.
    let nbds = format!("nbds+unix:///?socket={}", sock.display());
    let o = run(
        bin(),
        &[
            "create", "-f", "qcow2", "-b", &nbds, "-F", "raw", tops, "8M",
        ],
    );
    failed_with(&o, "nbds://");
    assert!(!top.exists());

    ok(&run(
        bin(),
        &[
            "--nbd-tls-ca",
            ca,
            "create",
            "-f",
            "qcow2",
            "-b",
            &uri,
            "-F",
            "raw",
            tops,
        ],
    ));
    // The header holds the plain URI QEMU opens (with its own TLS options).
    let info = ok(&run("qemu-img", &["info", "-U", "--output=json", tops]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], uri.as_str(), "{info}");
    assert_eq!(info["virtual-size"], 8 << 20, "{info}");

    // Without TLS the backing cannot be read; with it, it can.
    failed_with(&run(bin(), &["info", tops]), "TLS");
    ok(&run(bin(), &["--nbd-tls-ca", ca, "info", tops]));
    let out = ok(&run(bin(), &["--nbd-tls-ca", ca, "stream", tops]));
    assert!(out.contains("stream complete"), "{out}");

    // Independent now: no backing, clean, the base's bytes, the hole not
    // copied as data.
    let info = ok(&run("qemu-img", &["info", "--output=json", tops]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    ok(&run("qemu-img", &["check", tops]));
    let flat = dir.path().join("flat.raw");
    ok(&run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            tops,
            flat.to_str().unwrap(),
        ],
    ));
    assert!(
        std::fs::read(&flat).unwrap() == data,
        "streamed content differs"
    );
    let map = ok(&run("qemu-img", &["map", "--output=json", tops]));
    let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data_bytes: u64 = map
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data_bytes, 4 << 20, "{map:?}");
}
