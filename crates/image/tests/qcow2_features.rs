//! qcow2 features beyond the defaults, proven against qemu-img and qemu-io:
//! refcount widths 1..64 bits, version 2 (`compat=0.10`) images, lazy
//! refcounts, internal snapshots, zstd-compressed clusters, persistent
//! bitmaps and external data files. Every image diskstream writes here must
//! pass `qemu-img check` and read back (through qemu-img) as a flat model
//! says.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::{qemu_img, with_deadline};
use image::testing::{ContentModel, TestRng};
use image::{BlockDevice, CreateOptions, FormatKind, OpenOptions, WriteFlags, qcow2};

const LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs a QEMU tool; panics with its output unless it exits 0.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .expect("QEMU tools must be installed (scripts/test installs them)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

/// `qemu-img check` must find nothing at all (exit 0: no leaks either).
fn assert_clean(path: &Path) {
    let (code, text) = qemu_img(&["check", "-f", "qcow2", p(path)]);
    assert_eq!(code, 0, "qemu-img check {}:\n{text}", path.display());
}

/// The guest content as qemu-img reads it (optionally of snapshot `snap`).
fn qemu_content(path: &Path, snap: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let mut args = vec!["convert", "-U", "-f", "qcow2", "-O", "raw"];
    if let Some(s) = snap {
        args.extend(["-l", s]);
    }
    args.extend([p(path), p(&out)]);
    run("qemu-img", &args);
    std::fs::read(&out).unwrap()
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// Random writes, zero writes and discards through `image::open` (a flat
/// model follows along), then close. Returns the content, checked against
/// the model (discards are advisory: a discarded byte may read as before).
async fn exercise(path: &Path, seed: u64, ops: usize, initial: Vec<u8>) -> Vec<u8> {
    let mut model = ContentModel::new(initial);
    let img = image::open(path, &rw()).await.unwrap();
    let size = img.size();
    let mut rng = TestRng::new(seed);
    for _ in 0..ops {
        let off = rng.below(size / 512) * 512;
        let len = (rng.range(1, 64) * 512).min(size - off);
        match rng.below(5) {
            0 => {
                img.write_zeroes(off, len, rng.chance(1, 2)).await.unwrap();
                model.write_zeroes(off, len);
            }
            1 => {
                img.discard(off, len).await.unwrap();
                model.discard(off, len);
            }
            _ => {
                let data = rng.bytes(len as usize);
                model.write(off, &data);
                img.write(off, Bytes::from(data), WriteFlags::default())
                    .await
                    .unwrap();
            }
        }
        if rng.chance(1, 8) {
            img.flush().await.unwrap();
        }
    }
    let content = common::read_all(&*img).await;
    model.check(0, &content).unwrap();
    img.close().await.unwrap();
    content
}

fn qemu_create(path: &Path, opts: &str, size: &str) {
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, p(path), size],
    );
}

/// The `format-specific` data of `qemu-img info --output json`.
fn qemu_specific(path: &Path) -> serde_json::Value {
    let out = run("qemu-img", &["info", "-U", "--output", "json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"].clone()
}

async fn our_specific(path: &Path) -> serde_json::Value {
    let img = image::open(path, &OpenOptions::default()).await.unwrap();
    img.format().format_specific().unwrap()
}

#[test]
fn refcount_widths_1_to_64_bits_read_and_write() {
    with_deadline("refcount widths", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        for (i, bits) in [1u32, 2, 4, 8, 16, 32, 64].into_iter().enumerate() {
            // Made by qemu-img, written by us; 512-byte clusters so 64-bit
            // refcounts need several refcount blocks (and a table move).
            let a = dir.path().join(format!("q{bits}.qcow2"));
            qemu_create(&a, &format!("refcount_bits={bits},cluster_size=512"), "4M");
            let model = exercise(&a, 100 + i as u64, 60, vec![0; 4 << 20]).await;
            assert_clean(&a);
            assert!(qemu_content(&a, None) == model, "{bits}-bit refcounts");
            // Made and written by us.
            let b = dir.path().join(format!("d{bits}.qcow2"));
            image::create(
                &b,
                FormatKind::Qcow2,
                &CreateOptions {
                    size: Some(4 << 20),
                    cluster_size: Some(4096),
                    qcow2_features: qcow2::Features {
                        refcount_bits: Some(bits),
                        ..Default::default()
                    },
                    ..CreateOptions::default()
                },
            )
            .await
            .unwrap();
            assert_clean(&b);
            assert_eq!(our_specific(&b).await, qemu_specific(&b), "{bits} bits");
            let model = exercise(&b, 200 + i as u64, 60, vec![0; 4 << 20]).await;
            assert_clean(&b);
            assert!(qemu_content(&b, None) == model, "{bits}-bit refcounts");
            assert_eq!(our_specific(&b).await, qemu_specific(&b), "{bits} bits");
        }
    });
}

