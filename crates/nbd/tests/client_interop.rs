//! Our client against the real NBD servers (qemu-nbd, qemu-storage-daemon,
//! nbdkit's memory and file plugins, and our own server): identical reads,
//! block status that matches the file's layout, writes, pipelining, and
//! reconnect (restart within the window, death past it, a hung peer,
//! a changed export), plus latency and error injection with nbdkit filters.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use image::device::block_status_all;
use image::open::Opener;
use image::{BlockDevice, ErrorKind, ExtentKind, WriteFlags};
use nbd::client::{ClientOptions, NbdClient, NbdOpener};
use nbd::server::ServerConfig;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const DATA_AT: u64 = 3 * MIB;
const DATA_LEN: usize = 2 * MIB as usize + 4096;

/// A peer server process, killed when dropped.
struct Peer {
    child: Child,
    sock: PathBuf,
}

impl Peer {
    fn start(sock: &Path, prog: &str, args: &[&str]) -> Peer {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {prog}: {e}"));
        wait_socket(sock, Duration::from_secs(20));
        Peer {
            child,
            sock: sock.to_owned(),
        }
    }
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we own; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_nbd(sock: &Path, file: &Path, extra: &[&str]) -> Peer {
    let mut args = vec![
        "-f",
        "raw",
        "-k",
        sock.to_str().unwrap(),
        "--persistent",
        "--shared=16",
    ];
    args.extend_from_slice(extra);
    args.push(file.to_str().unwrap());
    Peer::start(sock, "qemu-nbd", &args)
}

fn fixture() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    let content = sparse_raw(&file, SIZE, DATA_AT, DATA_LEN);
    (dir, file, content)
}

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Some(Duration::from_secs(10)),
        reconnect_window: Some(Duration::from_secs(10)),
        ..ClientOptions::default()
    }
}

async fn read_all(c: &NbdClient) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < c.size() {
        let n = (c.size() - pos).min(3 * MIB + 512) as usize;
        out.extend(c.read(pos, n).await.unwrap());
        pos += n as u64;
    }
    out
}

