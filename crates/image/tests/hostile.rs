//! Hostile and damaged qcow2 input (DESIGN.md invariant 6): truncated files,
//! bit-flipped headers, metadata offsets past the end of the file or
//! unaligned, huge sizes, cluster_bits out of range, an L1 size that
//! overflows, backing names out of range, backing loops and chains deeper
//! than the limit. Each gives a clean `Err` — no panic, no hang (every open
//! runs under a timeout), no huge allocation (this binary's allocator
//! refuses any single allocation above [`ALLOC_CAP`], which aborts the test
//! run) — and a failed open leaves the file unchanged byte for byte, whether
//! it was opened read-only or read-write.
//!
//! The valid starting images are made by `qemu-img`, not by diskstream, so
//! these tests do not depend on our own `create`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use image::device::BlockDevice;
use image::open::{MAX_CHAIN_DEPTH, OpenOptions};
use image::testing::TestRng;
use image::{ErrorKind, open};

/// No single allocation while parsing a hostile image may exceed this.
const ALLOC_CAP: usize = 256 << 20;

struct CappedAlloc;

// SAFETY: forwards to the system allocator; refusing (returning null) is
// allowed by the GlobalAlloc contract.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CappedAlloc = CappedAlloc;

const TIMEOUT: Duration = Duration::from_secs(20);

/// The errors a hostile image may produce.
const REJECT: &[ErrorKind] = &[
    ErrorKind::InvalidImage,
    ErrorKind::Corrupt,
    ErrorKind::Unsupported,
    ErrorKind::Backing,
];

// ---- header editing --------------------------------------------------------

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

// Header field offsets (docs/interop/qcow2.txt).
const VERSION: usize = 4;
const BACKING_OFFSET: usize = 8;
const BACKING_SIZE: usize = 16;
const CLUSTER_BITS: usize = 20;
const SIZE: usize = 24;
const CRYPT: usize = 32;
const L1_SIZE: usize = 36;
const L1_OFFSET: usize = 40;
const REFTABLE_OFFSET: usize = 48;
const REFTABLE_CLUSTERS: usize = 56;
const INCOMPATIBLE: usize = 72;
const REFCOUNT_ORDER: usize = 96;
const HEADER_LENGTH: usize = 100;
/// L1/L2 entry offset bits.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

struct Work {
    dir: tempfile::TempDir,
    /// A 4 MiB, 64 KiB-cluster image with data in its first cluster.
    valid: Vec<u8>,
}

fn work() -> Work {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("valid.qcow2");
    let ps = p.to_str().unwrap();
    let (c, o) = qemu_img(&["create", "-f", "qcow2", ps, "4M"]);
    assert_eq!(c, 0, "{o}");
    let out = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 2M 4k", ps])
        .output()
        .unwrap();
    assert!(out.status.success());
    let valid = std::fs::read(&p).unwrap();
    Work { dir, valid }
}

impl Work {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn l2_offset(&self) -> u64 {
        let l1 = be64(&self.valid, L1_OFFSET) as usize;
        be64(&self.valid, l1) & OFFSET_MASK
    }
}

async fn try_open(path: &Path, writable: bool) -> image::Result<std::sync::Arc<image::Image>> {
    let opts = OpenOptions {
        writable,
        format: Some("qcow2".into()),
        ..OpenOptions::default()
    };
    tokio::time::timeout(TIMEOUT, open(path, &opts))
        .await
        .unwrap_or_else(|_| panic!("{}: open hangs", path.display()))
}

/// Writes `bytes` as `name`; opening it read-only and read-write must fail
/// with one of `kinds`, and leave the file as it was. Failures are collected
/// in `bad` so one test reports every case that fails, not just the first.
async fn rejects(bad: &mut Vec<String>, w: &Work, name: &str, bytes: &[u8], kinds: &[ErrorKind]) {
    let path = w.path(name);
    std::fs::write(&path, bytes).unwrap();
    rejects_path(bad, name, &path, kinds).await;
}

