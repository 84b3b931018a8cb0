//! `diskstream info --output json` carries qemu-img's fields with qemu-img's
//! values, plus its own `local-bytes` / `chain-bytes` / `local-percent`,
//! which must agree with what qemu-img map says is allocated where.

mod common;
use common::*;
use serde_json::Value;

const SHARED: [&str; 11] = [
    "virtual-size",
    "filename",
    "format",
    "cluster-size",
    "actual-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "format-specific",
    "dirty-flag",
    "children",
];

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// Compares every shared field, and checks the local share against qemu-img map.
fn same_info(d: &Dir, img: &str) -> Value {
    let ours = json(&ds_ok(d, &["info", "--output", "json", img]));
    let theirs = json(&qemu_ok(d, "qemu-img", &["info", "--output=json", img]));
    for k in SHARED {
        assert_eq!(
            ours.get(k),
            theirs.get(k),
            "info field {k} differs for {img}"
        );
    }
    let map = json(&qemu_ok(d, "qemu-img", &["map", "--output=json", img]));
    let (mut local, mut chain) = (0u64, 0u64);
    for e in map.as_array().expect("array") {
        let len = e["length"].as_u64().expect("length");
        if e["present"] == Value::Bool(true) {
            chain += len;
            if e["depth"] == 0 {
                local += len;
            }
        }
    }
    assert_eq!(ours["local-bytes"], local, "{img}");
    assert_eq!(ours["chain-bytes"], chain, "{img}");
    let pct = if chain == 0 {
        100.0
    } else {
        (local as f64 * 10000.0 / chain as f64).floor() / 100.0
    };
    assert_eq!(ours["local-percent"].as_f64(), Some(pct), "{img}");
    ours
}

#[test]
fn raw_info_matches_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "a.raw", "3M"],
    );
    qemu_io(&d, "raw", "a.raw", &["write -P 1 1M 64k"]);
    let i = same_info(&d, "a.raw");
    assert_eq!(i["local-percent"].as_f64(), Some(100.0));
    let human = ds_ok(&d, &["info", "a.raw"]);
    assert!(
        human.contains("virtual size: 3 MiB (3145728 bytes)"),
        "{human}"
    );
}

#[test]
fn qcow2_info_matches_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "a.qcow2",
            "5M",
        ],
    );
    qemu_io(&d, "qcow2", "a.qcow2", &["write -P 1 0 100k"]);
    same_info(&d, "a.qcow2");
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M,lazy_refcounts=on",
            "x.qcow2",
            "5M",
        ],
    );
    same_info(&d, "x.qcow2");
}

#[test]
fn backing_chain_info_matches_qemu_img_and_counts_the_local_share() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    qemu_io(&d, "qcow2", "base.qcow2", &["write -P 1 0 2M"]);
    std::fs::create_dir(d.path("sub")).unwrap();
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "sub/top.qcow2",
        ],
    );
    qemu_io(
        &d,
        "qcow2",
        "sub/top.qcow2",
        &["write -P 2 0 512k", "write -z 3M 64k"],
    );
    let i = same_info(&d, "sub/top.qcow2");
    assert_eq!(i["local-bytes"], 512 * 1024 + 64 * 1024);
    assert_eq!(i["chain-bytes"], 2 * 1024 * 1024 + 64 * 1024);
    let chain = i["backing-chain"].as_array().expect("backing-chain");
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1]["filename"], "sub/../base.qcow2");
    assert_eq!(chain[1]["local-bytes"], 2 * 1024 * 1024);
    // Absolute paths resolve the same way.
    same_info(&d, &d.s("sub/top.qcow2"));
    let human = ds_ok(&d, &["info", "sub/top.qcow2"]);
    assert!(
        human.contains("backing file: ../base.qcow2 (actual path: sub/../base.qcow2)"),
        "{human}"
    );
    assert!(human.contains("backing file format: qcow2"), "{human}");
}

