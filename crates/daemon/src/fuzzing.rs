//! Body of the QMP fuzz target (`fuzz/fuzz_targets/qmp.rs`), kept in the
//! library so the committed corpus replays in the normal test run
//! (`tests/fuzz_corpus.rs`) without cargo-fuzz.
//!
//! The input is the byte stream a QMP client sends. It is framed by
//! [`crate::qmp::codec::decode`] exactly as the server frames it, and every
//! request whose command cannot touch the host (no `blockdev-add`, which
//! opens paths; no `nbd-server-start`, which binds sockets; no `quit`) runs
//! in a real [`crate::Core`] holding one in-memory node, `disk`. So the
//! fuzzer reaches each command's argument parsing and checks, and the job
//! and export tables, with hostile arguments. Checked: decoding always
//! makes progress within the buffer, and every reply is one JSON object per
//! line.

use std::sync::Arc;
use std::time::Duration;

use image::Image;
use image::storage::{MemStorage, Storage};
use serde_json::Value;

use crate::qmp::codec::{Decoded, decode, reply};

/// Commands the fuzzer must not run: they reach outside the process.
const HOST_COMMANDS: &[&str] = &["blockdev-add", "nbd-server-start", "quit"];

/// Generous bound for one input; longer is a hang.
const HANG: Duration = Duration::from_secs(20);

fn check_reply(bytes: &[u8]) {
    assert!(bytes.ends_with(b"\r\n"), "reply not CRLF-terminated");
    let v: Value = serde_json::from_slice(bytes).expect("reply is JSON");
    assert!(
        v.get("return").is_some() != v.get("error").is_some(),
        "reply has neither or both of return/error: {v}"
    );
}

/// Frames `data` as QMP requests and runs them (see the module doc).
pub fn fuzz_qmp(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let (core, handle) = crate::core::new("fuzz");
        let core = tokio::spawn(core.run());
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes("fuzz-disk", vec![0; 1 << 20]));
        let raw = image::raw::Raw::open(s, true).expect("raw over memory");
        handle
            .add_image_node("disk", Arc::new(Image::new(Arc::new(raw), None)))
            .await
            .expect("add node");
        let run = async {
            let mut buf = data;
            // Bounded: every turn consumes at least one byte or stops.
            loop {
                let used = match decode(buf) {
                    Decoded::Incomplete => break,
                    Decoded::Request(r, used) => {
                        if !HOST_COMMANDS.contains(&r.execute.as_str()) {
                            let res = handle.execute(&r.execute, r.arguments).await;
                            check_reply(&reply(&res, r.id.as_ref()));
                        }
                        used
                    }
                    Decoded::BadRequest(e, id, used) => {
                        check_reply(&reply(&Err(e), id.as_ref()));
                        used
                    }
                    Decoded::Invalid(e, used) => {
                        check_reply(&reply(&Err(e), None));
                        used
                    }
                };
                assert!(
                    used > 0 && used <= buf.len(),
                    "decode used {used} of {}",
                    buf.len()
                );
                buf = &buf[used..];
            }
            handle.shutdown().await;
        };
        tokio::time::timeout(HANG, run)
            .await
            .expect("QMP commands hung");
        tokio::time::timeout(HANG, core)
            .await
            .expect("core did not stop")
            .expect("core panicked");
    });
}
