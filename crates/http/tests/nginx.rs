//! The HTTP source against a real nginx on loopback: raw and qcow2 images
//! read identically to local reads, connections are reused, an outage inside
//! the retry window is ridden out, one beyond it fails with an I/O error, a
//! server without range support and a file replaced on the server get clear
//! errors.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::testing::Nginx;
use http::{HttpOpener, HttpOptions, HttpSource};
use image::identity::BackingIdentity;
use image::open::{OpenOptions, Opener};
use image::{BlockDevice, ErrorKind};

const SIZE: usize = 4 << 20;

/// Pseudo-random data with some zero runs, as an image has.
fn sample_data(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; SIZE];
    for (i, chunk) in v.chunks_mut(65536).enumerate() {
        if i % 5 == 3 {
            continue; // a zero cluster
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

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn setup(extra: &str) -> (tempfile::TempDir, Nginx, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let data = sample_data(7);
    std::fs::write(dir.path().join("base.raw"), &data).unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &p("base.raw"),
        &p("base.qcow2"),
    ]);
    let nginx = Nginx::start(dir.path(), extra).expect("start nginx");
    (dir, nginx, data)
}

fn quick() -> HttpOptions {
    HttpOptions {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..HttpOptions::default()
    }
}

async fn open(url: &str, format: &str, options: HttpOptions) -> Arc<dyn BlockDevice> {
    let opener = HttpOpener { options };
    opener
        .open_backing(url, Some(format), &OpenOptions::default())
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
        .expect("an http URL is handled")
}

