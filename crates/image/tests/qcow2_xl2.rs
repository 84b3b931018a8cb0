//! qcow2 with extended L2 entries (`extended_l2=on`, 32 subclusters per
//! cluster): copy-on-write and copy-on-read move one subcluster from the
//! backing, not a cluster; images qemu-io wrote at subcluster offsets read
//! identically; what we write passes `qemu-img check` and `qemu-img
//! compare`; hostile bitmaps give clear errors.

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use image::device::{BlockDevice, WriteFlags};
use image::format::{BackingSpec, Format, Mapping};
use image::open::{CreateOptions, FormatKind, OpenOptions};
use image::qcow2::{self, Qcow2, Qcow2Options};
use image::storage::{MemStorage, Storage};
use image::testing::TestRng;
use image::{create, open};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(tool: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?}: {text}");
    text
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(img));
    run("qemu-io", &args);
}

async fn create_xl2(path: &Path, size: u64, cluster: u64, backing: Option<(&str, &str)>) {
    create(
        path,
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
    .unwrap();
}

/// `qemu-img compare` of `img` with the raw `expected`, and a clean check.
fn qemu_verdict(img: &Path, expected: &[u8]) {
    let (code, out) = qemu_img(&["check", "-f", "qcow2", s(img)]);
    assert_eq!(code, 0, "qemu-img check {}:\n{out}", img.display());
    let raw = img.with_extension("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    let (code, out) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(img), s(&raw)]);
    assert_eq!(code, 0, "qemu-img compare {}:\n{out}", img.display());
}

/// The measure: with 2 MiB clusters, a 4 KiB write into an
/// unallocated cluster copies one 64 KiB subcluster from the backing, and a
/// 4 KiB copy-on-read fetches one subcluster, not the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_kib_cow_and_cor_read_one_subcluster_from_the_backing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let mut expected = TestRng::new(7).bytes(size as usize);
    std::fs::write(dir.path().join("base.raw"), &expected).unwrap();
    let top = dir.path().join("top.qcow2");
    create_xl2(&top, size, 2 << 20, Some(("base.raw", "raw"))).await;
    let img = open(&top, &writable()).await.unwrap();
    assert_eq!(img.format().granularity(), 64 << 10);

    // Copy-on-write: 4 KiB at 2 MiB + 4 KiB, inside subcluster 0 of cluster 1.
    let at = (2u64 << 20) + 4096;
    let data = vec![0xa5u8; 4096];
    img.write(at, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    expected[at as usize..at as usize + 4096].copy_from_slice(&data);
    assert_eq!(img.stats().snapshot().backing_read_bytes, 64 << 10);
    let map = img.format().map(2 << 20, 2 << 20).unwrap();
    assert_eq!(map[0].length, 64 << 10, "{map:?}");
    assert!(matches!(map[0].mapping, Mapping::Data { .. }), "{map:?}");
    assert_eq!(map[1].mapping, Mapping::Unallocated, "{map:?}");

    // Copy-on-read: 4 KiB at 4 MiB + 70000, inside subcluster 1 of cluster 2.
    img.set_copy_on_read(true, None);
    let at = (4u64 << 20) + 70_000;
    let got = img.read(at, 4096).await.unwrap();
    assert_eq!(got, expected[at as usize..at as usize + 4096]);
    let st = img.stats().snapshot();
    assert_eq!(st.backing_read_bytes, 2 * (64 << 10));
    assert_eq!(st.cor_bytes, 64 << 10);
    let map = img.format().map(4 << 20, 2 << 20).unwrap();
    let local: u64 = map
        .iter()
        .filter(|r| r.mapping != Mapping::Unallocated)
        .map(|r| r.length)
        .sum();
    assert_eq!(local, 64 << 10, "{map:?}");

    // Populate (the stream job's unit) works per subcluster too.
    let out = img.populate(6 << 20, 4096, None).await.unwrap();
    assert_eq!(out.copied, 64 << 10);

    img.set_copy_on_read(false, None);
    assert_eq!(read_all(&*img).await, expected);
    img.close().await.unwrap();
    drop(img);
    qemu_verdict(&top, &expected);
    // qemu-img agrees: exactly three subclusters live in the overlay.
    let q: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", s(&top)])).unwrap();
    let top_bytes: u64 = q
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(top_bytes, 3 * (64 << 10), "{q}");
}

/// Images qemu made and qemu-io wrote at subcluster offsets (including its
/// own partial-subcluster copy-on-write, zero subclusters and discards)
/// read identically, and our block status agrees with qemu-img map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_written_subclusters_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2u64 << 20;
    let base = TestRng::new(3).bytes(size as usize);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    for (name, backing) in [("plain.qcow2", false), ("overlay.qcow2", true)] {
        let img = dir.path().join(name);
        let mut args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=32k",
        ];
        if backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.extend([s(&img), "2M"]);
        run("qemu-img", &args);
        qemu_io(
            &img,
            &[
                "write -P 1 1k 1k",
                "write -P 2 3k 5000",
                "write -P 3 31k 2k",
                "write -z 40k 2k",
                "write -P 4 64k 32k",
                "write -z -u 72k 3k",
                "discard 80k 8k",
                "write -P 5 1000k 100k",
                "write -z 1100k 64k",
                "write -P 6 1500k 1",
            ],
        );
        let raw = dir.path().join(format!("{name}.raw"));
        run(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&raw)],
        );
        let theirs = std::fs::read(&raw).unwrap();
        let dev = open(&img, &OpenOptions::default()).await.unwrap();
        assert_eq!(read_all(&*dev).await, theirs, "{name}");
        // Unaligned small reads across subcluster edges.
        let mut rng = TestRng::new(5);
        for _ in 0..200 {
            let off = rng.below(size - 5000);
            let len = rng.range(1, 5000) as usize;
            let got = dev.read(off, len).await.unwrap();
            assert_eq!(
                got,
                theirs[off as usize..off as usize + len],
                "{name} at {off}"
            );
        }
        let q: serde_json::Value =
            serde_json::from_str(&run("qemu-img", &["map", "--output=json", s(&img)])).unwrap();
        let theirs: Vec<(u64, u64, u64, bool, bool, Option<u64>)> = q
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["depth"].as_u64().unwrap(),
                    e["present"].as_bool().unwrap(),
                    e["zero"].as_bool().unwrap(),
                    e.get("offset").and_then(|o| o.as_u64()),
                )
            })
            .collect();
        let layers = dev.info().layers;
        let mut ours: Vec<(u64, u64, u64, bool, bool, Option<u64>)> = Vec::new();
        for e in image::device::block_status_all(&*dev, 0, size)
            .await
            .unwrap()
        {
            let depth = u64::from(e.qemu_map_depth(layers));
            let present = e.kind != image::device::ExtentKind::Hole;
            let zero = e.kind != image::device::ExtentKind::Data;
            ours.push((e.offset, e.length, depth, present, zero, e.host_offset));
        }
        // qemu-img merges extents that agree in everything it prints.
        let mut merged: Vec<(u64, u64, u64, bool, bool, Option<u64>)> = Vec::new();
        for e in ours {
            if let Some(l) = merged.last_mut()
                && l.0 + l.1 == e.0
                && (l.2, l.3, l.4) == (e.2, e.3, e.4)
                && match (l.5, e.5) {
                    (Some(a), Some(b)) => a + l.1 == b,
                    (None, None) => true,
                    _ => false,
                }
            {
                l.1 += e.1;
                continue;
            }
            merged.push(e);
        }
        assert_eq!(merged, theirs, "{name}: block status vs qemu-img map");
    }
}

