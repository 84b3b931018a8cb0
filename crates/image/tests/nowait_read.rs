//! Reads answered on the async thread: `Format::try_read_nowait` and
//! `Format::map_nowait` answer only from cached metadata and page-cached
//! data, and say `None` whenever they would have to wait; and a small
//! copy-on-read fetches its unit from the backing in one read, keeping
//! zeros as zero units.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use image::device::BlockDevice;
use image::format::Mapping;
use image::open::OpenOptions;
use image::storage::CacheMode;
use image::{Image, open};

const K: u64 = 1024;

fn run(prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(path: &Path, fmt: &str, cmd: &str) {
    run("qemu-io", &["-f", fmt, "-c", cmd, path.to_str().unwrap()]);
}

/// A 1 MiB qcow2 image (64 KiB clusters): cluster 0 data 0xab, cluster 1
/// unallocated, cluster 2 a zero cluster, the rest unallocated.
fn layout(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("img.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1M"],
    );
    qemu_io(&p, "qcow2", "write -P 0xab 0 64k");
    qemu_io(&p, "qcow2", "write -z 128k 64k");
    p
}

async fn open_with(path: &Path, fmt: &str, cache: CacheMode) -> Arc<Image> {
    open(
        path,
        &OpenOptions {
            format: Some(fmt.into()),
            cache,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_qcow2_read_is_answered_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let p = layout(dir.path());
    let img = open_with(&p, "qcow2", CacheMode::Writeback).await;
    let mut buf = vec![0x55u8; (256 * K) as usize];
    assert!(
        img.format().try_read_nowait(0, &mut buf).is_none(),
        "the L2 table is not in memory yet: only the blocking path may load it"
    );
    assert!(img.format().map_nowait(0, 256 * K).is_none());

    // A read through the image loads the table; the data is page cached
    // (qemu-io wrote it through the page cache).
    let slow = img.read(0, (256 * K) as usize).await.unwrap();
    let mut buf = vec![0x55u8; (256 * K) as usize];
    let holes = img
        .format()
        .try_read_nowait(0, &mut buf)
        .expect("cached metadata and data")
        .unwrap();
    assert_eq!(holes, vec![(64 * K, 64 * K), (192 * K, 64 * K)]);
    assert!(buf[..(64 * K) as usize].iter().all(|&b| b == 0xab));
    assert!(
        buf[(128 * K) as usize..(192 * K) as usize]
            .iter()
            .all(|&b| b == 0)
    );
    // Holes are left for the caller, as `read` leaves them.
    assert!(
        buf[(64 * K) as usize..(128 * K) as usize]
            .iter()
            .all(|&b| b == 0x55)
    );
    assert_eq!(&slow[..(64 * K) as usize], &buf[..(64 * K) as usize]);

    let fast = img.format().map_nowait(0, 256 * K).expect("cached");
    assert_eq!(fast, img.format().map(0, 256 * K).unwrap());
    assert!(matches!(fast[0].mapping, Mapping::Data { .. }));
    img.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o_direct_data_goes_the_blocking_way_but_holes_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let p = layout(dir.path());
    let img = open_with(&p, "qcow2", CacheMode::None).await;
    img.read(0, (256 * K) as usize).await.unwrap();
    let mut buf = vec![0u8; (64 * K) as usize];
    assert!(
        img.format().try_read_nowait(0, &mut buf).is_none(),
        "an O_DIRECT read always waits for the device"
    );
    let holes = img
        .format()
        .try_read_nowait(192 * K, &mut buf)
        .expect("an unallocated range needs no I/O")
        .unwrap();
    assert_eq!(holes, vec![(192 * K, 64 * K)]);
    img.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_clusters_go_the_blocking_way() {
    let dir = tempfile::tempdir().unwrap();
    let src = layout(dir.path());
    let c = dir.path().join("c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            c.to_str().unwrap(),
        ],
    );
    let img = open_with(&c, "qcow2", CacheMode::Writeback).await;
    let slow = img.read(0, (64 * K) as usize).await.unwrap();
    assert!(slow.iter().all(|&b| b == 0xab));
    let mut buf = vec![0u8; (64 * K) as usize];
    assert!(img.format().try_read_nowait(0, &mut buf).is_none());
    img.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_cached_raw_read_is_answered_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.raw");
    let content: Vec<u8> = (0..256 * K).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&p, &content).unwrap();
    let img = open_with(&p, "raw", CacheMode::Writeback).await;
    let mut buf = vec![0u8; (100 * K) as usize];
    let holes = img
        .format()
        .try_read_nowait(3 * K + 1, &mut buf)
        .expect("just written: page cached")
        .unwrap();
    assert!(holes.is_empty());
    assert_eq!(buf, content[(3 * K + 1) as usize..(103 * K + 1) as usize]);
    // The last bytes of the file.
    let img_size = img.size();
    let mut tail = [1u8; 4];
    img.format()
        .try_read_nowait(img_size - 4, &mut tail)
        .expect("cached")
        .unwrap();
    assert_eq!(&tail[..], &content[content.len() - 4..]);
    img.close().await.unwrap();
}

/// A 4 KiB copy-on-read fetches its 64 KiB cluster once; a read of a
/// backing hole becomes a zero cluster, so the next read of it stays local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_copy_on_read_fetches_once_and_keeps_zeros_local() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", base.to_str().unwrap(), "1M"],
    );
    qemu_io(&base, "raw", "write -P 0x3c 0 64k");
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            top.to_str().unwrap(),
        ],
    );
    let img = open(
        &top,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    img.set_copy_on_read(true, None);
    let got = img.read(4 * K, (4 * K) as usize).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x3c));
    assert_eq!(img.stats().snapshot().backing_read_bytes, 64 * K);
    let got = img.read(512 * K + 100, 100).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    let fetched = img.stats().snapshot().backing_read_bytes;
    assert_eq!(fetched, 128 * K, "one cluster per copy-on-read");
    // Both clusters are local now: reading them again fetches nothing.
    img.read(0, (64 * K) as usize).await.unwrap();
    img.read(512 * K, (64 * K) as usize).await.unwrap();
    assert_eq!(img.stats().snapshot().backing_read_bytes, fetched);
    let map = img.format().map(0, 1024 * K).unwrap();
    assert!(matches!(map[0].mapping, Mapping::Data { .. }) && map[0].length == 64 * K);
    assert!(
        map.iter()
            .any(|r| r.offset == 512 * K && matches!(r.mapping, Mapping::Zero { .. })),
        "{map:?}"
    );
    img.close().await.unwrap();
    drop(img);
    let out = Command::new("qemu-img")
        .args(["check", "-q", top.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "qcow2",
            base.to_str().unwrap(),
            top.to_str().unwrap(),
        ],
    );
}
