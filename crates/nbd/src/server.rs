//! The NBD server: exports [`BlockDevice`]s over Unix sockets or TCP.
//!
//! Shaped like mini-redis: [`run`] accepts connections until `shutdown`
//! resolves (or, without `persistent`, until the last client has gone), each
//! connection negotiates (fixed newstyle, under a handshake timeout) and then
//! runs requests concurrently: the connection task only reads and validates
//! frames; every request is spawned as its own task whose reply goes through
//! a channel to the one writer task, so replies leave in completion order and
//! are never interleaved. Shutdown stops reading, lets in-flight requests
//! finish, flushes writable exports and only then closes.
//!
//! Hostile input never panics and never takes the server down: bad magic,
//! oversized options or writes close that one connection (the stream cannot
//! be resynchronised); unknown commands, bad flags, out-of-range requests
//! and writes to a read-only export get the spec's errno in a reply.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use image::{BlockDevice, Extent, ExtentKind, WriteFlags};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::codec::{self, *};
use crate::conn::{FrameError, FrameReader};

/// Largest READ/WRITE/CACHE payload (same as qemu's NBD_MAX_BUFFER_SIZE).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests one connection runs at once; more wait (qemu allows 16).
pub const MAX_IN_FLIGHT: usize = 64;
/// Default handshake limit (same as qemu-nbd's `--handshake-limit`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const CTX_BASE: u32 = 1;
const CTX_DEPTH: u32 = 2;

/// One export.
#[derive(Clone, Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device accepts them.
    pub read_only: bool,
    /// Advertise `CAN_MULTI_CONN`: true only when the server takes several
    /// connections to this export at once and, if it is writable, a flush
    /// on one connection covers writes completed on every other (one shared
    /// device object). A client offered it may open several connections
    /// and wait for all of them (nbdcopy does), so a server limited to one
    /// client must not offer it even for a read-only export.
    pub multi_conn: bool,
}

impl Export {
    fn writable(&self) -> bool {
        !self.read_only && !self.device.info().read_only
    }

    fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_DF | TFLAG_SEND_CACHE;
        if self.writable() {
            f |= TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_SEND_TRIM
                | TFLAG_SEND_WRITE_ZEROES
                | TFLAG_SEND_FAST_ZERO;
        } else {
            f |= TFLAG_READ_ONLY;
        }
        if self.multi_conn {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        f
    }
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub exports: Vec<Export>,
    /// Exports that change while the server runs (the daemon's QMP
    /// `block-export-add`/`-del`); when set, used instead of `exports`.
    /// Removing one stops new connections to it; connected clients keep it.
    pub shared_exports: Option<Arc<std::sync::RwLock<Vec<Export>>>>,
    /// Connections served at once; further clients wait in the backlog
    /// (qemu-nbd `--shared`).
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Keep running after the last client disconnects (qemu-nbd
    /// `--persistent`); otherwise [`run`] returns once a client has come and
    /// every client has gone.
    pub persistent: bool,
    /// Print connection errors to stderr.
    pub verbose: bool,
    /// When set, TLS is required: clients must `STARTTLS` first.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// When set, receives the moment the first connection was accepted
    /// (deploy's "time to ready" ends there).
    pub first_accept: Option<Arc<std::sync::OnceLock<std::time::Instant>>>,
}

impl ServerConfig {
    /// The exports as they are now.
    fn current_exports(&self) -> Vec<Export> {
        match &self.shared_exports {
            Some(t) => t.read().unwrap_or_else(|e| e.into_inner()).clone(),
            None => self.exports.clone(),
        }
    }

