//! The NBD client: an export seen as a [`BlockDevice`], with pipelining and
//! reconnect.
//!
//! One connection carries many requests at once: callers register a cookie
//! in the pending table and hand the encoded request to the one writer task;
//! one reader task decodes replies and completes callers by cookie, so
//! replies may come back in any order. A supervisor task owns the connection
//! lifecycle: when the connection drops, or a request gets no answer within
//! `request_timeout` (a hung peer), it reconnects with exponential backoff.
//! Requests that were in flight are retried on the new connection when that
//! is safe (everything but FLUSH, whose meaning does not survive a server
//! restart); requests wait for the connection for at most
//! `reconnect_window` after the outage began and then fail with an error
//! naming the export and the cause. A reconnected export must have the same
//! size, otherwise the client fails for good (a different base is never
//! mixed in).
//!
//! Block status: an NBD export here is a raw device with no layer below it,
//! so a `HOLE|ZERO` range is [`ExtentKind::Zero`] at depth 0 (it reads as
//! zeros and a stream skips it), exactly as the raw driver reports a sparse
//! file's holes and as qemu-img map shows an NBD hole. A range that is a
//! hole but not known to read as zeros is data: it must be copied.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use image::identity::{self, BackingIdentity};
use image::open::{OpenOptions, Opener};
use image::{BlockDevice, DeviceInfo, Error, Extent, ExtentKind, Result, WriteFlags};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::codec::*;
use crate::conn::{FrameError, FrameReader};

/// Where an export lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

/// A parsed QEMU-style NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub address: Address,
    pub export: String,
}

/// Default NBD port (IANA).
pub const DEFAULT_PORT: u16 = 10809;

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8 once decoded"))
}

impl Target {
    /// Whether `name` is an NBD URI this module handles.
    pub fn is_nbd_uri(name: &str) -> bool {
        ["nbd://", "nbd+tcp://", "nbd+unix://"]
            .iter()
            .any(|p| name.starts_with(p))
    }

    /// Parses `nbd://host[:port]/export`, `nbd+tcp://...` and
    /// `nbd+unix:///export?socket=PATH`, as QEMU does.
    pub fn parse(uri: &str) -> std::result::Result<Self, String> {
        let bad = |m: &str| format!("invalid NBD URI '{uri}': {m}");
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).map_err(|m| bad(&m))?;
        let mut socket = None;
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("socket", v)) => socket = Some(percent_decode(v).map_err(|m| bad(&m))?),
                _ => return Err(bad(&format!("unknown query parameter '{kv}'"))),
            }
        }
        let address = match scheme {
            "nbd" | "nbd+tcp" => {
                if socket.is_some() {
                    return Err(bad("socket= is only for nbd+unix://"));
                }
                let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                    let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
                    (h.to_string(), after.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h.to_string(), Some(p)),
                        None => (authority.to_string(), None),
                    }
                };
                if host.is_empty() {
                    return Err(bad("no host"));
                }
                let port = match port {
                    None => DEFAULT_PORT,
                    Some(p) => p.parse().map_err(|_| bad(&format!("bad port '{p}'")))?,
                };
                Address::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad("nbd+unix:// takes no host"));
                }
                let path = socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
                Address::Unix { path: path.into() }
            }
            other => return Err(bad(&format!("unknown scheme '{other}'"))),
        };
        Ok(Target { address, export })
    }

    /// The URI form, for messages.
    pub fn uri(&self) -> String {
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp { host, port } => format!("nbd://{host}:{port}/{}", self.export),
            Address::Unix { path } => {
                format!("nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Limit for connecting and negotiating, on every (re)connect.
    pub connect_timeout: Duration,
    /// A request with no reply after this long means the peer hangs: the
    /// connection is dropped and re-established. `None` waits forever.
    pub request_timeout: Option<Duration>,
    /// How long requests wait for a lost connection to come back, from the
    /// start of the outage (QEMU's `reconnect-delay`); `None` = forever,
    /// zero = fail at once.
    pub reconnect_window: Option<Duration>,
    /// First and largest pause between reconnect attempts.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Require TLS (`STARTTLS`) with these settings; `None` = plaintext.
    pub tls: Option<crate::tls::ClientTls>,
    /// Connections to open when the server advertises `CAN_MULTI_CONN`
    /// (one otherwise). The extra ones connect in the background, so a
    /// server that accepts fewer clients never delays the open.
    pub connections: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(30)),
            reconnect_window: Some(Duration::from_secs(60)),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            tls: None,
            connections: 4,
        }
    }
}

/// What negotiation found out about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// Context id of `base:allocation`, when the server has it.
    pub base_ctx: Option<u32>,
    pub min_block: u32,
    pub max_payload: u32,
}

impl ExportInfo {
    fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
}

