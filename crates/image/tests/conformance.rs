//! One conformance suite for every [`BlockDevice`] implementation: raw,
//! qcow2 at 512 B / 64 KiB / 2 MiB clusters, qcow2 over a raw backing, over a
//! qcow2 backing (a chain of [`Image`]s), and over a backing shorter than the
//! overlay. The suite is generic over `Arc<dyn BlockDevice>`; what differs per
//! implementation (the content below, the device below for block status,
//! whether whole zeroed units must report as zeros) comes in the
//! [`Fixture`].
//!
//! Every step checks reads against a flat [`ContentModel`] and block status
//! against what the model says about each allocation unit, so the suite
//! catches both wrong data and wrong allocation reports.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use image::device::{BlockDevice, Extent, ExtentKind, WriteFlags, block_status_all};
use image::format::BackingSpec;
use image::open::{CreateOptions, FormatKind, OpenOptions};
use image::testing::{ContentModel, TestRng};
use image::{ErrorKind, create, open};

struct Fixture {
    name: &'static str,
    dev: Arc<dyn BlockDevice>,
    /// The device directly below the top image, if any.
    below: Option<Arc<dyn BlockDevice>>,
    /// What the device reads as before any write (the backing content,
    /// zero-extended; zeros without a backing).
    initial: Vec<u8>,
    top: FormatKind,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

/// What the suite did to each allocation unit of the top image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Touch {
    Untouched,
    /// Written (data or zeros through the write path).
    Written,
    /// Whole unit zeroed or discarded.
    Zeroed,
}

struct Suite {
    f: Fixture,
    model: ContentModel,
    touch: Vec<Touch>,
    g: u64,
    rng: TestRng,
}

fn kind(e: &image::Error) -> ErrorKind {
    e.kind()
}

impl Suite {
    fn size(&self) -> u64 {
        self.f.dev.size()
    }

    fn mark(&mut self, offset: u64, len: u64, t: Touch) {
        let g = self.g;
        let end = offset + len;
        let mut u = offset / g;
        while u * g < end {
            let (us, ue) = (u * g, ((u + 1) * g).min(self.size()));
            let whole = offset <= us && ue <= end;
            let cur = &mut self.touch[u as usize];
            *cur = match (t, whole) {
                (Touch::Zeroed, true) => Touch::Zeroed,
                (Touch::Zeroed, false) => Touch::Written,
                _ => Touch::Written,
            };
            u += 1;
        }
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>, fua: bool) {
        self.f
            .dev
            .write(offset, Bytes::from(data.clone()), WriteFlags { fua })
            .await
            .unwrap_or_else(|e| panic!("{}: write {offset}+{}: {e}", self.f.name, data.len()));
        self.model.write(offset, &data);
        self.mark(offset, data.len() as u64, Touch::Written);
        self.verify(
            offset.saturating_sub(self.g),
            data.len() as u64 + 2 * self.g,
        )
        .await;
    }

