//! The QMP server: accepts connections on a Unix socket and runs one
//! `Connection` task per client, mini-redis style: `run(listener,
//! shutdown)`, a broadcast that tells every connection to stop, and a wait
//! until every connection task has finished. A semaphore caps connections.
//!
//! A connection negotiates capabilities itself (QEMU's rules: only
//! `qmp_capabilities` before it, and not after), then hands each command to
//! the core and writes the reply; events are forwarded only once
//! negotiation is done, as QEMU does.

use std::future::Future;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast, mpsc};

use crate::core::Handle;
use crate::qmp::codec::{self, Decoded, Request};
use crate::qmp::{ErrorClass, QmpError};

/// Most clients connected at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest unparsed input kept for one client: a request bigger than this is
/// refused and the buffer dropped (QEMU's JSON parser limit is 64 MiB of
/// tokens; a block command is a few hundred bytes).
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Serves QMP on `listener` until `shutdown` resolves, then waits for every
/// connection to finish its current command.
pub async fn run(listener: UnixListener, handle: Handle, shutdown: impl Future<Output = ()>) {
    let (notify_shutdown, _) = broadcast::channel::<()>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let package = handle.package().to_string();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&limit).acquire_owned() => p.expect("semaphore never closed"),
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    eprintln!("diskstream daemon: accept: {e}");
                    continue;
                }
            },
        };
        let conn = Connection {
            stream,
            handle: handle.clone(),
            shutdown: notify_shutdown.subscribe(),
            negotiated: false,
            package: package.clone(),
            _done: done_tx.clone(),
        };
        tokio::spawn(async move {
            match conn.run().await {
                // A client that leaves while an event or reply is on its
                // way is not an error of the daemon.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ) => {}
                Err(e) => eprintln!("diskstream daemon: connection: {e}"),
                Ok(()) => {}
            }
            drop(permit);
        });
    }
    drop(listener);
    drop(notify_shutdown);
    drop(done_tx);
    // Every connection holds a sender: this returns when they are all gone.
    let _ = done_rx.recv().await;
}

/// One client.
#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    handle: Handle,
    shutdown: broadcast::Receiver<()>,
    negotiated: bool,
    package: String,
    /// Dropped when the connection ends; [`run`] waits for all of them.
    _done: mpsc::Sender<()>,
}

impl Connection {
    async fn run(mut self) -> std::io::Result<()> {
        let mut events = self.handle.subscribe();
        self.stream
            .write_all(&codec::greeting(&self.package))
            .await?;
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 8192];
        loop {
            tokio::select! {
                _ = self.shutdown.recv() => return Ok(()),
                ev = events.recv() => match ev {
                    Ok(ev) if self.negotiated => self.stream.write_all(&ev.encode()).await?,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                n = self.stream.read(&mut chunk) => {
                    let n = n?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    self.process(&mut buf).await?;
                    if buf.len() > MAX_REQUEST_BYTES {
                        buf.clear();
                        let e = QmpError::generic(format!(
                            "JSON parse error, request larger than {MAX_REQUEST_BYTES} bytes"
                        ));
                        self.stream.write_all(&codec::reply(&Err(e), None)).await?;
                    }
                }
            }
        }
    }

    /// Handles every complete message at the start of `buf`.
    async fn process(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        // Bounded: every turn consumes at least one byte or stops.
        loop {
            let (out, used) = match codec::decode(buf) {
                Decoded::Incomplete => return Ok(()),
                Decoded::Invalid(e, used) => (codec::reply(&Err(e), None), used),
                Decoded::BadRequest(e, id, used) => (codec::reply(&Err(e), id.as_ref()), used),
                Decoded::Request(req, used) => {
                    let r = self.execute(&req).await;
                    (codec::reply(&r, req.id.as_ref()), used)
                }
            };
            buf.drain(..used.max(1).min(buf.len()));
            self.stream.write_all(&out).await?;
        }
    }

    async fn execute(&mut self, req: &Request) -> Result<Value, QmpError> {
        if req.execute == "qmp_capabilities" {
            if self.negotiated {
                return Err(QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            let mut args = crate::qmp::args::Args::new(req.arguments.clone());
            if let Some(v) = args.opt_value("enable") {
                let Value::Array(caps) = v else {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'enable', expected: array",
                    ));
                };
                if let Some(c) = caps.first() {
                    let name = c.as_str().unwrap_or("?");
                    return Err(QmpError::generic(format!(
                        "Capability '{name}' not available"
                    )));
                }
            }
            args.finish()?;
            self.negotiated = true;
            return Ok(json!({}));
        }
        if !self.negotiated {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        self.handle
            .execute(&req.execute, req.arguments.clone())
            .await
    }
}
