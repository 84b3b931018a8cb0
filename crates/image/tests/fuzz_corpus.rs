//! Replays the committed `open_read` fuzz corpus (`fuzz/corpus/open_read/`)
//! through the fuzz target's body, [`image::testing::fuzz_open_read`], so
//! every finding stays a regression test without cargo-fuzz. File names say
//! what each input must do: `valid-*` opens as qcow2, passes `check()`, and
//! reads exactly what `qemu-img convert -O raw` reads; `reject-*` must not
//! open as qcow2; `any-*` must only not panic (nor break the target's own
//! assertions).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use image::storage::{MemStorage, Storage};
use image::testing::fuzz_open_read;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/open_read");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn fuzz_corpus_replays_with_the_expected_outcomes() {
    let files = corpus();
    assert!(
        files
            .iter()
            .filter(|(n, _)| n.starts_with("valid-"))
            .count()
            >= 4
    );
    assert!(
        files
            .iter()
            .filter(|(n, _)| n.starts_with("reject-"))
            .count()
            >= 4
    );
    for (name, data) in &files {
        eprintln!("corpus: {name}");
        let out = fuzz_open_read(data);
        if name.starts_with("valid-") {
            assert!(out.qcow2_opened, "{name}: does not open: {out:?}");
            assert_eq!(out.qcow2_check_clean, Some(true), "{name}: {out:?}");
            assert!(out.qcow2_bytes_read > 0, "{name}: {out:?}");
        } else if name.starts_with("reject-") {
            assert!(!out.qcow2_opened, "{name}: opened: {out:?}");
        } else if name.starts_with("qed-") {
            // QED seeds: checked by `fuzz_corpus_qed_seeds_replay` below.
        } else {
            assert!(name.starts_with("any-"), "{name}: unknown corpus file kind");
        }
    }
}

/// The valid corpus images read through the engine exactly as qemu reads
/// them (unallocated ranges as zeros: the one with a backing name is read
/// without its backing by both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_corpus_valid_images_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in corpus().iter().filter(|(n, _)| n.starts_with("valid-")) {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(name, data.clone()));
        let q = open_qcow2(s, false)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut ours = vec![0u8; q.virtual_size() as usize];
        for (off, len) in q.read(0, &mut ours).unwrap() {
            ours[off as usize..(off + len) as usize].fill(0);
        }
        let src = dir.path().join(name);
        std::fs::write(&src, data).unwrap();
        let out = dir.path().join(format!("{name}.raw"));
        let (code, text) = qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            &format!(
                "json:{{\"driver\":\"qcow2\",\"backing\":null,\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
                src.display()
            ),
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{name}: {text}");
        let theirs = std::fs::read(&out).unwrap();
        assert!(ours == theirs, "{name}: reads differ from qemu's");
    }
}

/// The QED seeds: `qed-valid-*` opens as QED, checks clean and reads exactly
/// what qemu-img reads (without the backing); `qed-reject-*` does not open
/// as QED; `qed-any-*` must only not panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_corpus_qed_seeds_replay() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = corpus()
        .into_iter()
        .filter(|(n, _)| n.starts_with("qed-"))
        .collect();
    let count = |p: &str| files.iter().filter(|(n, _)| n.starts_with(p)).count();
    assert!(count("qed-valid-") >= 3 && count("qed-reject-") >= 3);
    for (name, data) in &files {
        let out = fuzz_open_read(data);
        if name.starts_with("qed-valid-") {
            assert!(out.qed_opened, "{name}: does not open: {out:?}");
            assert_eq!(out.qed_check_clean, Some(true), "{name}: {out:?}");
            assert!(out.qed_bytes_read > 0, "{name}: {out:?}");
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(name, data.clone()));
            let q = image::qed::Qed::open(s, &image::qed::QedOptions::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            use image::format::Format;
            let mut ours = vec![0u8; q.virtual_size() as usize];
            for (off, len) in q.read(0, &mut ours).unwrap() {
                ours[off as usize..(off + len) as usize].fill(0);
            }
            let src = dir.path().join(name);
            std::fs::write(&src, data).unwrap();
            let out = dir.path().join(format!("{name}.raw"));
            let (code, text) = qemu_img(&[
                "convert",
                "-O",
                "raw",
                &format!(
                    "json:{{\"driver\":\"qed\",\"backing\":null,\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
                    src.display()
                ),
                out.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "{name}: {text}");
            assert!(
                ours == std::fs::read(&out).unwrap(),
                "{name}: reads differ from qemu's"
            );
        } else if name.starts_with("qed-reject-") {
            assert!(!out.qed_opened, "{name}: opened: {out:?}");
        } else {
            assert!(
                name.starts_with("qed-any-"),
                "{name}: unknown corpus file kind"
            );
        }
    }
}