#[test]
fn version_2_images_are_writable() {
    with_deadline("compat=0.10", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        // Made by qemu-img, written by us.
        let a = dir.path().join("q.qcow2");
        qemu_create(&a, "compat=0.10,cluster_size=4096", "4M");
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x5a 0 1M", p(&a)],
        );
        let mut initial = vec![0u8; 4 << 20];
        initial[..1 << 20].fill(0x5a);
        let model = exercise(&a, 7, 80, initial).await;
        assert_clean(&a);
        assert!(qemu_content(&a, None) == model);
        let buf = std::fs::read(&a).unwrap();
        assert_eq!(buf[4..8], 2u32.to_be_bytes(), "still version 2");
        // Made by us: the same header qemu-img makes.
        let b = dir.path().join("d.qcow2");
        image::create(
            &b,
            FormatKind::Qcow2,
            &CreateOptions {
                size: Some(4 << 20),
                qcow2_features: qcow2::Features {
                    version_2: true,
                    ..Default::default()
                },
                ..CreateOptions::default()
            },
        )
        .await
        .unwrap();
        let c = dir.path().join("c.qcow2");
        qemu_create(&c, "compat=0.10", "4M");
        let ours = std::fs::read(&b).unwrap();
        let theirs = std::fs::read(&c).unwrap();
        assert!(
            ours[..4096] == theirs[..4096],
            "v2 header differs from qemu-img's"
        );
        assert_eq!(our_specific(&b).await, qemu_specific(&b));
        let model = exercise(&b, 8, 80, vec![0; 4 << 20]).await;
        assert_clean(&b);
        assert!(qemu_content(&b, None) == model);
        // No zero flag anywhere: qemu-img map never reports a v2 zero cluster
        // that is not also unallocated data.
        let buf = std::fs::read(&b).unwrap();
        assert_eq!(buf[4..8], 2u32.to_be_bytes());
    });
}

#[test]
fn create_refuses_what_qemu_img_refuses() {
    let bad = [
        qcow2::Features {
            refcount_bits: Some(3),
            ..Default::default()
        },
        qcow2::Features {
            refcount_bits: Some(128),
            ..Default::default()
        },
        qcow2::Features {
            version_2: true,
            lazy_refcounts: true,
            ..Default::default()
        },
        qcow2::Features {
            version_2: true,
            refcount_bits: Some(8),
            ..Default::default()
        },
    ];
    for f in bad {
        let m = image::storage::MemStorage::new("x.qcow2");
        let e = qcow2::create_with(
            &m,
            &qcow2::CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
            &f,
        )
        .unwrap_err();
        assert_eq!(e.kind(), image::ErrorKind::InvalidInput, "{f:?}: {e}");
    }
}