/// Largest payload we send or accept when the server does not say (the
/// spec's default maximum for clients is 32 MiB).
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Largest minimum block size a server may advertise (the NBD spec's
/// limit for `NBD_INFO_BLOCK_SIZE`).
const MAX_MIN_BLOCK: u32 = 64 << 10;

/// Requests retried at most this many times across reconnects.
const MAX_ATTEMPTS: u32 = 16;

type Stream = (crate::tls::BoxRead, crate::tls::BoxWrite);

/// TCP keepalive on client connections: idle this long before the first
/// probe, then a probe every [`KEEPALIVE_INTERVAL`], the connection declared
/// dead after [`KEEPALIVE_PROBES`] unanswered ones. Request timeouts catch a
/// peer that stops answering requests; keepalive catches one whose host
/// vanished (no FIN, no RST) while no request was outstanding, so the
/// reconnect starts before the next guest read has to wait for it.
const KEEPALIVE_IDLE_SECS: libc::c_int = 30;
const KEEPALIVE_INTERVAL: libc::c_int = 10;
const KEEPALIVE_PROBES: libc::c_int = 3;

fn enable_keepalive(s: &TcpStream) -> io::Result<()> {
    use crate::sockopt::set;
    set(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(
        s,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        KEEPALIVE_IDLE_SECS,
    )?;
    set(
        s,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        KEEPALIVE_INTERVAL,
    )?;
    set(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES)
}

async fn dial(addr: &Address) -> io::Result<Stream> {
    Ok(match addr {
        Address::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            enable_keepalive(&s)?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        Address::Unix { path } => {
            let (r, w) = UnixStream::connect(path).await?.into_split();
            (Box::new(r), Box::new(w))
        }
    })
}

/// Why negotiation failed.
#[derive(Debug, thiserror::Error)]
enum NegoError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("server closed the connection during the handshake")]
    Closed,
    #[error("{0}")]
    Refused(String),
}

async fn next_opt_reply(
    rd: &mut FrameReader<Box<dyn AsyncRead + Send + Unpin>>,
) -> std::result::Result<OptionReply, NegoError> {
    match rd.next(decode_option_reply).await? {
        Some((r, _)) => Ok(r),
        None => Err(NegoError::Closed),
    }
}

async fn send_opt(
    wr: &mut Box<dyn AsyncWrite + Send + Unpin>,
    opt: &Opt,
) -> std::result::Result<(), NegoError> {
    let mut b = Vec::new();
    encode_opt(opt, &mut b);
    wr.write_all(&b).await?;
    wr.flush().await?;
    Ok(())
}

struct Negotiated {
    rd: FrameReader<Box<dyn AsyncRead + Send + Unpin>>,
    wr: Box<dyn AsyncWrite + Send + Unpin>,
    info: ExportInfo,
}

/// Connects and negotiates: fixed newstyle, structured replies,
/// `base:allocation`, then `GO` (falling back to `EXPORT_NAME`).
async fn negotiate(
    target: &Target,
    tls: Option<&crate::tls::ClientTls>,
) -> std::result::Result<Negotiated, NegoError> {
    let (rd, mut wr) = dial(&target.address).await?;
    let mut rd = FrameReader::new(rd);
    let Some((sflags, _)) = rd.next(decode_greeting).await? else {
        return Err(NegoError::Closed);
    };
    let no_zeroes = sflags & FLAG_NO_ZEROES != 0;
    let mut b = Vec::new();
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    encode_client_flags(cflags, &mut b);
    wr.write_all(&b).await?;

    if let Some(tls) = tls {
        send_opt(&mut wr, &Opt::StartTls).await?;
        match next_opt_reply(&mut rd).await?.reply {
            OptReply::Ack => {}
            OptReply::Error { code, message } => {
                return Err(NegoError::Refused(format!(
                    "server refused STARTTLS (reply {code:#x}): {message}"
                )));
            }
            other => {
                return Err(NegoError::Refused(format!(
                    "unexpected reply to STARTTLS: {other:?}"
                )));
            }
        }
        if rd.buffered() > 0 {
            return Err(NegoError::Refused(
                "server sent data after accepting STARTTLS".into(),
            ));
        }
        let name = match (&tls.server_name, &target.address) {
            (n, _) if !n.is_empty() => n.as_str(),
            (_, Address::Tcp { host, .. }) => host.as_str(),
            // A Unix socket has no host name: QEMU's default for
            // tls-hostname there is "localhost" too.
            (_, Address::Unix { .. }) => "localhost",
        };
        let (r, w) = crate::tls::connect(tls, name, rd.into_inner(), wr)
            .await
            .map_err(|e| NegoError::Refused(format!("TLS handshake: {e}")))?;
        rd = FrameReader::new(r);
        wr = w;
    }

    send_opt(&mut wr, &Opt::StructuredReply).await?;
    let structured = matches!(next_opt_reply(&mut rd).await?.reply, OptReply::Ack);

    let mut base_ctx = None;
    if structured {
        send_opt(
            &mut wr,
            &Opt::SetMetaContext {
                export: target.export.clone(),
                queries: vec![CONTEXT_BASE_ALLOCATION.into()],
            },
        )
        .await?;
        loop {
            match next_opt_reply(&mut rd).await?.reply {
                OptReply::MetaContext { id, name } if name == CONTEXT_BASE_ALLOCATION => {
                    base_ctx = Some(id)
                }
                OptReply::MetaContext { .. } => {}
                _ => break, // ACK or an error: no context
            }
        }
    }

    send_opt(
        &mut wr,
        &Opt::Go {
            name: target.export.clone(),
            requests: vec![INFO_BLOCK_SIZE],
        },
    )
    .await?;
    let (mut export, mut min_block, mut max_payload) = (None, 1, DEFAULT_MAX_PAYLOAD);
    loop {
        match next_opt_reply(&mut rd).await?.reply {
            OptReply::Info(InfoItem::Export { size, flags }) => export = Some((size, flags)),
            OptReply::Info(InfoItem::BlockSize { min, max, .. }) => {
                // The spec's limits: a power of two of at most 64 KiB. A
                // larger one used to make the clamp below panic (found by
                // the nbd_client fuzz target).
                if min > MAX_MIN_BLOCK || !min.max(1).is_power_of_two() {
                    return Err(NegoError::Refused(format!(
                        "server advertises minimum block size {min}: must be a power of two \
                         of at most {MAX_MIN_BLOCK}"
                    )));
                }
                min_block = min.max(1);
                max_payload = max.clamp(min_block, DEFAULT_MAX_PAYLOAD);
            }
            OptReply::Info(_) | OptReply::Unknown(_) | OptReply::Server { .. } => {}
            OptReply::MetaContext { .. } => {}
            OptReply::Ack => break,
            OptReply::Error { code, .. } if code == REP_ERR_UNSUP => {
                // An old server without GO: EXPORT_NAME has no error path.
                send_opt(&mut wr, &Opt::ExportName(target.export.clone())).await?;
                let Some(((size, flags), _)) =
                    rd.next(|b| decode_export_name_reply(b, no_zeroes)).await?
                else {
                    return Err(NegoError::Refused(format!(
                        "server has no export '{}'",
                        target.export
                    )));
                };
                export = Some((size, flags));
                break;
            }
            OptReply::Error { code, message } if code == REP_ERR_TLS_REQD => {
                return Err(NegoError::Refused(format!(
                    "server requires TLS (configure the client with TLS): {message}"
                )));
            }
            OptReply::Error { code, message } => {
                return Err(NegoError::Refused(format!(
                    "server refused export '{}' (reply {code:#x}): {message}",
                    target.export
                )));
            }
        }
    }
    let Some((size, flags)) = export else {
        return Err(NegoError::Refused(
            "server acknowledged GO without NBD_INFO_EXPORT".into(),
        ));
    };
    Ok(Negotiated {
        rd,
        wr,
        info: ExportInfo {
            size,
            flags,
            structured,
            base_ctx,
            min_block,
            max_payload,
        },
    })
}

