//! `diskstream map --output json` must print exactly what `qemu-img map
//! --output=json` prints, byte for byte, on every layout: raw sparse files,
//! qcow2 with and without backing, zero clusters, compressed clusters,
//! chains of three, and seeded random mixes of all of these.

mod common;
use common::*;

/// Asserts that both tools print the same JSON for `img` (and that the
/// human output matches too).
fn same_map(d: &Dir, img: &str) {
    let ours = ds_ok(d, &["map", "--output", "json", img]);
    let theirs = qemu_ok(d, "qemu-img", &["map", "--output=json", img]);
    assert_eq!(ours, theirs, "map --output json differs for {img}");
    // qemu-img's human format cannot show compressed data and fails; so must we.
    let ours = ds(d, &["map", img]);
    let theirs = qemu(d, "qemu-img", &["map", img]);
    assert_eq!(
        ours.status.success(),
        theirs.status.success(),
        "human map exit differs for {img}: {}",
        stderr(&ours)
    );
    assert_eq!(ours.stdout, theirs.stdout, "human map differs for {img}");
}

#[test]
fn raw_sparse_files_map_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "empty.raw", "4M"],
    );
    same_map(&d, "empty.raw");
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "a.raw", "8M"],
    );
    qemu_io(
        &d,
        "raw",
        "a.raw",
        &[
            "write -P 1 0 4k",
            "write -P 2 1M 64k",
            "write -P 0 3M 128k",
            "write -P 5 8188k 4k",
        ],
    );
    same_map(&d, "a.raw");
    // Empty images.
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "zero.raw", "0"],
    );
    same_map(&d, "zero.raw");
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "zero.qcow2", "0"],
    );
    same_map(&d, "zero.qcow2");
    // Full of data, no hole at all.
    qemu_io(&d, "raw", "empty.raw", &["write -P 9 0 4M"]);
    same_map(&d, "empty.raw");
}

#[test]
fn qcow2_without_backing_maps_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "16M"],
    );
    same_map(&d, "a.qcow2");
    qemu_io(
        &d,
        "qcow2",
        "a.qcow2",
        &[
            "write -P 1 0 64k",
            "write -P 2 64k 64k",
            "write -P 3 1M 192k",
            "write -z 4M 128k",
            "write -z -u 6M 64k",
            "write -P 4 8M 4k",
            "discard 64k 64k",
        ],
    );
    same_map(&d, "a.qcow2");
}

#[test]
fn compressed_clusters_map_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "4M"],
    );
    qemu_io(
        &d,
        "qcow2",
        "c.qcow2",
        &[
            "write -c -P 7 0 64k",
            "write -c -P 8 64k 64k",
            "write -P 9 128k 64k",
            "write -c -P 10 1M 128k",
        ],
    );
    same_map(&d, "c.qcow2");
}

#[test]
fn qcow2_over_backing_maps_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
    );
    qemu_io(
        &d,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -z 2M 64k", "write -P 2 4M 256k"],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    same_map(&d, "top.qcow2");
    qemu_io(
        &d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 3 512k 64k",
            "write -z 4M 64k",
            "write -P 4 7M 64k",
        ],
    );
    same_map(&d, "top.qcow2");
}

#[test]
fn chains_of_three_map_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "8M"],
    );
    qemu_io(
        &d,
        "raw",
        "base.raw",
        &["write -P 1 0 128k", "write -P 2 6M 1M"],
    );
    qemu_ok(
        &d,
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
            "mid.qcow2",
        ],
    );
    qemu_io(
        &d,
        "qcow2",
        "mid.qcow2",
        &["write -P 3 64k 128k", "write -z 6M 64k"],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(
        &d,
        "qcow2",
        "top.qcow2",
        &["write -P 4 0 64k", "write -c -P 5 2M 64k"],
    );
    same_map(&d, "top.qcow2");

    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "q0.qcow2", "8M"],
    );
    qemu_io(&d, "qcow2", "q0.qcow2", &["write -P 1 1M 1M"]);
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "q0.qcow2", "-F", "qcow2", "q1.qcow2",
        ],
    );
    qemu_io(&d, "qcow2", "q1.qcow2", &["write -P 2 1536k 64k"]);
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "q1.qcow2", "-F", "qcow2", "q2.qcow2",
        ],
    );
    same_map(&d, "q2.qcow2");
}