    /// Reads `[offset, offset + len)` (clipped) and checks it.
    async fn verify(&self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size());
        let got = self
            .f
            .dev
            .read(offset, (end - offset) as usize)
            .await
            .unwrap_or_else(|e| panic!("{}: read {offset}..{end}: {e}", self.f.name));
        if let Err(e) = self.model.check(offset, &got) {
            panic!("{}: read {offset}..{end}: {e}", self.f.name);
        }
    }

    async fn verify_all(&self) {
        let got = read_all(&*self.f.dev).await;
        if let Err(e) = self.model.check(0, &got) {
            panic!("{}: whole device: {e}", self.f.name);
        }
    }

    /// Block status of the whole device: covers it, merged, consistent with
    /// the content, and with the right kinds and depths per unit.
    async fn verify_status(&self) {
        let name = self.f.name;
        let size = self.size();
        let ext = block_status_all(&*self.f.dev, 0, size)
            .await
            .unwrap_or_else(|e| panic!("{name}: block status: {e}"));
        // A single call answers at least one byte, starting where asked.
        let first = self.f.dev.block_status(0, size).await.unwrap();
        assert!(
            !first.is_empty() && first[0].offset == 0,
            "{name}: {first:?}"
        );
        let mut pos = 0;
        for (i, e) in ext.iter().enumerate() {
            assert_eq!(e.offset, pos, "{name}: gap in block status at {pos}");
            assert!(e.length > 0);
            if i > 0 {
                assert!(
                    !ext[i - 1].continues(e),
                    "{name}: unmerged extents {:?} {e:?}",
                    ext[i - 1]
                );
            }
            match e.kind {
                ExtentKind::Hole => assert_eq!(e.depth, None, "{name}: {e:?}"),
                _ => assert!(
                    e.depth.is_some_and(|d| d < self.f.dev.info().layers),
                    "{name}: {e:?}"
                ),
            }
            pos = e.end();
        }
        assert_eq!(pos, size, "{name}: block status stops at {pos}");
        // Zero and hole extents read as zeros.
        let content = read_all(&*self.f.dev).await;
        for e in ext.iter().filter(|e| e.kind != ExtentKind::Data) {
            let r = e.offset as usize..e.end() as usize;
            assert!(
                content[r].iter().all(|&b| b == 0),
                "{name}: {e:?} is not zero"
            );
        }
        // Per unit: what the top holds, or what the layer below says.
        let below_ext = match &self.f.below {
            Some(b) => block_status_all(&**b, 0, b.size()).await.unwrap(),
            None => Vec::new(),
        };
        let bsize = self.f.below.as_ref().map_or(0, |b| b.size());
        for e in &ext {
            let mut at = e.offset;
            while at < e.end() {
                let u = (at / self.g) as usize;
                let unit_end = ((u as u64 + 1) * self.g).min(e.end());
                self.check_unit(e, at, u, &below_ext, bsize);
                at = unit_end;
            }
        }
    }

    fn check_unit(&self, e: &Extent, at: u64, u: usize, below: &[Extent], bsize: u64) {
        let name = self.f.name;
        if self.f.top == FormatKind::Raw {
            assert_eq!(e.depth, Some(0), "{name}: raw reports {e:?}");
            assert_ne!(e.kind, ExtentKind::Hole, "{name}: raw reports {e:?}");
            return;
        }
        match self.touch[u] {
            Touch::Written => assert!(
                e.depth == Some(0) && e.kind != ExtentKind::Hole,
                "{name}: written unit {u} at {at} reported as {e:?}"
            ),
            Touch::Zeroed => {
                assert_ne!(
                    e.kind,
                    ExtentKind::Data,
                    "{name}: zeroed unit {u} reported as {e:?}"
                );
                if self.f.below.is_some() {
                    // Over a backing a zeroed unit must be a zero unit here,
                    // never a hole through which the backing shows.
                    assert_eq!(
                        e.depth,
                        Some(0),
                        "{name}: zeroed unit {u} reported as {e:?}"
                    );
                }
            }
            Touch::Untouched => {
                if at >= bsize {
                    assert_eq!(
                        e.kind,
                        ExtentKind::Hole,
                        "{name}: unit {u} past the backing: {e:?}"
                    );
                    return;
                }
                let b = below
                    .iter()
                    .find(|b| b.offset <= at && at < b.end())
                    .expect("below covers");
                assert_eq!(
                    (e.kind, e.depth),
                    (b.kind, b.depth.map(|d| d + 1)),
                    "{name}: untouched unit {u} at {at}: top says {e:?}, backing says {b:?}"
                );
            }
        }
    }
}

/// A suite that takes longer than this is hung or pathologically slow (it
/// takes about a second per implementation on a healthy engine).
const SUITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn suite(f: Fixture) {
    run_suite(f).await
}

