//! KNOWN ENGINE BUGS — minimal failing tests for bugs found in the qcow2
//! engine (owned by the qcow2 branch; not fixed here). A test here FAILS
//! until its bug is fixed; then it passes and stays as a regression test
//! (those say "Fixed on the qcow2 branch by ..."). Each names the engine
//! file and what goes wrong.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use image::device::{BlockDevice, WriteFlags};
use image::open::{CreateOptions, FormatKind, OpenOptions};
use image::storage::{MemStorage, Storage};
use image::{ErrorKind, create, open};

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A 4 MiB, 64 KiB-cluster image made by qemu-img, data in cluster 0.
fn qemu_image(dir: &Path) -> Vec<u8> {
    let p = dir.join("v.qcow2");
    let (c, o) = qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
    assert_eq!(c, 0, "{o}");
    let out = Command::new("qemu-io")
        .args(["-c", "write -P 0xab 0 64k", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::read(&p).unwrap()
}

async fn open_ro(path: &Path) -> image::Result<Arc<image::Image>> {
    open(
        path,
        &OpenOptions {
            format: Some("qcow2".into()),
            ..OpenOptions::default()
        },
    )
    .await
}

/// qcow2/header.rs: a backing_file_offset near u64::MAX overflows an index
/// computation and panics (the blocking task dies: `Internal`) instead of
/// returning InvalidImage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_bug_backing_offset_overflow_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = qemu_image(dir.path());
    put64(&mut b, 8, u64::MAX - 3);
    b[16..20].copy_from_slice(&8u32.to_be_bytes());
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, &b).unwrap();
    let e = open_ro(&p).await.expect_err("must not open");
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
}

/// qcow2/mod.rs open: an L1 table that lies past the end of the file is
/// accepted (reads then see zeros where data was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_bug_l1_table_past_eof_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = qemu_image(dir.path());
    put64(&mut b, 40, 1 << 30);
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, &b).unwrap();
    let r = open_ro(&p).await;
    assert!(r.is_err(), "an image whose L1 table is past EOF opened");
}

/// qcow2/mod.rs open: a file truncated before its refcount table (the
/// refcount table offset is past EOF) opens read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_bug_refcount_table_past_eof_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let b = qemu_image(dir.path());
    let rt = be64(&b, 48) as usize;
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, &b[..rt]).unwrap();
    let r = open_ro(&p).await;
    assert!(r.is_err(), "a file cut before its refcount table opened");
}

/// qcow2/mod.rs read path: an L1 entry pointing at an L2 table past EOF
/// read as zeros instead of failing (qemu-img check calls it corruption).
/// Fixed on the qcow2 branch by 7995065; kept as a regression test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_bug_l2_table_past_eof_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = qemu_image(dir.path());
    let l1 = be64(&b, 40) as usize;
    put64(&mut b, l1, (1 << 63) | (1 << 40));
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, &b).unwrap();
    if let Ok(img) = open_ro(&p).await {
        let r = img.read(0, 4096).await;
        assert!(r.is_err(), "a read through an L2 table past EOF succeeded");
    }
}

/// Fixed on the qcow2 branch by 94dee2e; kept as a regression test.
/// qcow2/mod.rs create: 512-byte clusters with a backing file were refused
/// ("header, extensions and backing name take 538 bytes, more than the 512
/// bytes a header write may cover"); qemu-img creates them (the corpus file
/// fuzz/corpus/open_read/valid-512b-backing-name.qcow2 is one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_bug_create_refuses_512b_clusters_with_a_backing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![1u8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    create(
        &top,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(1 << 20),
            cluster_size: Some(512),
            backing: Some(image::BackingSpec {
                name: "base.raw".into(),
                format: Some("raw".into()),
            }),
            ..CreateOptions::default()
        },
    )
    .await
    .expect("create a 512 B-cluster overlay");
    assert_eq!(qemu_check(&top), Ok(0));
}