#[test]
fn shorter_backings_map_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "2M"],
    );
    qemu_io(&d, "qcow2", "b.qcow2", &["write -P 1 0 64k"]);
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "m.qcow2", "4M",
        ],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "t.qcow2", "8M",
        ],
    );
    qemu_io(&d, "qcow2", "t.qcow2", &["write -P 2 5M 64k"]);
    same_map(&d, "t.qcow2");
}

#[test]
fn random_layouts_map_like_qemu_img() {
    let seeds: u64 = std::env::var("DS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for seed in 0..seeds {
        let d = Dir::new();
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let cluster = ["4k", "64k", "512k"][next(3) as usize];
        let mut names: Vec<String> = Vec::new();
        for layer in 0..3 {
            let name = format!("l{layer}.qcow2");
            let mut args = vec![
                "create".to_string(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                "-o".into(),
                format!("cluster_size={cluster}"),
            ];
            if let Some(prev) = names.last() {
                args.extend([
                    "-b".to_string(),
                    prev.to_string(),
                    "-F".into(),
                    "qcow2".into(),
                ]);
            }
            args.extend([name.clone(), "8M".into()]);
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            qemu_ok(&d, "qemu-img", &a);
            let mut cmds = Vec::new();
            for _ in 0..12 {
                let off = next(128) * 64 * 1024;
                let len = (1 + next(8)) * 64 * 1024;
                let len = len.min(8 * 1024 * 1024 - off);
                cmds.push(match next(5) {
                    0 => format!("write -z {off} {len}"),
                    1 => format!("discard {off} {len}"),
                    2 => format!("write -P 0 {off} {len}"),
                    _ => format!("write -P {} {off} {len}", 1 + next(200)),
                });
            }
            let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(&d, "qcow2", &name, &c);
            names.push(name);
        }
        same_map(&d, "l2.qcow2");
    }
}

#[test]
fn raw_files_of_partial_sectors_map_and_size_like_qemu_img() {
    let d = Dir::new();
    // 1000 bytes of data: qemu-img sees a 1024-byte device, zeros at the end.
    std::fs::write(d.path("odd.raw"), vec![0x5au8; 1000]).unwrap();
    same_map(&d, "odd.raw");
    let ours: serde_json::Value =
        serde_json::from_str(&ds_ok(&d, &["info", "--output", "json", "odd.raw"])).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&qemu_ok(
        &d,
        "qemu-img",
        &["info", "--output=json", "odd.raw"],
    ))
    .unwrap();
    assert_eq!(ours["virtual-size"], theirs["virtual-size"]);
    assert_eq!(ours["virtual-size"], 1024);
}

/// Extended L2 entries: per-subcluster extents (data, zero, unallocated
/// subclusters of allocated clusters with their offsets), with and without
/// a backing, compressed clusters; and an xl2 image written by our convert.
#[test]
fn extended_l2_images_map_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "4M"],
    );
    qemu_io(
        &d,
        "raw",
        "base.raw",
        &["write -P 7 0 1M", "write -P 8 2M 512k"],
    );
    for (name, backing) in [("x.qcow2", false), ("xb.qcow2", true)] {
        let mut args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
        ];
        if backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.extend([name, "4M"]);
        qemu_ok(&d, "qemu-img", &args);
        same_map(&d, name);
        qemu_io(
            &d,
            "qcow2",
            name,
            &[
                "write -P 1 0 4k",
                "write -P 2 6k 3000",
                "write -z 16k 8k",
                "write -P 3 128k 2k",
                "write -z -u 200k 64k",
                "discard 64k 64k",
                "write -P 4 1M 70k",
                "write -z 3M 6k",
                "write -P 5 4090k 1k",
            ],
        );
        same_map(&d, name);
    }
    // Compressed clusters in an xl2 image.
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=32k",
            "base.raw",
            "c.qcow2",
        ],
    );
    same_map(&d, "c.qcow2");
    // Written by us.
    ds_ok(
        &d,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on",
            "xb.qcow2",
            "ours.qcow2",
        ],
    );
    qemu_ok(&d, "qemu-img", &["check", "ours.qcow2"]);
    qemu_ok(&d, "qemu-img", &["compare", "xb.qcow2", "ours.qcow2"]);
    same_map(&d, "ours.qcow2");
}