async fn run_suite(f: Fixture) {
    let size = f.dev.size();
    let info = f.dev.info();
    let g = info.granularity;
    let name = f.name;
    assert!(g.is_power_of_two() && g >= 512, "{name}: granularity {g}");
    assert!(!info.read_only && info.can_flush, "{name}: {info:?}");
    assert_eq!(
        info.layers,
        1 + u32::from(f.below.is_some()) + extra_layers(&f).await
    );
    assert_eq!(info.format, f.top.name());
    let units = size.div_ceil(g) as usize;
    let mut s = Suite {
        model: ContentModel::new(f.initial.clone()),
        touch: vec![Touch::Untouched; units],
        g,
        rng: TestRng::new(size ^ g),
        f,
    };
    assert_eq!(s.model.size(), size, "{name}: fixture content size");

    // Before anything: reads as the layer below, status as the layer below.
    s.verify_all().await;
    s.verify_status().await;

    // Round trips: aligned, unaligned, across unit boundaries, at the end.
    let d = s.rng.bytes(g as usize);
    s.write(0, d, false).await;
    let d = s.rng.bytes(5000);
    s.write(1000, d, false).await;
    let d = s.rng.bytes(200);
    s.write(3 * g - 100, d, false).await;
    let d = s.rng.bytes((2 * g + 1234) as usize);
    s.write(5 * g + 17, d, false).await;
    let d = s.rng.bytes(700);
    s.write(size - 700, d, false).await;
    let d = s.rng.bytes(1);
    s.write(size / 2 + 3, d, false).await;
    // FUA
    let d = s.rng.bytes(4096 + 512);
    s.write(size / 3 - size / 3 % 512, d, true).await;
    s.verify_all().await;
    s.verify_status().await;

    // write_zeroes without and with unmap, over written data, backing data
    // and partial units on both ends.
    let z1 = (9 * g + 100, 3 * g);
    s.f.dev.write_zeroes(z1.0, z1.1, false).await.unwrap();
    s.model.write_zeroes(z1.0, z1.1);
    s.mark(z1.0, z1.1, Touch::Zeroed);
    let z2 = (g - 7, 2 * g + 14);
    s.f.dev.write_zeroes(z2.0, z2.1, true).await.unwrap();
    s.model.write_zeroes(z2.0, z2.1);
    s.mark(z2.0, z2.1, Touch::Zeroed);
    let z3 = (size / 2 + size / 2 % g, 4 * g);
    s.f.dev.write_zeroes(z3.0, z3.1, true).await.unwrap();
    s.model.write_zeroes(z3.0, z3.1);
    s.mark(z3.0, z3.1, Touch::Zeroed);
    s.verify_all().await;
    s.verify_status().await;

    // discard: over data written here (partial units keep it), and over
    // never-written backing data.
    let d = s.rng.bytes((4 * g) as usize);
    let w = 14 * g;
    s.write(w, d, false).await;
    let dc = (w + g / 2, 3 * g);
    s.f.dev.discard(dc.0, dc.1).await.unwrap();
    s.model.discard(dc.0, dc.1);
    s.mark(dc.0, dc.1, Touch::Zeroed);
    let dc2 = (20 * g, 2 * g);
    s.f.dev.discard(dc2.0, dc2.1).await.unwrap();
    s.model.discard(dc2.0, dc2.1);
    s.mark(dc2.0, dc2.1, Touch::Zeroed);
    s.verify_all().await;
    // Discarded units read as zeros or old content: resolve the model so
    // the status check below knows which. A whole discarded unit must
    // never show the backing.
    let got = read_all(&*s.f.dev).await;
    s.model.resolve(0, &got);
    for (off, len) in [dc, dc2] {
        let ext = block_status_all(&*s.f.dev, off, len).await.unwrap();
        let (ws, we) = (off.next_multiple_of(g), (off + len) / g * g);
        for e in ext.iter().filter(|e| e.offset < we && e.end() > ws) {
            assert!(
                e.depth.is_none_or(|d| d == 0) || s.f.below.is_none(),
                "{name}: discarded units show a lower layer: {e:?}"
            );
        }
        // The model: a discarded whole unit may have kept its data.
        for u in ws / g..we / g {
            let r = (u * g) as usize..((u + 1) * g) as usize;
            if got[r].iter().any(|&b| b != 0) {
                s.touch[u as usize] = Touch::Written;
            }
        }
    }
    s.f.dev.flush().await.unwrap();
    s.verify_status().await;

    // The whole device in one write.
    let d = s.rng.bytes(size as usize);
    s.write(0, d, false).await;
    s.f.dev.flush().await.unwrap();
    s.verify_all().await;
    s.verify_status().await;

    // Out of range.
    let dev = &s.f.dev;
    let oor = |r: image::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(kind(&e), ErrorKind::OutOfRange, "{name}: {what}: {e}");
    };
    oor(
        dev.read(size - 10, 11).await.map(|_| ()),
        "read past the end",
    );
    oor(dev.read(size, 1).await.map(|_| ()), "read at the end");
    oor(
        dev.read(u64::MAX - 4, 10).await.map(|_| ()),
        "read overflowing",
    );
    oor(
        dev.write(size - 1, Bytes::from_static(&[1, 2]), WriteFlags::default())
            .await,
        "write past the end",
    );
    oor(
        dev.write_zeroes(size - 512, 1024, true).await,
        "write_zeroes past the end",
    );
    oor(dev.discard(size, 512).await, "discard past the end");
    oor(
        dev.discard(u64::MAX - 511, 1024).await,
        "discard overflowing",
    );
    oor(
        dev.block_status(size, 1).await.map(|_| ()),
        "block status past the end",
    );
    s.verify_all().await;

    // Read-only: reopen after closing the writer.
    let Suite { f, model, .. } = s;
    let Fixture {
        dev,
        below,
        path,
        top,
        _dir,
        ..
    } = f;
    drop((dev, below));
    read_only_checks(name, &path, top, &model).await;
    drop(_dir);
}