/// A single write covering a whole fresh 512 B-cluster image (1 MiB plus
/// three sectors, as in the conformance suite) did not finish (minutes in
/// `alloc_clusters` rescanning refcounts); fixed on the qcow2 branch since,
/// kept as a regression test. A healthy engine
/// does this in milliseconds; the bound is only a hang detector.
#[test]
fn engine_bug_whole_device_write_on_512b_clusters_hangs() {
    with_deadline(
        "one 1 MiB write to a fresh 512 B-cluster image",
        Duration::from_secs(30),
        whole_device_write_512b(),
    );
}

async fn whole_device_write_512b() {
    let size = (1u64 << 20) + 3 * 512;
    let s = Arc::new(MemStorage::new("t.qcow2"));
    image::qcow2::create(
        &*s,
        &image::qcow2::CreateOptions {
            size,
            cluster_size: Some(512),
            backing: None,
            ..Default::default()
        },
    )
    .unwrap();
    let f = open_qcow2(s, true).await.unwrap();
    let img = image::Image::new(f, None);
    img.write(
        0,
        Bytes::from(vec![7u8; size as usize]),
        WriteFlags::default(),
    )
    .await
    .unwrap();
}

/// qcow2/check.rs walk: check() sized its per-cluster table by the largest
/// metadata offset it met, so a refcount table offset of ~2^60 asked for
/// petabytes and aborted the process (found by the fuzz corpus; fixed on
/// the qcow2 branch by 1dcd028, kept as a regression test). Run in a child process (this test
/// binary re-executed) so the abort is a failure, not the end of the run.
#[test]
fn engine_bug_check_allocates_by_metadata_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = qemu_image(dir.path());
    put64(&mut b, 48, 0x1002_0000_0000_0000);
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, &b).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "engine_bug_child_check",
            "--nocapture",
        ])
        .env("DS_BUG_IMAGE", &p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check() on a hostile image killed the process: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find(|l| l.contains("memory allocation") || l.contains("panicked"))
            .unwrap_or("(no message)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of engine_bug_check_allocates_by_metadata_offset"]
async fn engine_bug_child_check() {
    let Ok(p) = std::env::var("DS_BUG_IMAGE") else {
        return;
    };
    let bytes = std::fs::read(p).unwrap();
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes("bad.qcow2", bytes));
    // Opening may fail (fine); if it opens, check must return, not abort.
    if let Ok(f) = open_qcow2(s, false).await {
        let _ = f.check(None);
    }
}

/// qcow2/mod.rs read path: an L2 entry whose data cluster offset is not
/// cluster aligned (qemu: "Cluster allocation offset ... unaligned", a
/// corruption) is read from the unaligned offset instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_bug_unaligned_data_cluster_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = qemu_image(dir.path());
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be64(&b, l2);
    put64(&mut b, l2, e + 512);
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, &b).unwrap();
    if let Ok(img) = open_ro(&p).await {
        let r = img.read(0, 4096).await;
        assert!(r.is_err(), "a read of an unaligned data cluster succeeded");
    }
}

/// Fixed on the qcow2 branch by 7995065; kept as a regression test.
/// qcow2/refcount.rs: a refcount table entry pointing past EOF was taken as
/// an all-zero refcount block, so every cluster it covers looks free; an
/// allocating write then succeeds and puts guest data on cluster 0, over
/// the header: qemu-img then says "Image is not in qcow2 format".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_bug_refcount_block_past_eof_makes_used_clusters_free() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = qemu_image(dir.path());
    let rt = be64(&b, 48) as usize;
    put64(&mut b, rt, 1 << 40);
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, &b).unwrap();
    let Ok(img) = open(&p, &writable()).await else {
        return; // refused at open: fine
    };
    let w = img
        .write(
            1 << 20,
            Bytes::from(vec![1u8; 65536]),
            WriteFlags::default(),
        )
        .await;
    let f = img.flush().await;
    let c = img.close().await;
    drop(img);
    let report = qemu_img(&["check", "-f", "qcow2", p.to_str().unwrap()]);
    assert!(
        w.is_err() || f.is_err() || c.is_err(),
        "an allocating write over a refcount block past EOF succeeded; qemu-img check then exits {}:\n{}",
        report.0,
        report.1.lines().take(6).collect::<Vec<_>>().join("\n")
    );
}
