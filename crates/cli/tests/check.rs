//! `diskstream check` exit codes and output follow qemu-img check: 0 clean,
//! 2 corruption, 3 leaks only, 63 raw (no checks), 1 when the check cannot
//! run; `-r leaks` repairs leaks so that qemu-img check is clean again.

mod common;
use common::*;
use std::os::unix::fs::FileExt;

fn code(o: &std::process::Output) -> i32 {
    o.status.code().expect("exit code")
}

fn be64(p: &std::path::Path, at: u64) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn poke64(p: &std::path::Path, at: u64, v: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&v.to_be_bytes(), at).unwrap();
}

#[test]
fn clean_image_exits_0_with_qemu_img_json() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    qemu_io(&d, "qcow2", "a.qcow2", &["write -P 1 0 200k"]);
    let o = ds(&d, &["check", "a.qcow2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("No errors were found on the image."));
    let ours: serde_json::Value =
        serde_json::from_str(&ds_ok(&d, &["check", "--output", "json", "a.qcow2"])).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&qemu_ok(
        &d,
        "qemu-img",
        &["check", "--output=json", "a.qcow2"],
    ))
    .unwrap();
    assert_eq!(ours, theirs);
}

#[test]
fn raw_has_no_checks_exit_63() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "a.raw", "1M"],
    );
    let o = ds(&d, &["check", "a.raw"]);
    assert_eq!(code(&o), 63);
    assert!(stderr(&o).contains("a.raw"), "{}", stderr(&o));
}

#[test]
fn leaks_exit_3_and_repair_makes_it_clean() {
    let d = Dir::new();
    let p = d.path("l.qcow2");
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "l.qcow2", "4M"],
    );
    qemu_io(&d, "qcow2", "l.qcow2", &["write -P 1 0 64k"]);
    // Drop the L2 entry of guest cluster 0: its data cluster stays counted
    // in the refcounts but is used by nobody -> one leaked cluster.
    let l1 = be64(&p, 40);
    let l2 = be64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    poke64(&p, l2, 0);
    assert_eq!(code(&qemu(&d, "qemu-img", &["check", "l.qcow2"])), 3);
    let o = ds(&d, &["check", "l.qcow2"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1 leaked clusters were found on the image.")
    );
    let j: serde_json::Value =
        serde_json::from_slice(&ds(&d, &["check", "--output", "json", "l.qcow2"]).stdout).unwrap();
    assert_eq!(j["leaks"], 1);
    let o = ds(&d, &["check", "-r", "leaks", "l.qcow2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(code(&qemu(&d, "qemu-img", &["check", "l.qcow2"])), 0);
}

#[test]
fn corruption_exits_2() {
    let d = Dir::new();
    let p = d.path("c.qcow2");
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "4M"],
    );
    qemu_io(
        &d,
        "qcow2",
        "c.qcow2",
        &["write -P 1 0 64k", "write -P 2 64k 64k"],
    );
    // Point guest cluster 1 at the data cluster of guest cluster 0: that
    // cluster is now referenced twice but has refcount 1 -> corruption.
    let l1 = be64(&p, 40);
    let l2 = be64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    let e0 = be64(&p, l2);
    poke64(&p, l2 + 8, e0);
    assert_eq!(code(&qemu(&d, "qemu-img", &["check", "c.qcow2"])), 2);
    let o = ds(&d, &["check", "c.qcow2"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("errors were found on the image."));
}

#[test]
fn an_image_that_does_not_open_exits_1() {
    let d = Dir::new();
    let o = ds(&d, &["check", "missing.qcow2"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("missing.qcow2"));
}

#[test]
fn check_repair_refuses_bitmaps_unless_told_to_drop_them() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "bm.qcow2", "1M"],
    );
    qemu_ok(&d, "qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
    qemu_io(&d, "qcow2", "bm.qcow2", &["write -P 1 0 64k"]);
    let o = ds(&d, &["check", "-r", "leaks", "bm.qcow2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--drop-bitmaps"), "{}", stderr(&o));
    // Read-only check is fine and leaves the bitmap.
    ds_ok(&d, &["check", "bm.qcow2"]);
    assert!(qemu_ok(&d, "qemu-img", &["info", "bm.qcow2"]).contains("b0"));
    ds_ok(&d, &["check", "-r", "leaks", "--drop-bitmaps", "bm.qcow2"]);
    assert!(!qemu_ok(&d, "qemu-img", &["info", "bm.qcow2"]).contains("bitmaps"));
    let c = qemu(&d, "qemu-img", &["check", "bm.qcow2"]);
    assert!(c.status.success(), "{}", stderr(&c));
}

#[test]
fn repair_with_cache_none_makes_it_clean() {
    let d = Dir::new();
    let p = d.path("n.qcow2");
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "n.qcow2", "4M"],
    );
    qemu_io(&d, "qcow2", "n.qcow2", &["write -P 1 0 64k"]);
    // One leaked cluster, as in leaks_exit_3_and_repair_makes_it_clean.
    let l1 = be64(&p, 40);
    let l2 = be64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    poke64(&p, l2, 0);
    assert_eq!(code(&qemu(&d, "qemu-img", &["check", "n.qcow2"])), 3);
    let o = ds(&d, &["check", "-t", "none", "n.qcow2"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    for repair in ["leaks", "all"] {
        let o = ds(&d, &["check", "-r", repair, "--cache", "none", "n.qcow2"]);
        assert_eq!(code(&o), 0, "-r {repair}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("No errors were found on the image."), "{out}");
    }
    let c = qemu(&d, "qemu-img", &["check", "n.qcow2"]);
    assert_eq!(code(&c), 0, "{}", stderr(&c));
}
