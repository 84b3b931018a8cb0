//! Every kind of bad input gets one line, `diskstream: <file>: <problem>`,
//! a non-zero exit, and leaves every image as it was.

mod common;
use common::*;

/// Runs diskstream expecting failure; checks the message names `file` and
/// says `problem`, and that `untouched` files did not change.
fn fails(d: &Dir, args: &[&str], file: &str, problem: &str, untouched: &[&str]) {
    let before: Vec<_> = untouched.iter().map(|f| digest(&d.path(f))).collect();
    let o = ds(d, args);
    assert!(!o.status.success(), "{args:?} succeeded");
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got: {err}");
    assert!(lines[0].starts_with("diskstream: "), "{err}");
    assert!(
        lines[0].contains(file),
        "{args:?}: message does not name {file}: {err}"
    );
    assert!(
        lines[0].to_lowercase().contains(problem),
        "{args:?}: message does not say '{problem}': {err}"
    );
    let after: Vec<_> = untouched.iter().map(|f| digest(&d.path(f))).collect();
    assert_eq!(before, after, "{args:?} modified an image");
}

#[test]
fn nonexistent_files() {
    let d = Dir::new();
    for cmd in ["info", "map", "check"] {
        fails(&d, &[cmd, "nope.qcow2"], "nope.qcow2", "no such file", &[]);
    }
    fails(
        &d,
        &["convert", "nope.qcow2", "out.raw"],
        "nope.qcow2",
        "no such file",
        &[],
    );
    assert!(!d.path("out.raw").exists());
}

#[test]
fn wrong_and_unknown_formats() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "a.raw", "1M"],
    );
    fails(
        &d,
        &["info", "-f", "qcow2", "a.raw"],
        "a.raw",
        "qcow2",
        &["a.raw"],
    );
    fails(
        &d,
        &["map", "-f", "vmdk", "a.raw"],
        "a.raw",
        "unknown image format",
        &["a.raw"],
    );
    fails(
        &d,
        &["create", "-f", "vmdk", "new.img", "1M"],
        "new.img",
        "unknown image format",
        &[],
    );
    fails(
        &d,
        &["convert", "-O", "vdi", "a.raw", "o.img"],
        "o.img",
        "unknown image format",
        &["a.raw"],
    );
    assert!(!d.path("new.img").exists() && !d.path("o.img").exists());
}

#[test]
fn malformed_and_overflowing_sizes() {
    let d = Dir::new();
    for size in [
        "12Q",
        "abc",
        "-5",
        "1.5",
        "99999999999999999999",
        "8E",
        "16777216T",
    ] {
        fails(
            &d,
            &["create", "-f", "raw", "s.raw", size],
            "s.raw",
            "size",
            &[],
        );
        assert!(!d.path("s.raw").exists(), "{size}");
    }
    fails(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3000",
            "s.qcow2",
            "1M",
        ],
        "s.qcow2",
        "cluster_size",
        &[],
    );
    fails(
        &d,
        &["create", "-f", "qcow2", "s.qcow2"],
        "s.qcow2",
        "size",
        &[],
    );
    assert!(!d.path("s.qcow2").exists());
}

#[test]
fn missing_or_misnamed_backing() {
    let d = Dir::new();
    fails(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "t.qcow2",
            "1M",
        ],
        "gone.qcow2",
        "no such file",
        &[],
    );
    assert!(!d.path("t.qcow2").exists());
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "1M"],
    );
    // A raw backing named as qcow2 is refused, never probed.
    fails(
        &d,
        &[
            "create", "-f", "qcow2", "-b", "base.raw", "-F", "qcow2", "t.qcow2",
        ],
        "base.raw",
        "qcow2",
        &["base.raw"],
    );
    fails(
        &d,
        &["create", "-f", "qcow2", "-b", "base.raw", "t.qcow2"],
        "t.qcow2",
        "backing format",
        &["base.raw"],
    );
    assert!(!d.path("t.qcow2").exists());
    // An existing overlay whose backing went away, or is recorded with the wrong format.
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b2.qcow2", "1M"],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "b2.qcow2", "-F", "qcow2", "o.qcow2",
        ],
    );
    std::fs::remove_file(d.path("b2.qcow2")).unwrap();
    fails(
        &d,
        &["info", "o.qcow2"],
        "b2.qcow2",
        "no such file",
        &["o.qcow2"],
    );
    fails(
        &d,
        &["map", "o.qcow2"],
        "b2.qcow2",
        "no such file",
        &["o.qcow2"],
    );
    fails(
        &d,
        &["convert", "o.qcow2", "x.raw"],
        "b2.qcow2",
        "no such file",
        &["o.qcow2"],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "w.qcow2",
        ],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &["rebase", "-u", "-b", "base.raw", "-F", "qcow2", "w.qcow2"],
    );
    fails(
        &d,
        &["info", "w.qcow2"],
        "base.raw",
        "qcow2",
        &["w.qcow2", "base.raw"],
    );
}

