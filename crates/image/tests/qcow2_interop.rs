//! qcow2 interop with the real QEMU tools: images qemu-img and qemu-io write
//! read byte-identically through `image::open`; images diskstream writes pass
//! `qemu-img check` and `qemu-img compare` against a flat model; `check()`
//! agrees with `qemu-img check --output=json`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use image::format::Repair;
use image::{BlockDevice, CreateOptions, FormatKind, OpenOptions, WriteFlags};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(path));
    run("qemu-io", &args);
}

async fn read_all(path: &Path) -> Vec<u8> {
    let img = image::open(path, &OpenOptions::default()).await.unwrap();
    let size = img.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(3 << 20) as usize;
        out.extend_from_slice(&img.read(pos, n).await.unwrap());
        pos += n as u64;
    }
    out
}

fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-out.raw");
    run("qemu-img", &["convert", "-O", "raw", p(path), p(&raw)]);
    std::fs::read(raw).unwrap()
}

/// `qemu-img check --output=json`, whatever its exit status.
fn qemu_check_any(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", p(path)])
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

/// `qemu-img check --output=json`, which must exit 0.
fn qemu_check(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", p(path)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Our check() and qemu-img check report the same counters.
async fn assert_check_agrees(path: &Path) {
    let q = qemu_check_any(path);
    let img = image::open(path, &OpenOptions::default()).await.unwrap();
    let r = img.format().check(None).unwrap();
    let field = |k: &str| q.get(k).and_then(|v| v.as_u64());
    assert_eq!(r.corruptions, field("corruptions").unwrap_or(0), "{q}");
    assert_eq!(r.leaks, field("leaks").unwrap_or(0), "{q}");
    assert_eq!(r.image_end_offset, field("image-end-offset"), "{q}");
    // qemu-img leaves the cluster counters out of the JSON when they are zero.
    assert_eq!(
        r.total_clusters.unwrap_or(0),
        field("total-clusters").unwrap_or(0),
        "{q}"
    );
    assert_eq!(
        r.allocated_clusters.unwrap_or(0),
        field("allocated-clusters").unwrap_or(0),
        "{q}"
    );
    assert_eq!(
        r.fragmented_clusters.unwrap_or(0),
        field("fragmented-clusters").unwrap_or(0),
        "{q}"
    );
    assert_eq!(
        r.compressed_clusters.unwrap_or(0),
        field("compressed-clusters").unwrap_or(0),
        "{q}"
    );
}

fn pattern_cmds(size: u64, cluster: u64, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cmds = Vec::new();
    for i in 0..24 {
        let len = rng.random_range(1..=4 * cluster.max(4096) / 512) * 512;
        let off = rng.random_range(0..(size - len) / 512) * 512;
        if i % 5 == 4 {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {} {off} {len}", i + 1));
        }
    }
    cmds
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_images_qemu_wrote_byte_identically() {
    let dir = tempfile::tempdir().unwrap();
    for (compat, cluster, size) in [
        ("0.10", 65536u64, 64u64 << 20),
        ("1.1", 512, 8 << 20),
        ("1.1", 4096, 32 << 20),
        ("1.1", 65536, 64 << 20),
        ("1.1", 2 << 20, 64 << 20),
    ] {
        let img = dir.path().join(format!("q-{compat}-{cluster}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat},cluster_size={cluster}"),
                p(&img),
                &size.to_string(),
            ],
        );
        let cmds = pattern_cmds(size, cluster, cluster);
        let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
        qemu_io(&img, &cmds);
        let ours = read_all(&img).await;
        let theirs = qemu_raw(&img, dir.path());
        assert!(ours == theirs, "{compat} {cluster}: contents differ");
        assert_check_agrees(&img).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&src), "16M"]);
    let cmds = pattern_cmds(16 << 20, 65536, 7);
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(&src, &cmds);
    let comp = dir.path().join("comp.qcow2");
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", p(&src), p(&comp)],
    );
    assert_eq!(read_all(&comp).await, qemu_raw(&comp, dir.path()));
    let img = image::open(&comp, &OpenOptions::default()).await.unwrap();
    let map = img.format().map(0, 16 << 20).unwrap();
    assert!(
        map.iter()
            .any(|r| r.mapping == image::format::Mapping::Compressed)
    );
    drop(img);
    assert_check_agrees(&comp).await;

    // Writes into compressed clusters rewrite them as normal clusters.
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&comp, &copy).unwrap();
    let mut model = qemu_raw(&comp, dir.path());
    let img = image::open(
        &copy,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..40 {
        let len = rng.random_range(1..20000usize);
        let off = rng.random_range(0..(16u64 << 20) - len as u64);
        let data = random_bytes(&mut rng, len);
        model[off as usize..off as usize + len].copy_from_slice(&data);
        img.write(off, Bytes::from(data), WriteFlags::default())
            .await
            .unwrap();
    }
    img.close().await.unwrap();
    drop(img);
    qemu_check(&copy);
    assert_eq!(read_all(&copy).await, model);
    assert_eq!(qemu_raw(&copy, dir.path()), model);
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_backing_chain_of_depth_3() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut rng = StdRng::seed_from_u64(11);
    let base_data = random_bytes(&mut rng, (8 << 20) as usize);
    std::fs::write(&base, &base_data).unwrap();
    let mid = dir.path().join("mid.qcow2");
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
            p(&mid),
            "12M",
        ],
    );
    qemu_io(
        &mid,
        &[
            "write -P 1 1M 300k",
            "write -z 3M 128k",
            "write -P 2 9M 64k",
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    qemu_io(
        &top,
        &[
            "write -P 3 1100k 10k",
            "write -z 9M 4k",
            "write -P 4 11M 8k",
        ],
    );
    assert_eq!(read_all(&top).await, qemu_raw(&top, dir.path()));
    assert_eq!(read_all(&mid).await, qemu_raw(&mid, dir.path()));
}

/// Random writes, write-zeroes and discards through `Image`, mirrored in a
/// flat model; then qemu-img check and compare.
async fn model_run(dir: &Path, cluster: u64, backing: bool, seed: u64) {
    model_run_with(dir, cluster, backing, seed, 24 << 20, None).await
}

/// `qemu_compat`: create the image with qemu-img at that compat level
/// instead of with diskstream.
async fn model_run_with(
    dir: &Path,
    cluster: u64,
    backing: bool,
    seed: u64,
    size: u64,
    qemu_compat: Option<&str>,
) {
    let path = dir.join(format!("ours-{cluster}-{backing}-{seed}.qcow2"));
    let mut model = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(seed);
    let backing_spec = if backing {
        let b = dir.join(format!("base-{cluster}.raw"));
        let data = random_bytes(&mut rng, (size - (1 << 20)) as usize);
        model[..data.len()].copy_from_slice(&data);
        std::fs::write(&b, &data).unwrap();
        Some(image::BackingSpec {
            name: b.file_name().unwrap().to_str().unwrap().into(),
            format: Some("raw".into()),
        })
    } else {
        None
    };
    if let Some(compat) = qemu_compat {
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-o".into(),
            format!("compat={compat},cluster_size={cluster}"),
        ];
        if let Some(b) = &backing_spec {
            args.extend(["-b".into(), b.name.clone(), "-F".into(), "raw".into()]);
        }
        args.extend([p(&path).to_string(), size.to_string()]);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        run("qemu-img", &args);
    } else {
        image::create(
            &path,
            FormatKind::Qcow2,
            &CreateOptions {
                size: Some(size),
                backing: backing_spec,
                cluster_size: Some(cluster),
                ..CreateOptions::default()
            },
        )
        .await
        .unwrap();
    }
    let img = image::open(
        &path,
        &OpenOptions {
            writable: true,
            metadata_cache_bytes: Some(cluster * 32),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let img: Arc<image::Image> = img;
    for i in 0..300 {
        let len = rng.random_range(1..(3 * cluster).max(70000));
        let off = rng.random_range(0..size - len);
        match rng.random_range(0..10) {
            0..=5 => {
                let data = random_bytes(&mut rng, len as usize);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                img.write(off, Bytes::from(data), WriteFlags::default())
                    .await
                    .unwrap();
            }
            6 | 7 => {
                model[off as usize..(off + len) as usize].fill(0);
                img.write_zeroes(off, len, rng.random()).await.unwrap();
            }
            8 => {
                // Discard only changes content of whole clusters.
                let s = off.next_multiple_of(cluster);
                let e = if off + len == size {
                    size
                } else {
                    (off + len) / cluster * cluster
                };
                img.discard(off, len).await.unwrap();
                // v3: zero clusters with a backing, holes without: zeros.
                // v2 with a backing has neither: discard leaves the data.
                let v2 = qemu_compat == Some("0.10");
                if e > s && !(v2 && backing) {
                    model[s as usize..e as usize].fill(0);
                }
            }
            _ => img.flush().await.unwrap(),
        }
        if i % 50 == 0 {
            let got = img.read(off, len as usize).await.unwrap();
            assert!(
                got == model[off as usize..(off + len) as usize],
                "read-back mismatch at op {i}"
            );
        }
    }
    let got = img.read(0, size as usize).await.unwrap();
    assert!(got == model, "contents differ from the model before close");
    img.close().await.unwrap();
    drop(img);
    let raw = dir.join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    let c = qemu_check(&path);
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&path),
            p(&raw),
        ],
    );
    assert_check_agrees(&path).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn our_writes_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    model_run(dir.path(), 65536, false, 1).await;
    model_run(dir.path(), 65536, true, 2).await;
    model_run(dir.path(), 512, false, 3).await;
    model_run(dir.path(), 4096, true, 4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn our_writes_to_v2_and_unaligned_images_pass_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    // v2 has no zero clusters: write-zeroes over a backing writes zeros.
    model_run_with(dir.path(), 65536, true, 5, 16 << 20, Some("0.10")).await;
    model_run_with(dir.path(), 65536, false, 6, 16 << 20, Some("0.10")).await;
    // A size that is not a multiple of the cluster size.
    model_run_with(dir.path(), 65536, true, 7, (16 << 20) + 4608, None).await;
    model_run_with(dir.path(), 4096, false, 8, (8 << 20) + 1536, Some("1.1")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refcount_table_grows_with_small_clusters() {
    // 512-byte clusters: one refcount block covers 256 clusters, one table
    // cluster 64 blocks, so 8 MiB of data needs a bigger table.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    image::create(
        &path,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(16 << 20),
            cluster_size: Some(512),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    let img = image::open(
        &path,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let data: Vec<u8> = (0..(10u32 << 20)).map(|i| (i % 251) as u8).collect();
    img.write(1 << 20, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    img.close().await.unwrap();
    drop(img);
    let c = qemu_check(&path);
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
    let all = read_all(&path).await;
    assert!(all[1 << 20..(11 << 20)] == data[..]);
    assert_check_agrees(&path).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn set_backing_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let path = dir.path().join("o.qcow2");
    image::create(
        &path,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(1 << 20),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    let img = image::open(
        &path,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let spec = image::BackingSpec {
        name: "b.raw".into(),
        format: Some("raw".into()),
    };
    img.format().set_backing(Some(&spec)).unwrap();
    img.close().await.unwrap();
    drop(img);
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(&path)])).unwrap();
    assert_eq!(info["backing-filename"], "b.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(read_all(&path).await, vec![7u8; 1 << 20]);
    let img = image::open(
        &path,
        &OpenOptions {
            writable: true,
            backing: image::open::BackingChoice::None,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    img.format().set_backing(None).unwrap();
    let fs = img.format().format_specific().unwrap();
    img.close().await.unwrap();
    drop(img);
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(&path)])).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_eq!(info["format-specific"], fs);
    qemu_check(&path);
}

#[tokio::test(flavor = "multi_thread")]
async fn format_specific_matches_qemu_img_info() {
    let dir = tempfile::tempdir().unwrap();
    for opts in ["compat=0.10", "compat=1.1", "compat=1.1,lazy_refcounts=on"] {
        let path = dir.path().join("fs.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, p(&path), "1M"],
        );
        let info: serde_json::Value =
            serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(&path)])).unwrap();
        let img = image::open(&path, &OpenOptions::default()).await.unwrap();
        assert_eq!(
            img.format().format_specific().unwrap(),
            info["format-specific"],
            "{opts}"
        );
    }
}

