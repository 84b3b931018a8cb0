//! Cache modes of an opened chain: the image gets the mode asked for, its
//! read-only backing chain gets `backing_cache` (writeback unless asked),
//! seen from the kernel's side (the O_DIRECT bit of each open file).

use std::path::Path;

use image::CacheMode;
use image::open::{CreateOptions, FormatKind, OpenOptions};

/// Whether this process has `path` open with O_DIRECT (None: not open).
fn open_direct(path: &Path) -> Option<bool> {
    let want = std::fs::canonicalize(path).unwrap();
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            fd.file_name().to_str().unwrap()
        ))
        .unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        return Some(flags & libc::O_DIRECT as u32 != 0);
    }
    None
}

#[tokio::test]
async fn an_o_direct_overlay_reads_its_backing_through_the_page_cache_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    image::create(
        &base,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(4 << 20),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    image::create(
        &top,
        FormatKind::Qcow2,
        &CreateOptions {
            backing: Some(image::BackingSpec {
                name: "base.qcow2".into(),
                format: Some("qcow2".into()),
            }),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    for (backing_cache, base_direct) in [(CacheMode::Writeback, false), (CacheMode::None, true)] {
        let img = image::open(
            &top,
            &OpenOptions {
                writable: true,
                cache: CacheMode::None,
                backing_cache,
                ..OpenOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(open_direct(&top), Some(true));
        assert_eq!(open_direct(&base), Some(base_direct), "{backing_cache:?}");
        img.close().await.unwrap();
        drop(img);
    }
}