#[test]
fn an_image_that_is_its_own_backing() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "l.qcow2", "1M"],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &["rebase", "-u", "-b", "l.qcow2", "-F", "qcow2", "l.qcow2"],
    );
    for cmd in ["info", "map"] {
        fails(&d, &[cmd, "l.qcow2"], "l.qcow2", "loop", &["l.qcow2"]);
    }
    fails(
        &d,
        &["convert", "l.qcow2", "x.raw"],
        "l.qcow2",
        "loop",
        &["l.qcow2"],
    );
    // Two images pointing at each other.
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
        ],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    fails(
        &d,
        &["info", "b.qcow2"],
        "b.qcow2",
        "loop",
        &["a.qcow2", "b.qcow2"],
    );
    // Creating an image over its own backing.
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"],
    );
    fails(
        &d,
        &[
            "create", "-f", "qcow2", "-b", "s.qcow2", "-F", "qcow2", "s.qcow2",
        ],
        "s.qcow2",
        "own backing",
        &["s.qcow2"],
    );
    // Converting onto the source.
    fails(
        &d,
        &["convert", "-O", "qcow2", "s.qcow2", "s.qcow2"],
        "s.qcow2",
        "source",
        &["s.qcow2"],
    );
}

/// Rewrites the type of `img`'s backing format header extension
/// (0xe2792aca) to one QEMU and diskstream do not know, so that the header
/// no longer records the backing format (qemu-img 10 refuses to write such
/// an image: create and rebase -u both want -F).
fn forget_backing_format(img: &std::path::Path) {
    let mut b = std::fs::read(img).unwrap();
    let header_len = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    let mut at = header_len;
    loop {
        let ty = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(ty, 0, "{}: no backing format extension", img.display());
        if ty == 0xe279_2aca {
            b[at..at + 4].copy_from_slice(&0x0bad_f00d_u32.to_be_bytes());
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    std::fs::write(img, b).unwrap();
}

#[test]
fn json_backing_names_are_refused() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "1M"],
    );
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}}"#,
        d.s("base.raw")
    );
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", &json, "-F", "raw", "j.qcow2", "1M",
        ],
    );
    let problem = "json: backing names are not supported";
    for cmd in ["info", "map"] {
        fails(
            &d,
            &[cmd, "j.qcow2"],
            "j.qcow2",
            problem,
            &["j.qcow2", "base.raw"],
        );
    }
    fails(
        &d,
        &["convert", "j.qcow2", "x.raw"],
        "j.qcow2",
        problem,
        &["j.qcow2", "base.raw"],
    );
    assert!(!d.path("x.raw").exists());
}

#[test]
fn a_backing_without_a_recorded_format_is_refused_not_probed() {
    let d = Dir::new();
    // The backing is a qcow2 image whose own backing is gone: a walk that
    // probed it would open it as qcow2 and fail on gone.raw instead.
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "1M",
        ],
    );
    qemu_ok(
        &d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "1M",
        ],
    );
    forget_backing_format(&d.path("top.qcow2"));
    let info = qemu_ok(&d, "qemu-img", &["info", "-U", "top.qcow2"]);
    assert!(!info.contains("backing file format"), "{info}");
    let untouched = ["top.qcow2", "mid.qcow2"];
    for cmd in ["info", "map"] {
        fails(
            &d,
            &[cmd, "top.qcow2"],
            "top.qcow2",
            "backing format",
            &untouched,
        );
    }
    fails(
        &d,
        &["convert", "top.qcow2", "x.raw"],
        "top.qcow2",
        "backing format",
        &untouched,
    );
    assert!(!d.path("x.raw").exists());
}
