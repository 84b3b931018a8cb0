//! `diskstream create` makes images qemu-img reads as asked: format, size
//! (with qemu-img's suffixes, or the backing's size), cluster size, backing
//! name and format; and they check clean.

mod common;
use common::*;
use serde_json::Value;

fn qinfo(d: &Dir, img: &str) -> Value {
    serde_json::from_str(&qemu_ok(d, "qemu-img", &["info", "--output=json", img])).unwrap()
}

#[test]
fn raw_and_qcow2_images_have_the_asked_size_and_cluster_size() {
    let d = Dir::new();
    ds_ok(&d, &["create", "-f", "raw", "a.raw", "1.5M"]);
    assert_eq!(qinfo(&d, "a.raw")["virtual-size"], 3 << 19);
    ds_ok(&d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1G"]);
    let i = qinfo(&d, "a.qcow2");
    assert_eq!(i["virtual-size"], 1u64 << 30);
    assert_eq!(i["cluster-size"], 65536);
    qemu_ok(&d, "qemu-img", &["check", "a.qcow2"]);
    ds_ok(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "b.qcow2",
            "100M",
        ],
    );
    assert_eq!(qinfo(&d, "b.qcow2")["cluster-size"], 4096);
    qemu_ok(&d, "qemu-img", &["check", "b.qcow2"]);
}

#[test]
fn an_overlay_takes_its_backings_size_and_names_it() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "7M"],
    );
    ds_ok(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    let i = qinfo(&d, "top.qcow2");
    assert_eq!(i["virtual-size"], 7 << 20);
    assert_eq!(i["backing-filename"], "base.raw");
    assert_eq!(i["backing-filename-format"], "raw");
    qemu_ok(&d, "qemu-img", &["check", "top.qcow2"]);
    // A larger overlay than its backing, and a chain of three.
    ds_ok(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "t2.qcow2",
            "9M",
        ],
    );
    let i = qinfo(&d, "t2.qcow2");
    assert_eq!(i["virtual-size"], 9 << 20);
    assert_eq!(i["full-backing-filename"], "top.qcow2");
    // Existing images are overwritten, as qemu-img does.
    ds_ok(&d, &["create", "-f", "qcow2", "t2.qcow2", "2M"]);
    let i = qinfo(&d, "t2.qcow2");
    assert_eq!(i["virtual-size"], 2 << 20);
    assert!(i.get("backing-filename").is_none());
}

#[test]
fn create_with_o_direct_writes_a_valid_image() {
    let d = Dir::new();
    ds_ok(
        &d,
        &[
            "create", "-q", "-t", "none", "-f", "qcow2", "d.qcow2", "64M",
        ],
    );
    assert_eq!(qinfo(&d, "d.qcow2")["virtual-size"], 64u64 << 20);
    qemu_ok(&d, "qemu-img", &["check", "d.qcow2"]);
    ds_ok(
        &d,
        &["create", "-q", "-t", "none", "-f", "raw", "d.raw", "1M"],
    );
    assert_eq!(qinfo(&d, "d.raw")["virtual-size"], 1u64 << 20);
}

#[test]
fn a_default_qcow2_image_is_compat_1_1_with_16_bit_refcounts() {
    let d = Dir::new();
    ds_ok(&d, &["create", "-q", "-f", "qcow2", "ours.qcow2", "1M"]);
    let ours = qinfo(&d, "ours.qcow2");
    assert_eq!(ours["format-specific"]["type"], "qcow2");
    let data = &ours["format-specific"]["data"];
    assert_eq!(data["refcount-bits"], 16, "{data}");
    assert_eq!(data["compat"], "1.1", "{data}");
    // The defaults are qemu-img create's.
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "theirs.qcow2", "1M"],
    );
    assert_eq!(*data, qinfo(&d, "theirs.qcow2")["format-specific"]["data"]);
}
