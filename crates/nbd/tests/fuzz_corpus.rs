//! Replays the committed corpora of the NBD connection fuzz targets
//! (`fuzz/corpus/nbd_server/`, `fuzz/corpus/nbd_client/`) through their
//! bodies, [`nbd::fuzzing::fuzz_server`] and [`nbd::fuzzing::fuzz_client`],
//! whole and cut short, so every seed and every finding stays a regression
//! test without cargo-fuzz. Findings are named after the bug they found.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
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

fn replay(target: &str, body: fn(&[u8])) {
    let files = corpus(target);
    assert!(
        files.len() >= 5,
        "{target}: only {} corpus files",
        files.len()
    );
    for (name, data) in &files {
        eprintln!("{target}: {name}");
        body(data);
        // The same stream ending early, at a few places.
        for cut in [1, data.len() / 3, data.len() / 2, data.len() - 1] {
            if cut > 0 && cut < data.len() {
                body(&data[..cut]);
            }
        }
    }
}

#[test]
fn nbd_server_corpus_replays_cleanly() {
    replay("nbd_server", nbd::fuzzing::fuzz_server);
}

#[test]
fn nbd_client_corpus_replays_cleanly() {
    replay("nbd_client", nbd::fuzzing::fuzz_client);
}