// ---- one connection ---------------------------------------------------------

/// What a request got back.
#[derive(Debug, Default)]
struct Answer {
    data: Vec<u8>,
    descriptors: Vec<Descriptor>,
    error: Option<(u32, String)>,
}

/// Why a request did not get an answer on its connection.
#[derive(Debug, Clone)]
struct Lost(String);

struct Pending {
    done: oneshot::Sender<std::result::Result<Answer, Lost>>,
    offset: u64,
    read_len: u32,
    answer: Answer,
}

struct Conn {
    info: ExportInfo,
    tx: mpsc::UnboundedSender<(Vec<u8>, Option<Bytes>)>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_cookie: AtomicU64,
    dead: AtomicBool,
    reason: Mutex<Option<String>>,
    died: tokio::sync::Notify,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("info", &self.info).finish()
    }
}

impl Conn {
    fn start(n: Negotiated) -> Arc<Conn> {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            info: n.info,
            tx,
            pending: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            reason: Mutex::new(None),
            died: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
        });
        let w = tokio::spawn(writer(n.wr, rx, Arc::downgrade(&conn)));
        let r = tokio::spawn(reader(n.rd, Arc::downgrade(&conn)));
        conn.tasks
            .lock()
            .expect("lock")
            .extend([w.abort_handle(), r.abort_handle()]);
        conn
    }

    /// Marks the connection dead, fails every pending request with `why`
    /// and stops its tasks. Idempotent.
    fn kill(&self, why: String) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        *self.reason.lock().expect("lock") = Some(why.clone());
        for t in self.tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
        let pending: Vec<Pending> = self
            .pending
            .lock()
            .expect("lock")
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in pending {
            let _ = p.done.send(Err(Lost(why.clone())));
        }
        self.died.notify_waiters();
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    async fn wait_dead(&self) {
        loop {
            let n = self.died.notified();
            if self.is_dead() {
                return;
            }
            n.await;
        }
    }

    async fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: Option<Bytes>,
        timeout: Option<Duration>,
    ) -> std::result::Result<Answer, Lost> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        let read_len = if command == Command::Read { length } else { 0 };
        {
            let mut p = self.pending.lock().expect("lock");
            if self.is_dead() {
                return Err(Lost(self.reason()));
            }
            p.insert(
                cookie,
                Pending {
                    done,
                    offset,
                    read_len,
                    answer: Answer {
                        data: if read_len > 0 {
                            vec![0; read_len as usize]
                        } else {
                            Vec::new()
                        },
                        ..Answer::default()
                    },
                },
            );
        }
        let mut head = Vec::with_capacity(REQUEST_HEADER_LEN);
        encode_request(
            &Request {
                flags,
                command,
                cookie,
                offset,
                length,
            },
            &mut head,
        );
        if self.tx.send((head, data)).is_err() {
            self.kill("connection writer stopped".into());
        }
        let answer = match timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(r) => r,
                Err(_) => {
                    let why = format!("no reply to {command} within {t:?}: server hangs");
                    self.kill(why.clone());
                    return Err(Lost(why));
                }
            },
            None => rx.await,
        };
        match answer {
            Ok(r) => r,
            Err(_) => Err(Lost(self.reason())),
        }
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .expect("lock")
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    }

    /// Applies one reply frame to its pending request.
    fn on_reply(&self, reply: Reply) -> std::result::Result<(), String> {
        let mut table = self.pending.lock().expect("lock");
        let (cookie, finished) = match reply {
            Reply::Simple {
                cookie,
                error,
                data,
            } => {
                let p = table
                    .get_mut(&cookie)
                    .ok_or_else(|| format!("reply for unknown cookie {cookie:#x}"))?;
                if error != 0 {
                    p.answer.error = Some((error, String::new()));
                } else if p.read_len > 0 {
                    p.answer.data = data;
                }
                (cookie, true)
            }
            Reply::Chunk {
                cookie,
                done,
                chunk,
            } => {
                let p = table
                    .get_mut(&cookie)
                    .ok_or_else(|| format!("chunk for unknown cookie {cookie:#x}"))?;
                let (start, len) = (p.offset, p.read_len as u64);
                let place = |off: u64, n: u64| -> std::result::Result<usize, String> {
                    // checked: a hostile offset near u64::MAX must not wrap
                    // around into the buffer (found by the nbd_client fuzz
                    // target).
                    if off < start || off.checked_add(n).is_none_or(|e| e > start + len) {
                        return Err(format!(
                            "chunk at {off}+{n} outside the request {start}+{len}"
                        ));
                    }
                    Ok((off - start) as usize)
                };
                match chunk {
                    Chunk::None => {}
                    Chunk::OffsetData { offset, data } => {
                        let at = place(offset, data.len() as u64)?;
                        p.answer.data[at..at + data.len()].copy_from_slice(&data);
                    }
                    Chunk::OffsetHole { offset, length } => {
                        let at = place(offset, length as u64)?;
                        p.answer.data[at..at + length as usize].fill(0);
                    }
                    Chunk::BlockStatus {
                        context,
                        descriptors,
                    } => {
                        if Some(context) == self.info.base_ctx {
                            p.answer.descriptors = descriptors;
                        }
                    }
                    Chunk::Error { error, message } | Chunk::ErrorOffset { error, message, .. } => {
                        p.answer.error.get_or_insert((error, message));
                    }
                    Chunk::Unknown { kind, .. } => {
                        return Err(format!("unknown structured reply type {kind}"));
                    }
                }
                (cookie, done)
            }
        };
        if finished && let Some(p) = table.remove(&cookie) {
            let _ = p.done.send(Ok(p.answer));
        }
        Ok(())
    }
}

