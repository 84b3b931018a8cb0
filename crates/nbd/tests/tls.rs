//! TLS (STARTTLS) end to end: our server with our client, with nbdinfo
//! (libnbd/GnuTLS) and with a plaintext client that must be refused; our
//! client against qemu-nbd with `tls-creds-x509`. Certificates are made
//! with the openssl command in a temporary directory.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use image::BlockDevice;
use nbd::client::{ClientOptions, NbdClient};
use nbd::server::ServerConfig;
use nbd::tls::{ClientTls, server_config};

/// A CA, a server certificate for "localhost" and a client certificate,
/// in QEMU's file names (scripts/make-test-certs).
fn make_certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-test-certs");
    let o = Command::new(script).arg(dir).output().unwrap();
    assert!(
        o.status.success(),
        "make-test-certs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn client_opts(tls: Option<ClientTls>) -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        reconnect_window: Some(Duration::ZERO),
        tls,
        ..ClientOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_server_serves_tls_clients_and_refuses_plaintext() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let cfg = server_config(
        &certs.path().join("server-cert.pem"),
        &certs.path().join("server-key.pem"),
    )
    .unwrap();
    let data = pattern(1 << 20, 5);
    let dev = Arc::new(MemDevice::new(data.clone(), vec![]));
    let s = serve(move || async move {
        let mut c = ServerConfig::new(vec![mem_export("secure", dev, true)]);
        c.tls = Some(cfg);
        c
    });
    let tls = ClientTls::new(&certs.path().join("ca-cert.pem"), "localhost").unwrap();
    let c = NbdClient::connect_uri(&s.uri("secure"), client_opts(Some(tls)))
        .await
        .unwrap();
    assert!(c.read(0, 1 << 20).await.unwrap() == data);

    let e = NbdClient::connect_uri(&s.uri("secure"), client_opts(None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("requires TLS"), "{e}");

    // A client trusting another CA fails the TLS handshake.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path());
    let wrong = ClientTls::new(&other.path().join("ca-cert.pem"), "localhost").unwrap();
    let e = NbdClient::connect_uri(&s.uri("secure"), client_opts(Some(wrong)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TLS handshake"), "{e}");

    // libnbd (GnuTLS) interoperates.
    let uri = format!(
        "nbds+unix:///secure?socket={}&tls-certificates={}&tls-verify-peer=false",
        s.sock.display(),
        certs.path().display()
    );
    let out = tokio::task::spawn_blocking(move || tool_ok(30, "nbdinfo", &[&uri]))
        .await
        .unwrap();
    assert!(
        out.contains("using TLS") || out.contains("with TLS"),
        "{out}"
    );
    assert!(out.contains("1048576"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_reads_from_qemu_nbd_with_x509_creds() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.raw");
    let content = sparse_raw(&file, 4 << 20, 1 << 20, 65536);
    let sock = dir.path().join("q.sock");
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}",
        certs.path().display()
    );
    let mut child = Command::new("qemu-nbd")
        .args([
            "--object",
            &object,
            "--tls-creds",
            "tls0",
            "-r",
            "-f",
            "raw",
            "--persistent",
            "-k",
        ])
        .arg(&sock)
        .arg(&file)
        .spawn()
        .unwrap();
    wait_socket(&sock, Duration::from_secs(20));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let tls = ClientTls::new(&certs.path().join("ca-cert.pem"), "localhost").unwrap();
    let secure = async {
        let c = NbdClient::connect_uri(&uri, client_opts(Some(tls))).await?;
        c.read(0, 4 << 20).await
    }
    .await;
    let plain = NbdClient::connect_uri(&uri, client_opts(None)).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(secure.unwrap() == content, "data read over TLS differs");
    let e = plain.unwrap_err().to_string();
    assert!(e.contains("TLS"), "{e}");
}