async fn extra_layers(f: &Fixture) -> u32 {
    // Layers below the backing (a qcow2 backing of a qcow2 backing ...).
    f.below.as_ref().map_or(0, |b| b.info().layers - 1)
}

async fn read_only_checks(name: &str, path: &Path, top: FormatKind, model: &ContentModel) {
    let ro = open(
        path,
        &OpenOptions {
            format: Some(top.name().into()),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: reopen read-only: {e}"));
    assert!(ro.info().read_only, "{name}");
    let got = read_all(&*ro).await;
    model
        .check(0, &got)
        .unwrap_or_else(|e| panic!("{name}: after reopen: {e}"));
    let ro_err = |r: image::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::ReadOnly, "{name}: {what}: {e}");
    };
    ro_err(
        ro.write(0, Bytes::from_static(&[1]), WriteFlags::default())
            .await,
        "write",
    );
    ro_err(ro.write_zeroes(0, 512, false).await, "write_zeroes");
    ro_err(ro.discard(0, 512).await, "discard");
    ro.flush()
        .await
        .expect("flush of a read-only device is a no-op");
    // A refused request changed nothing.
    model.check(0, &read_all(&*ro).await).unwrap();
}

// ---- fixtures ------------------------------------------------------------

fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A raw file with `content`, written directly.
fn raw_file(path: &Path, content: &[u8]) {
    std::fs::write(path, content).unwrap();
}

