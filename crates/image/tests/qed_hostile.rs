//! Hostile and damaged QED input (DESIGN.md invariant 6), and the spec's
//! rules for feature bits and the need-check flag: every bad header field is
//! refused by name, before anything is allocated from it, with the file left
//! as it was; damaged tables fail the request that meets them (never a
//! panic, never a read or write outside the file); an image left with the
//! need-check flag is repaired by a read-write open and read as-is by a
//! read-only one.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::*;
use image::device::{BlockDevice, WriteFlags};
use image::storage::{MemStorage, Storage};
use image::{ErrorKind, OpenOptions, open};

// Header field offsets (docs/interop/qed_spec.rst).
const CLUSTER_SIZE: usize = 4;
const TABLE_SIZE: usize = 8;
const HEADER_SIZE: usize = 12;
const FEATURES: usize = 16;
const COMPAT: usize = 24;
const AUTOCLEAR: usize = 32;
const L1_OFFSET: usize = 40;
const IMAGE_SIZE: usize = 48;
const BACKING_OFFSET: usize = 56;
const BACKING_SIZE: usize = 60;

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A valid 4 MiB image (64 KiB clusters, 2-cluster tables) with data in its
/// first 256 KiB, made by our engine.
async fn valid(dir: &Path) -> Vec<u8> {
    let p = dir.join("seed.qed");
    image::create(
        &p,
        image::FormatKind::Qed,
        &image::CreateOptions {
            size: Some(4 << 20),
            table_size: Some(2),
            ..image::CreateOptions::default()
        },
    )
    .await
    .unwrap();
    let img = open(&p, &writable()).await.unwrap();
    img.write(0, Bytes::from(vec![0xab; 256 << 10]), WriteFlags::default())
        .await
        .unwrap();
    img.close().await.unwrap();
    drop(img);
    std::fs::read(&p).unwrap()
}

async fn try_open(path: &Path, writable: bool) -> image::Result<std::sync::Arc<image::Image>> {
    let opts = OpenOptions {
        writable,
        format: Some("qed".into()),
        ..OpenOptions::default()
    };
    // Other tests of this binary run qemu-img meanwhile: a child forked
    // while we hold a file's OFD lock holds it too until it execs. A lock
    // conflict is that race, not the outcome under test: try again.
    for _ in 0..20 {
        match open(path, &opts).await {
            Err(e) if e.kind() == ErrorKind::Locked => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            r => return r,
        }
    }
    open(path, &opts).await
}

/// Opening `bytes` read-only and read-write must fail with `kind` and a
/// message holding `what`, and leave the file as it was.
async fn rejects(
    bad: &mut Vec<String>,
    dir: &Path,
    name: &str,
    bytes: &[u8],
    kind: ErrorKind,
    what: &str,
) {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    for writable in [false, true] {
        match try_open(&path, writable).await {
            Ok(_) => bad.push(format!("{name}: opened (writable: {writable})")),
            Err(e) if e.kind() != kind || !e.to_string().contains(what) => bad.push(format!(
                "{name} (writable: {writable}): {:?}: {e} (wanted {kind:?} naming '{what}')",
                e.kind()
            )),
            Err(_) => {}
        }
        if std::fs::read(&path).unwrap() != bytes {
            bad.push(format!("{name}: a failed open changed the file"));
        }
    }
}