async fn rejects_path(bad: &mut Vec<String>, name: &str, path: &Path, kinds: &[ErrorKind]) {
    let before = file_hash(path);
    for writable in [false, true] {
        match try_open(path, writable).await {
            Ok(img) => bad.push(format!(
                "{name}: opened (writable: {writable}) as a {}-byte device",
                img.size()
            )),
            Err(e) if !kinds.contains(&e.kind()) => bad.push(format!(
                "{name} (writable: {writable}): {:?}: {e}",
                e.kind()
            )),
            Err(_) => {}
        }
        if file_hash(path) != before {
            bad.push(format!("{name}: a failed open changed the file"));
        }
    }
}

/// Fails the test with every collected failure.
fn verdict(bad: Vec<String>) {
    assert!(
        bad.is_empty(),
        "{} failing cases:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn edited(w: &Work, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = w.valid.clone();
    f(&mut b);
    b
}

// ---- the cases -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_valid_starting_image_opens() {
    // The control: without damage the same image opens and reads back.
    let w = work();
    let p = w.path("ok.qcow2");
    std::fs::write(&p, &w.valid).unwrap();
    let img = try_open(&p, false).await.expect("the valid image opens");
    assert_eq!(img.size(), 4 << 20);
    assert!(img.read(0, 65536).await.unwrap().iter().all(|&b| b == 0xab));
    assert!(
        img.read(2 << 20, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0xcd)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_truncated_files_are_rejected() {
    let mut bad = Vec::new();
    let w = work();
    let l1 = be64(&w.valid, L1_OFFSET) as usize;
    let rt = be64(&w.valid, REFTABLE_OFFSET) as usize;
    for cut in [0usize, 4, 20, 71, 103, rt, l1] {
        assert!(cut < w.valid.len());
        rejects(&mut bad, &w, &format!("cut-{cut}"), &w.valid[..cut], REJECT).await;
    }
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bad_magic_version_and_features_are_rejected() {
    let mut bad = Vec::new();
    let w = work();
    let b = edited(&w, |b| b[0] ^= 0x01);
    rejects(&mut bad, &w, "magic", &b, REJECT).await;
    for v in [0u32, 1, 4, u32::MAX] {
        let b = edited(&w, |b| put32(b, VERSION, v));
        rejects(&mut bad, &w, &format!("version-{v}"), &b, REJECT).await;
    }
    let b = edited(&w, |b| put64(b, INCOMPATIBLE, 1 << 63));
    rejects(
        &mut bad,
        &w,
        "unknown-incompatible-feature",
        &b,
        &[ErrorKind::Unsupported],
    )
    .await;
    let b = edited(&w, |b| put32(b, CRYPT, 1));
    rejects(&mut bad, &w, "encrypted", &b, &[ErrorKind::Unsupported]).await;
    for len in [0u32, 50, 103, 1 << 20, u32::MAX] {
        let b = edited(&w, |b| put32(b, HEADER_LENGTH, len));
        rejects(&mut bad, &w, &format!("header-length-{len}"), &b, REJECT).await;
    }
    for order in [7u32, 64, u32::MAX] {
        let b = edited(&w, |b| put32(b, REFCOUNT_ORDER, order));
        rejects(&mut bad, &w, &format!("refcount-order-{order}"), &b, REJECT).await;
    }
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cluster_bits_out_of_range_are_rejected() {
    let mut bad = Vec::new();
    let w = work();
    for bits in [0u32, 1, 8, 22, 31, 63, 64, 255, u32::MAX] {
        let b = edited(&w, |b| put32(b, CLUSTER_BITS, bits));
        rejects(&mut bad, &w, &format!("cluster-bits-{bits}"), &b, REJECT).await;
    }
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_huge_sizes_and_l1_overflow_are_rejected() {
    let mut bad = Vec::new();
    let w = work();
    for size in [u64::MAX, u64::MAX - 511, 1 << 63, 1 << 60] {
        let b = edited(&w, |b| put64(b, SIZE, size));
        rejects(&mut bad, &w, &format!("size-{size}"), &b, REJECT).await;
    }
    // L1 too small for the size; L1 huge; both huge and consistent (the
    // table alone would be 32 GiB).
    let b = edited(&w, |b| put32(b, L1_SIZE, 0));
    rejects(&mut bad, &w, "l1-size-0", &b, REJECT).await;
    let b = edited(&w, |b| put32(b, L1_SIZE, u32::MAX));
    rejects(&mut bad, &w, "l1-size-max", &b, REJECT).await;
    let b = edited(&w, |b| {
        put64(b, SIZE, 1 << 60);
        put32(b, L1_SIZE, 1 << 29);
    });
    rejects(&mut bad, &w, "l1-size-consistent-huge", &b, REJECT).await;
    let b = edited(&w, |b| put32(b, REFTABLE_CLUSTERS, u32::MAX));
    rejects(&mut bad, &w, "reftable-clusters-max", &b, REJECT).await;
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_table_offsets_past_eof_or_unaligned_are_rejected() {
    let mut bad = Vec::new();
    let w = work();
    let end = w.valid.len() as u64;
    let l1 = be64(&w.valid, L1_OFFSET);
    let rt = be64(&w.valid, REFTABLE_OFFSET);
    for (field, good) in [(L1_OFFSET, l1), (REFTABLE_OFFSET, rt)] {
        for (what, v) in [
            ("past-eof", end.next_multiple_of(65536) + (1 << 30)),
            ("at-eof", end.next_multiple_of(65536)),
            ("unaligned", good + 512),
            ("overflowing", u64::MAX - 65535),
        ] {
            let b = edited(&w, |b| put64(b, field, v));
            rejects(&mut bad, &w, &format!("{field}-{what}"), &b, REJECT).await;
        }
    }
    verdict(bad);
}

/// An L2 table or a refcount block that points past the end or is
/// unaligned: found at open or at the latest on the first read of its
/// range; either way a clean error and an unchanged file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_l2_and_refblock_offsets_past_eof_or_unaligned_fail_cleanly() {
    let w = work();
    let l1 = be64(&w.valid, L1_OFFSET) as usize;
    let rt = be64(&w.valid, REFTABLE_OFFSET) as usize;
    let l2 = w.l2_offset();
    let cases: Vec<(String, Vec<u8>)> = vec![
        (
            "l2-past-eof".into(),
            edited(&w, |b| put64(b, l1, (1 << 62) | (1 << 40))),
        ),
        (
            "l2-unaligned".into(),
            edited(&w, |b| put64(b, l1, (1 << 63) | (l2 + 512))),
        ),
        (
            "data-past-eof".into(),
            edited(&w, |b| {
                put64(b, l2 as usize, (1 << 63) | (1 << 40));
            }),
        ),
        (
            "data-unaligned".into(),
            edited(&w, |b| {
                let e = be64(b, l2 as usize);
                put64(b, l2 as usize, e + 512);
            }),
        ),
        (
            "refblock-past-eof".into(),
            edited(&w, |b| put64(b, rt, 1 << 40)),
        ),
        (
            "refblock-unaligned".into(),
            edited(&w, |b| {
                let e = be64(b, rt);
                put64(b, rt, e + 512);
            }),
        ),
    ];
    let mut bad = Vec::new();
    for (name, bytes) in cases {
        let path = w.path(&name);
        std::fs::write(&path, &bytes).unwrap();
        let before = file_hash(&path);
        for writable in [false, true] {
            if let Ok(img) = try_open(&path, writable).await {
                let r = tokio::time::timeout(TIMEOUT, img.read(0, 65536))
                    .await
                    .expect("read hangs");
                if name.starts_with("refblock") {
                    // Reads do not need refcounts; a write that allocates does.
                    if writable {
                        let data = bytes::Bytes::from(vec![1u8; 65536]);
                        let w = img.write(1 << 20, data, Default::default()).await;
                        let f = img.flush().await;
                        if w.is_ok() && f.is_ok() {
                            bad.push(format!(
                                "{name}: an allocating write over a broken refcount block succeeded"
                            ));
                        }
                    }
                } else {
                    match r {
                        Ok(d) => bad.push(format!(
                            "{name} (writable: {writable}): a read of the broken range returned {} bytes",
                            d.len()
                        )),
                        Err(e) if !REJECT.contains(&e.kind()) => {
                            bad.push(format!("{name}: {:?}: {e}", e.kind()))
                        }
                        Err(_) => {}
                    }
                }
                drop(img);
                if !writable && file_hash(&path) != before {
                    bad.push(format!("{name}: a read-only open changed the file"));
                }
            } else if file_hash(&path) != before {
                bad.push(format!("{name}: a failed open changed the file"));
            }
        }
    }
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_backing_name_out_of_range_is_rejected() {
    let mut bad = Vec::new();
    let w = work();
    let end = w.valid.len() as u64;
    for (name, off, len) in [
        ("backing-past-eof", end + 65536, 8u32),
        ("backing-past-cluster", 65530, 16),
        ("backing-overflow", u64::MAX - 3, 8),
        ("backing-too-long", 1024, 4096),
        ("backing-huge", 1024, u32::MAX),
    ] {
        let b = edited(&w, |b| {
            put64(b, BACKING_OFFSET, off);
            put32(b, BACKING_SIZE, len);
        });
        rejects(&mut bad, &w, name, &b, REJECT).await;
    }
    verdict(bad);
}

/// Random bit flips in the header: anything may happen except a panic, a
/// hang, a huge allocation, or a failed open that changed the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_random_header_bit_flips_never_panic_or_change_the_file() {
    let w = work();
    let mut rng = TestRng::new(0xB17F11B);
    let path = w.path("flipped.qcow2");
    let mut rejected = 0;
    for i in 0..200 {
        let mut b = w.valid.clone();
        for _ in 0..rng.range(1, 4) {
            let bit = rng.below(104 * 8) as usize;
            b[bit / 8] ^= 1 << (bit % 8);
        }
        std::fs::write(&path, &b).unwrap();
        let before = file_hash(&path);
        match try_open(&path, i % 2 == 0).await {
            Ok(img) => {
                let n = img.size().min(1 << 20) as usize;
                let _ = tokio::time::timeout(TIMEOUT, img.read(0, n))
                    .await
                    .expect("read hangs");
            }
            Err(_) => {
                rejected += 1;
                assert_eq!(
                    file_hash(&path),
                    before,
                    "flip {i}: a failed open changed the file"
                );
            }
        }
    }
    assert!(
        rejected > 50,
        "only {rejected} of 200 damaged headers were rejected"
    );
}

// ---- backing chains --------------------------------------------------------

/// Creates `name` as a qcow2 overlay naming `backing` (qcow2), without
/// opening the backing.
fn overlay(w: &Work, name: &str, backing: &str) -> PathBuf {
    let p = w.path(name);
    let (c, o) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        "qcow2",
        p.to_str().unwrap(),
        "4M",
    ]);
    assert_eq!(c, 0, "{o}");
    p
}

/// Replaces the backing name in a header by another of the same length
/// (qemu-img will not create a loop itself).
fn rename_backing(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut b = std::fs::read(path).unwrap();
    let off = be64(&b, BACKING_OFFSET) as usize;
    let len = be32(&b, BACKING_SIZE) as usize;
    assert_eq!(&b[off..off + len], from.as_bytes());
    b[off..off + len].copy_from_slice(to.as_bytes());
    std::fs::write(path, b).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_self_referencing_backing_is_rejected() {
    let mut bad = Vec::new();
    let w = work();
    let p = overlay(&w, "self.qcow2", "xxxx.qcow2");
    rename_backing(&p, "xxxx.qcow2", "self.qcow2");
    rejects_path(&mut bad, "self-backing", &p, &[ErrorKind::Backing]).await;
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_backing_loop_of_two_is_rejected() {
    let mut bad = Vec::new();
    let w = work();
    overlay(&w, "a.qcow2", "b.qcow2");
    let b = overlay(&w, "b.qcow2", "x.qcow2");
    rename_backing(&b, "x.qcow2", "a.qcow2");
    rejects_path(
        &mut bad,
        "loop-a-b",
        &w.path("a.qcow2"),
        &[ErrorKind::Backing],
    )
    .await;
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_chain_deeper_than_the_limit_is_rejected_and_the_limit_opens() {
    let mut bad = Vec::new();
    let w = work();
    std::fs::write(w.path("c0.qcow2"), &w.valid).unwrap();
    let n = MAX_CHAIN_DEPTH as usize;
    for i in 1..=n {
        overlay(&w, &format!("c{i}.qcow2"), &format!("c{}.qcow2", i - 1));
    }
    // c{n-1} heads a chain of exactly MAX_CHAIN_DEPTH images: it opens and
    // reads the bottom's data.
    let top = w.path(&format!("c{}.qcow2", n - 1));
    let img = try_open(&top, false)
        .await
        .expect("a chain at the limit opens");
    assert_eq!(img.info().layers, MAX_CHAIN_DEPTH);
    assert!(img.read(0, 4096).await.unwrap().iter().all(|&b| b == 0xab));
    drop(img);
    // One more image is one too many.
    rejects_path(
        &mut bad,
        "chain-too-deep",
        &w.path(&format!("c{n}.qcow2")),
        &[ErrorKind::Backing],
    )
    .await;
    verdict(bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_raw_backing_is_never_probed_as_qcow2() {
    // base.raw holds a qcow2 image (whose own backing would be /etc/passwd);
    // named as raw, it must read as those bytes, never be interpreted.
    let w = work();
    let evil = overlay(&w, "evil.img", "/etc/passwd");
    let evil_bytes = std::fs::read(&evil).unwrap();
    let mut base = evil_bytes.clone();
    base.resize(4 << 20, 0);
    std::fs::write(w.path("base.raw"), &base).unwrap();
    let top = w.path("top.qcow2");
    let (c, o) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    assert_eq!(c, 0, "{o}");
    let img = try_open(&top, false).await.expect("opens");
    assert_eq!(img.info().layers, 2);
    assert_eq!(img.read(0, 4096).await.unwrap(), base[..4096]);
}

/// Damage that a reader may tolerate (qemu opens some of these read-only)
/// but that must never panic, hang, or let a failed open change the file:
/// tables at offset 0 (overlapping the header), an empty refcount table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tolerable_damage_never_panics_or_changes_the_file_on_failure() {
    let w = work();
    let cases = [
        ("l1-at-0", edited(&w, |b| put64(b, L1_OFFSET, 0))),
        (
            "reftable-at-0",
            edited(&w, |b| put64(b, REFTABLE_OFFSET, 0)),
        ),
        (
            "reftable-clusters-0",
            edited(&w, |b| put32(b, REFTABLE_CLUSTERS, 0)),
        ),
    ];
    for (name, bytes) in cases {
        let path = w.path(name);
        std::fs::write(&path, &bytes).unwrap();
        let before = file_hash(&path);
        match try_open(&path, false).await {
            Ok(img) => {
                let _ = tokio::time::timeout(TIMEOUT, img.read(0, 1 << 20))
                    .await
                    .expect("read hangs");
            }
            Err(e) => assert!(REJECT.contains(&e.kind()), "{name}: {e}"),
        }
        assert_eq!(
            file_hash(&path),
            before,
            "{name}: a read-only open changed the file"
        );
    }
}

/// A read-write open that fails on the backing chain must not have changed
/// the top image either, even when opening it read-write would (here: an
/// unknown autoclear feature bit, which a read-write open clears).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_failed_backing_leaves_a_read_write_top_unchanged() {
    let mut bad = Vec::new();
    let w = work();
    let p = overlay(&w, "self.qcow2", "xxxx.qcow2");
    rename_backing(&p, "xxxx.qcow2", "self.qcow2");
    let mut b = std::fs::read(&p).unwrap();
    put64(&mut b, 88, 1 << 40);
    std::fs::write(&p, &b).unwrap();
    rejects_path(
        &mut bad,
        "self-backing-autoclear",
        &p,
        &[ErrorKind::Backing],
    )
    .await;
    verdict(bad);
}