async fn open_rw(path: &Path) -> Arc<image::Image> {
    open(path, &writable())
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

async fn qcow2_fixture(
    name: &'static str,
    size: u64,
    cluster: u64,
    backing: Option<(&str, &str)>,
    dir: tempfile::TempDir,
    initial: Vec<u8>,
) -> Fixture {
    let path = p(dir.path(), "top.qcow2");
    create(
        &path,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster),
            backing: backing.map(|(n, f)| BackingSpec {
                name: n.into(),
                format: Some(f.into()),
            }),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: create: {e}"));
    let img = open_rw(&path).await;
    let below = img.backing();
    Fixture {
        name,
        dev: img,
        below,
        initial,
        top: FormatKind::Qcow2,
        path,
        _dir: dir,
    }
}

#[test]
fn conformance_raw() {
    with_deadline("conformance_raw", SUITE_TIMEOUT, case_raw());
}

async fn case_raw() {
    let dir = tempfile::tempdir().unwrap();
    let path = p(dir.path(), "disk.raw");
    let size = (4 << 20) + 3 * 512;
    create(
        &path,
        FormatKind::Raw,
        &CreateOptions {
            size: Some(size),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    let dev = open_rw(&path).await;
    suite(Fixture {
        name: "raw",
        dev,
        below: None,
        initial: vec![0; size as usize],
        top: FormatKind::Raw,
        path,
        _dir: dir,
    })
    .await;
}

#[test]
fn conformance_qcow2_512b_clusters() {
    with_deadline(
        "conformance_qcow2_512b_clusters",
        SUITE_TIMEOUT,
        case_qcow2_512b_clusters(),
    );
}

async fn case_qcow2_512b_clusters() {
    let size = (1 << 20) + 3 * 512;
    let f = qcow2_fixture(
        "qcow2-512b",
        size,
        512,
        None,
        tempfile::tempdir().unwrap(),
        vec![0; size as usize],
    )
    .await;
    suite(f).await;
}

#[test]
fn conformance_qcow2_64k_clusters() {
    with_deadline(
        "conformance_qcow2_64k_clusters",
        SUITE_TIMEOUT,
        case_qcow2_64k_clusters(),
    );
}

async fn case_qcow2_64k_clusters() {
    let size = (4 << 20) + 3 * 512;
    let f = qcow2_fixture(
        "qcow2-64k",
        size,
        64 << 10,
        None,
        tempfile::tempdir().unwrap(),
        vec![0; size as usize],
    )
    .await;
    suite(f).await;
}

#[test]
fn conformance_qcow2_2m_clusters() {
    with_deadline(
        "conformance_qcow2_2m_clusters",
        SUITE_TIMEOUT,
        case_qcow2_2m_clusters(),
    );
}

async fn case_qcow2_2m_clusters() {
    let size = (48 << 20) + 512;
    let f = qcow2_fixture(
        "qcow2-2m",
        size,
        2 << 20,
        None,
        tempfile::tempdir().unwrap(),
        vec![0; size as usize],
    )
    .await;
    suite(f).await;
}

#[test]
fn conformance_qcow2_over_raw_backing() {
    with_deadline(
        "conformance_qcow2_over_raw_backing",
        SUITE_TIMEOUT,
        case_qcow2_over_raw_backing(),
    );
}

async fn case_qcow2_over_raw_backing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let content = patchy(&mut TestRng::new(11), size as usize);
    raw_file(&p(dir.path(), "base.raw"), &content);
    let f = qcow2_fixture(
        "qcow2-over-raw",
        size,
        64 << 10,
        Some(("base.raw", "raw")),
        dir,
        content,
    )
    .await;
    suite(f).await;
}

#[test]
fn conformance_qcow2_over_qcow2_backing() {
    with_deadline(
        "conformance_qcow2_over_qcow2_backing",
        SUITE_TIMEOUT,
        case_qcow2_over_qcow2_backing(),
    );
}

async fn case_qcow2_over_qcow2_backing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let content = patchy(&mut TestRng::new(12), size as usize);
    // The backing is made by qemu-img (zero runs stay unallocated), with a
    // different cluster size than the overlay.
    let raw = p(dir.path(), "base-src.raw");
    raw_file(&raw, &content);
    let (code, out) = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=16384",
        raw.to_str().unwrap(),
        p(dir.path(), "base.qcow2").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let f = qcow2_fixture(
        "qcow2-over-qcow2",
        size,
        64 << 10,
        Some(("base.qcow2", "qcow2")),
        dir,
        content,
    )
    .await;
    assert_eq!(f.dev.info().layers, 2);
    suite(f).await;
}

#[test]
fn conformance_qcow2_over_shorter_backing() {
    with_deadline(
        "conformance_qcow2_over_shorter_backing",
        SUITE_TIMEOUT,
        case_qcow2_over_shorter_backing(),
    );
}

async fn case_qcow2_over_shorter_backing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    // Not a multiple of the overlay's cluster: the unit that straddles the
    // backing's end is half backing, half zeros.
    let bsize = (2 << 20) + 3 * 512;
    let mut content = patchy(&mut TestRng::new(13), bsize);
    raw_file(&p(dir.path(), "short.raw"), &content);
    content.resize(size as usize, 0);
    let f = qcow2_fixture(
        "qcow2-over-short",
        size,
        64 << 10,
        Some(("short.raw", "raw")),
        dir,
        content,
    )
    .await;
    assert_eq!(f.below.as_ref().unwrap().size(), bsize as u64);
    suite(f).await;
}