/// Writes at subcluster offsets through our engine (partial subclusters,
/// zero subclusters, discards, writes into compressed clusters) pass
/// `qemu-img check` and read back as `qemu-img compare` sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_subcluster_writes_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let base = TestRng::new(11).bytes(size as usize);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    // A compressed xl2 image from qemu-img (its bitmaps are 0), as overlay.
    let src = dir.path().join("src.raw");
    let mut content = base.clone();
    content[..(1 << 20)].fill(0x11);
    std::fs::write(&src, &content).unwrap();
    let comp = dir.path().join("comp.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            s(&src),
            s(&comp),
        ],
    );
    let fresh = dir.path().join("fresh.qcow2");
    create_xl2(&fresh, size, 64 << 10, Some(("base.raw", "raw"))).await;
    for (path, mut expected) in [(comp, content), (fresh, base.clone())] {
        let img = open(&path, &writable()).await.unwrap();
        assert_eq!(read_all(&*img).await, expected, "{}", path.display());
        let mut rng = TestRng::new(21);
        for i in 0..60 {
            let off = rng.below(size - 70_000);
            let len = rng.range(1, 70_000);
            match i % 5 {
                0..=2 => {
                    let d = rng.bytes(len as usize);
                    img.write(off, Bytes::from(d.clone()), WriteFlags::default())
                        .await
                        .unwrap();
                    expected[off as usize..(off + len) as usize].copy_from_slice(&d);
                }
                3 => {
                    img.write_zeroes(off, len, rng.chance(1, 2)).await.unwrap();
                    expected[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    // Discard over a backing leaves zero units; partial
                    // units keep their content.
                    img.discard(off, len).await.unwrap();
                    let g = 2048;
                    let (a, b) = (off.next_multiple_of(g), (off + len) / g * g);
                    if a < b {
                        expected[a as usize..b as usize].fill(0);
                    }
                }
            }
        }
        assert_eq!(read_all(&*img).await, expected, "{}", path.display());
        let report = img.format().check(None).unwrap();
        assert_eq!(report.corruptions + report.leaks, 0, "{report:?}");
        img.close().await.unwrap();
        drop(img);
        qemu_verdict(&path, &expected);
    }
}