/// `qemu-img check --output=json` of a file (any exit code).
fn qemu_check_json(path: &Path) -> serde_json::Value {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-U", "-f", "qcow2", "--output=json", p(path)])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {}: {e}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Our read-only check reports what qemu-img check reports for `path`.
async fn assert_check_agrees(path: &Path) -> (u64, u64) {
    let q = qemu_check_json(path);
    let img = image::open(path, &OpenOptions::default()).await.unwrap();
    let r = img.format().check(None).unwrap();
    let field = |k: &str| q.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    assert_eq!(r.corruptions, field("corruptions"), "corruptions: {q}");
    assert_eq!(r.leaks, field("leaks"), "leaks: {q}");
    assert_eq!(
        r.image_end_offset,
        q.get("image-end-offset").and_then(|v| v.as_u64()),
        "{q}"
    );
    (r.corruptions, r.leaks)
}

fn is_dirty(path: &Path) -> bool {
    let b = std::fs::read(path).unwrap();
    b[79] & 1 != 0
}

#[test]
fn lazy_refcounts_defer_updates_and_repair_on_open() {
    with_deadline("lazy refcounts", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        for (made_by_qemu, cluster) in [(true, 65536u64), (false, 4096), (true, 512)] {
            let a = dir.path().join("lazy.qcow2");
            let _ = std::fs::remove_file(&a);
            if made_by_qemu {
                qemu_create(
                    &a,
                    &format!("lazy_refcounts=on,cluster_size={cluster}"),
                    "8M",
                );
            } else {
                image::create(
                    &a,
                    FormatKind::Qcow2,
                    &CreateOptions {
                        size: Some(8 << 20),
                        cluster_size: Some(cluster),
                        qcow2_features: qcow2::Features {
                            lazy_refcounts: true,
                            ..Default::default()
                        },
                        ..CreateOptions::default()
                    },
                )
                .await
                .unwrap();
                assert_eq!(our_specific(&a).await, qemu_specific(&a));
            }
            assert!(!is_dirty(&a));
            let img = image::open(&a, &rw()).await.unwrap();
            let mut model = vec![0u8; 8 << 20];
            let mut rng = TestRng::new(cluster);
            for _ in 0..40 {
                let off = rng.below(16 << 10) * 512;
                let len = rng.range(1, 130) * 512;
                let len = len.min((8 << 20) - off);
                let data = rng.bytes(len as usize);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                img.write(off, Bytes::from(data), WriteFlags::default())
                    .await
                    .unwrap();
            }
            img.discard(0, 1 << 20).await.unwrap();
            model[..1 << 20].fill(0);
            img.flush().await.unwrap();
            // A crash now: the copy is what the disk holds after the flush.
            let crashed = dir.path().join("crashed.qcow2");
            std::fs::copy(&a, &crashed).unwrap();
            assert!(is_dirty(&crashed), "dirty bit not set before L2 writes");
            let (corruptions, _leaks) = assert_check_agrees(&crashed).await;
            assert!(corruptions > 0, "refcounts were not deferred");
            let content = common::read_all(&*img).await;
            assert!(
                content == model,
                "cluster {cluster}: content differs from the model"
            );
            img.close().await.unwrap();
            drop(img);
            assert!(!is_dirty(&a), "close leaves the dirty bit set");
            assert_clean(&a);
            assert!(qemu_content(&a, None) == content);
            // The next read-write open repairs the crashed copy.
            let img = image::open(&crashed, &rw()).await.unwrap();
            assert!(!is_dirty(&crashed), "open did not repair");
            img.close().await.unwrap();
            drop(img);
            assert_clean(&crashed);
            assert!(
                qemu_content(&crashed, None) == content,
                "lost durable writes"
            );
        }
    });
}

