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

/// Finding of the nbd_client target: a server advertising a minimum block
/// size above the client's largest payload made negotiation panic
/// (`clamp` with min > max). Now the client refuses the export, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_minimum_block_size_above_the_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_client");
    let data = std::fs::read(dir.join("crash-min-block-above-max-payload")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("s.sock");
    let l = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = s.write_all(&data).await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    });
    let opts = nbd::client::ClientOptions {
        reconnect_window: Some(std::time::Duration::ZERO),
        ..Default::default()
    };
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let Err(e) = nbd::client::NbdClient::connect_uri(&uri, opts).await else {
        panic!("the export must be refused");
    };
    assert!(e.to_string().contains("minimum block size"), "{e}");
    server.abort();
}

/// Finding of the nbd_client target: a read chunk whose offset plus length
/// overflows u64 passed the bounds check by wrapping around and indexed
/// outside the read buffer (a panic in the client's reader). The chunk is
/// now refused as outside the request; the replay must not panic.
#[test]
fn client_refuses_a_chunk_whose_offset_wraps_around() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_client");
    let data = std::fs::read(dir.join("crash-chunk-offset-wraps-around")).unwrap();
    // The panic would be in the client's reader task, which the runtime
    // catches: count panics anywhere instead.
    static PANICS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        prev(info);
    }));
    for _ in 0..20 {
        nbd::fuzzing::fuzz_client(&data);
    }
    assert_eq!(PANICS.load(std::sync::atomic::Ordering::SeqCst), 0);
}