/// `extended-l2: true` in format-specific, as qemu-img reports it, for
/// images qemu-img and diskstream create.
#[test]
fn extended_l2_info_matches_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "q.qcow2",
            "8M",
        ],
    );
    let ours = same_info(&d, "q.qcow2");
    assert_eq!(ours["format-specific"]["data"]["extended-l2"], true);
    ds_ok(
        &d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=32k",
            "d.qcow2",
            "8M",
        ],
    );
    let ours = same_info(&d, "d.qcow2");
    assert_eq!(ours["format-specific"]["data"]["extended-l2"], true);
    assert_eq!(ours["cluster-size"], 32768);
    // Too small a cluster is refused by name.
    let o = ds(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
            "e.qcow2",
            "8M",
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("16384"), "{}", stderr(&o));
}

/// The block qemu-img prints from "Snapshot list:" up to the next heading.
fn snapshot_block(text: &str) -> String {
    let Some(start) = text.find("Snapshot list:") else {
        return String::new();
    };
    text[start..]
        .lines()
        .take_while(|l| !l.starts_with("Format specific") && !l.starts_with("local data"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn qcow2_feature_fields_and_snapshots_match_qemu_img() {
    let d = Dir::new();
    for (name, opts) in [
        ("v2.qcow2", "compat=0.10"),
        ("r1.qcow2", "refcount_bits=1"),
        ("r64.qcow2", "refcount_bits=64,lazy_refcounts=on"),
        ("snap.qcow2", "cluster_size=4096"),
        ("snapv2.qcow2", "compat=0.10,cluster_size=4096"),
    ] {
        ds_ok(&d, &["create", "-q", "-f", "qcow2", "-o", opts, name, "2M"]);
        qemu_io(&d, "qcow2", name, &["write -P 3 0 64k"]);
        if name.starts_with("snap") {
            qemu_ok(&d, "qemu-img", &["snapshot", "-c", "first", name]);
            qemu_io(&d, "qcow2", name, &["write -P 4 0 4k"]);
            qemu_ok(&d, "qemu-img", &["snapshot", "-c", "second", name]);
        }
        let ours = same_info(&d, name);
        let theirs = json(&qemu_ok(&d, "qemu-img", &["info", "--output=json", name]));
        assert_eq!(ours.get("snapshots"), theirs.get("snapshots"), "{name}");
        let human = ds_ok(&d, &["info", name]);
        let qemu_human = qemu_ok(&d, "qemu-img", &["info", name]);
        assert_eq!(
            snapshot_block(&human),
            snapshot_block(&qemu_human),
            "{name}"
        );
        let check = qemu(&d, "qemu-img", &["check", name]);
        assert!(check.status.success(), "{name}: {}", stderr(&check));
    }
}

#[test]
fn qcow2_bitmaps_in_info_match_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "bm.qcow2", "1M"],
    );
    qemu_ok(&d, "qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
    qemu_ok(
        &d,
        "qemu-img",
        &["bitmap", "--add", "-g", "1M", "--disable", "bm.qcow2", "b1"],
    );
    qemu_io(&d, "qcow2", "bm.qcow2", &["write -P 1 0 64k"]);
    let ours = same_info(&d, "bm.qcow2");
    let list = ours.pointer("/format-specific/data/bitmaps").unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{ours}");
    // Key order too: the JSON text of format-specific equals qemu-img's.
    let text = ds_ok(&d, &["info", "--output", "json", "bm.qcow2"]);
    let qtext = qemu_ok(&d, "qemu-img", &["info", "--output=json", "bm.qcow2"]);
    let spec = |t: &str| {
        let s = t
            .find("\"format-specific\": {\n        \"type\": \"qcow2\"")
            .unwrap();
        let e = s + t[s..].find("\n    },").unwrap();
        t[s..e].split_whitespace().collect::<String>()
    };
    assert_eq!(spec(&text), spec(&qtext));
}