// ---- qcow2 with extended L2 entries (subclusters) ----------------------

/// [`qcow2_fixture`] on an image with extended L2 entries: the suite then
/// runs at subcluster granularity (cluster / 32).
async fn xl2_fixture(
    name: &'static str,
    size: u64,
    cluster: u64,
    backing: Option<(&str, &str)>,
    dir: tempfile::TempDir,
    initial: Vec<u8>,
) -> Fixture {
    let path = p(dir.path(), "top.qcow2");
    create(
        &path,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster),
            extended_l2: true,
            backing: backing.map(|(n, f)| BackingSpec {
                name: n.into(),
                format: Some(f.into()),
            }),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: create: {e}"));
    let img = open_rw(&path).await;
    assert_eq!(img.info().granularity, cluster / 32, "{name}");
    let below = img.backing();
    Fixture {
        name,
        dev: img,
        below,
        initial,
        top: FormatKind::Qcow2,
        path,
        _dir: dir,
    }
}

#[test]
fn conformance_qcow2_xl2_no_backing() {
    with_deadline("conformance_qcow2_xl2_no_backing", SUITE_TIMEOUT, async {
        let size = (6 << 20) + 512;
        let f = xl2_fixture(
            "qcow2-xl2-64k",
            size,
            64 << 10,
            None,
            tempfile::tempdir().unwrap(),
            vec![0; size as usize],
        )
        .await;
        suite(f).await;
    });
}

#[test]
fn conformance_qcow2_xl2_over_raw_backing() {
    with_deadline(
        "conformance_qcow2_xl2_over_raw_backing",
        SUITE_TIMEOUT,
        async {
            let dir = tempfile::tempdir().unwrap();
            let size = 4u64 << 20;
            let content = patchy(&mut TestRng::new(31), size as usize);
            raw_file(&p(dir.path(), "base.raw"), &content);
            let f = xl2_fixture(
                "qcow2-xl2-16k-over-raw",
                size,
                16 << 10,
                Some(("base.raw", "raw")),
                dir,
                content,
            )
            .await;
            suite(f).await;
        },
    );
}

#[test]
fn conformance_qcow2_xl2_2m_clusters_over_short_backing() {
    with_deadline(
        "conformance_qcow2_xl2_2m_clusters_over_short_backing",
        SUITE_TIMEOUT,
        async {
            let dir = tempfile::tempdir().unwrap();
            let size = 8u64 << 20;
            // Ends inside a subcluster of the overlay.
            let bsize = (5 << 20) + 3 * 512;
            let mut content = patchy(&mut TestRng::new(32), bsize);
            raw_file(&p(dir.path(), "short.raw"), &content);
            content.resize(size as usize, 0);
            let f = xl2_fixture(
                "qcow2-xl2-2m-over-short",
                size,
                2 << 20,
                Some(("short.raw", "raw")),
                dir,
                content,
            )
            .await;
            suite(f).await;
        },
    );
}