    pub fn new(exports: Vec<Export>) -> Self {
        ServerConfig {
            exports,
            shared_exports: None,
            max_connections: 100,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            persistent: true,
            verbose: false,
            tls: None,
            first_accept: None,
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

use crate::tls::{BoxRead, BoxWrite};

impl Listener {
    pub async fn bind_tcp(addr: &str) -> io::Result<Self> {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        Ok(Listener::Tcp(l))
    }

    /// Binds a Unix socket at `path`, replacing a stale socket file.
    pub fn bind_unix(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path)
            && m.file_type().is_socket()
        {
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path)
            .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", path.display())))?;
        Ok(Listener::Unix(l, path.to_owned()))
    }

    /// `host:port` or the socket path, for messages.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    async fn accept(&self) -> io::Result<(BoxRead, BoxWrite)> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                enlarge_send_buffer(&s);
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }
}

/// Send buffer asked for on accepted Unix connections. The default (208
/// KiB) is smaller than one 1 MiB read reply, which then goes out in ~5
/// partial writes with a poll between each; the kernel caps the request at
/// `net.core.wmem_max`. 1 MiB read at QD4 over a Unix socket (fio nbd,
/// qcow2, four interleaved rounds): ~1850 MiB/s with the default, ~2500
/// with 1 MiB (4 MiB no better). TCP sockets keep the kernel's
/// auto-tuning, which a fixed size would turn off.
const UNIX_SEND_BUFFER: libc::c_int = 1 << 20;

/// Best effort: a refusal leaves the default, which works, only slower.
fn enlarge_send_buffer(s: &tokio::net::UnixStream) {
    let _ = crate::sockopt::set(s, libc::SOL_SOCKET, libc::SO_SNDBUF, UNIX_SEND_BUFFER);
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Counts live connections and wakes the accept loop when it drops to zero.
#[derive(Debug, Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

/// Serves `config.exports` on `listener` until `shutdown` resolves (or,
/// without `persistent`, until the last client leaves), then lets every
/// connection finish its in-flight requests and returns.
pub async fn run(
    listener: Listener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let config = Arc::new(config);
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; recv() returns None when all are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let active = Arc::new(Active::default());
    let served = AtomicBool::new(false);
    tokio::pin!(shutdown);
    let idle = || async {
        if config.persistent || !served.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        loop {
            let notified = active.idle.notified();
            if active.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    };
    let mut result = Ok(());
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
            _ = idle() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
            _ = idle() => break,
        };
        let (rd, wr) = match accepted {
            Ok(s) => s,
            Err(e) if is_transient_accept_error(&e) => {
                if config.verbose {
                    eprintln!("nbd server: accept: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                result = Err(io::Error::new(
                    e.kind(),
                    format!("accept on {}: {e}", listener.describe()),
                ));
                break;
            }
        };
        if let Some(first) = &config.first_accept {
            let _ = first.set(std::time::Instant::now());
        }
        served.store(true, Ordering::SeqCst);
        active.count.fetch_add(1, Ordering::SeqCst);
        let (config, stop, done, active) = (
            Arc::clone(&config),
            stop_rx.clone(),
            done_tx.clone(),
            Arc::clone(&active),
        );
        tokio::spawn(async move {
            if let Err(e) = serve_connection(rd, wr, &config, stop).await
                && config.verbose
            {
                eprintln!("nbd server: connection: {e}");
            }
            drop(permit);
            if active.count.fetch_sub(1, Ordering::SeqCst) == 1 {
                active.idle.notify_waiters();
            }
            drop(done);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
    result
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("client asked for unknown export '{0}' with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client closed the connection during the handshake")]
    ClosedInHandshake,
    #[error("client sent NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")]
    TlsRequired,
    #[error("client sent data after STARTTLS before the TLS handshake")]
    DataAfterStartTls,
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What negotiation settled on.
struct Session {
    export: Export,
    structured: bool,
    base_ctx: bool,
    depth_ctx: bool,
}

async fn serve_connection(
    rd: BoxRead,
    wr: BoxWrite,
    config: &ServerConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let mut reader = FrameReader::new(rd);
    let mut wr = wr;
    let t = config.handshake_timeout;
    let nego = tokio::select! {
        r = tokio::time::timeout(t, negotiate(&mut reader, &mut wr, config)) => {
            r.map_err(|_| ConnError::HandshakeTimeout(t))??
        }
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    let Some(session) = nego else {
        return Ok(());
    };
    transmission(reader, wr, session, stop).await
}

// ---- handshake -----------------------------------------------------------

struct Negotiation {
    structured: bool,
    /// Contexts chosen by SET_META_CONTEXT, and the export they were set for.
    contexts: Option<(String, bool, bool)>,
}

async fn send(wr: &mut BoxWrite, bytes: &[u8]) -> io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

async fn reply(wr: &mut BoxWrite, option: u32, r: OptReply) -> io::Result<()> {
    let mut b = Vec::new();
    encode_option_reply(option, &r, &mut b);
    send(wr, &b).await
}

fn err(code: u32, message: impl Into<String>) -> OptReply {
    OptReply::Error {
        code,
        message: message.into(),
    }
}

async fn negotiate(
    reader: &mut FrameReader<BoxRead>,
    wr: &mut BoxWrite,
    config: &ServerConfig,
) -> Result<Option<Session>, ConnError> {
    let mut b = Vec::new();
    encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, &mut b);
    send(wr, &b).await?;
    let Some((cflags, _)) = reader.next(decode_client_flags).await? else {
        return Err(ConnError::ClosedInHandshake);
    };
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::ClientFlags(cflags));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut st = Negotiation {
        structured: false,
        contexts: None,
    };
    let find = |name: &str| {
        config
            .current_exports()
            .into_iter()
            .find(|e| e.name == name)
    };
    let mut tls_active = false;
    loop {
        let Some((raw, _)) = reader.next(decode_option).await? else {
            return Err(ConnError::ClosedInHandshake);
        };
        let code = raw.code;
        if let Some(tls) = config.tls.as_ref().filter(|_| !tls_active) {
            match code {
                OPT_STARTTLS if raw.data.is_empty() => {
                    reply(wr, code, OptReply::Ack).await?;
                    if reader.buffered() > 0 {
                        // Plaintext injected ahead of the TLS handshake.
                        return Err(ConnError::DataAfterStartTls);
                    }
                    let empty: BoxRead = Box::new(tokio::io::empty());
                    let old_rd = std::mem::replace(reader, FrameReader::new(empty));
                    let old_wr = std::mem::replace(wr, Box::new(tokio::io::sink()));
                    let (r, w) = crate::tls::accept(Arc::clone(tls), old_rd.into_inner(), old_wr)
                        .await
                        .map_err(ConnError::Tls)?;
                    *reader = FrameReader::new(r);
                    *wr = w;
                    tls_active = true;
                    continue;
                }
                OPT_ABORT => {
                    let _ = reply(wr, code, OptReply::Ack).await;
                    return Ok(None);
                }
                OPT_EXPORT_NAME => return Err(ConnError::TlsRequired),
                _ => {
                    reply(
                        wr,
                        code,
                        err(
                            REP_ERR_TLS_REQD,
                            "this server requires TLS (STARTTLS first)",
                        ),
                    )
                    .await?;
                    continue;
                }
            }
        }
        let opt = match codec::parse_option(&raw) {
            Ok(o) => o,
            Err(e) => {
                reply(wr, code, err(REP_ERR_INVALID, e.to_string())).await?;
                continue;
            }
        };
        match opt {
            Opt::ExportName(name) => {
                // No way to report an error here: the spec says close.
                let Some(export) = find(&name) else {
                    return Err(ConnError::UnknownExport(name));
                };
                let mut b = Vec::new();
                encode_export_name_reply(
                    export.device.size(),
                    export.transmission_flags(),
                    no_zeroes,
                    &mut b,
                );
                send(wr, &b).await?;
                return Ok(Some(st.session(export)));
            }
            Opt::Abort => {
                // The client may already have closed; an ACK is a courtesy.
                let _ = reply(wr, code, OptReply::Ack).await;
                return Ok(None);
            }
            Opt::List => {
                let mut b = Vec::new();
                for e in &config.current_exports() {
                    encode_option_reply(
                        code,
                        &OptReply::Server {
                            name: e.name.clone(),
                            description: e.description.clone(),
                        },
                        &mut b,
                    );
                }
                encode_option_reply(code, &OptReply::Ack, &mut b);
                send(wr, &b).await?;
            }
            Opt::StartTls => {
                let r = if tls_active {
                    err(REP_ERR_INVALID, "TLS is already active")
                } else {
                    err(REP_ERR_UNSUP, "TLS is not configured on this server")
                };
                reply(wr, code, r).await?
            }
            Opt::StructuredReply => {
                if st.structured {
                    reply(
                        wr,
                        code,
                        err(REP_ERR_INVALID, "structured replies already negotiated"),
                    )
                    .await?;
                } else {
                    st.structured = true;
                    reply(wr, code, OptReply::Ack).await?;
                }
            }
            Opt::Info { name, requests } | Opt::Go { name, requests } => {
                let Some(export) = find(&name) else {
                    reply(
                        wr,
                        code,
                        err(REP_ERR_UNKNOWN, format!("no export named '{name}'")),
                    )
                    .await?;
                    continue;
                };
                let mut b = Vec::new();
                let mut info = |item| encode_option_reply(code, &OptReply::Info(item), &mut b);
                info(InfoItem::Export {
                    size: export.device.size(),
                    flags: export.transmission_flags(),
                });
                if requests.contains(&INFO_NAME) {
                    info(InfoItem::Name(export.name.clone()));
                }
                if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    info(InfoItem::Description(export.description.clone()));
                }
                if requests.contains(&INFO_BLOCK_SIZE) {
                    info(InfoItem::BlockSize {
                        min: 1,
                        preferred: 4096,
                        max: MAX_PAYLOAD,
                    });
                }
                encode_option_reply(code, &OptReply::Ack, &mut b);
                send(wr, &b).await?;
                if code == OPT_GO {
                    return Ok(Some(st.session(export)));
                }
            }
            Opt::ListMetaContext { export, queries } | Opt::SetMetaContext { export, queries } => {
                let set = code == OPT_SET_META_CONTEXT;
                if !st.structured {
                    reply(
                        wr,
                        code,
                        err(
                            REP_ERR_INVALID,
                            "meta contexts need structured replies first",
                        ),
                    )
                    .await?;
                    continue;
                }
                if find(&export).is_none() {
                    reply(
                        wr,
                        code,
                        err(REP_ERR_UNKNOWN, format!("no export named '{export}'")),
                    )
                    .await?;
                    continue;
                }
                let (mut base, mut depth) =
                    (queries.is_empty() && !set, queries.is_empty() && !set);
                for q in &queries {
                    match q.as_str() {
                        CONTEXT_BASE_ALLOCATION | "base:" => base = true,
                        CONTEXT_ALLOCATION_DEPTH | "qemu:" => depth = true,
                        _ => {}
                    }
                }
                let mut b = Vec::new();
                for (on, id, name) in [
                    (base, CTX_BASE, CONTEXT_BASE_ALLOCATION),
                    (depth, CTX_DEPTH, CONTEXT_ALLOCATION_DEPTH),
                ] {
                    if on {
                        encode_option_reply(
                            code,
                            &OptReply::MetaContext {
                                id,
                                name: name.into(),
                            },
                            &mut b,
                        );
                    }
                }
                encode_option_reply(code, &OptReply::Ack, &mut b);
                send(wr, &b).await?;
                if set {
                    st.contexts = Some((export, base, depth));
                }
            }
            Opt::Unknown(c) => {
                reply(
                    wr,
                    c,
                    err(REP_ERR_UNSUP, format!("option {c} is not supported")),
                )
                .await?
            }
        }
    }
}

impl Negotiation {
    fn session(self, export: Export) -> Session {
        let (base_ctx, depth_ctx) = match self.contexts {
            Some((name, b, d)) if name == export.name && self.structured => (b, d),
            _ => (false, false),
        };
        Session {
            export,
            structured: self.structured,
            base_ctx,
            depth_ctx,
        }
    }
}

// ---- transmission ----------------------------------------------------------

/// A reply ready for the writer: header bytes and, for reads, the data.
struct Out {
    head: Vec<u8>,
    data: Option<Vec<u8>>,
}

async fn writer_task(wr: BoxWrite, mut rx: mpsc::UnboundedReceiver<Out>) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(out) = rx.recv().await {
        let mut next = Some(out);
        // Batch whatever is ready into as few syscalls as possible.
        while let Some(o) = next {
            w.write_all(&o.head).await?;
            if let Some(d) = &o.data {
                w.write_all(d).await?;
            }
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}

async fn transmission(
    mut reader: FrameReader<BoxRead>,
    wr: BoxWrite,
    session: Session,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer = tokio::spawn(writer_task(wr, rx));
    let session = Arc::new(session);
    let inflight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut result = Ok(());
    loop {
        let frame = tokio::select! {
            f = reader.next(|b| decode_request(b, MAX_PAYLOAD)) => f,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (req, bytes) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(FrameError::Invalid(Invalid::PayloadTooLarge { cookie, len, limit })) => {
                // Answer, then close: the payload cannot be skipped safely.
                let msg = format!("write of {len} bytes exceeds the maximum {limit}");
                let _ = tx.send(error_reply(&session, cookie, EINVAL, &msg));
                result = Err(ConnError::Frame(FrameError::Invalid(
                    Invalid::PayloadTooLarge { cookie, len, limit },
                )));
                break;
            }
            Err(e) => {
                result = Err(e.into());
                break;
            }
        };
        if req.command == Command::Disc {
            break;
        }
        let permit = Arc::clone(&inflight)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let (s, tx) = (Arc::clone(&session), tx.clone());
        let payload = bytes.slice(REQUEST_HEADER_LEN..);
        tokio::spawn(async move {
            let out = dispatch(&s, req, payload).await;
            let _ = tx.send(out);
            drop(permit);
        });
    }
    // Let every in-flight request finish, then make writes durable.
    let _all = inflight.acquire_many(MAX_IN_FLIGHT as u32).await;
    if session.export.writable()
        && let Err(e) = session.export.device.flush().await
    {
        eprintln!(
            "nbd server: flush of export '{}' at disconnect: {e}",
            session.export.name
        );
    }
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if result.is_ok() && e.kind() != io::ErrorKind::BrokenPipe => {
            result = Err(e.into())
        }
        _ => {}
    }
    result
}

fn simple(cookie: u64, error: u32) -> Out {
    let mut head = Vec::with_capacity(SIMPLE_REPLY_LEN);
    encode_simple_reply(cookie, error, &mut head);
    Out { head, data: None }
}

fn error_reply(s: &Session, cookie: u64, error: u32, message: &str) -> Out {
    if !s.structured {
        return simple(cookie, error);
    }
    let mut head = Vec::new();
    let message: String = message.chars().take(4096).collect();
    encode_chunk(cookie, true, &Chunk::Error { error, message }, &mut head);
    Out { head, data: None }
}

fn device_error(s: &Session, cookie: u64, e: &image::Error) -> Out {
    error_reply(s, cookie, wire_errno(e.errno()), &e.to_string())
}

/// The dispatcher: validates one request and runs its handler.
async fn dispatch(s: &Session, req: Request, payload: Bytes) -> Out {
    let cookie = req.cookie;
    match validate(s, &req) {
        Ok(()) => {}
        Err((errno, msg)) => return error_reply(s, cookie, errno, &msg),
    }
    let dev = &s.export.device;
    let (off, len) = (req.offset, req.length);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = |r: image::Result<()>| match r {
        Ok(()) => simple(cookie, 0),
        Err(e) => device_error(s, cookie, &e),
    };
    match req.command {
        Command::Read => match dev.read(off, len as usize).await {
            Ok(data) => read_reply(s, cookie, off, data),
            Err(e) => device_error(s, cookie, &e),
        },
        Command::Write => done(dev.write(off, payload, WriteFlags { fua }).await),
        Command::Flush => done(dev.flush().await),
        Command::Trim => done(with_fua(dev, fua, dev.discard(off, len as u64)).await),
        Command::WriteZeroes => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && no_hole {
                // Zeroing without unmapping writes every byte: not fast.
                return error_reply(
                    s,
                    cookie,
                    ENOTSUP,
                    "fast zero needs unmapping (NO_HOLE set)",
                );
            }
            done(with_fua(dev, fua, dev.write_zeroes(off, len as u64, !no_hole)).await)
        }
        Command::Cache => {
            // Prefetch: reading is how a device (or an overlay, by
            // copy-on-read) pulls the range in.
            done(dev.read(off, len as usize).await.map(|_| ()))
        }
        Command::BlockStatus => match dev.block_status(off, len as u64).await {
            Ok(extents) => block_status_reply(s, &req, &extents),
            Err(e) => device_error(s, cookie, &e),
        },
        Command::Disc | Command::Unknown(_) => error_reply(
            s,
            cookie,
            EINVAL,
            &format!("{} is not supported", req.command),
        ),
    }
}

async fn with_fua(
    dev: &Arc<dyn BlockDevice>,
    fua: bool,
    op: impl Future<Output = image::Result<()>>,
) -> image::Result<()> {
    op.await?;
    if fua { dev.flush().await } else { Ok(()) }
}

/// Checks a request against the export and the negotiated options; the
/// error is the errno and message to reply with.
fn validate(s: &Session, req: &Request) -> Result<(), (u32, String)> {
    let e = &s.export;
    let name = req.command;
    if req.flags & !CMD_FLAGS_KNOWN != 0 {
        return Err((EINVAL, format!("{name}: unknown flags {:#x}", req.flags)));
    }
    // A flag is valid only on the commands the spec documents it for (FUA
    // on all of them), as qemu-nbd checks: a client that sets DF on a
    // write, say, gets EINVAL rather than a success that means nothing.
    let valid = CMD_FLAG_FUA
        | match req.command {
            Command::Read if s.structured => CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if req.flags & !valid != 0 {
        return Err((
            EINVAL,
            format!("{name}: flags {:#x} do not apply to it", req.flags & !valid),
        ));
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    let ranged = writes
        || matches!(
            req.command,
            Command::Read | Command::Cache | Command::BlockStatus
        );
    if let Command::Unknown(c) = req.command {
        return Err((EINVAL, format!("unknown command {c}")));
    }
    if writes && !e.writable() {
        return Err((EPERM, format!("{name}: export '{}' is read-only", e.name)));
    }
    if req.command == Command::Flush && (req.offset != 0 || req.length != 0) {
        return Err((EINVAL, "FLUSH with a non-zero offset or length".into()));
    }
    if !ranged {
        return Ok(());
    }
    if matches!(req.command, Command::Read | Command::Write | Command::Cache)
        && req.length > MAX_PAYLOAD
    {
        return Err((
            EINVAL,
            format!(
                "{name} of {} bytes exceeds the maximum {MAX_PAYLOAD}",
                req.length
            ),
        ));
    }
    let size = e.device.size();
    if req.offset > size || req.length as u64 > size - req.offset {
        // Same choice as qemu: writing past the end is "no space".
        let errno = if matches!(req.command, Command::Write | Command::WriteZeroes) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err((
            errno,
            format!(
                "{name} at offset {} length {} is beyond the export size {size}",
                req.offset, req.length
            ),
        ));
    }
    if req.command == Command::BlockStatus {
        if !(s.base_ctx || s.depth_ctx) {
            return Err((
                EINVAL,
                "BLOCK_STATUS without a negotiated meta context".into(),
            ));
        }
        if req.length == 0 {
            return Err((EINVAL, "BLOCK_STATUS of length 0".into()));
        }
    }
    Ok(())
}

fn read_reply(s: &Session, cookie: u64, offset: u64, data: Vec<u8>) -> Out {
    if !s.structured {
        let mut o = simple(cookie, 0);
        o.data = Some(data);
        return o;
    }
    let mut head = Vec::with_capacity(CHUNK_HEADER_LEN + 8);
    if data.is_empty() {
        encode_chunk(cookie, true, &Chunk::None, &mut head);
        return Out { head, data: None };
    }
    encode_read_chunk_header(cookie, offset, data.len() as u32, &mut head);
    Out {
        head,
        data: Some(data),
    }
}

/// `base:allocation` flags: only data is "not a hole"; a zero or unallocated
/// range reads as zeros and holds no data (what qemu-nbd reports too).
fn base_status(e: &Extent) -> u32 {
    match e.kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero | ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
    }
}

/// Turns extents into descriptors for one context, merging equal runs and
/// clipping to the request (descriptor lengths are 32-bit).
fn descriptors(
    req: &Request,
    extents: &[Extent],
    status: impl Fn(&Extent) -> u32,
) -> Vec<Descriptor> {
    let end = req.offset + req.length as u64;
    let mut out: Vec<Descriptor> = Vec::new();
    for e in extents {
        let start = e.offset.max(req.offset);
        let stop = e.end().min(end);
        if stop <= start {
            continue;
        }
        let len = (stop - start) as u32;
        let st = status(e);
        match out.last_mut() {
            Some(last) if last.status == st => last.length += len,
            _ => out.push(Descriptor {
                length: len,
                status: st,
            }),
        }
    }
    if req.flags & CMD_FLAG_REQ_ONE != 0 {
        out.truncate(1);
    }
    out
}

fn block_status_reply(s: &Session, req: &Request, extents: &[Extent]) -> Out {
    let mut chunks = Vec::new();
    if s.base_ctx {
        chunks.push((CTX_BASE, descriptors(req, extents, base_status)));
    }
    if s.depth_ctx {
        chunks.push((
            CTX_DEPTH,
            descriptors(req, extents, |e| e.nbd_allocation_depth()),
        ));
    }
    if chunks.iter().any(|(_, d)| d.is_empty()) {
        return error_reply(
            s,
            req.cookie,
            EIO,
            &format!("device returned no block status at offset {}", req.offset),
        );
    }
    let mut head = Vec::new();
    let n = chunks.len();
    for (i, (context, descriptors)) in chunks.into_iter().enumerate() {
        encode_chunk(
            req.cookie,
            i + 1 == n,
            &Chunk::BlockStatus {
                context,
                descriptors,
            },
            &mut head,
        );
    }
    Out { head, data: None }
}

/// A boxed shutdown future, for callers that choose one at run time.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn send_buffer(s: &tokio::net::UnixStream) -> libc::c_int {
        crate::sockopt::get(s, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap()
    }

    #[tokio::test]
    async fn accepted_unix_connections_get_the_larger_send_buffer() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let before = send_buffer(&a);
        enlarge_send_buffer(&a);
        let wmem_max: libc::c_int = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The kernel doubles what it grants (bookkeeping), capped at wmem_max.
        let want = UNIX_SEND_BUFFER.min(wmem_max);
        let after = send_buffer(&a);
        assert!(
            after >= want,
            "send buffer {before} -> {after}, want {want}"
        );
    }
}