/// `info` data says `extended-l2: true`, as qemu-img's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_specific_reports_extended_l2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.qcow2");
    create_xl2(&path, 1 << 20, 32 << 10, None).await;
    let img = open(&path, &OpenOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let fs = img.format().format_specific().unwrap();
    assert_eq!(fs["data"]["extended-l2"], true, "{fs}");
    let q: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", s(&path)])).unwrap();
    assert_eq!(q["format-specific"], fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_l2_needs_16k_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let e = create(
        &dir.path().join("x.qcow2"),
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(1 << 20),
            cluster_size: Some(8192),
            extended_l2: true,
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("at least 16384"), "{e}");
}

/// An xl2 image in memory with guest cluster 0 written; returns the bytes
/// and the offset of its first L2 table.
fn small_xl2() -> (Vec<u8>, u64) {
    let st = Arc::new(MemStorage::new("x.qcow2"));
    qcow2::create(
        &*st,
        &qcow2::CreateOptions {
            size: 1 << 20,
            cluster_size: Some(16384),
            extended_l2: true,
            ..Default::default()
        },
    )
    .unwrap();
    let q = Qcow2::open(
        Arc::clone(&st) as Arc<dyn Storage>,
        &Qcow2Options {
            writable: true,
            cache_bytes: None,
            ..Default::default()
        },
    )
    .unwrap();
    q.write(0, &[7u8; 1024], &[]).unwrap();
    q.close().unwrap();
    let bytes = st.snapshot();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap());
    let l2 = u64::from_be_bytes(bytes[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    (bytes, l2)
}

/// Hostile bitmaps: a subcluster both allocated and zero, allocated
/// subclusters without a host cluster, a compressed cluster with a bitmap.
#[test]
fn hostile_extended_entries_give_clear_errors() {
    let (good, l2) = small_xl2();
    let l2 = l2 as usize;
    let bitmap0 = u64::from_be_bytes(good[l2 + 8..l2 + 16].try_into().unwrap());
    assert_eq!(
        bitmap0, 0b11,
        "1 KiB of 16 KiB clusters: subclusters 0 and 1"
    );
    type Mutation = Box<dyn Fn(&mut [u8])>;
    let cases: [(&str, Mutation); 3] = [
        (
            "both allocated and zero",
            Box::new(move |b: &mut [u8]| b[l2 + 8 + 3] |= 1),
        ),
        (
            "no host cluster but allocated subclusters",
            Box::new(move |b: &mut [u8]| b[l2 + 16 + 15] = 0x10),
        ),
        (
            "non-zero subcluster allocation bitmap",
            Box::new(move |b: &mut [u8]| {
                // Entry 2: compressed, with a bitmap.
                b[l2 + 32..l2 + 40].copy_from_slice(&((1u64 << 62) | 0x20000).to_be_bytes());
                b[l2 + 47] = 1;
            }),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, mutate) in cases {
        let mut bytes = good.clone();
        mutate(&mut bytes);
        let st = Arc::new(MemStorage::from_bytes("bad.qcow2", bytes.clone()));
        let q = Qcow2::open(st as Arc<dyn Storage>, &Qcow2Options::default()).unwrap();
        let report = q.check(None).unwrap();
        assert!(report.corruptions > 0, "{what}: {report:?}");
        assert!(
            report.messages.iter().any(|m| m.contains(what)),
            "{what}: {:?}",
            report.messages
        );
        if what != "non-zero subcluster allocation bitmap" {
            let mut buf = vec![0u8; 64 << 10];
            let e = q.read(0, &mut buf).unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
            assert!(q.map(0, 64 << 10).is_err());
        }
        // qemu-img calls it corruption too.
        let path = dir.path().join("bad.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        let (code, out) = qemu_img(&["check", "-f", "qcow2", s(&path)]);
        assert_eq!(code, 2, "{what}: qemu-img check:\n{out}");
        // check -r all repairs the bitmap (allocation wins over zero) and
        // keeps the data.
        let st = Arc::new(MemStorage::from_bytes("bad.qcow2", bytes));
        let q = Qcow2::open(
            Arc::clone(&st) as Arc<dyn Storage>,
            &Qcow2Options {
                writable: true,
                cache_bytes: None,
                ..Default::default()
            },
        )
        .unwrap();
        let report = q.check(Some(image::format::Repair::All)).unwrap();
        assert!(report.corruptions_fixed > 0, "{what}: {report:?}");
        let report = q.check(None).unwrap();
        assert_eq!(report.corruptions, 0, "{what}: after repair: {report:?}");
        let mut buf = vec![0u8; 1024];
        assert!(q.read(0, &mut buf).unwrap().is_empty());
        assert_eq!(buf, vec![7u8; 1024], "{what}: data kept");
        q.close().unwrap();
        std::fs::write(&path, st.snapshot()).unwrap();
        let (code, out) = qemu_img(&["check", "-f", "qcow2", s(&path)]);
        assert_eq!(code, 0, "{what}: qemu-img check after repair:\n{out}");
    }
}
