//! QED through the CLI, against the real QEMU tools: `create -f qed` makes
//! images qemu-img accepts; images qemu-img and qemu-io make (several
//! cluster and table sizes, with and without a backing) read identically,
//! map to the same JSON and info as qemu-img's; `check` counts and exits
//! like qemu-img's; `convert` to and from QED gives identical images.

mod common;
use common::*;

fn code(o: &std::process::Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn same_map(d: &Dir, img: &str) {
    let ours = ds_ok(d, &["map", "--output", "json", img]);
    let theirs = qemu_ok(d, "qemu-img", &["map", "--output=json", img]);
    assert_eq!(ours, theirs, "map --output json differs for {img}");
    let ours = ds(d, &["map", img]);
    let theirs = qemu(d, "qemu-img", &["map", img]);
    assert_eq!(ours.stdout, theirs.stdout, "human map differs for {img}");
}

/// Reads `img` through diskstream (convert to raw) and through qemu-img, and
/// compares both byte for byte.
fn reads_like_qemu(d: &Dir, img: &str) {
    let ours = format!("{img}.ds.raw");
    let theirs = format!("{img}.qemu.raw");
    ds_ok(d, &["convert", "-O", "raw", img, &ours]);
    qemu_ok(d, "qemu-img", &["convert", "-O", "raw", img, &theirs]);
    let a = std::fs::read(d.path(&ours)).unwrap();
    let b = std::fs::read(d.path(&theirs)).unwrap();
    assert_eq!(a.len(), b.len(), "{img}: sizes differ");
    assert!(
        a == b,
        "{img}: content read by diskstream differs from qemu-img's"
    );
}

fn qemu_check_clean(d: &Dir, img: &str) {
    let o = qemu(d, "qemu-img", &["check", "-f", "qed", img]);
    assert_eq!(
        code(&o),
        0,
        "qemu-img check {img}: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn qemu_made_images_read_map_and_check_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "12M"],
    );
    qemu_io(
        &d,
        "raw",
        "base.raw",
        &["write -P 0x33 0 12M", "write -z 4M 1M"],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &["convert", "-O", "qcow2", "base.raw", "base.qcow2"],
    );
    for (i, (cs, ts, backing)) in [
        ("4k", "2", None),
        ("64k", "4", None),
        ("16k", "16", Some(("base.raw", "raw"))),
        ("64k", "4", Some(("base.qcow2", "qcow2"))),
        ("1M", "8", Some(("base.raw", "raw"))),
    ]
    .into_iter()
    .enumerate()
    {
        let img = format!("t{i}.qed");
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qed".into(),
            "-o".into(),
            format!("cluster_size={cs},table_size={ts}"),
        ];
        if let Some((b, f)) = backing {
            args.extend(["-b".into(), b.into(), "-F".into(), f.into()]);
        }
        args.extend([img.clone(), "12M".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu_ok(&d, "qemu-img", &args);
        same_map(&d, &img);
        qemu_io(
            &d,
            "qed",
            &img,
            &[
                "write -P 0xa1 0 100k",
                "write -P 0xb2 3000k 5000",
                "write -z 5M 2M",
                "write -P 0xc3 11M 1M",
                "write -z 11M 64k",
            ],
        );
        reads_like_qemu(&d, &img);
        same_map(&d, &img);
        // info agrees with qemu-img on every field qemu-img prints.
        let ours: serde_json::Value =
            serde_json::from_str(&ds_ok(&d, &["info", "--output", "json", &img])).unwrap();
        let theirs: serde_json::Value =
            serde_json::from_str(&qemu_ok(&d, "qemu-img", &["info", "--output=json", &img]))
                .unwrap();
        for (k, v) in theirs.as_object().unwrap() {
            if k == "children" || k == "actual-size" {
                continue;
            }
            assert_eq!(ours.get(k), Some(v), "{img}: info field {k}");
        }
        let ours: serde_json::Value =
            serde_json::from_str(&ds_ok(&d, &["check", "--output", "json", &img])).unwrap();
        let theirs: serde_json::Value =
            serde_json::from_str(&qemu_ok(&d, "qemu-img", &["check", "--output=json", &img]))
                .unwrap();
        assert_eq!(ours, theirs, "{img}: check --output json");
    }
}

#[test]
fn create_makes_images_qemu_img_accepts() {
    let d = Dir::new();
    ds_ok(&d, &["create", "-f", "qed", "a.qed", "20M"]);
    qemu_check_clean(&d, "a.qed");
    ds_ok(
        &d,
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=4k,table_size=2",
            "b.qed",
            "8M",
        ],
    );
    qemu_check_clean(&d, "b.qed");
    let info = qemu_ok(&d, "qemu-img", &["info", "--output=json", "b.qed"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["cluster-size"], 4096);
    // Over a raw backing: the no-probe bit, so qemu reports the format.
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "8M"],
    );
    ds_ok(
        &d,
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "raw", "o.qed",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&qemu_ok(
        &d,
        "qemu-img",
        &["info", "--output=json", "o.qed"],
    ))
    .unwrap();
    assert_eq!(v["backing-filename"], "base.raw");
    assert_eq!(v["backing-filename-format"], "raw");
    assert_eq!(v["virtual-size"], 8 << 20);
    qemu_check_clean(&d, "o.qed");
    // Limits, each with its own message.
    for (opt, what) in [
        ("cluster_size=2k", "cluster_size"),
        ("cluster_size=128M", "cluster_size"),
        ("table_size=3", "table_size"),
        ("table_size=32", "table_size"),
        ("table_size=1", "table size 1"),
    ] {
        let o = ds(&d, &["create", "-f", "qed", "-o", opt, "x.qed", "1M"]);
        assert!(!o.status.success(), "{opt} accepted");
        assert!(stderr(&o).contains(what), "{opt}: {}", stderr(&o));
        assert!(
            !d.path("x.qed").exists(),
            "{opt}: a half-made image was left"
        );
    }
    // A backing whose format QED could not find again is refused.
    let o = ds(
        &d,
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "qcow2", "y.qed",
        ],
    );
    assert!(!o.status.success());
    assert!(!d.path("y.qed").exists());
}

