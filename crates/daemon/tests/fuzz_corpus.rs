//! Replays the committed corpus of the QMP fuzz target (`fuzz/corpus/qmp/`)
//! through its body, [`daemon::fuzzing::fuzz_qmp`], whole and cut short, so
//! every seed and every finding stays a regression test without cargo-fuzz.

use std::path::PathBuf;

#[test]
fn qmp_corpus_replays_cleanly() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qmp");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "only {} corpus files", files.len());
    for p in &files {
        eprintln!("qmp: {}", p.display());
        let data = std::fs::read(p).unwrap();
        daemon::fuzzing::fuzz_qmp(&data);
        for cut in [1, data.len() / 2, data.len() - 1] {
            if cut > 0 && cut < data.len() {
                daemon::fuzzing::fuzz_qmp(&data[..cut]);
            }
        }
    }
}