async fn writer(
    wr: Box<dyn AsyncWrite + Send + Unpin>,
    mut rx: mpsc::UnboundedReceiver<(Vec<u8>, Option<Bytes>)>,
    conn: Weak<Conn>,
) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let r: io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some((head, data)) = next {
                w.write_all(&head).await?;
                if let Some(d) = data {
                    w.write_all(&d).await?;
                }
                next = rx.try_recv().ok();
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if let (Err(e), Some(c)) = (r, conn.upgrade()) {
        c.kill(format!("sending to the server: {e}"));
    }
}

async fn reader(mut rd: FrameReader<Box<dyn AsyncRead + Send + Unpin>>, conn: Weak<Conn>) {
    let why = loop {
        let Some(c) = conn.upgrade() else { return };
        let max = c.info.max_payload;
        drop(c);
        let frame = rd
            .next(|b| {
                decode_reply(b, max, |cookie| {
                    let c = conn.upgrade()?;
                    let t = c.pending.lock().expect("lock");
                    t.get(&cookie).map(|p| p.read_len)
                })
            })
            .await;
        let Some(c) = conn.upgrade() else { return };
        match frame {
            Ok(Some((reply, _))) => {
                if let Err(e) = c.on_reply(reply) {
                    break format!("protocol error from the server: {e}");
                }
            }
            Ok(None) => break "server closed the connection".to_string(),
            Err(e) => break format!("reading from the server: {e}"),
        }
    };
    if let Some(c) = conn.upgrade() {
        c.kill(why);
    }
}

// ---- the device ---------------------------------------------------------------

#[derive(Debug, Clone)]
enum State {
    Up(Arc<Conn>),
    /// Reconnecting since `since`; `expired` once the window has passed.
    Down {
        since: Instant,
        expired: bool,
        error: String,
    },
    /// For good: the client was closed or the export changed.
    Failed(String),
}

#[derive(Debug)]
struct Shared {
    target: Target,
    uri: String,
    opts: ClientOptions,
    state: watch::Sender<State>,
    size: u64,
    closed: AtomicBool,
    /// The identity the overlay recorded for this export, checked after
    /// every reconnect before the new connection serves a request.
    /// The identity pinned by [`NbdClient::pin_identity`], shared by every
    /// connection of a client: each checks it after a reconnect.
    expect: Arc<Mutex<Option<BackingIdentity>>>,
}

/// One connection and its supervisor (which reconnects it).
#[derive(Debug)]
struct Lane {
    shared: Arc<Shared>,
    supervisor: AbortHandle,
}

impl Lane {
    fn start(
        target: Target,
        uri: String,
        opts: ClientOptions,
        conn: Arc<Conn>,
        size: u64,
        expect: Arc<Mutex<Option<BackingIdentity>>>,
    ) -> Lane {
        let (state, _) = watch::channel(State::Up(Arc::clone(&conn)));
        let shared = Arc::new(Shared {
            target,
            uri,
            opts,
            state,
            size,
            closed: AtomicBool::new(false),
            expect,
        });
        let supervisor = tokio::spawn(supervise(Arc::downgrade(&shared), conn)).abort_handle();
        Lane { shared, supervisor }
    }