/// `qemu-img info --output json`'s `snapshots` list, in our terms.
fn qemu_snapshots(path: &Path) -> Vec<image::format::SnapshotInfo> {
    let out = run("qemu-img", &["info", "-U", "--output", "json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let Some(list) = v["snapshots"].as_array() else {
        return Vec::new();
    };
    let n = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    list.iter()
        .map(|s| image::format::SnapshotInfo {
            id: s["id"].as_str().unwrap().into(),
            name: s["name"].as_str().unwrap().into(),
            vm_state_size: n(s, "vm-state-size"),
            date_sec: n(s, "date-sec"),
            date_nsec: n(s, "date-nsec"),
            vm_clock_nsec: n(s, "vm-clock-sec") * 1_000_000_000 + n(s, "vm-clock-nsec"),
            icount: s.get("icount").and_then(|c| c.as_u64()),
        })
        .collect()
}

#[test]
fn writes_to_images_with_internal_snapshots_copy_shared_clusters_first() {
    with_deadline("internal snapshots", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        for (opts, seed) in [
            ("cluster_size=65536", 1u64),
            ("cluster_size=512", 2),
            ("cluster_size=4096,compat=0.10", 3),
            ("cluster_size=4096,lazy_refcounts=on,refcount_bits=8", 4),
        ] {
            let a = dir.path().join(format!("snap{seed}.qcow2"));
            qemu_create(&a, opts, "4M");
            run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 1 0 3M",
                    "-c",
                    "write -c -P 9 3M 128k",
                    p(&a),
                ],
            );
            run("qemu-img", &["snapshot", "-c", "s1", p(&a)]);
            run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 2 1M 1M",
                    "-c",
                    "write -z 2M 64k",
                    p(&a),
                ],
            );
            run("qemu-img", &["snapshot", "-c", "s2", p(&a)]);
            let s1 = qemu_content(&a, Some("s1"));
            let s2 = qemu_content(&a, Some("s2"));
            let listed = run("qemu-img", &["snapshot", "-l", p(&a)]);
            let before = qemu_content(&a, None);
            assert!(before == s2);
            {
                let img = image::open(&a, &OpenOptions::default()).await.unwrap();
                assert!(
                    common::read_all(&*img).await == before,
                    "{opts}: active layer"
                );
                assert_eq!(img.format().snapshots(), qemu_snapshots(&a), "{opts}");
            }
            assert_check_agrees(&a).await;
            // Our writes, zero writes and discards everywhere: every shared
            // data cluster and L2 table is copied before it changes.
            let content = exercise(&a, 300 + seed, 120, before).await;
            assert_clean(&a);
            assert!(qemu_content(&a, None) == content, "{opts}: active layer");
            assert!(
                qemu_content(&a, Some("s1")) == s1,
                "{opts}: snapshot s1 changed"
            );
            assert!(
                qemu_content(&a, Some("s2")) == s2,
                "{opts}: snapshot s2 changed"
            );
            assert_eq!(run("qemu-img", &["snapshot", "-l", p(&a)]), listed);
            assert_check_agrees(&a).await;
            // qemu can still go back to a snapshot and write there.
            run("qemu-img", &["snapshot", "-a", "s1", p(&a)]);
            assert!(qemu_content(&a, None) == s1, "{opts}: applied s1");
            run("qemu-img", &["snapshot", "-d", "s2", p(&a)]);
            assert_clean(&a);
            let img = image::open(&a, &OpenOptions::default()).await.unwrap();
            assert!(common::read_all(&*img).await == s1);
        }
    });
}

