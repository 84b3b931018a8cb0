//! A pinned export identity is checked after every reconnect: qemu-nbd
//! restarted over the same data is accepted, restarted over other data is
//! refused for good with an error naming the change.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use image::BlockDevice;
use nbd::client::{ClientOptions, NbdClient};

fn qemu_nbd(img: &Path, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "raw", "-x", "base", "-k"])
        .arg(sock)
        .arg(img)
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

fn stop(mut c: Child) {
    c.kill().unwrap();
    c.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_to_changed_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let same = dir.path().join("base.raw");
    std::fs::write(&same, &data).unwrap();
    let mut other_data = data.clone();
    other_data[(1 << 20) - 1] ^= 0xff; // inside the last sample range
    let other = dir.path().join("other.raw");
    std::fs::write(&other, &other_data).unwrap();
    let sock = dir.path().join("nbd.sock");
    let uri = format!("nbd+unix:///base?socket={}", sock.display());
    let opts = ClientOptions {
        reconnect_window: Some(Duration::from_secs(60)),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..ClientOptions::default()
    };

    let srv = qemu_nbd(&same, &sock);
    let c = NbdClient::connect_uri(&uri, opts).await.unwrap();
    let id = c.identity().await.unwrap();
    c.pin_identity(id).await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), data[..4096]);

    // Same data behind a restarted server: the identity matches.
    stop(srv);
    let srv = qemu_nbd(&same, &sock);
    assert_eq!(c.read(8192, 4096).await.unwrap(), data[8192..12288]);

    // Other data: the reconnect is refused, reads fail naming the change.
    stop(srv);
    let srv = qemu_nbd(&other, &sock);
    let e = c.read(0, 4096).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("backing {uri} changed: data sample")),
        "{e}"
    );
    let e = c.read(4096, 4096).await.unwrap_err().to_string();
    assert!(e.contains("changed"), "{e}");
    stop(srv);
}