    /// The live connection, if the lane has one right now.
    fn live(&self) -> Option<Arc<Conn>> {
        match &*self.shared.state.borrow() {
            State::Up(c) if !c.is_dead() => Some(Arc::clone(c)),
            _ => None,
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.supervisor.abort();
        // A polite goodbye: DISC, then the writer shuts the stream down
        // (a TLS close_notify) once the connection object is gone.
        if let Some(c) = self.live() {
            let mut head = Vec::with_capacity(REQUEST_HEADER_LEN);
            encode_request(
                &Request {
                    flags: 0,
                    command: Command::Disc,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                },
                &mut head,
            );
            let _ = c.tx.send((head, None));
        }
    }
}

/// An NBD export as a [`BlockDevice`].
///
/// The first connection decides everything (its outage state is what
/// requests wait on and fail with); when the server advertises
/// `CAN_MULTI_CONN`, up to `connections - 1` more connect in the background
/// and requests are spread over whichever are up, round robin. Multi-conn
/// makes that safe: a flush on any connection covers the writes completed
/// on all of them.
#[derive(Debug)]
pub struct NbdClient {
    info: ExportInfo,
    first: Lane,
    extra: Arc<Mutex<Vec<Lane>>>,
    next: AtomicU64,
    dialer: Option<AbortHandle>,
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Some(d) = &self.dialer {
            d.abort();
        }
    }
}

impl NbdClient {
    /// Connects to a URI (`nbd://`, `nbd+unix://`).
    pub async fn connect_uri(uri: &str, opts: ClientOptions) -> Result<Self> {
        let target = Target::parse(uri).map_err(Error::InvalidInput)?;
        Self::connect(target, opts).await
    }

    pub async fn connect(target: Target, opts: ClientOptions) -> Result<Self> {
        let uri = target.uri();
        let n = tokio::time::timeout(opts.connect_timeout, negotiate(&target, opts.tls.as_ref()))
            .await
            .map_err(|_| {
                Error::Remote(format!(
                    "{uri}: no NBD handshake within {:?}",
                    opts.connect_timeout
                ))
            })?
            .map_err(|e| Error::Remote(format!("{uri}: {e}")))?;
        let info = n.info;
        let expect = Arc::new(Mutex::new(None));
        let first = Lane::start(
            target.clone(),
            uri.clone(),
            opts.clone(),
            Conn::start(n),
            info.size,
            Arc::clone(&expect),
        );
        let extra = Arc::new(Mutex::new(Vec::new()));
        let wanted = opts.connections.saturating_sub(1);
        let dialer = (info.has(TFLAG_CAN_MULTI_CONN) && wanted > 0).then(|| {
            tokio::spawn(dial_extra(
                Arc::downgrade(&extra),
                target,
                uri,
                opts,
                info,
                wanted,
                expect,
            ))
            .abort_handle()
        });
        Ok(NbdClient {
            info,
            first,
            extra,
            next: AtomicU64::new(0),
            dialer,
        })
    }

    /// Connections up right now (1 while only the first one is).
    pub fn connections(&self) -> usize {
        1 + self.extra.lock().expect("lanes lock").len()
    }

    /// What the export is now: its size, its transmission flags and the
    /// checksum of the fixed sample ranges of its data.
    pub async fn identity(&self) -> Result<BackingIdentity> {
        Ok(BackingIdentity {
            size: self.info.size,
            nbd_flags: Some(self.info.flags),
            sample: Some(identity::sample_checksum(self).await?),
            ..BackingIdentity::default()
        })
    }

    /// Checks the export against the identity an overlay recorded for it,
    /// now and after every reconnect; a changed export fails for good.
    pub async fn pin_identity(&self, expected: BackingIdentity) -> Result<()> {
        let now = self.identity().await?;
        expected.check(&self.first.shared.uri, &now)?;
        *self.first.shared.expect.lock().expect("lock") = Some(expected);
        Ok(())
    }

    /// What the first negotiation found.
    pub fn export_info(&self) -> ExportInfo {
        self.info
    }

    pub fn uri(&self) -> &str {
        &self.first.shared.uri
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        matches!(&*self.first.shared.state.borrow(), State::Up(c) if !c.is_dead())
    }