#[test]
fn hostile_snapshot_tables_are_refused_cleanly() {
    with_deadline("hostile snapshot tables", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.qcow2");
        qemu_create(&good, "cluster_size=4096", "1M");
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 1 0 64k", p(&good)],
        );
        run("qemu-img", &["snapshot", "-c", "s1", p(&good)]);
        let bytes = std::fs::read(&good).unwrap();
        let len = bytes.len() as u64;
        let table = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Mutation, &str)> = vec![
            (
                "table past the end of the file",
                Box::new(move |b| {
                    b[64..72].copy_from_slice(&(len + 4096).next_multiple_of(4096).to_be_bytes())
                }),
                "snapshot table",
            ),
            (
                "65536 snapshots running off the file",
                Box::new(|b| b[60..64].copy_from_slice(&65536u32.to_be_bytes())),
                "snapshot table",
            ),
            (
                "snapshot L1 table past the end",
                Box::new(move |b| {
                    b[table..table + 8]
                        .copy_from_slice(&(len + (1 << 20)).next_multiple_of(4096).to_be_bytes())
                }),
                "L1 table",
            ),
            (
                "snapshot L1 table unaligned",
                Box::new(move |b| b[table + 7] |= 0x10),
                "not cluster aligned",
            ),
            (
                "huge snapshot L1",
                Box::new(move |b| {
                    b[table + 8..table + 12].copy_from_slice(&u32::MAX.to_be_bytes())
                }),
                "l1_size",
            ),
            (
                "huge extra data",
                Box::new(move |b| {
                    b[table + 36..table + 40].copy_from_slice(&100_000u32.to_be_bytes())
                }),
                "extra data",
            ),
        ];
        for (what, mutate, expect) in cases {
            let mut b = bytes.clone();
            mutate(&mut b);
            let path = dir.path().join("bad.qcow2");
            std::fs::write(&path, &b).unwrap();
            for writable in [false, true] {
                let o = OpenOptions {
                    writable,
                    ..OpenOptions::default()
                };
                let e = image::open(&path, &o)
                    .await
                    .err()
                    .unwrap_or_else(|| panic!("{what}: opened"));
                assert_eq!(e.kind(), image::ErrorKind::InvalidImage, "{what}: {e}");
                assert!(e.to_string().contains(expect), "{what}: {e}");
            }
            assert!(std::fs::read(&path).unwrap() == b, "{what}: file changed");
        }
    });
}

#[test]
fn zstd_compressed_clusters_read_and_copy_on_write() {
    with_deadline("zstd", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        let mut rng = TestRng::new(77);
        // Compressible and incompressible clusters, and zeros.
        let mut data = common::patchy(&mut rng, 6 << 20);
        for (i, b) in data[..2 << 20].iter_mut().enumerate() {
            *b = (i / 4096) as u8;
        }
        std::fs::write(&src, &data).unwrap();
        for cluster in ["65536", "4096", "2M"] {
            let z = dir.path().join(format!("z{cluster}.qcow2"));
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
                    &format!("compression_type=zstd,cluster_size={cluster}"),
                    p(&src),
                    p(&z),
                ],
            );
            assert!(our_specific(&z).await["data"]["compression-type"] == "zstd");
            assert_eq!(our_specific(&z).await, qemu_specific(&z));
            let map = run("qemu-img", &["map", "--output=json", p(&z)]);
            assert!(
                map.contains("\"compressed\": true"),
                "{cluster}: no compressed cluster"
            );
            {
                let img = image::open(&z, &OpenOptions::default()).await.unwrap();
                assert!(common::read_all(&*img).await == data, "{cluster}: read");
            }
            assert_check_agrees(&z).await;
            // Partial writes into compressed clusters copy them first.
            let content = exercise(&z, 400, 60, data.clone()).await;
            assert_clean(&z);
            assert!(qemu_content(&z, None) == content, "{cluster}");
        }
    });
}

