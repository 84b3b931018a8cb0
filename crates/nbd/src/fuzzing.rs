//! Bodies of the NBD connection fuzz targets (`fuzz/fuzz_targets/nbd_server.rs`
//! and `nbd_client.rs`), kept in the library so the committed corpora replay
//! in the normal test run (`tests/fuzz_corpus.rs`) without cargo-fuzz.
//!
//! The one decision to know: these drive the real connection code, not only
//! the decoders ([`crate::codec::check_all_decoders`] does that). The input
//! is the whole byte stream one peer sends: for the server, a client's
//! handshake and requests against an in-memory export; for the client, a
//! server's greeting, option replies and transmission replies. Each run uses
//! a Unix socket under the temporary directory and a bounded wait, so a
//! hang is reported as a failure rather than stalling the fuzzer.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use image::storage::{MemStorage, Storage};
use image::{BlockDevice, Image, WriteFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::client::{ClientOptions, NbdClient};
use crate::server::{Export, Listener, ServerConfig};

/// Generous bound for one input; a run that takes longer is a hang.
const HANG: Duration = Duration::from_secs(20);

/// Size of the in-memory export the server fuzzer serves.
const EXPORT_SIZE: usize = 1 << 20;

fn socket_path(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "ds-fuzz-{what}-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn mem_device(writable: bool) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(
        "fuzz-export",
        vec![0x5a; EXPORT_SIZE],
    ));
    let raw = image::raw::Raw::open(s, writable).expect("raw over memory");
    Arc::new(Image::new(Arc::new(raw), None))
}

/// Sends `data` as a client to a server exporting a 1 MiB writable device
/// (named `disk`, and the default export), reads whatever it answers, and
/// checks that the server ends the connection and returns (no panic, no
/// hang) once the input ends.
pub fn fuzz_server(data: &[u8]) {
    let path = socket_path("srv");
    runtime().block_on(async {
        let listener = Listener::bind_unix(&path).expect("bind");
        let dev = mem_device(true);
        let export = |name: &str| Export {
            name: name.into(),
            description: "fuzz".into(),
            device: Arc::clone(&dev),
            read_only: false,
            multi_conn: true,
        };
        let mut config = ServerConfig::new(vec![export("disk"), export("")]);
        config.persistent = false;
        config.handshake_timeout = Duration::from_secs(5);
        let server = tokio::spawn(crate::server::run(
            listener,
            config,
            std::future::pending::<()>(),
        ));
        let mut s = UnixStream::connect(&path).await.expect("connect");
        let (mut rd, mut wr) = s.split();
        let talk = async {
            // The server may close early (a fatal protocol error): then the
            // rest of the input is not wanted, and that is fine.
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        };
        tokio::time::timeout(HANG, talk)
            .await
            .expect("server never closed the connection after the input ended");
        drop(s);
        let r = tokio::time::timeout(HANG, server)
            .await
            .expect("server did not return after its only client left");
        r.expect("server task panicked").ok();
    });
    let _ = std::fs::remove_file(&path);
}

/// Plays a server that sends `data` (and then closes its side), connects the
/// client to it, and if negotiation succeeds issues a read, a block-status
/// query, a write and a flush. Every outcome must be an answer or an error:
/// no panic, no hang, and a successful read has the length asked for.
pub fn fuzz_client(data: &[u8]) {
    let path = socket_path("cli");
    runtime().block_on(async {
        let listener = UnixListener::bind(&path).expect("bind");
        let input = data.to_vec();
        let server = tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.write_all(&input).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        let opts = ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(5)),
            reconnect_window: Some(Duration::ZERO),
            ..ClientOptions::default()
        };
        let uri = format!("nbd+unix:///disk?socket={}", path.display());
        let run = async {
            let Ok(c) = NbdClient::connect_uri(&uri, opts).await else {
                return;
            };
            let size = c.size();
            if size >= 4096 {
                if let Ok(v) = c.read(0, 4096).await {
                    assert_eq!(v.len(), 4096, "read returned a short buffer");
                }
                let _ = c
                    .write(0, Bytes::from(vec![1u8; 512]), WriteFlags::default())
                    .await;
            }
            if size > 0
                && let Ok(ext) = c.block_status(0, size.min(1 << 20)).await
            {
                let mut at = 0;
                for e in &ext {
                    assert_eq!(e.offset, at, "extents not contiguous: {ext:?}");
                    assert!(e.length > 0, "empty extent: {ext:?}");
                    at = e.end();
                }
                assert!(at <= size.min(1 << 20), "extents past the range: {ext:?}");
            }
            let _ = c.flush().await;
        };
        tokio::time::timeout(HANG, run)
            .await
            .expect("client hung on a closed server");
        server.abort();
    });
    let _ = std::fs::remove_file(&path);
}