#[test]
fn convert_to_and_from_qed_gives_identical_images() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "16M"],
    );
    qemu_io(
        &d,
        "qcow2",
        "src.qcow2",
        &[
            "write -P 7 0 3M",
            "write -P 9 5M 64k",
            "write -z 6M 1M",
            "write -P 1 15M 1M",
        ],
    );
    ds_ok(&d, &["convert", "-O", "qed", "src.qcow2", "a.qed"]);
    qemu_check_clean(&d, "a.qed");
    qemu_ok(&d, "qemu-img", &["compare", "src.qcow2", "a.qed"]);
    same_map(&d, "a.qed");
    ds_ok(
        &d,
        &[
            "convert",
            "-O",
            "qed",
            "-o",
            "cluster_size=16k,table_size=8",
            "src.qcow2",
            "b.qed",
        ],
    );
    qemu_check_clean(&d, "b.qed");
    qemu_ok(&d, "qemu-img", &["compare", "src.qcow2", "b.qed"]);
    ds_ok(&d, &["convert", "-O", "raw", "b.qed", "b.raw"]);
    qemu_ok(&d, "qemu-img", &["compare", "-F", "raw", "b.qed", "b.raw"]);
    ds_ok(&d, &["convert", "-O", "qcow2", "a.qed", "c.qcow2"]);
    qemu_ok(&d, "qemu-img", &["compare", "a.qed", "c.qcow2"]);
}

#[test]
fn check_counts_leaks_and_corruption_like_qemu_img() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=64k",
            "a.qed",
            "8M",
        ],
    );
    qemu_io(&d, "qed", "a.qed", &["write -P 5 0 256k"]);
    // A leak: one cluster appended that nothing references.
    let len = std::fs::metadata(d.path("a.qed")).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("a.qed"))
        .unwrap();
    f.set_len(len + 65536).unwrap();
    drop(f);
    let ours = ds(&d, &["check", "a.qed"]);
    let theirs = qemu(&d, "qemu-img", &["check", "a.qed"]);
    assert_eq!(code(&ours), 3);
    assert_eq!(code(&ours), code(&theirs));
    // qemu cannot repair QED leaks; a leaked tail we can give back.
    let o = ds(&d, &["check", "-r", "leaks", "a.qed"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    qemu_check_clean(&d, "a.qed");
    assert_eq!(std::fs::metadata(d.path("a.qed")).unwrap().len(), len);
    // Corruption: an L2 entry pointing past the end of the file.
    let l1 = u64::from_le_bytes(
        std::fs::read(d.path("a.qed")).unwrap()[40..48]
            .try_into()
            .unwrap(),
    );
    let bytes = std::fs::read(d.path("a.qed")).unwrap();
    let l2 = u64::from_le_bytes(bytes[l1 as usize..l1 as usize + 8].try_into().unwrap());
    let mut bytes = bytes;
    bytes[l2 as usize + 8..l2 as usize + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(d.path("a.qed"), &bytes).unwrap();
    let ours = ds(&d, &["check", "a.qed"]);
    let theirs = qemu(&d, "qemu-img", &["check", "a.qed"]);
    assert_eq!(code(&ours), 2, "{}", String::from_utf8_lossy(&ours.stdout));
    assert_eq!(code(&ours), code(&theirs));
    // The repair clears the entry; the cluster it pointed at before the
    // damage is then a leak, for qemu-img as for us.
    std::fs::copy(d.path("a.qed"), d.path("q.qed")).unwrap();
    let ours = ds(&d, &["check", "-r", "all", "a.qed"]);
    let theirs = qemu(&d, "qemu-img", &["check", "-r", "all", "q.qed"]);
    assert_eq!(code(&ours), 3, "{}", String::from_utf8_lossy(&ours.stdout));
    assert_eq!(code(&ours), code(&theirs));
    let ours = qemu(&d, "qemu-img", &["check", "a.qed"]);
    assert_eq!(code(&ours), 3, "{}", String::from_utf8_lossy(&ours.stdout));
    assert_eq!(
        std::fs::read(d.path("a.qed")).unwrap(),
        std::fs::read(d.path("q.qed")).unwrap()
    );
}