#[test]
fn compression_type_fields_are_checked_like_qemu() {
    with_deadline("compression type", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let z = dir.path().join("z.qcow2");
        qemu_create(&z, "compression_type=zstd", "1M");
        let good = std::fs::read(&z).unwrap();
        for (what, byte104, bit, kind, expect) in [
            (
                "zstd without the bit",
                1u8,
                false,
                image::ErrorKind::InvalidImage,
                "bit",
            ),
            (
                "the bit with zlib",
                0,
                true,
                image::ErrorKind::InvalidImage,
                "zlib",
            ),
            (
                "type 2",
                2,
                true,
                image::ErrorKind::Unsupported,
                "compression_type 2",
            ),
        ] {
            let mut b = good.clone();
            b[104] = byte104;
            if bit {
                b[79] |= 1 << 3;
            } else {
                b[79] &= !(1 << 3);
            }
            let path = dir.path().join("bad.qcow2");
            std::fs::write(&path, &b).unwrap();
            let e = image::open(&path, &OpenOptions::default())
                .await
                .err()
                .unwrap_or_else(|| panic!("{what}: opened"));
            assert_eq!(e.kind(), kind, "{what}: {e}");
            assert!(e.to_string().contains(expect), "{what}: {e}");
            let (code, _) = qemu_img(&["info", p(&path)]);
            assert_ne!(code, 0, "{what}: qemu-img opens it");
        }
    });
}

#[test]
fn persistent_bitmaps_kept_read_only_refused_read_write_unless_dropped() {
    with_deadline("bitmaps", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("bm.qcow2");
        qemu_create(&a, "cluster_size=4096", "4M");
        run("qemu-img", &["bitmap", "--add", p(&a), "b0"]);
        run("qemu-img", &["bitmap", "--add", "-g", "65536", p(&a), "b1"]);
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 1M",
                "-c",
                "write -P 2 3M 64k",
                p(&a),
            ],
        );
        let before = std::fs::read(&a).unwrap();
        let content = qemu_content(&a, None);
        // Read-only: read, checked like qemu-img, file untouched.
        {
            let img = image::open(&a, &OpenOptions::default()).await.unwrap();
            assert!(common::read_all(&*img).await == content);
        }
        assert_check_agrees(&a).await;
        // Read-write: refused by name, file untouched.
        let Err(e) = image::open(&a, &rw()).await else {
            panic!("opened read-write");
        };
        assert_eq!(e.kind(), image::ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("bitmaps"), "{e}");
        assert!(e.to_string().contains("--drop-bitmaps"), "{e}");
        assert!(
            std::fs::read(&a).unwrap() == before,
            "a refused open changed the file"
        );
        // Asked to drop them: gone for QEMU too, and no leaked clusters.
        let o = OpenOptions {
            writable: true,
            drop_bitmaps: true,
            ..OpenOptions::default()
        };
        let img = image::open(&a, &o).await.unwrap();
        img.write(8192, Bytes::from(vec![3u8; 8192]), WriteFlags::default())
            .await
            .unwrap();
        img.close().await.unwrap();
        drop(img);
        assert_clean(&a);
        let info = run("qemu-img", &["info", "--output=json", p(&a)]);
        assert!(!info.contains("bitmaps"), "{info}");
        let mut expect = content.clone();
        expect[8192..16384].fill(3);
        assert!(qemu_content(&a, None) == expect);
        // QEMU can add bitmaps again.
        run("qemu-img", &["bitmap", "--add", p(&a), "again"]);
        assert_clean(&a);
    });
}

#[test]
fn external_data_files_are_refused_by_name() {
    with_deadline("data file", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("df.qcow2");
        let data = dir.path().join("df.raw");
        qemu_create(&a, &format!("data_file={}", p(&data)), "1M");
        let before = std::fs::read(&a).unwrap();
        for writable in [false, true] {
            let o = OpenOptions {
                writable,
                ..OpenOptions::default()
            };
            let Err(e) = image::open(&a, &o).await else {
                panic!("opened");
            };
            assert_eq!(e.kind(), image::ErrorKind::Unsupported, "{e}");
            assert!(e.to_string().contains("external data file"), "{e}");
        }
        assert!(std::fs::read(&a).unwrap() == before);
    });
}

