//! `diskstream convert` results are identical to their source
//! (`qemu-img compare`), clean (`qemu-img check`), and contain no more data
//! than the source: holes and zeros are never written.

mod common;
use common::*;
use serde_json::Value;

fn data_bytes(d: &Dir, img: &str) -> u64 {
    let m: Value =
        serde_json::from_str(&qemu_ok(d, "qemu-img", &["map", "--output=json", img])).unwrap();
    m.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == Value::Bool(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

fn converted_ok(d: &Dir, src: &str, dst: &str, dst_fmt: &str) {
    qemu_ok(d, "qemu-img", &["compare", "-F", dst_fmt, src, dst]);
    if dst_fmt == "qcow2" {
        qemu_ok(d, "qemu-img", &["check", dst]);
        let info: Value =
            serde_json::from_str(&qemu_ok(d, "qemu-img", &["info", "--output=json", dst])).unwrap();
        assert!(
            info.get("backing-filename").is_none(),
            "convert output has a backing"
        );
    }
}

fn source_chain(d: &Dir) {
    qemu_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "24M"],
    );
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &[
            "write -P 1 0 3M",
            "write -P 2 10M 5M",
            "write -P 0 16M 1M",
            "write -c -P 3 20M 128k",
        ],
    );
    qemu_ok(
        d,
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
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 4 1M 64k", "write -z 11M 1M", "write -P 5 23M 1M"],
    );
}

#[test]
fn qcow2_chain_to_qcow2_and_raw_is_identical_and_sparse() {
    let d = Dir::new();
    source_chain(&d);
    ds_ok(&d, &["convert", "-O", "qcow2", "top.qcow2", "out.qcow2"]);
    converted_ok(&d, "top.qcow2", "out.qcow2", "qcow2");
    // Zeros (the written-zero MiB, the zero cluster range) are not data.
    let src_nonzero = 3 * 1024 * 1024 + 4 * 1024 * 1024 + 128 * 1024 + 1024 * 1024;
    assert_eq!(data_bytes(&d, "out.qcow2"), src_nonzero);
    ds_ok(
        &d,
        &[
            "convert",
            "-O",
            "raw",
            "-t",
            "none",
            "-m",
            "3",
            "top.qcow2",
            "out.raw",
        ],
    );
    converted_ok(&d, "top.qcow2", "out.raw", "raw");
    assert_eq!(data_bytes(&d, "out.raw"), src_nonzero);
    // Through the page cache, writes go in order (any -m), or out of order
    // with -W.
    for (i, extra) in [&["-m", "1"][..], &["-m", "2"], &["-W", "-m", "5"]]
        .into_iter()
        .enumerate()
    {
        let out = format!("order{i}.qcow2");
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend(["top.qcow2", out.as_str()]);
        ds_ok(&d, &args);
        converted_ok(&d, "top.qcow2", &out, "qcow2");
        assert_eq!(data_bytes(&d, &out), src_nonzero, "{extra:?}");
    }
    // Cluster size option.
    ds_ok(
        &d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "top.qcow2",
            "small.qcow2",
        ],
    );
    converted_ok(&d, "top.qcow2", "small.qcow2", "qcow2");
    let info: Value = serde_json::from_str(&qemu_ok(
        &d,
        "qemu-img",
        &["info", "--output=json", "small.qcow2"],
    ))
    .unwrap();
    assert_eq!(info["cluster-size"], 4096);
}

#[test]
fn raw_to_raw_and_overwriting_an_existing_destination() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "a.raw", "9M"],
    );
    qemu_io(
        &d,
        "raw",
        "a.raw",
        &["write -P 7 4k 8k", "write -P 8 5M 3M"],
    );
    // An existing, larger destination with other data is replaced.
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "b.raw", "20M"],
    );
    qemu_io(&d, "raw", "b.raw", &["write -P 9 0 20M"]);
    ds_ok(&d, &["convert", "-f", "raw", "-O", "raw", "a.raw", "b.raw"]);
    converted_ok(&d, "a.raw", "b.raw", "raw");
    assert_eq!(
        std::fs::metadata(d.path("b.raw")).unwrap().len(),
        9 * 1024 * 1024
    );
}

#[test]
fn raw_to_qcow2_is_identical() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "a.raw", "9M"],
    );
    qemu_io(
        &d,
        "raw",
        "a.raw",
        &["write -P 7 4k 8k", "write -P 8 5M 3M"],
    );
    ds_ok(
        &d,
        &["convert", "-f", "raw", "-O", "qcow2", "a.raw", "b.qcow2"],
    );
    converted_ok(&d, "a.raw", "b.qcow2", "qcow2");
}

/// The progress figures `    (42.17/100%)` in `out`, in order.
fn progress_figures(out: &str) -> Vec<f64> {
    out.split('(')
        .filter_map(|s| s.split_once("/100%)"))
        .filter_map(|(n, _)| n.parse().ok())
        .collect()
}

#[test]
fn progress_is_drawn_on_a_terminal_only() {
    let d = Dir::new();
    source_chain(&d);
    // `script` (util-linux) runs the command on a pseudo-terminal and copies
    // what it writes there, stderr included, to its own stdout.
    let cmd = format!(
        "'{}' convert -p -O qcow2 top.qcow2 tty.qcow2",
        env!("CARGO_BIN_EXE_diskstream")
    );
    let o = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(d.dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script (util-linux)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{cmd}: {out}{}", stderr(&o));
    let figures = progress_figures(&out);
    assert!(
        !figures.is_empty(),
        "no progress drawn on a terminal: {out:?}"
    );
    assert!(
        figures.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {out:?}"
    );
    assert_eq!(figures.last(), Some(&100.0), "{out:?}");
    assert!(out.contains("    (100.00/100%)"), "{out:?}");
    converted_ok(&d, "top.qcow2", "tty.qcow2", "qcow2");
    // Through a pipe there is no terminal: nothing is drawn.
    let o = ds(
        &d,
        &["convert", "-p", "-O", "qcow2", "top.qcow2", "pipe.qcow2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "progress drawn without a terminal");
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    converted_ok(&d, "top.qcow2", "pipe.qcow2", "qcow2");
}
