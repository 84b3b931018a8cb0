//! Image locks against the real QEMU tools: the same OFD lock bytes QEMU's
//! file-posix driver takes, so QEMU and diskstream refuse (or with -U allow)
//! each other's opens exactly as two QEMU processes would.

mod common;
use common::*;

use image::open::OpenOptions;

fn writable() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_refuses_an_image_diskstream_writes() {
    let d = Dir::new();
    for (fmt, name) in [("raw", "a.raw"), ("qcow2", "a.qcow2")] {
        qemu_ok(&d, "qemu-img", &["create", "-q", "-f", fmt, name, "1M"]);
        let img = image::open(&d.path(name), &writable())
            .await
            .expect("open rw");
        // Another writer is refused, whatever the format.
        let o = qemu(&d, "qemu-io", &["-f", fmt, "-c", "write 0 512", name]);
        assert!(
            !o.status.success(),
            "qemu-io wrote {name} while diskstream holds it"
        );
        assert!(stderr(&o).contains("\"write\" lock"), "{}", stderr(&o));
        if fmt == "qcow2" {
            let o = qemu(&d, "qemu-img", &["info", name]);
            assert!(!o.status.success(), "qemu-img info opened {name}");
            assert!(
                stderr(&o).contains("Failed to get shared \"write\" lock"),
                "{}",
                stderr(&o)
            );
        }
        qemu_ok(&d, "qemu-img", &["info", "-U", name]);
        drop(img);
        qemu_ok(&d, "qemu-img", &["info", name]);
        qemu_ok(&d, "qemu-io", &["-f", fmt, "-c", "write 0 512", name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diskstream_refuses_an_image_qemu_io_writes() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    let p = d.path("a.qcow2");
    let _h = Holder::start(&d, "qemu-io", &["-f", "qcow2", "a.qcow2"], &p);
    let e = image::open(&p, &writable())
        .await
        .expect_err("opened a locked image");
    assert_eq!(e.kind(), image::ErrorKind::Locked);
    assert!(e.to_string().contains("a.qcow2"), "{e}");
    // Read-only needs force-share, exactly as qemu-img.
    let o = ds(&d, &["info", "a.qcow2"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("a.qcow2") && stderr(&o).contains("lock"),
        "{}",
        stderr(&o)
    );
    assert!(!qemu(&d, "qemu-img", &["info", "a.qcow2"]).status.success());
    ds_ok(&d, &["info", "-U", "a.qcow2"]);
    ds_ok(&d, &["map", "--force-share", "a.qcow2"]);
    // Creating or converting over it would destroy it: refused, file intact.
    let before = digest(&p);
    let o = ds(&d, &["create", "-f", "qcow2", "a.qcow2", "2M"]);
    assert!(
        !o.status.success() && stderr(&o).contains("lock"),
        "{}",
        stderr(&o)
    );
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "src.raw", "1M"],
    );
    let o = ds(&d, &["convert", "-O", "qcow2", "src.raw", "a.qcow2"]);
    assert!(
        !o.status.success() && stderr(&o).contains("lock"),
        "{}",
        stderr(&o)
    );
    assert_eq!(before, digest(&p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_export_and_backing_files_are_locked() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
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
    let sock = d.s("nbd.sock");
    {
        let top = d.path("top.qcow2");
        let _h = Holder::start(
            &d,
            "qemu-nbd",
            &["-f", "qcow2", "-k", &sock, "top.qcow2"],
            &top,
        );
        // qemu-nbd locks the backing too, a moment after the top: wait
        // (bounded) for that before testing it.
        let base = d.path("base.qcow2");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !has_qemu_lock(&base) {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-nbd did not lock the backing"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let e = image::open(&top, &writable())
            .await
            .expect_err("opened an exported image");
        assert_eq!(e.kind(), image::ErrorKind::Locked);
        // Its backing may be read, never written.
        let e = image::open(&d.path("base.qcow2"), &writable())
            .await
            .expect_err("wrote a backing in use");
        assert_eq!(e.kind(), image::ErrorKind::Locked);
        ds_ok(&d, &["info", "base.qcow2"]);
    }
    // diskstream holding the overlay writable locks its backing against writers.
    let top = image::open(&d.path("top.qcow2"), &writable())
        .await
        .expect("open rw");
    let o = qemu(
        &d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write 0 512", "base.qcow2"],
    );
    assert!(
        !o.status.success(),
        "qemu-io wrote a backing diskstream uses"
    );
    assert!(stderr(&o).contains("\"write\" lock"), "{}", stderr(&o));
    qemu_ok(&d, "qemu-img", &["info", "base.qcow2"]);
    drop(top);
    qemu_ok(
        &d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write 0 512", "base.qcow2"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_images_lock_like_a_guest_disk() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "1M"],
    );
    let p = d.path("r.raw");
    let _h = Holder::start(&d, "qemu-io", &["-f", "raw", "r.raw"], &p);
    // qemu-io shares writes on raw, so reads work without -U, as with qemu-img;
    // diskstream as a writer refuses to share writes, so it cannot open.
    ds_ok(&d, &["info", "r.raw"]);
    qemu_ok(&d, "qemu-img", &["info", "r.raw"]);
    let e = image::open(&p, &writable())
        .await
        .expect_err("second raw writer");
    assert_eq!(e.kind(), image::ErrorKind::Locked);
}

#[test]
fn check_needs_force_share_on_an_image_qemu_io_writes_and_never_repairs_it() {
    let d = Dir::new();
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    let p = d.path("a.qcow2");
    let _h = Holder::start(&d, "qemu-io", &["-f", "qcow2", "a.qcow2"], &p);
    let before = digest(&p);
    // Like qemu-img check: a read-only check of an image in use is refused...
    let o = ds(&d, &["check", "a.qcow2"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("a.qcow2") && err.contains("\"write\" lock"),
        "{err}"
    );
    // ...allowed with -U...
    let o = ds(&d, &["check", "-U", "a.qcow2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("No errors were found on the image."));
    // ...and a repair, which writes, is refused even with -U.
    let o = ds(&d, &["check", "-U", "-r", "leaks", "a.qcow2"]);
    assert!(
        !o.status.success(),
        "check -U -r leaks repaired an image in use"
    );
    let err = stderr(&o);
    assert!(
        err.contains("a.qcow2") && err.contains("force-share") && err.contains("read-only"),
        "{err}"
    );
    let o = ds(&d, &["check", "-r", "leaks", "a.qcow2"]);
    assert!(
        !o.status.success(),
        "check -r leaks repaired an image in use"
    );
    assert!(stderr(&o).contains("lock"), "{}", stderr(&o));
    assert_eq!(before, digest(&p));
}