/// Reads the whole device in 256 KiB pieces, eight requests in flight.
async fn read_all(dev: &Arc<dyn BlockDevice>) -> Vec<u8> {
    const PIECE: usize = 256 << 10;
    let size = dev.size() as usize;
    let mut out = vec![0u8; size];
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let mut in_flight = 0;
    loop {
        while in_flight < 8 && next < size {
            let d = Arc::clone(dev);
            let off = next;
            let len = PIECE.min(size - off);
            set.spawn(async move { (off, d.read(off as u64, len).await) });
            next += len;
            in_flight += 1;
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (off, data) = done.unwrap();
        let data = data.unwrap();
        out[off..off + data.len()].copy_from_slice(&data);
        in_flight -= 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_qcow2_read_like_the_local_files() {
    let (_dir, nginx, data) = setup("");
    let raw = open(&nginx.url("base.raw"), "raw", quick()).await;
    assert_eq!(raw.size(), SIZE as u64);
    assert!(read_all(&raw).await == data, "raw over HTTP differs");
    let st = raw.block_status(0, SIZE as u64).await.unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(
        (st[0].kind, st[0].depth),
        (image::ExtentKind::Data, Some(0))
    );
    assert!(
        raw.write(0, vec![0u8; 512].into(), Default::default())
            .await
            .is_err()
    );

    let q = open(&nginx.url("base.qcow2"), "qcow2", quick()).await;
    assert_eq!(q.size(), SIZE as u64);
    assert_eq!(q.info().format, "qcow2");
    assert!(read_all(&q).await == data, "qcow2 over HTTP differs");
    // The qcow2 engine knows its zero clusters without reading them.
    let st = image::device::block_status_all(&*q, 0, SIZE as u64)
        .await
        .unwrap();
    assert!(
        st.iter().any(|e| e.kind != image::ExtentKind::Data),
        "{st:?}"
    );

    // Connection reuse: far fewer connections than range requests.
    let log = nginx.access_log();
    let ranged: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("GET ") && l.contains(" 206 "))
        .collect();
    let conns: std::collections::HashSet<&str> =
        ranged.iter().filter_map(|l| l.split(' ').nth(3)).collect();
    assert!(ranged.len() >= 32, "{log}");
    assert!(
        conns.len() * 2 <= ranged.len(),
        "{} range requests over {} connections",
        ranged.len(),
        conns.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_inside_the_window_is_retried() {
    let (_dir, mut nginx, data) = setup("");
    let src = Arc::new(
        HttpSource::open(
            &nginx.url("base.raw"),
            HttpOptions {
                retry_window: Some(Duration::from_secs(120)),
                ..quick()
            },
            None,
        )
        .await
        .unwrap(),
    );
    assert_eq!(src.read(0, 4096).await.unwrap(), data[..4096]);
    nginx.stop();
    let reader = {
        let s = Arc::clone(&src);
        tokio::spawn(async move { s.read(1 << 20, 1 << 20).await })
    };
    // Wait (bounded) until the read has failed at least twice, so it really
    // runs across the outage, then bring the server back.
    for _ in 0..1000 {
        if src.stats.retries.load(std::sync::atomic::Ordering::Relaxed) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(src.stats.retries.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    nginx.start_again().unwrap();
    let got = reader
        .await
        .unwrap()
        .expect("read retried across the restart");
    assert!(got == data[1 << 20..2 << 20]);
}

/// Past the window a read fails with EIO, as the outage (`Unavailable`, on
/// which a stream job pauses and probes), whether the engine reads the
/// remote file itself (raw) or runs a format over it (qcow2).
async fn an_outage_beyond_the_window_fails_as_unavailable(name: &str, format: &str) {
    let (_dir, mut nginx, _data) = setup("");
    let dev = open(
        &nginx.url(name),
        format,
        HttpOptions {
            retry_window: Some(Duration::from_millis(300)),
            ..quick()
        },
    )
    .await;
    dev.read(0, 65536).await.unwrap();
    nginx.stop();
    let e = dev.read(2 << 20, 65536).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{format}: {e}");
    assert_eq!(e.errno(), 5, "{format}: EIO expected: {e}");
    assert!(e.to_string().contains("no answer after"), "{format}: {e}");
    // Back again, reads work again: nothing was left broken.
    nginx.start_again().unwrap();
    dev.read(2 << 20, 65536).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_beyond_the_window_fails_as_unavailable_raw() {
    an_outage_beyond_the_window_fails_as_unavailable("base.raw", "raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_beyond_the_window_fails_as_unavailable_qcow2() {
    an_outage_beyond_the_window_fails_as_unavailable("base.qcow2", "qcow2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_ranges_is_refused_clearly() {
    let (_dir, nginx, _data) = setup("max_ranges 0;");
    let e = HttpSource::open(&nginx.url("base.raw"), quick(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not support range requests"), "{e}");
    assert!(e.contains(&nginx.url("base.raw")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_a_clear_error_not_a_retry_loop() {
    let (_dir, nginx, _data) = setup("");
    let e = HttpSource::open(&nginx.url("nope.raw"), quick(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("404"), "{e}");
}

/// Replaces the served file with other bytes and another mtime (nginx's
/// ETag is mtime-size, so the new version has a new ETag).
fn replace(path: &Path) {
    let mut data = std::fs::read(path).unwrap();
    data[100] ^= 0xff;
    std::fs::write(path, &data).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_on_the_server_fails_reads_naming_the_etag() {
    let (dir, nginx, data) = setup("");
    let url = nginx.url("base.raw");
    let src = HttpSource::open(&url, quick(), None).await.unwrap();
    let before = src.identity().clone();
    assert!(before.etag.is_some(), "nginx serves an ETag");
    assert_eq!(src.read(0, 512).await.unwrap(), data[..512]);
    replace(&dir.path().join("base.raw"));
    let e = src.read(0, 512).await.unwrap_err().to_string();
    let old = before.etag.clone().unwrap();
    assert!(
        e.contains(&format!("backing {url} changed: ETag {old} → \"")),
        "{e}"
    );
    // Opening with the old identity recorded refuses at once.
    let e = HttpSource::open(&url, quick(), Some(&before))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("changed: ETag"), "{e}");
    // And with the current one it opens.
    let now: BackingIdentity = HttpSource::open(&url, quick(), None)
        .await
        .unwrap()
        .identity()
        .clone();
    HttpSource::open(&url, quick(), Some(&now)).await.unwrap();
}