// ---- QED ------------------------------------------------------------------

async fn qed_fixture(
    name: &'static str,
    size: u64,
    cluster: u64,
    table: u32,
    backing: Option<(&str, &str)>,
    dir: tempfile::TempDir,
    initial: Vec<u8>,
) -> Fixture {
    let path = p(dir.path(), "top.qed");
    create(
        &path,
        FormatKind::Qed,
        &CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster),
            table_size: Some(table),
            backing: backing.map(|(n, f)| BackingSpec {
                name: n.into(),
                format: Some(f.into()),
            }),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: create: {e}"));
    let img = open_rw(&path).await;
    let below = img.backing();
    Fixture {
        name,
        dev: img,
        below,
        initial,
        top: FormatKind::Qed,
        path,
        _dir: dir,
    }
}

#[test]
fn conformance_qed_4k_clusters() {
    with_deadline(
        "conformance_qed_4k_clusters",
        SUITE_TIMEOUT,
        case_qed_4k_clusters(),
    );
}

async fn case_qed_4k_clusters() {
    // Tables of 2 clusters map 4 MiB each: the image spans several.
    let size = (9 << 20) + 3 * 512;
    let f = qed_fixture(
        "qed-4k",
        size,
        4096,
        2,
        None,
        tempfile::tempdir().unwrap(),
        vec![0; size as usize],
    )
    .await;
    suite(f).await;
}

#[test]
fn conformance_qed_64k_over_raw_backing() {
    with_deadline(
        "conformance_qed_64k_over_raw_backing",
        SUITE_TIMEOUT,
        case_qed_64k_over_raw_backing(),
    );
}

async fn case_qed_64k_over_raw_backing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let content = patchy(&mut TestRng::new(21), size as usize);
    raw_file(&p(dir.path(), "base.raw"), &content);
    let f = qed_fixture(
        "qed-over-raw",
        size,
        64 << 10,
        4,
        Some(("base.raw", "raw")),
        dir,
        content,
    )
    .await;
    suite(f).await;
}

#[test]
fn conformance_qed_over_qcow2_backing() {
    with_deadline(
        "conformance_qed_over_qcow2_backing",
        SUITE_TIMEOUT,
        case_qed_over_qcow2_backing(),
    );
}

async fn case_qed_over_qcow2_backing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let content = patchy(&mut TestRng::new(22), size as usize);
    let raw = p(dir.path(), "base-src.raw");
    raw_file(&raw, &content);
    let (code, out) = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=16384",
        raw.to_str().unwrap(),
        p(dir.path(), "base.qcow2").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    // QED records no backing format: the qcow2 backing is found by probing.
    let f = qed_fixture(
        "qed-over-qcow2",
        size,
        8192,
        4,
        Some(("base.qcow2", "qcow2")),
        dir,
        content,
    )
    .await;
    assert_eq!(f.dev.info().layers, 2);
    suite(f).await;
}

#[test]
fn conformance_qed_over_shorter_backing() {
    with_deadline(
        "conformance_qed_over_shorter_backing",
        SUITE_TIMEOUT,
        case_qed_over_shorter_backing(),
    );
}

async fn case_qed_over_shorter_backing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let bsize = (2 << 20) + 3 * 512;
    let mut content = patchy(&mut TestRng::new(23), bsize);
    raw_file(&p(dir.path(), "short.raw"), &content);
    content.resize(size as usize, 0);
    let f = qed_fixture(
        "qed-over-short",
        size,
        64 << 10,
        2,
        Some(("short.raw", "raw")),
        dir,
        content,
    )
    .await;
    assert_eq!(f.below.as_ref().unwrap().size(), bsize as u64);
    suite(f).await;
}

#[test]
fn conformance_qcow2_over_qed_backing() {
    with_deadline(
        "conformance_qcow2_over_qed_backing",
        SUITE_TIMEOUT,
        case_qcow2_over_qed_backing(),
    );
}