    /// A live connection: the next one round robin when several are up,
    /// else waits for the first one within the reconnect window.
    async fn conn(&self) -> Result<Arc<Conn>> {
        {
            let extra = self.extra.lock().expect("lanes lock");
            if !extra.is_empty() {
                let n = extra.len() + 1;
                let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
                for k in 0..n {
                    let lane = match (i + k) % n {
                        0 => &self.first,
                        j => &extra[j - 1],
                    };
                    if let Some(c) = lane.live() {
                        return Ok(c);
                    }
                }
            }
        }
        let mut rx = self.first.shared.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                State::Up(c) if !c.is_dead() => return Ok(c),
                State::Up(_) => {}
                State::Down {
                    expired: true,
                    error,
                    since,
                } => {
                    return Err(Error::Unavailable(format!(
                        "{}: server unreachable for {:.1?} (reconnect window {}): {error}",
                        self.first.shared.uri,
                        since.elapsed(),
                        window_text(self.first.shared.opts.reconnect_window),
                    )));
                }
                State::Down { .. } => {}
                State::Failed(e) => {
                    return Err(Error::Remote(format!("{}: {e}", self.first.shared.uri)));
                }
            }
            if rx.changed().await.is_err() {
                return Err(Error::Remote(format!(
                    "{}: client closed",
                    self.first.shared.uri
                )));
            }
        }
    }

    /// Sends one request, retrying it on a new connection when `retry`.
    async fn request(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: Option<Bytes>,
        retry: bool,
    ) -> Result<Answer> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let conn = self.conn().await?;
            let t = self.first.shared.opts.request_timeout;
            match conn
                .call(command, flags, offset, length, data.clone(), t)
                .await
            {
                Ok(a) => match a.error {
                    None => return Ok(a),
                    Some((errno, msg)) => {
                        return Err(self.server_error(command, offset, length, errno, &msg));
                    }
                },
                Err(Lost(why)) if retry && attempt < MAX_ATTEMPTS => {
                    let _ = why;
                    continue;
                }
                Err(Lost(why)) => {
                    return Err(Error::Unavailable(format!(
                        "{}: {command} at offset {offset} length {length}: connection lost \
                         ({why}){}",
                        self.first.shared.uri,
                        if retry {
                            "; retries exhausted"
                        } else {
                            "; not retried"
                        }
                    )));
                }
            }
        }
    }

    fn server_error(&self, cmd: Command, offset: u64, len: u32, errno: u32, msg: &str) -> Error {
        let text = format!(
            "{}: {cmd} at offset {offset} length {len}: server replied {}{}{msg}",
            self.first.shared.uri,
            errno_name(errno),
            if msg.is_empty() { "" } else { ": " }
        );
        match errno {
            EPERM => Error::ReadOnly { name: text },
            EINVAL => Error::InvalidInput(text),
            ENOSPC => Error::io(
                self.first.shared.uri.clone(),
                "write",
                io::Error::new(io::ErrorKind::StorageFull, text),
            ),
            ENOTSUP => Error::Unsupported {
                path: self.first.shared.uri.clone().into(),
                format: "nbd",
                feature: text,
            },
            _ => Error::Remote(text),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.info.has(TFLAG_READ_ONLY) {
            return Err(Error::ReadOnly {
                name: self.first.shared.uri.clone(),
            });
        }
        Ok(())
    }

    /// Splits `[offset, offset+len)` into pieces the server accepts.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let max = self.info.max_payload as u64;
        let end = offset + len;
        (0..len.div_ceil(max)).map(move |i| {
            let o = offset + i * max;
            (o, (end - o).min(max) as u32)
        })
    }
}

fn window_text(w: Option<Duration>) -> String {
    match w {
        None => "unlimited".into(),
        Some(d) => format!("{d:?}"),
    }
}

/// Opens the extra connections of a multi-conn client, one after another;
/// one that fails, or sees a different export, is left out (the server may
/// take fewer clients than we asked for).
async fn dial_extra(
    lanes: Weak<Mutex<Vec<Lane>>>,
    target: Target,
    uri: String,
    opts: ClientOptions,
    info: ExportInfo,
    wanted: usize,
    expect: Arc<Mutex<Option<BackingIdentity>>>,
) {
    for _ in 0..wanted {
        let n =
            match tokio::time::timeout(opts.connect_timeout, negotiate(&target, opts.tls.as_ref()))
                .await
            {
                Ok(Ok(n)) if n.info.size == info.size && n.info.flags == info.flags => n,
                _ => return,
            };
        let conn = Conn::start(n);
        // A pinned identity holds for every connection, the late ones too.
        let pinned = expect.lock().expect("lock").clone();
        if let Some(e) = pinned {
            match verify_identity(&conn, &e, info.flags, info.size, &opts).await {
                Ok(now) if e.check(&uri, &now).is_ok() => {}
                _ => {
                    conn.kill("identity check of an extra connection failed".into());
                    return;
                }
            }
        }
        let lane = Lane::start(
            target.clone(),
            uri.clone(),
            opts.clone(),
            conn,
            info.size,
            Arc::clone(&expect),
        );
        let Some(lanes) = lanes.upgrade() else { return };
        lanes.lock().expect("lanes lock").push(lane);
    }
}