fn verdict(bad: Vec<String>) {
    assert!(
        bad.is_empty(),
        "{} failing cases:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qed_hostile_header_fields_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v = valid(d).await;
    let ed = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = v.clone();
        f(&mut b);
        b
    };
    use ErrorKind::{InvalidImage, Unsupported};
    let mut bad = Vec::new();
    let cases: Vec<(&str, Vec<u8>, ErrorKind, &str)> = vec![
        ("short", v[..40].to_vec(), InvalidImage, "too short"),
        (
            "cluster-0",
            ed(&|b| put32(b, CLUSTER_SIZE, 0)),
            InvalidImage,
            "cluster_size",
        ),
        (
            "cluster-2k",
            ed(&|b| put32(b, CLUSTER_SIZE, 2048)),
            InvalidImage,
            "cluster_size",
        ),
        (
            "cluster-12k",
            ed(&|b| put32(b, CLUSTER_SIZE, 3 << 12)),
            InvalidImage,
            "cluster_size",
        ),
        (
            "cluster-128m",
            ed(&|b| put32(b, CLUSTER_SIZE, 128 << 20)),
            InvalidImage,
            "cluster_size",
        ),
        (
            "cluster-max",
            ed(&|b| put32(b, CLUSTER_SIZE, u32::MAX)),
            InvalidImage,
            "cluster_size",
        ),
        (
            "table-0",
            ed(&|b| put32(b, TABLE_SIZE, 0)),
            InvalidImage,
            "table_size",
        ),
        (
            "table-3",
            ed(&|b| put32(b, TABLE_SIZE, 3)),
            InvalidImage,
            "table_size",
        ),
        (
            "table-32",
            ed(&|b| put32(b, TABLE_SIZE, 32)),
            InvalidImage,
            "table_size",
        ),
        (
            "header-0",
            ed(&|b| put32(b, HEADER_SIZE, 0)),
            InvalidImage,
            "header_size",
        ),
        (
            "header-huge",
            ed(&|b| put32(b, HEADER_SIZE, u32::MAX)),
            InvalidImage,
            "l1_table_offset",
        ),
        (
            "unknown-feature",
            ed(&|b| put64(b, FEATURES, 1 << 9)),
            Unsupported,
            "feature",
        ),
        (
            "size-odd",
            ed(&|b| put64(b, IMAGE_SIZE, (4 << 20) + 1)),
            InvalidImage,
            "image_size",
        ),
        (
            "size-max",
            ed(&|b| put64(b, IMAGE_SIZE, u64::MAX - 511)),
            InvalidImage,
            "image_size",
        ),
        (
            "l1-unaligned",
            ed(&|b| put64(b, L1_OFFSET, 65536 + 512)),
            InvalidImage,
            "l1_table_offset",
        ),
        (
            "l1-in-header",
            ed(&|b| put64(b, L1_OFFSET, 0)),
            InvalidImage,
            "l1_table_offset",
        ),
        (
            "l1-past-eof",
            ed(&|b| put64(b, L1_OFFSET, 1 << 30)),
            InvalidImage,
            "L1 table",
        ),
        (
            "l1-wraps",
            ed(&|b| put64(b, L1_OFFSET, u64::MAX - 65535)),
            InvalidImage,
            "L1 table",
        ),
        (
            "backing-past-header",
            ed(&|b| {
                put64(b, FEATURES, 1);
                put32(b, BACKING_OFFSET, 65530);
                put32(b, BACKING_SIZE, 100);
            }),
            InvalidImage,
            "backing file name",
        ),
        (
            "backing-size-max",
            ed(&|b| {
                put64(b, FEATURES, 1);
                put32(b, BACKING_OFFSET, 64);
                put32(b, BACKING_SIZE, u32::MAX);
            }),
            InvalidImage,
            "backing file name",
        ),
        (
            "backing-not-utf8",
            ed(&|b| {
                put64(b, FEATURES, 1);
                put32(b, BACKING_OFFSET, 64);
                put32(b, BACKING_SIZE, 2);
                b[64] = 0xff;
                b[65] = 0xfe;
            }),
            InvalidImage,
            "UTF-8",
        ),
        (
            "backing-empty",
            ed(&|b| {
                put64(b, FEATURES, 1);
                put32(b, BACKING_OFFSET, 64);
                put32(b, BACKING_SIZE, 0);
            }),
            InvalidImage,
            "empty",
        ),
    ];
    for (name, bytes, kind, what) in &cases {
        rejects(&mut bad, d, name, bytes, *kind, what).await;
    }
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qed_damaged_tables_fail_the_request_not_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v = valid(d).await;
    let l1 = get64(&v, L1_OFFSET) as usize;
    let l2 = get64(&v, l1) as usize;
    let mut bad = Vec::new();
    let cases: Vec<(&str, usize, u64)> = vec![
        ("l2-past-eof", l1, 1 << 40),
        ("l2-unaligned", l1, l2 as u64 + 4096),
        ("data-past-eof", l2, 1 << 40),
        ("data-unaligned", l2, 65536 * 3 + 512),
        ("data-in-header", l2, 2),
        ("data-near-max", l2, !65535),
    ];
    for (name, at, val) in cases {
        let mut b = v.clone();
        put64(&mut b, at, val);
        let path = d.join(name);
        std::fs::write(&path, &b).unwrap();
        match try_open(&path, false).await {
            Err(e) => bad.push(format!("{name}: does not even open: {e}")),
            Ok(img) => match img.read(0, 128 << 10).await {
                Ok(_) => bad.push(format!("{name}: read of damaged metadata succeeded")),
                Err(e) if e.kind() != ErrorKind::Corrupt => {
                    bad.push(format!("{name}: {:?}: {e}", e.kind()))
                }
                Err(_) => {}
            },
        }
        if std::fs::read(&path).unwrap() != b {
            bad.push(format!("{name}: a read-only open changed the file"));
        }
    }
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qed_feature_bits_follow_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v = valid(d).await;
    // Unknown compat bits: opens, read-write too, and they stay.
    let mut b = v.clone();
    put64(&mut b, COMPAT, 1 << 5);
    let p = d.join("compat.qed");
    std::fs::write(&p, &b).unwrap();
    let img = try_open(&p, true).await.unwrap();
    assert_eq!(img.read(0, 4).await.unwrap(), vec![0xab; 4]);
    img.close().await.unwrap();
    drop(img);
    assert_eq!(get64(&std::fs::read(&p).unwrap(), COMPAT), 1 << 5);
    // Unknown autoclear bits: a read-only open leaves them, a read-write
    // open clears them.
    let mut b = v.clone();
    put64(&mut b, AUTOCLEAR, 1 << 7);
    let p = d.join("autoclear.qed");
    std::fs::write(&p, &b).unwrap();
    drop(try_open(&p, false).await.unwrap());
    assert_eq!(std::fs::read(&p).unwrap(), b);
    let img = try_open(&p, true).await.unwrap();
    img.close().await.unwrap();
    drop(img);
    assert_eq!(get64(&std::fs::read(&p).unwrap(), AUTOCLEAR), 0);
    let (code, out) = qemu_img(&["check", "-f", "qed", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qed_need_check_flag_makes_a_read_write_open_repair() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v = valid(d).await;
    let l1 = get64(&v, L1_OFFSET) as usize;
    let l2 = get64(&v, l1) as usize;
    // As a crash could leave it: need-check set, an L2 entry pointing past
    // the end of the file (its data never made it), and a leaked cluster.
    let mut b = v.clone();
    put64(&mut b, FEATURES, 2);
    put64(&mut b, l2 + 8 * 10, 1 << 40);
    b.extend_from_slice(&[0u8; 65536]);
    let p = d.join("crashed.qed");
    std::fs::write(&p, &b).unwrap();
    // Read-only: reads what is valid as is, changes nothing (as qemu).
    let ro = try_open(&p, false).await.unwrap();
    assert_eq!(ro.read(0, 4).await.unwrap(), vec![0xab; 4]);
    assert_eq!(
        ro.read(10 * 65536, 4).await.unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    drop(ro);
    assert_eq!(std::fs::read(&p).unwrap(), b);
    // Read-write: the check clears the bad entry, gives back the leaked
    // tail, and clears the flag.
    let rw = try_open(&p, true).await.unwrap();
    assert_eq!(rw.read(10 * 65536, 4).await.unwrap(), vec![0; 4]);
    assert_eq!(rw.read(0, 4).await.unwrap(), vec![0xab; 4]);
    rw.close().await.unwrap();
    drop(rw);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(get64(&after, FEATURES) & 2, 0);
    let (code, out) = qemu_img(&["check", "-f", "qed", p.to_str().unwrap()]);
    // The cluster the bad entry once owned is a leak now (as after qemu's
    // own repair); nothing is corrupt.
    assert!(code == 0 || code == 3, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qed_backing_is_probed_only_for_formats_with_a_magic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("base.raw"), vec![7u8; 1 << 20]).unwrap();
    // qemu-img records -F raw as the no-probe bit: opens as raw.
    let (code, out) = qemu_img(&[
        "create",
        "-f",
        "qed",
        "-b",
        "base.raw",
        "-F",
        "raw",
        d.join("ok.qed").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let img = try_open(&d.join("ok.qed"), false).await.unwrap();
    assert_eq!(img.read(0, 4).await.unwrap(), vec![7; 4]);
    drop(img);
    // Without the bit a raw backing would have to be probed: refused.
    let mut b = std::fs::read(d.join("ok.qed")).unwrap();
    let f = get64(&b, FEATURES);
    put64(&mut b, FEATURES, f & !4);
    let p = d.join("probe.qed");
    std::fs::write(&p, &b).unwrap();
    let e = try_open(&p, false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backing, "{e}");
    assert!(e.to_string().contains("never probes a raw backing"), "{e}");
}

/// The engine over memory: a hostile header cannot make it allocate more
/// than the file holds (the L1 table must lie inside the file).
#[test]
fn qed_huge_tables_need_a_file_that_holds_them() {
    let mut b = vec![0u8; 4096];
    b[..4].copy_from_slice(b"QED\0");
    put32(&mut b, CLUSTER_SIZE, 64 << 20);
    put32(&mut b, TABLE_SIZE, 16);
    put32(&mut b, HEADER_SIZE, 1);
    put64(&mut b, L1_OFFSET, 64 << 20);
    put64(&mut b, IMAGE_SIZE, 1 << 40);
    let s: std::sync::Arc<dyn Storage> = std::sync::Arc::new(MemStorage::from_bytes("h.qed", b));
    let e = image::qed::Qed::open(s, &image::qed::QedOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
    assert!(e.to_string().contains("L1 table"), "{e}");
}