async fn case_qcow2_over_qed_backing() {
    // QED in the middle of a chain: qcow2 -> qed (made by qemu-img) -> raw.
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let content = patchy(&mut TestRng::new(24), size as usize);
    let raw = p(dir.path(), "base.raw");
    raw_file(&raw, &vec![0x5a; size as usize]);
    let mid = p(dir.path(), "mid.qed");
    let (code, out) = qemu_img(&[
        "create",
        "-f",
        "qed",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    // Overwrite the whole backing view with `content` through qemu-io.
    let src = p(dir.path(), "content.raw");
    raw_file(&src, &content);
    let (code, out) = qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "qed",
        src.to_str().unwrap(),
        mid.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let f = qcow2_fixture(
        "qcow2-over-qed",
        size,
        64 << 10,
        Some(("mid.qed", "qed")),
        dir,
        content,
    )
    .await;
    assert_eq!(f.dev.info().layers, 3);
    suite(f).await;
}

// ---- qcow2 on-disk features (refcount widths, compat=0.10, lazy
// refcounts) -----------------------------------------------------------------

async fn qcow2_fixture_with(
    name: &'static str,
    size: u64,
    cluster: u64,
    backing: Option<(&str, &str)>,
    initial: Vec<u8>,
    dir: tempfile::TempDir,
    features: image::qcow2::Features,
) -> Fixture {
    let path = p(dir.path(), "top.qcow2");
    create(
        &path,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(size),
            cluster_size: Some(cluster),
            backing: backing.map(|(n, f)| BackingSpec {
                name: n.into(),
                format: Some(f.into()),
            }),
            qcow2_features: features,
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: create: {e}"));
    let img = open_rw(&path).await;
    let below = img.backing();
    Fixture {
        name,
        dev: img,
        below,
        initial,
        top: FormatKind::Qcow2,
        path,
        _dir: dir,
    }
}

#[test]
fn conformance_qcow2_lazy_refcounts_over_raw_backing() {
    with_deadline("conformance_qcow2_lazy_refcounts", SUITE_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let content = patchy(&mut TestRng::new(21), size as usize);
        raw_file(&p(dir.path(), "base.raw"), &content);
        let f = qcow2_fixture_with(
            "qcow2-lazy-refcounts",
            size,
            64 << 10,
            Some(("base.raw", "raw")),
            content,
            dir,
            image::qcow2::Features {
                lazy_refcounts: true,
                ..Default::default()
            },
        )
        .await;
        suite(f).await;
    });
}

#[test]
fn conformance_qcow2_64bit_refcounts_512b_clusters() {
    with_deadline("conformance_qcow2_64bit_refcounts", SUITE_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let size = 2u64 << 20;
        let f = qcow2_fixture_with(
            "qcow2-refcount-bits-64",
            size,
            512,
            None,
            vec![0; size as usize],
            dir,
            image::qcow2::Features {
                refcount_bits: Some(64),
                ..Default::default()
            },
        )
        .await;
        suite(f).await;
    });
}

#[test]
fn conformance_qcow2_1bit_refcounts() {
    with_deadline("conformance_qcow2_1bit_refcounts", SUITE_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let f = qcow2_fixture_with(
            "qcow2-refcount-bits-1",
            size,
            4096,
            None,
            vec![0; size as usize],
            dir,
            image::qcow2::Features {
                refcount_bits: Some(1),
                ..Default::default()
            },
        )
        .await;
        suite(f).await;
    });
}

#[test]
fn conformance_qcow2_compat_0_10() {
    with_deadline("conformance_qcow2_compat_0_10", SUITE_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let f = qcow2_fixture_with(
            "qcow2-compat-0.10",
            size,
            64 << 10,
            None,
            vec![0; size as usize],
            dir,
            image::qcow2::Features {
                version_2: true,
                ..Default::default()
            },
        )
        .await;
        suite(f).await;
    });
}