/// Power-loss replay over an image with internal snapshots: every crash
/// state during our writes (copies of shared L2 tables and data clusters,
/// lazy refcounts or not) opens, has no corruption for our check nor for
/// qemu-img (after the repair on open), keeps every write acknowledged by a
/// completed flush, and leaves both snapshots exactly as they were.
#[test]
fn powerloss_during_copy_on_write_of_snapshot_clusters() {
    use image::storage::MemStorage;
    use image::testing::{RecordingStorage, env_count};
    use std::sync::Arc;
    with_deadline("powerloss with snapshots", LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let states = env_count("DS_POWERLOSS_STATES", 60);
        for (opts, seed) in [
            ("cluster_size=4096", 51u64),
            ("cluster_size=512,lazy_refcounts=on", 52),
        ] {
            let a = dir.path().join("base.qcow2");
            let _ = std::fs::remove_file(&a);
            qemu_create(&a, opts, "1M");
            run(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 1 0 768k", p(&a)],
            );
            run("qemu-img", &["snapshot", "-c", "s1", p(&a)]);
            run(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 2 256k 256k", p(&a)],
            );
            run("qemu-img", &["snapshot", "-c", "s2", p(&a)]);
            let (s1, s2) = (qemu_content(&a, Some("s1")), qemu_content(&a, Some("s2")));
            let initial = qemu_content(&a, None);
            let rec = Arc::new(RecordingStorage::new(
                "snap.qcow2",
                std::fs::read(&a).unwrap(),
            ));
            let f = common::open_qcow2(rec.clone(), true).await.unwrap();
            let img = image::Image::new(f, None);
            let mut rng = TestRng::new(seed);
            // (event range, offset, data or None for a flush)
            let mut done: Vec<(usize, usize, u64, Option<Vec<u8>>)> = Vec::new();
            for _ in 0..40 {
                let start = rec.position();
                if rng.chance(1, 5) {
                    img.flush().await.unwrap();
                    done.push((start, rec.position(), 0, None));
                    continue;
                }
                let off = rng.below((1 << 20) / 512) * 512;
                let len = (rng.range(1, 40) * 512).min((1 << 20) - off);
                let data = rng.bytes(len as usize);
                img.write(off, Bytes::from(data.clone()), WriteFlags::default())
                    .await
                    .unwrap();
                done.push((start, rec.position(), off, Some(data)));
            }
            let start = rec.position();
            img.close().await.unwrap();
            done.push((start, rec.position(), 0, None));
            let recording = rec.recording();
            drop(img);
            let check_path = dir.path().join("state.qcow2");
            for i in 0..states {
                let st = recording.crash_state(seed * 1_000_003 + i);
                // Writes before the last flush that completed before the
                // durable point are definite; later ones may be there.
                let last_durable_flush = done
                    .iter()
                    .rposition(|(_, end, _, d)| d.is_none() && *end <= st.durable);
                let mut model = ContentModel::new(initial.clone());
                for (k, (s, _, off, d)) in done.iter().enumerate() {
                    let Some(d) = d else { continue };
                    if *s >= st.cut {
                        break;
                    }
                    if last_durable_flush.is_some_and(|f| k < f) {
                        model.write(*off, d);
                    } else {
                        model.maybe_write(*off, d);
                    }
                }
                let ctx = format!(
                    "{opts}: crash state {i} (cut {}, durable {})",
                    st.cut, st.durable
                );
                let mem = Arc::new(MemStorage::from_bytes("snap.qcow2", st.bytes.clone()));
                let f = common::open_qcow2(mem.clone(), true)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
                let r = f.check(None).unwrap();
                assert_eq!(r.corruptions, 0, "{ctx}: {r:?}");
                let img = image::Image::new(f, None);
                let got = common::read_all(&img).await;
                model
                    .check(0, &got)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                img.close().await.unwrap();
                drop(img);
                if i % 6 == 0 {
                    std::fs::write(&check_path, mem.snapshot()).unwrap();
                    common::qemu_check(&check_path).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    assert!(qemu_content(&check_path, Some("s1")) == s1, "{ctx}: s1");
                    assert!(qemu_content(&check_path, Some("s2")) == s2, "{ctx}: s2");
                }
            }
        }
    });
}