fn writable() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_what_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    // Refcount width 8: read and written (more widths: qcow2_features.rs).
    let r8 = dir.path().join("r8.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=8",
            p(&r8),
            "1M",
        ],
    );
    qemu_io(&r8, &["write -P 5 0 64k"]);
    assert_eq!(read_all(&r8).await[..65536], vec![5u8; 65536][..]);
    let img = image::open(&r8, &writable()).await.unwrap();
    img.write(65536, Bytes::from(vec![6u8; 65536]), WriteFlags::default())
        .await
        .unwrap();
    img.close().await.unwrap();
    drop(img);
    assert_eq!(read_all(&r8).await[65536..131072], vec![6u8; 65536][..]);
    assert_check_agrees(&r8).await;

    // Unknown incompatible bit: named from the feature table.
    let unk = dir.path().join("unk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&unk), "1M"]);
    let mut b = std::fs::read(&unk).unwrap();
    b[79] |= 1 << 5;
    std::fs::write(&unk, &b).unwrap();
    let e = image::open(&unk, &OpenOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown feature bit 5"), "{e}");

    // Corrupt bit: read-only allowed, read-write refused.
    let cor = dir.path().join("cor.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&cor), "1M"]);
    let mut b = std::fs::read(&cor).unwrap();
    b[79] |= 2;
    std::fs::write(&cor, &b).unwrap();
    image::open(&cor, &OpenOptions::default()).await.unwrap();
    let e = image::open(&cor, &writable()).await.unwrap_err();
    assert_eq!(e.kind(), image::ErrorKind::Corrupt, "{e}");

    // Encryption.
    let enc = dir.path().join("enc.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&enc), "1M"]);
    let mut b = std::fs::read(&enc).unwrap();
    b[35] = 1;
    std::fs::write(&enc, &b).unwrap();
    let e = image::open(&enc, &OpenOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("crypt_method 1"), "{e}");

    // zstd: read and written (more in qcow2_features.rs).
    let z = dir.path().join("z.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            p(&z),
            "1M",
        ],
    );
    image::open(&z, &OpenOptions::default()).await.unwrap();
    image::open(&z, &writable()).await.unwrap();

    // External data file: refused.
    let d = dir.path().join("d.qcow2");
    let df = dir.path().join("d.data");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p(&df)),
            p(&d),
            "1M",
        ],
    );
    let e = image::open(&d, &OpenOptions::default()).await.unwrap_err();
    assert!(e.to_string().contains("external data file"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dirty_image_is_repaired_on_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lazy.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            p(&path),
            "8M",
        ],
    );
    // qemu-io aborts without flushing refcounts: the dirty bit stays set.
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 9 0 1M",
            "-c",
            "write -P 8 4M 64k",
            "-c",
            "abort",
            p(&path),
        ])
        .output()
        .unwrap();
    let b = std::fs::read(&path).unwrap();
    assert_ne!(b[79] & 1, 0, "qemu-io left the dirty bit set");
    let img = image::open(&path, &writable()).await.unwrap();
    assert_eq!(img.read(0, 1 << 20).await.unwrap(), vec![9u8; 1 << 20]);
    img.write(
        2 << 20,
        Bytes::from(vec![3u8; 70000]),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    img.close().await.unwrap();
    drop(img);
    let b = std::fs::read(&path).unwrap();
    assert_eq!(b[79] & 1, 0, "dirty bit cleared");
    let c = qemu_check(&path);
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_repairs_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leak.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&path), "8M"]);
    qemu_io(&path, &["write -P 1 0 1M"]);
    // Raise the refcount of cluster 40 (unused) behind qemu's back.
    let mut b = std::fs::read(&path).unwrap();
    let rb = u64::from_be_bytes(b[0x10000..0x10008].try_into().unwrap()) as usize;
    b[rb + 80..rb + 82].copy_from_slice(&1u16.to_be_bytes());
    b.resize(b.len().max(41 * 65536), 0);
    std::fs::write(&path, &b).unwrap();
    assert_check_agrees(&path).await;
    let img = image::open(&path, &writable()).await.unwrap();
    let r = img.format().check(None).unwrap();
    assert_eq!((r.leaks, r.corruptions), (1, 0));
    let r = img.format().check(Some(Repair::Leaks)).unwrap();
    assert_eq!((r.leaks, r.leaks_fixed, r.corruptions), (0, 1, 0));
    img.close().await.unwrap();
    drop(img);
    let c = qemu_check(&path);
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_repairs_refcounts_that_are_too_low() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("low.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&path), "8M"]);
    qemu_io(&path, &["write -P 1 0 1M"]);
    // Zero the refcount of a data cluster (cluster 6, the second data cluster).
    let mut b = std::fs::read(&path).unwrap();
    let rb = u64::from_be_bytes(b[0x10000..0x10008].try_into().unwrap()) as usize;
    b[rb + 12..rb + 14].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&path, &b).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", p(&path)])
        .output()
        .unwrap();
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let img = image::open(&path, &OpenOptions::default()).await.unwrap();
    let r = img.format().check(None).unwrap();
    assert_eq!(r.corruptions, q["corruptions"].as_u64().unwrap(), "{q}");
    drop(img);
    let img = image::open(&path, &writable()).await.unwrap();
    let r = img.format().check(Some(Repair::All)).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert!(r.corruptions_fixed > 0);
    img.close().await.unwrap();
    drop(img);
    let c = qemu_check(&path);
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(read_all(&path).await[..1 << 20], vec![1u8; 1 << 20][..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_and_readers_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("conc.qcow2");
    let size = 32u64 << 20;
    image::create(
        &path,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(size),
            cluster_size: Some(4096),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    let img = image::open(&path, &writable()).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let img = Arc::clone(&img);
        tasks.push(tokio::spawn(async move {
            // Each task owns a 4 MiB stripe.
            let base = t * (4 << 20);
            let mut rng = StdRng::seed_from_u64(t);
            let mut model = vec![0u8; 4 << 20];
            for _ in 0..60 {
                let len = rng.random_range(1..50000u64);
                let off = rng.random_range(0..(4u64 << 20) - len);
                let byte = rng.random::<u8>() | 1;
                model[off as usize..(off + len) as usize].fill(byte);
                img.write(
                    base + off,
                    Bytes::from(vec![byte; len as usize]),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
                let got = img.read(base + off, len as usize).await.unwrap();
                assert!(got == model[off as usize..(off + len) as usize]);
            }
            model
        }));
    }
    let mut model = Vec::new();
    for t in tasks {
        model.extend(t.await.unwrap());
    }
    img.close().await.unwrap();
    drop(img);
    let raw = dir.path().join("conc.raw");
    std::fs::write(&raw, &model).unwrap();
    let c = qemu_check(&path);
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&path),
            p(&raw),
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn images_with_internal_snapshots_read_and_check_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&path), "16M"],
    );
    qemu_io(&path, &["write -P 1 0 3M", "write -P 2 8M 1M"]);
    run("qemu-img", &["snapshot", "-c", "s1", p(&path)]);
    qemu_io(&path, &["write -P 3 1M 1M", "write -z 8M 64k"]);
    run("qemu-img", &["snapshot", "-c", "s2", p(&path)]);
    qemu_io(&path, &["write -P 4 2M 128k"]);
    assert_eq!(read_all(&path).await, qemu_raw(&path, dir.path()));
    assert_check_agrees(&path).await;
    // Writable: shared clusters are copied first (more in qcow2_features.rs).
    let img = image::open(&path, &writable()).await.unwrap();
    img.write(0, Bytes::from(vec![7u8; 4 << 20]), WriteFlags::default())
        .await
        .unwrap();
    img.close().await.unwrap();
    drop(img);
    assert_check_agrees(&path).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_finds_and_repairs_a_wrong_copied_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copied.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&path), "8M"]);
    qemu_io(&path, &["write -P 1 0 128k"]);
    // Clear COPIED on the first L2 entry (L2 table at the L1's first entry).
    let mut b = std::fs::read(&path).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2] &= 0x7f;
    std::fs::write(&path, &b).unwrap();
    assert_check_agrees(&path).await;
    let img = image::open(&path, &writable())
        .await
        .unwrap_or_else(|e| panic!("read-write open: {e:?}"));
    let r = img.format().check(Some(Repair::All)).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert_eq!(r.corruptions_fixed, 1, "{:?}", r.messages);
    img.close().await.unwrap();
    drop(img);
    let c = qemu_check(&path);
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(read_all(&path).await[..128 << 10], vec![1u8; 128 << 10][..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn images_with_persistent_bitmaps_check_like_qemu_and_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bm.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&path), "16M"],
    );
    run("qemu-img", &["bitmap", "--add", p(&path), "b0"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512k", p(&path), "b1"],
    );
    // Data written through qemu-io marks the bitmaps, which are stored
    // (with data clusters) when it closes the image.
    qemu_io(&path, &["write -P 6 0 2M", "write -P 7 4M 1M"]);
    let c = qemu_check(&path);
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(read_all(&path).await, qemu_raw(&path, dir.path()));
    assert_check_agrees(&path).await;
    let e = image::open(&path, &writable()).await.unwrap_err();
    assert!(e.to_string().contains("bitmaps"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_l2_offsets_are_reported_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("far.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&path), "8M"]);
    qemu_io(&path, &["write -P 1 0 64k"]);
    // Point the first L2 entry 2^54 bytes into the file.
    let mut b = std::fs::read(&path).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | (1u64 << 54)).to_be_bytes());
    std::fs::write(&path, &b).unwrap();
    let img = image::open(&path, &OpenOptions::default()).await.unwrap();
    let r = img.format().check(None).unwrap();
    assert!(r.corruptions >= 1, "{:?}", r.messages);
    // Reading it fails cleanly or reads zeros; it never panics.
    let _ = img.read(0, 65536).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn images_we_create_are_what_qemu_img_expects() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [512u64, 65536, 2 << 20] {
        for size in [0u64, 1, 512, (1 << 20) + 1, 3 << 30] {
            let path = dir.path().join(format!("c-{cluster}-{size}.qcow2"));
            image::create(
                &path,
                FormatKind::Qcow2,
                &CreateOptions {
                    size: Some(size),
                    cluster_size: Some(cluster),
                    ..CreateOptions::default()
                },
            )
            .await
            .unwrap();
            let c = qemu_check(&path);
            assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{cluster} {size}: {c}");
            let info: serde_json::Value =
                serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(&path)]))
                    .unwrap();
            let rounded = size.next_multiple_of(512);
            assert_eq!(info["virtual-size"].as_u64(), Some(rounded), "{info}");
            assert_eq!(info["cluster-size"].as_u64(), Some(cluster), "{info}");
            assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
            assert_check_agrees(&path).await;
        }
    }
    // 512-byte clusters with a backing: the header still fits (qemu drops
    // the feature name table then, and so do we).
    std::fs::write(dir.path().join("b.raw"), vec![5u8; 1 << 20]).unwrap();
    let path = dir.path().join("c-512-backed.qcow2");
    image::create(
        &path,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(1 << 20),
            cluster_size: Some(512),
            backing: Some(image::BackingSpec {
                name: "b.raw".into(),
                format: Some("raw".into()),
            }),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    qemu_check(&path);
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(&path)])).unwrap();
    assert_eq!(info["backing-filename"], "b.raw", "{info}");
    assert_eq!(read_all(&path).await, vec![5u8; 1 << 20]);
    // Cluster sizes outside 512 B..2 MiB are refused.
    for bad in [256u64, 4 << 20, 3000] {
        let path = dir.path().join(format!("bad-{bad}.qcow2"));
        let e = image::create(
            &path,
            FormatKind::Qcow2,
            &CreateOptions {
                size: Some(1 << 20),
                cluster_size: Some(bad),
                ..CreateOptions::default()
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("cluster size"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn map_agrees_with_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("map.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&path), "8M"]);
    qemu_io(
        &path,
        &[
            "write -P 1 0 256k",
            "write -z 64k 64k",
            "write -z -u 128k 64k",
            "write -z 1M 128k",
            "write -P 2 3M 64k",
            "write -P 3 2M 64k",
        ],
    );
    let q: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", p(&path)])).unwrap();
    let img = image::open(&path, &OpenOptions::default()).await.unwrap();
    let ours = img.format().map(0, 8 << 20).unwrap();
    let theirs: Vec<(u64, u64, bool, bool, Option<u64>)> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["present"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e.get("offset").and_then(|o| o.as_u64()),
            )
        })
        .collect();
    use image::format::Mapping;
    let ours: Vec<(u64, u64, bool, bool, Option<u64>)> = ours
        .iter()
        .map(|r| match r.mapping {
            Mapping::Data { host_offset } => (r.offset, r.length, true, false, Some(host_offset)),
            Mapping::Zero { host_offset } => (r.offset, r.length, true, true, host_offset),
            Mapping::Unallocated => (r.offset, r.length, false, true, None),
            Mapping::Compressed => (r.offset, r.length, true, false, None),
        })
        .collect();
    assert_eq!(ours, theirs);
}