/// Block status must say: zeros, then data exactly where the file has it, then zeros.
async fn assert_layout(c: &NbdClient) {
    let ext = block_status_all(c, 0, SIZE).await.unwrap();
    let data: Vec<(u64, u64)> = ext
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(data, vec![(DATA_AT, DATA_LEN as u64)], "{ext:?}");
    assert!(ext.iter().all(|e| e.depth == Some(0)));
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_identically_from_qemu_nbd() {
    let (dir, file, content) = fixture();
    let p = qemu_nbd(&dir.path().join("q.sock"), &file, &["-r"]);
    let c = NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap();
    assert_eq!(c.size(), SIZE);
    assert!(c.info().read_only);
    assert!(read_all(&c).await == content);
    assert_layout(&c).await;
    let e = c
        .write(0, Bytes::from_static(b"x"), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_identically_from_qemu_storage_daemon() {
    let (dir, file, content) = fixture();
    let sock = dir.path().join("qsd.sock");
    let blockdev = format!(
        "driver=file,filename={},node-name=f0,read-only=on",
        file.display()
    );
    let server = format!("addr.type=unix,addr.path={}", sock.display());
    let p = Peer::start(
        &sock,
        "qemu-storage-daemon",
        &[
            "--blockdev",
            &blockdev,
            "--blockdev",
            "driver=raw,file=f0,node-name=d0,read-only=on",
            "--nbd-server",
            &server,
            "--export",
            "type=nbd,id=e0,node-name=d0,name=disk",
        ],
    );
    let c = NbdClient::connect_uri(&p.uri("disk"), opts())
        .await
        .unwrap();
    assert!(read_all(&c).await == content);
    assert_layout(&c).await;
    // An unknown export is refused with a message naming it.
    let e = NbdClient::connect_uri(&p.uri("nope"), opts())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_identically_from_nbdkit_file() {
    let (dir, file, content) = fixture();
    let sock = dir.path().join("k.sock");
    let p = Peer::start(
        &sock,
        "nbdkit",
        &[
            "-f",
            "-r",
            "-U",
            sock.to_str().unwrap(),
            "file",
            file.to_str().unwrap(),
        ],
    );
    let c = NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap();
    assert!(read_all(&c).await == content);
    assert_layout(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_nbdkit_memory_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let p = Peer::start(
        &sock,
        "nbdkit",
        &["-f", "-U", sock.to_str().unwrap(), "memory", "16M"],
    );
    let c = Arc::new(NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap());
    assert_eq!(c.size(), SIZE);
    // Many writes in flight at once on one connection.
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let c = Arc::clone(&c);
        tasks.push(tokio::spawn(async move {
            let d = pattern(65536, i + 1);
            c.write(
                i * 4 * 65536,
                Bytes::from(d),
                WriteFlags { fua: i % 2 == 0 },
            )
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.write_zeroes(65536, 65536, true).await.unwrap();
    c.discard(8 * MIB, MIB).await.unwrap();
    c.flush().await.unwrap();
    for i in 0..32u64 {
        let got = c.read(i * 4 * 65536, 65536).await.unwrap();
        assert!(got == pattern(65536, i + 1), "block {i}");
    }
    assert!(c.read(65536, 65536).await.unwrap().iter().all(|&b| b == 0));
    // The memory plugin reports written ranges as data, the rest as zero.
    let ext = block_status_all(&*c, 0, SIZE).await.unwrap();
    assert_eq!(ext[0].kind, ExtentKind::Data, "{ext:?}");
    assert_eq!(ext.last().unwrap().kind, ExtentKind::Zero, "{ext:?}");
    // A request past the end is refused locally, naming the range.
    let e = c.read(SIZE - 1, 2).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_complete_out_of_order_against_our_server() {
    let dev = Arc::new({
        let mut d = MemDevice::new(pattern(SIZE as usize, 3), vec![]);
        d.delay = Duration::from_millis(200);
        d
    });
    let d = Arc::clone(&dev);
    let s = serve(move || async move { ServerConfig::new(vec![mem_export("m", d, false)]) });
    let c = Arc::new(NbdClient::connect_uri(&s.uri("m"), opts()).await.unwrap());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let c = Arc::clone(&c);
        tasks.push(tokio::spawn(async move {
            (i, c.read(i * 65536, 65536).await.unwrap())
        }));
    }
    let expect = dev.data.lock().unwrap().clone();
    for t in tasks {
        let (i, got) = t.await.unwrap();
        assert!(got[..] == expect[(i * 65536) as usize..((i + 1) * 65536) as usize]);
    }
    // 32 requests of 200 ms each ran concurrently, not one after another.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_when_the_server_restarts_within_the_window() {
    let (dir, file, content) = fixture();
    let sock = dir.path().join("r.sock");
    let mut p = qemu_nbd(&sock, &file, &["-r"]);
    let c = Arc::new(NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap());
    assert!(c.read(DATA_AT, 4096).await.unwrap()[..] == content[DATA_AT as usize..][..4096]);
    drop(p);
    // Requests issued while the server is down wait for it.
    let c2 = Arc::clone(&c);
    let pending = tokio::spawn(async move { c2.read(DATA_AT, 65536).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!pending.is_finished());
    p = qemu_nbd(&sock, &file, &["-r"]);
    let got = tokio::time::timeout(Duration::from_secs(15), pending)
        .await
        .expect("request did not complete after the restart")
        .unwrap()
        .unwrap();
    assert!(got[..] == content[DATA_AT as usize..][..65536]);
    assert!(c.is_connected());
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_clearly_when_the_server_stays_dead_past_the_window() {
    let (dir, file, _) = fixture();
    let p = qemu_nbd(&dir.path().join("d.sock"), &file, &["-r"]);
    let o = ClientOptions {
        reconnect_window: Some(Duration::from_secs(1)),
        ..opts()
    };
    let c = NbdClient::connect_uri(&p.uri(""), o).await.unwrap();
    c.read(0, 512).await.unwrap();
    drop(p);
    let start = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(20), c.read(0, 512))
        .await
        .expect("request hung past the window")
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("unreachable") && msg.contains("d.sock"),
        "{msg}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    // An outage, not a bad range: EIO on the wire, and a stream waits it out.
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(e.errno(), libc::EIO);
    // Later requests fail at once while the server is still gone.
    let t = Instant::now();
    assert!(c.read(0, 512).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_detects_a_hung_server() {
    let (dir, file, content) = fixture();
    let p = qemu_nbd(&dir.path().join("h.sock"), &file, &["-r"]);
    let o = ClientOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Some(Duration::from_secs(1)),
        reconnect_window: Some(Duration::from_secs(2)),
        ..opts()
    };
    let c = Arc::new(NbdClient::connect_uri(&p.uri(""), o).await.unwrap());
    c.read(0, 512).await.unwrap();
    // Stopped briefly: the request times out, the client reconnects once the
    // server runs again, and the request completes.
    p.signal(libc::SIGSTOP);
    let c2 = Arc::clone(&c);
    let r = tokio::spawn(async move { c2.read(DATA_AT, 4096).await });
    tokio::time::sleep(Duration::from_millis(1300)).await;
    p.signal(libc::SIGCONT);
    let got = tokio::time::timeout(Duration::from_secs(10), r)
        .await
        .expect("no completion after SIGCONT")
        .unwrap()
        .unwrap();
    assert!(got[..] == content[DATA_AT as usize..][..4096]);
    // Stopped for good: the request fails after timeout + window.
    p.signal(libc::SIGSTOP);
    let start = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(20), c.read(0, 512))
        .await
        .expect("hung request never failed")
        .unwrap_err();
    assert!(e.to_string().contains("unreachable"), "{e}");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    p.signal(libc::SIGCONT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_export_whose_size_changed_across_a_reconnect() {
    let (dir, file, _) = fixture();
    let sock = dir.path().join("s.sock");
    let p = qemu_nbd(&sock, &file, &["-r"]);
    let c = NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap();
    drop(p);
    let other = dir.path().join("other.raw");
    sparse_raw(&other, SIZE * 2, 0, 4096);
    let _p = qemu_nbd(&sock, &other, &["-r"]);
    let e = tokio::time::timeout(Duration::from_secs(20), c.read(0, 512))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("size changed"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_delay_and_error_filters() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("f.sock");
    let p = Peer::start(
        &sock,
        "nbdkit",
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "--filter=delay",
            "memory",
            "1M",
            "delay-read=400ms",
        ],
    );
    let c = NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap();
    let t = Instant::now();
    assert!(c.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    assert!(t.elapsed() >= Duration::from_millis(400));
    drop(c);
    drop(p);

    let p = Peer::start(
        &sock,
        "nbdkit",
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "--filter=error",
            "memory",
            "1M",
            "error=EIO",
            "error-pread-rate=100%",
        ],
    );
    let c = NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap();
    let t = Instant::now();
    let e = c.read(4096, 512).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("EIO") && msg.contains("offset 4096"), "{msg}");
    // A server error is an answer, not an outage: no reconnect, no wait.
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(c.is_connected());
    c.write(0, Bytes::from_static(b"ok"), WriteFlags::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opener_opens_nbd_backings_as_raw_devices() {
    let (dir, file, content) = fixture();
    let p = qemu_nbd(&dir.path().join("o.sock"), &file, &["-r"]);
    let opener = NbdOpener { options: opts() };
    let o = image::OpenOptions::default();
    let dev = opener
        .open_backing(&p.uri(""), Some("raw"), &o)
        .await
        .unwrap()
        .expect("nbd URI handled");
    assert_eq!(dev.size(), SIZE);
    assert!(dev.read(0, SIZE as usize).await.unwrap() == content);
    assert!(
        opener
            .open_backing("/some/file", Some("raw"), &o)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        opener
            .open_backing("http://h/x", Some("raw"), &o)
            .await
            .unwrap()
            .is_none()
    );
    let e = opener
        .open_backing(&p.uri(""), Some("qcow2"), &o)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}

/// An overlay whose backing is an NBD export, exactly as
/// `qemu-img create -f qcow2 -b nbd+unix:///?socket=... -F raw` writes it,
/// opens through `image::open` with the NBD opener and reads like qemu-io.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_overlay_over_an_nbd_backing_opens_through_image_open() {
    let (dir, file, mut content) = fixture();
    let p = qemu_nbd(&dir.path().join("b.sock"), &file, &["-r"]);
    let overlay = dir.path().join("top.qcow2");
    let uri = p.uri("");
    let ov = overlay.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        tool_ok(
            30,
            "qemu-img",
            &["create", "-f", "qcow2", "-b", &uri, "-F", "raw", &ov],
        );
        tool_ok(
            30,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x33 0 65536", &ov],
        );
    })
    .await
    .unwrap();
    content[..65536].fill(0x33);
    let opts = image::OpenOptions {
        opener: Some(Arc::new(NbdOpener { options: opts() })),
        ..image::OpenOptions::default()
    };
    let img = image::open(&overlay, &opts).await.unwrap();
    assert_eq!(img.size(), SIZE);
    assert!(img.read(0, SIZE as usize).await.unwrap() == content);
    // Block status: our write at depth 0, the backing's data at depth 1,
    // the backing's holes as zeros at depth 1 (skipped by a stream).
    let ext = block_status_all(&*img, 0, SIZE).await.unwrap();
    assert_eq!(
        (ext[0].offset, ext[0].kind, ext[0].depth),
        (0, ExtentKind::Data, Some(0)),
        "{ext:?}"
    );
    let data_below: Vec<(u64, u64)> = ext
        .iter()
        .filter(|e| e.kind == ExtentKind::Data && e.depth == Some(1))
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(data_below, vec![(DATA_AT, DATA_LEN as u64)], "{ext:?}");
    assert!(
        ext.iter()
            .filter(|e| e.depth == Some(1) && e.kind == ExtentKind::Zero)
            .count()
            >= 2,
        "{ext:?}"
    );
    // Without an opener the backing is refused with a message naming it.
    let e = image::open(&overlay, &image::OpenOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("b.sock"), "{e}");
}

/// Waits (bounded) until the client has `n` connections up.
async fn wait_connections(c: &NbdClient, n: usize) {
    for _ in 0..100 {
        if c.connections() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} connections up, expected {n}", c.connections());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_conn_spreads_requests_and_a_flush_covers_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    // nbdkit's memory plugin advertises CAN_MULTI_CONN.
    let p = Peer::start(
        &sock,
        "nbdkit",
        &["-f", "-U", sock.to_str().unwrap(), "memory", "16M"],
    );
    let c = Arc::new(NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap());
    wait_connections(&c, 4).await;
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = Arc::clone(&c);
        tasks.push(tokio::spawn(async move {
            c.write(
                i * 65536,
                Bytes::from(pattern(65536, i + 7)),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.flush().await.unwrap();
    // Read back on a fresh single-connection client: what the four
    // connections wrote is one export's content.
    let one = NbdClient::connect_uri(
        &p.uri(""),
        ClientOptions {
            connections: 1,
            ..opts()
        },
    )
    .await
    .unwrap();
    assert_eq!(one.connections(), 1);
    for i in 0..64u64 {
        let got = one.read(i * 65536, 65536).await.unwrap();
        assert!(got == pattern(65536, i + 7), "block {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_when_the_server_does_not_offer_multi_conn() {
    let (dir, file, content) = fixture();
    let sock = dir.path().join("q.sock");
    // qemu-nbd with its default --shared=1 does not advertise CAN_MULTI_CONN
    // (and would not accept a second client).
    let p = Peer::start(
        &sock,
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-r",
            "-k",
            sock.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    );
    let c = NbdClient::connect_uri(&p.uri(""), opts()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.connections(), 1);
    assert!(read_all(&c).await == content);
}