/// Owns the connection lifecycle: waits for the live connection to die,
/// then reconnects with backoff until it succeeds, the window passes (then
/// waiting requests fail, and attempts go on for later ones), or the export
/// turns out to be a different one.
async fn supervise(shared: Weak<Shared>, mut conn: Arc<Conn>) {
    loop {
        conn.wait_dead().await;
        let Some(s) = shared.upgrade() else { return };
        if s.closed.load(Ordering::SeqCst) {
            return;
        }
        let since = Instant::now();
        let mut error = conn.reason();
        let opts = s.opts.clone();
        let target = s.target.clone();
        let size = s.size;
        let expired_now = opts.reconnect_window == Some(Duration::ZERO);
        s.state.send_replace(State::Down {
            since,
            expired: expired_now,
            error: error.clone(),
        });
        drop(s);
        let mut backoff = opts.backoff_min;
        let mut expired = expired_now;
        loop {
            let attempt =
                tokio::time::timeout(opts.connect_timeout, negotiate(&target, opts.tls.as_ref()))
                    .await;
            let Some(s) = shared.upgrade() else { return };
            match attempt {
                Ok(Ok(n)) if n.info.size != size => {
                    s.state.send_replace(State::Failed(format!(
                        "export size changed from {size} to {} across a reconnect: refusing \
                         a different export",
                        n.info.size
                    )));
                    return;
                }
                Ok(Ok(n)) => {
                    let flags = n.info.flags;
                    let fresh = Conn::start(n);
                    let expect = s.expect.lock().expect("lock").clone();
                    let checked = match expect {
                        None => Ok(Ok(())),
                        Some(e) => verify_identity(&fresh, &e, flags, size, &opts)
                            .await
                            .map(|now| e.check(&s.uri, &now)),
                    };
                    match checked {
                        Ok(Ok(())) => {
                            conn = fresh;
                            s.state.send_replace(State::Up(Arc::clone(&conn)));
                            break;
                        }
                        Ok(Err(changed)) => {
                            fresh.kill("the export changed".into());
                            let msg = changed.to_string();
                            let msg = msg
                                .strip_prefix(&format!("{}: ", s.uri))
                                .unwrap_or(&msg)
                                .to_string();
                            s.state.send_replace(State::Failed(msg));
                            return;
                        }
                        Err(Lost(why)) => {
                            fresh.kill(why.clone());
                            error = why;
                        }
                    }
                }
                Ok(Err(e)) => error = e.to_string(),
                Err(_) => error = format!("no NBD handshake within {:?}", opts.connect_timeout),
            }
            let past = opts.reconnect_window.is_some_and(|w| since.elapsed() >= w);
            if past != expired || !past {
                expired = past;
                s.state.send_replace(State::Down {
                    since,
                    expired,
                    error: error.clone(),
                });
            }
            drop(s);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(opts.backoff_max);
        }
    }
}

/// The identity of the export behind a fresh connection, read through it
/// before it serves anything.
async fn verify_identity(
    conn: &Conn,
    expect: &BackingIdentity,
    flags: u16,
    size: u64,
    opts: &ClientOptions,
) -> std::result::Result<BackingIdentity, Lost> {
    let sample = match expect.sample {
        None => None,
        Some(_) => {
            let mut h = identity::SampleHasher::default();
            for (off, len) in identity::sample_ranges(size) {
                let a = conn
                    .call(
                        Command::Read,
                        0,
                        off,
                        len as u32,
                        None,
                        opts.request_timeout,
                    )
                    .await?;
                if let Some((errno, msg)) = a.error {
                    return Err(Lost(format!(
                        "reading the identity sample at {off}: server replied {}: {msg}",
                        errno_name(errno)
                    )));
                }
                h.update(&a.data);
            }
            Some(h.finish())
        }
    };
    Ok(BackingIdentity {
        size,
        nbd_flags: Some(flags),
        sample,
        ..BackingIdentity::default()
    })
}

#[async_trait]
impl BlockDevice for NbdClient {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.first.shared.uri.clone(),
            format: "nbd".into(),
            read_only: self.info.has(TFLAG_READ_ONLY),
            layers: 1,
            granularity: (self.info.min_block as u64).max(512),
            can_flush: self.info.has(TFLAG_SEND_FLUSH) && !self.info.has(TFLAG_READ_ONLY),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        image::device::check_range(self.info.size, offset, len as u64)?;
        if len as u64 <= self.info.max_payload as u64 {
            return Ok(self
                .request(Command::Read, 0, offset, len as u32, None, true)
                .await?
                .data);
        }
        let mut out = Vec::with_capacity(len);
        for (o, n) in self.pieces(offset, len as u64) {
            out.extend_from_slice(&self.request(Command::Read, 0, o, n, None, true).await?.data);
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.check_writable()?;
        image::device::check_range(self.info.size, offset, data.len() as u64)?;
        let native_fua = flags.fua && self.info.has(TFLAG_SEND_FUA);
        let f = if native_fua { CMD_FLAG_FUA } else { 0 };
        for (o, n) in self.pieces(offset, data.len() as u64) {
            let at = (o - offset) as usize;
            let piece = data.slice(at..at + n as usize);
            self.request(Command::Write, f, o, n, Some(piece), true)
                .await?;
        }
        if flags.fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        image::device::check_range(self.info.size, offset, len)?;
        if !self.info.has(TFLAG_SEND_WRITE_ZEROES) {
            for (o, n) in self.pieces(offset, len) {
                let zeros = Bytes::from(vec![0u8; n as usize]);
                self.write(o, zeros, WriteFlags::default()).await?;
            }
            return Ok(());
        }
        let f = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
        // WRITE_ZEROES has no payload: only the 32-bit length limits it.
        let step = u32::MAX as u64 & !0xfff;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(step) as u32;
            self.request(Command::WriteZeroes, f, pos, n, None, true)
                .await?;
            pos += n as u64;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        image::device::check_range(self.info.size, offset, len)?;
        if !self.info.has(TFLAG_SEND_TRIM) {
            return Ok(()); // a hint the server cannot take
        }
        let step = u32::MAX as u64 & !0xfff;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(step) as u32;
            self.request(Command::Trim, 0, pos, n, None, true).await?;
            pos += n as u64;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if !self.info.has(TFLAG_SEND_FLUSH) || self.info.has(TFLAG_READ_ONLY) {
            return Ok(());
        }
        // Not retried: a flush on a new connection says nothing about writes
        // the old one acknowledged (the server may have restarted).
        self.request(Command::Flush, 0, 0, 0, None, false)
            .await
            .map(|_| ())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        image::device::check_range(self.info.size, offset, len)?;
        let data = |offset, length| Extent {
            offset,
            length,
            kind: ExtentKind::Data,
            depth: Some(0),
            host_offset: None,
            compressed: false,
        };
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.info.base_ctx.is_none() {
            return Ok(vec![data(offset, len)]);
        }
        let n = len.min(u32::MAX as u64 & !0xfff).max(1) as u32;
        let a = self
            .request(Command::BlockStatus, 0, offset, n, None, true)
            .await?;
        let end = offset + n as u64;
        let mut out = Vec::new();
        let mut pos = offset;
        for d in &a.descriptors {
            if pos >= end {
                break;
            }
            if d.length == 0 {
                return Err(Error::Remote(format!(
                    "{}: block status at {pos}: zero-length extent",
                    self.first.shared.uri
                )));
            }
            let l = (d.length as u64).min(end - pos);
            let mut e = data(pos, l);
            if d.status & STATE_ZERO != 0 {
                e.kind = ExtentKind::Zero;
            }
            image::device::push_extent(&mut out, e);
            pos += l;
        }
        if out.is_empty() {
            return Err(Error::Remote(format!(
                "{}: block status at {offset}: server returned no extent",
                self.first.shared.uri
            )));
        }
        Ok(out)
    }
}

/// Opens `nbd://` and `nbd+unix://` backings for [`image::open()`]. NBD
/// exports are raw devices: a backing named with another format is refused
/// (diskstream does not run a format over a remote device).
#[derive(Clone, Debug, Default)]
pub struct NbdOpener {
    pub options: ClientOptions,
}

#[async_trait]
impl Opener for NbdOpener {
    async fn open_backing(
        &self,
        name: &str,
        format: Option<&str>,
        opts: &OpenOptions,
    ) -> Result<Option<Arc<dyn BlockDevice>>> {
        if !Target::is_nbd_uri(name) {
            return Ok(None);
        }
        match format {
            None | Some("raw") => {}
            Some(f) => {
                return Err(Error::Unsupported {
                    path: name.into(),
                    format: "nbd",
                    feature: format!("backing format '{f}' over NBD (only raw)"),
                });
            }
        }
        let c = NbdClient::connect_uri(name, self.options.clone()).await?;
        if let Some(expected) = &opts.expect_identity {
            c.pin_identity(expected.clone()).await?;
        }
        Ok(Some(Arc::new(c)))
    }

    /// Size, transmission flags and a checksum of a sample of the data.
    async fn identify(&self, name: &str, _format: Option<&str>) -> Result<Option<BackingIdentity>> {
        if !Target::is_nbd_uri(name) {
            return Ok(None);
        }
        let c = NbdClient::connect_uri(name, self.options.clone()).await?;
        c.identity().await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockopt(s: &TcpStream, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        crate::sockopt::get(s, level, name).unwrap()
    }

    #[tokio::test]
    async fn tcp_connections_have_keepalive() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        assert_eq!(sockopt(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        enable_keepalive(&s).unwrap();
        assert_eq!(sockopt(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        let idle = sockopt(&s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE);
        assert_eq!(idle, KEEPALIVE_IDLE_SECS);
        let intvl = sockopt(&s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL);
        assert_eq!(intvl, KEEPALIVE_INTERVAL);
        let cnt = sockopt(&s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT);
        assert_eq!(cnt, KEEPALIVE_PROBES);
    }

    #[test]
    fn parses_qemu_style_uris() {
        let t = Target::parse("nbd+unix:///?socket=/tmp/s.sock").unwrap();
        assert_eq!(
            t,
            Target {
                address: Address::Unix {
                    path: "/tmp/s.sock".into()
                },
                export: String::new()
            }
        );
        let t = Target::parse("nbd+unix:///vm%200?socket=/tmp/a%20b").unwrap();
        assert_eq!(t.export, "vm 0");
        assert_eq!(
            t.address,
            Address::Unix {
                path: "/tmp/a b".into()
            }
        );
        let t = Target::parse("nbd://127.0.0.1:1234/disk").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 1234
            }
        );
        assert_eq!(t.export, "disk");
        let t = Target::parse("nbd://example").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "example".into(),
                port: DEFAULT_PORT
            }
        );
        let t = Target::parse("nbd+tcp://[::1]:99/x").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        assert_eq!(t.uri(), "nbd://[::1]:99/x");
    }

    #[test]
    fn rejects_bad_uris_naming_the_problem() {
        for (uri, what) in [
            ("nbd+unix:///x", "socket"),
            ("nbd://host:notaport/x", "port"),
            ("nbd:///x", "host"),
            ("nbd://h/x?socket=/s", "socket"),
            ("nbd+unix://h/x?socket=/s", "host"),
            ("nbd+unix:///x?socket=/s&tls=1", "tls"),
            ("http://h/x", "scheme"),
        ] {
            let e = Target::parse(uri).unwrap_err();
            assert!(e.contains(what), "{uri}: {e}");
        }
    }
}
