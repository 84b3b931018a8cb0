//! The daemon core: the one task that owns block nodes and jobs.
//!
//! Connections never touch state: they send a [`Msg`] carrying a oneshot
//! reply channel (cloud-hypervisor's `vmm/src/api` pattern) and the core
//! handles one message at a time, so a command sees and leaves a consistent
//! state, and every job transition is checked against QEMU's table in one
//! place. Engines report back through an unbounded channel the core also
//! selects on. Long work (a one-unit stream step) runs in a spawned task
//! that answers the reply channel itself; opening an image is short and
//! runs inline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use image::open::BackingChoice;
use image::{BlockDevice, CacheMode, Image, OpenOptions};
use serde_json::{Map, Value, json};
use stream::{Base, Outcome, StreamJob, StreamOptions};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::export::{Exports, NbdAddr, NewExport};
use crate::job::state::{apply_verb, can_transition};
use crate::job::stream_job::{BlockJob, EngineEvent, OnErrorPolicy, io_status_of};
use crate::job::{JobStatus, JobVerb};
use crate::qmp::args::Args;
use crate::qmp::codec::Event;
use crate::qmp::{EXT_PREFIX, ErrorClass, QmpError};

/// Events kept for a slow client before it starts losing them.
const EVENT_BACKLOG: usize = 4096;
/// Requests queued to the core before connections wait.
const REQUEST_QUEUE: usize = 64;

/// The commands this daemon implements, as `query-commands` lists them.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "block-stream",
    "query-block-jobs",
    "query-jobs",
    "block-job-set-speed",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "object-add",
    "object-del",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "__com.diskstream_block-stream-step",
    "__com.diskstream_migrate-send",
    "__com.diskstream_block-job-set-policy",
];

type Reply = oneshot::Sender<Result<Value, QmpError>>;

/// A request to the core.
#[derive(Debug)]
pub enum Msg {
    /// Run a QMP command (capability negotiation is the connection's).
    Execute {
        name: String,
        arguments: Map<String, Value>,
        reply: Reply,
    },
    /// Add a format node for an image opened elsewhere.
    AddImage {
        name: String,
        image: Arc<Image>,
        reply: Reply,
    },
    /// Stop every job so the image stays resumable, close every node.
    Shutdown { reply: oneshot::Sender<()> },
}

/// What connections and the binary hold to talk to the core.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Msg>,
    events: broadcast::Sender<Event>,
    quit: watch::Receiver<bool>,
    package: Arc<str>,
}

impl Handle {
    /// Runs one command in the core.
    pub async fn execute(
        &self,
        name: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Execute {
            name: name.to_string(),
            arguments,
            reply,
        };
        if self.tx.send(msg).await.is_err() {
            return Err(QmpError::generic("the daemon is shutting down"));
        }
        rx.await
            .unwrap_or_else(|_| Err(QmpError::generic("the daemon is shutting down")))
    }

    /// The `package` string of the greeting and `query-version`.
    pub fn package(&self) -> &str {
        &self.package
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Resolves when a client ran `quit`.
    pub async fn quit_requested(&self) {
        let mut q = self.quit.clone();
        let _ = q.wait_for(|&v| v).await;
    }

    /// Adds `image`, opened by the caller, as a writable format node named
    /// `name`: how an embedder hands the daemon a device `blockdev-add`
    /// cannot open (a test double; later a remote device).
    pub async fn add_image_node(&self, name: &str, image: Arc<Image>) -> Result<(), QmpError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::AddImage {
            name: name.to_string(),
            image,
            reply,
        };
        if self.tx.send(msg).await.is_err() {
            return Err(QmpError::generic("the daemon is shutting down"));
        }
        rx.await
            .unwrap_or_else(|_| Err(QmpError::generic("the daemon is shutting down")))
            .map(|_| ())
    }

    /// Cancels jobs (the images stay resumable), closes every node, and
    /// stops the core.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

#[derive(Debug)]
enum NodeKind {
    /// A protocol node (`driver: file`): a file name a format node opens.
    File { path: PathBuf },
    /// A protocol node for a remote file (`driver: http` / `https`, what
    /// QEMU's curl driver offers): opened (HEAD: size, validators, ranges)
    /// when added, always read-only. A format node on it runs its engine
    /// over range requests.
    Http {
        driver: &'static str,
        source: Arc<http::HttpSource>,
    },
    /// A format node (qcow2, raw): an open image.
    Image {
        image: Arc<Image>,
        driver: &'static str,
        /// The protocol node it was opened through, when named.
        file_node: Option<String>,
        /// The backing node given by name.
        backing_node: Option<String>,
    },
}

#[derive(Debug)]
struct Node {
    name: String,
    read_only: bool,
    direct: bool,
    kind: NodeKind,
}

impl Node {
    fn path(&self) -> PathBuf {
        match &self.kind {
            NodeKind::File { path } => path.clone(),
            NodeKind::Http { source, .. } => PathBuf::from(source.name()),
            NodeKind::Image { image, .. } => image.format().storage().path().to_owned(),
        }
    }
}

/// The state the core owns.
#[derive(Debug)]
pub struct Core {
    rx: mpsc::Receiver<Msg>,
    events: broadcast::Sender<Event>,
    quit: watch::Sender<bool>,
    engine_tx: mpsc::UnboundedSender<(String, EngineEvent)>,
    engine_rx: mpsc::UnboundedReceiver<(String, EngineEvent)>,
    /// In creation order, as QEMU lists them.
    nodes: Vec<Node>,
    /// In creation order; a job leaves the list when it reaches `null`.
    jobs: Vec<BlockJob>,
    exports: Exports,
    /// `object-add` objects by id: TLS credentials.
    tls_creds: HashMap<String, TlsCreds>,
    /// The credentials the running NBD server uses.
    server_tls: Option<String>,
    /// Exports recording an access profile: (export id, file, image). The
    /// file is written when the export is deleted or the daemon stops.
    profiles: Vec<(String, PathBuf, Arc<Image>)>,
    package: String,
}

/// A `tls-creds-x509` object: QEMU's file names in `dir`.
#[derive(Debug)]
struct TlsCreds {
    endpoint: String,
    /// Loaded at object-add, as QEMU loads them (server endpoint only: the
    /// daemon has no use for client credentials).
    server: Option<nbd::tls::ServerTls>,
}

/// Creates the core and its handle; run the core with [`Core::run`].
pub fn new(package: &str) -> (Core, Handle) {
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    let (events, _) = broadcast::channel(EVENT_BACKLOG);
    let (quit, quit_rx) = watch::channel(false);
    let (engine_tx, engine_rx) = mpsc::unbounded_channel();
    let core = Core {
        rx,
        events: events.clone(),
        quit,
        engine_tx,
        engine_rx,
        nodes: Vec::new(),
        jobs: Vec::new(),
        exports: Exports::default(),
        tls_creds: HashMap::new(),
        server_tls: None,
        profiles: Vec::new(),
        package: package.to_string(),
    };
    let handle = Handle {
        tx,
        events,
        quit: quit_rx,
        package: Arc::from(package),
    };
    (core, handle)
}

fn job_not_found_block(id: &str) -> QmpError {
    QmpError::new(
        ErrorClass::DeviceNotActive,
        format!("Block job '{id}' not found"),
    )
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, '-', '.', '_'.
fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || "-._".contains(ch))
}

impl Core {
    /// Serves requests until [`Handle::shutdown`] (or every handle is gone).
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(Msg::Execute { name, arguments, reply }) => {
                        self.execute(&name, arguments, reply).await;
                    }
                    Some(Msg::AddImage { name, image, reply }) => {
                        let r = self.check_new_node_name(&name).map(|()| {
                            self.nodes.push(Node {
                                name,
                                read_only: image.info().read_only,
                                direct: false,
                                kind: NodeKind::Image {
                                    driver: image.format().format_name(),
                                    image,
                                    file_node: None,
                                    backing_node: None,
                                },
                            });
                            json!({})
                        });
                        let _ = reply.send(r);
                    }
                    Some(Msg::Shutdown { reply }) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                Some((id, ev)) = self.engine_rx.recv() => self.engine_event(&id, ev),
            }
        }
    }

    fn emit(&self, name: &str, data: Value) {
        // No receivers is fine: nobody is connected.
        let _ = self.events.send(Event::now(name, data));
    }

    async fn execute(&mut self, name: &str, arguments: Map<String, Value>, reply: Reply) {
        let args = Args::new(arguments);
        if name == "__com.diskstream_block-stream-step" {
            // Answers from its own task.
            self.stream_step(args, reply);
            return;
        }
        let r = self.dispatch(name, args).await;
        let _ = reply.send(r);
    }

    async fn dispatch(&mut self, name: &str, mut args: Args) -> Result<Value, QmpError> {
        let v = match name {
            "query-version" => {
                args.finish()?;
                let (major, minor, micro) = crate::qmp::QEMU_VERSION;
                json!({"qemu": {"micro": micro, "minor": minor, "major": major}, "package": self.package})
            }
            "query-commands" => {
                args.finish()?;
                Value::Array(COMMANDS.iter().map(|c| json!({"name": c})).collect())
            }
            "quit" => {
                args.finish()?;
                self.quit.send_replace(true);
                json!({})
            }
            "blockdev-add" => self.blockdev_add(args).await?,
            "blockdev-del" => {
                let name = args.str("node-name")?;
                args.finish()?;
                self.blockdev_del(&name).await?
            }
            "query-named-block-nodes" => {
                // `flat` changes nothing here: backing images opened from a
                // header are not named nodes, so there is nothing to nest.
                args.opt_bool("flat")?;
                args.finish()?;
                self.query_named_block_nodes().await?
            }
            "block-stream" => self.block_stream(args)?,
            "query-block-jobs" => {
                args.finish()?;
                Value::Array(
                    self.jobs
                        .iter()
                        .filter(|j| j.status != JobStatus::Null)
                        .map(BlockJob::block_job_info)
                        .collect(),
                )
            }
            "query-jobs" => {
                args.finish()?;
                Value::Array(self.jobs.iter().map(BlockJob::job_info).collect())
            }
            "block-job-set-speed" => {
                let id = args.str("device")?;
                let speed = args
                    .opt_i64("speed")?
                    .ok_or_else(|| QmpError::generic("Parameter 'speed' is missing"))?;
                args.finish()?;
                let job = self.block_job(&id)?;
                apply_verb(&id, JobVerb::SetSpeed, job.status)?;
                if speed < 0 {
                    return Err(QmpError::generic(
                        "Parameter 'speed' expects a non-negative value",
                    ));
                }
                job.engine.set_speed(speed as u64);
                json!({})
            }
            "__com.diskstream_block-job-set-policy" => {
                let id = args.str("device")?;
                let current = self.block_job(&id)?.engine.info().policy;
                let policy = policy_args(&mut args, "", current)?
                    .ok_or_else(|| QmpError::generic("Parameter 'policy' is missing"))?;
                args.finish()?;
                let job = self.block_job(&id)?;
                // QEMU's job-change is the verb that alters a running job's
                // parameters; it is allowed in the same states as set-speed.
                apply_verb(&id, JobVerb::Change, job.status)?;
                job.engine.set_policy(policy);
                json!({})
            }
            "block-job-pause" | "job-pause" => {
                let id = self.job_id_arg(name, &mut args)?;
                args.finish()?;
                self.pause(name, &id)?
            }
            "block-job-resume" | "job-resume" => {
                let id = self.job_id_arg(name, &mut args)?;
                args.finish()?;
                self.resume(name, &id)?
            }
            "block-job-cancel" | "job-cancel" => {
                let id = self.job_id_arg(name, &mut args)?;
                let force = if name == "block-job-cancel" {
                    args.opt_bool("force")?.unwrap_or(false)
                } else {
                    true
                };
                args.finish()?;
                if !force && self.find_job(name, &id)?.user_paused {
                    // QEMU's qmp_block_job_cancel refuses a paused job
                    // unless forced; job-cancel does not.
                    return Err(QmpError::generic(format!(
                        "The block job for device '{id}' is currently paused"
                    )));
                }
                self.cancel(name, &id)?
            }
            "block-job-complete" | "job-complete" => {
                let id = self.job_id_arg(name, &mut args)?;
                args.finish()?;
                let job = self.find_job(name, &id)?;
                apply_verb(&id, JobVerb::Complete, job.status)?;
                // Unreachable for stream jobs (never ready); kept for the message.
                return Err(QmpError::generic(format!(
                    "The active block job '{id}' cannot be completed"
                )));
            }
            "block-job-finalize" | "job-finalize" => {
                let id = args.str("id")?;
                args.finish()?;
                let job = self.find_job(name, &id)?;
                apply_verb(&id, JobVerb::Finalize, job.status)?;
                self.finalize_deferred(&id).await;
                json!({})
            }
            "block-job-dismiss" | "job-dismiss" => {
                let id = args.str("id")?;
                args.finish()?;
                let job = self.find_job(name, &id)?;
                apply_verb(&id, JobVerb::Dismiss, job.status)?;
                self.dismiss(&id);
                json!({})
            }
            "nbd-server-start" => {
                let addr = args
                    .opt_object("addr")?
                    .ok_or_else(|| QmpError::generic("Parameter 'addr' is missing"))?;
                let creds = args.opt_str("tls-creds")?;
                // As QEMU: 0 (the default) is unlimited. A multi-connection
                // client opens several per export (ours: up to 4).
                let max_connections = args.opt_u64("max-connections")?.unwrap_or(0);
                if args.opt_str("tls-authz")?.is_some() {
                    return Err(QmpError::generic(
                        "tls-authz is not supported by diskstream daemon (authorization \
                         objects); use verify-peer=on credentials to require client certificates",
                    ));
                }
                args.finish()?;
                let addr = NbdAddr::from_args(addr)?;
                let tls = match &creds {
                    None => None,
                    Some(id) => Some(self.server_tls_creds(id)?),
                };
                self.exports.start(&addr, tls, max_connections).await?;
                self.server_tls = creds;
                json!({})
            }
            "object-add" => self.object_add(args)?,
            "object-del" => {
                let id = args.str("id")?;
                args.finish()?;
                if !self.tls_creds.contains_key(&id) {
                    return Err(QmpError::generic(format!("object '{id}' not found")));
                }
                if self.server_tls.as_deref() == Some(id.as_str()) && self.exports.server_running()
                {
                    return Err(QmpError::generic(format!(
                        "object '{id}' is in use by the NBD server and cannot be deleted"
                    )));
                }
                self.tls_creds.remove(&id);
                json!({})
            }
            "nbd-server-stop" => {
                args.finish()?;
                for id in self.exports.stop().await? {
                    self.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
                }
                json!({})
            }
            "block-export-add" => self.block_export_add(args)?,
            "block-export-del" => {
                let id = args.str("id")?;
                let mode = args.opt_enum("mode", &["safe", "hard"])?;
                args.finish()?;
                if mode.as_deref() == Some("hard") {
                    return Err(QmpError::generic(
                        "block-export-del mode 'hard' is not supported: connected clients \
                         keep the export until they disconnect",
                    ));
                }
                self.exports.del(&id)?;
                self.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
                self.write_profiles(Some(&id))?;
                json!({})
            }
            "query-block-exports" => {
                args.finish()?;
                self.exports.query()
            }
            "__com.diskstream_migrate-send" => self.migrate_send(args).await?,
            other => {
                return Err(QmpError::new(
                    ErrorClass::CommandNotFound,
                    format!("The command {other} has not been found"),
                ));
            }
        };
        Ok(v)
    }

    // ---- nodes -----------------------------------------------------------

    /// `object-add`: the one QOM type the daemon has, `tls-creds-x509`
    /// (`dir` with QEMU's file names, `endpoint`, `verify-peer`).
    fn object_add(&mut self, mut args: Args) -> Result<Value, QmpError> {
        let qom_type = args.str("qom-type")?;
        let id = args.str("id")?;
        if qom_type != "tls-creds-x509" {
            return Err(QmpError::generic(format!(
                "object type '{qom_type}' is not supported by diskstream daemon \
                 (only tls-creds-x509)"
            )));
        }
        if !id_wellformed(&id) {
            return Err(QmpError::generic(format!("Invalid object ID '{id}'")));
        }
        if self.tls_creds.contains_key(&id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let dir = PathBuf::from(args.str("dir")?);
        let endpoint = args
            .opt_enum("endpoint", &["client", "server"])?
            .unwrap_or_else(|| "client".into());
        let verify_peer = args.opt_bool("verify-peer")?.unwrap_or(true);
        args.finish()?;
        let server = if endpoint == "server" {
            let (cert, key) = (dir.join("server-cert.pem"), dir.join("server-key.pem"));
            let cfg = if verify_peer {
                nbd::tls::server_config_verify_clients(&cert, &key, &dir.join("ca-cert.pem"))
            } else {
                nbd::tls::server_config(&cert, &key)
            };
            Some(cfg.map_err(|e| QmpError::generic(format!("tls-creds-x509 '{id}': {e}")))?)
        } else {
            None
        };
        self.tls_creds.insert(id, TlsCreds { endpoint, server });
        Ok(json!({}))
    }

    fn server_tls_creds(&self, id: &str) -> Result<nbd::tls::ServerTls, QmpError> {
        let creds = self
            .tls_creds
            .get(id)
            .ok_or_else(|| QmpError::generic(format!("No TLS credentials with id '{id}'")))?;
        match &creds.server {
            Some(c) if creds.endpoint == "server" => Ok(Arc::clone(c)),
            _ => Err(QmpError::generic(
                "Expecting TLS credentials with a server endpoint",
            )),
        }
    }

    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    fn image_node(&self, name: &str) -> Option<(&Node, &Arc<Image>)> {
        self.node(name).and_then(|n| match &n.kind {
            NodeKind::Image { image, .. } => Some((n, image)),
            NodeKind::File { .. } | NodeKind::Http { .. } => None,
        })
    }

    fn check_new_node_name(&self, name: &str) -> Result<(), QmpError> {
        if !id_wellformed(name) {
            return Err(QmpError::generic(format!("Invalid node-name: '{name}'")));
        }
        if self.node(name).is_some() {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        Ok(())
    }

    /// `cache: {direct, no-flush}`.
    fn cache_arg(args: &mut Args) -> Result<Option<bool>, QmpError> {
        match args.opt_object("cache")? {
            None => Ok(None),
            Some(mut c) => {
                let direct = c.opt_bool("direct")?;
                if c.opt_bool("no-flush")? == Some(true) {
                    return Err(QmpError::generic(
                        "cache.no-flush=on is not supported: diskstream never drops flushes",
                    ));
                }
                c.finish()?;
                Ok(direct)
            }
        }
    }

    async fn blockdev_add(&mut self, mut args: Args) -> Result<Value, QmpError> {
        let driver = args
            .opt_enum("driver", &["file", "http", "https", "qcow2", "qed", "raw"])?
            .ok_or_else(|| QmpError::generic("Parameter 'driver' is missing"))?;
        let node_name = args
            .opt_str("node-name")?
            .ok_or_else(|| QmpError::generic("'node-name' must be specified for the root node"))?;
        let read_only = args.opt_bool("read-only")?.unwrap_or(false);
        let direct = Self::cache_arg(&mut args)?;
        if driver == "file" {
            let filename = args.str("filename")?;
            args.finish()?;
            self.check_new_node_name(&node_name)?;
            let path = PathBuf::from(&filename);
            std::fs::metadata(&path)
                .map_err(|e| QmpError::generic(format!("Could not open '{filename}': {e}")))?;
            self.nodes.push(Node {
                name: node_name,
                read_only,
                direct: direct.unwrap_or(false),
                kind: NodeKind::File { path },
            });
            return Ok(json!({}));
        }
        if let Some(hdriver) = http_driver(&driver) {
            let spec = HttpNodeSpec::take(hdriver, &mut args, read_only)?;
            args.finish()?;
            self.check_new_node_name(&node_name)?;
            let source = spec.open().await?;
            self.nodes.push(Node {
                name: node_name,
                read_only: true,
                direct: direct.unwrap_or(false),
                kind: NodeKind::Http {
                    driver: hdriver,
                    source,
                },
            });
            return Ok(json!({}));
        }
        let driver: &'static str = match driver.as_str() {
            "qcow2" => "qcow2",
            "qed" => "qed",
            _ => "raw",
        };
        // file: a node name, {"driver": "file", "filename": ...} or
        // {"driver": "http"|"https", "url": ...}.
        let mut file_node = None;
        let mut new_file_node = None;
        let (file, file_direct, file_ro) = match args.opt_value("file") {
            None => return Err(QmpError::generic("Parameter 'file' is missing")),
            Some(Value::String(name)) => {
                let n = self.node(&name).ok_or_else(|| {
                    QmpError::generic(format!("Cannot find device='' nor node-name='{name}'"))
                })?;
                let file = match &n.kind {
                    NodeKind::File { path } => FileSource::Path(path.clone()),
                    NodeKind::Http { source, .. } => FileSource::Http(Arc::clone(source)),
                    NodeKind::Image { driver, .. } => {
                        return Err(QmpError::generic(format!(
                            "Node '{name}' is a {driver} node; 'file' must name a protocol \
                             (driver 'file', 'http' or 'https') node"
                        )));
                    }
                };
                if self.nodes.iter().any(
                    |o| matches!(&o.kind, NodeKind::Image { file_node: Some(f), .. } if *f == name),
                ) {
                    return Err(QmpError::generic(format!(
                        "Node '{name}' is busy: it is already the file of another node"
                    )));
                }
                file_node = Some(name.clone());
                (file, n.direct, n.read_only)
            }
            Some(Value::Object(m)) => {
                let mut f = Args::nested(m, "file.");
                let Some(fdriver) = f.opt_enum("driver", &["file", "http", "https"])? else {
                    return Err(QmpError::generic("Parameter 'file.driver' is missing"));
                };
                let fname = f.opt_str("node-name")?;
                let fro = f.opt_bool("read-only")?.unwrap_or(false);
                let fdirect = Self::cache_arg(&mut f)?.unwrap_or(false);
                let (spec, filename) = match http_driver(&fdriver) {
                    Some(d) => (Some(HttpNodeSpec::take(d, &mut f, fro)?), String::new()),
                    None => {
                        let filename = f.opt_str("filename")?.ok_or_else(|| {
                            QmpError::generic("Parameter 'file.filename' is missing")
                        })?;
                        (None, filename)
                    }
                };
                f.finish()?;
                if let Some(n) = &fname {
                    self.check_new_node_name(n)?;
                    if *n == node_name {
                        return Err(QmpError::generic(format!(
                            "Duplicate nodes with node-name='{n}'"
                        )));
                    }
                }
                match spec {
                    Some(spec) => {
                        let driver = spec.driver;
                        let source = spec.open().await?;
                        new_file_node = fname.map(|n| {
                            let kind = NodeKind::Http {
                                driver,
                                source: Arc::clone(&source),
                            };
                            (n, kind, true, fdirect)
                        });
                        (FileSource::Http(source), fdirect, true)
                    }
                    None => {
                        let path = PathBuf::from(filename);
                        new_file_node =
                            fname.map(|n| (n, NodeKind::File { path: path.clone() }, fro, fdirect));
                        (FileSource::Path(path), fdirect, fro)
                    }
                }
            }
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'file', expected: BlockdevRef (object or node name)",
                ));
            }
        };
        let backing = match args.opt_value("backing") {
            None => BackingChoice::FromHeader,
            Some(_) if driver == "raw" => {
                return Err(QmpError::generic(
                    "Driver 'raw' does not support backing files",
                ));
            }
            Some(Value::Null) => BackingChoice::None,
            Some(Value::String(name)) => {
                let (_, img) = self.image_node(&name).ok_or_else(|| {
                    QmpError::generic(format!("Cannot find device='' nor node-name='{name}'"))
                })?;
                BackingChoice::Device(Arc::clone(img) as Arc<dyn BlockDevice>)
            }
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'backing', expected: node name or null",
                ));
            }
        };
        let backing_node = match &backing {
            BackingChoice::Device(_) => match args.opt_value("backing") {
                Some(Value::String(s)) => Some(s),
                _ => None,
            },
            _ => None,
        };
        let cor = args.opt_bool(&format!("{EXT_PREFIX}copy-on-read"))?;
        args.finish()?;
        self.check_new_node_name(&node_name)?;
        let read_only = read_only || file_ro;
        if cor == Some(true) && read_only {
            return Err(QmpError::generic(format!(
                "{EXT_PREFIX}copy-on-read needs a writable node; '{node_name}' is read-only"
            )));
        }
        let direct = direct.unwrap_or(file_direct);
        let cache = if direct {
            CacheMode::None
        } else {
            CacheMode::Writeback
        };
        let opts = OpenOptions {
            writable: !read_only,
            cache,
            // As in QEMU, a backing opened from the header inherits the
            // node's cache.direct.
            backing_cache: cache,
            format: Some(driver.to_string()),
            backing,
            // Backings named nbd://, nbd+unix:// (post-copy migration) and
            // http(s):// (a central repository).
            opener: Some(remote_opener()),
            ..OpenOptions::default()
        };
        let image = match file {
            FileSource::Path(path) => image::open(&path, &opts).await.map_err(|e| {
                QmpError::generic(format!("Could not open '{}': {e}", path.display()))
            })?,
            FileSource::Http(source) => {
                let url = source.name().to_string();
                let kind = image::open::FormatKind::parse(driver)?;
                http::HttpOpener::default()
                    .open_image(source, kind, &opts)
                    .await
                    .map_err(|e| QmpError::generic(format!("Could not open '{url}': {e}")))?
            }
        };
        if cor == Some(true) {
            image.set_copy_on_read(true, None);
        }
        if let Some((n, kind, ro, d)) = new_file_node {
            file_node = Some(n.clone());
            self.nodes.push(Node {
                name: n,
                read_only: ro,
                direct: d,
                kind,
            });
        }
        self.nodes.push(Node {
            name: node_name,
            read_only,
            direct,
            kind: NodeKind::Image {
                image,
                driver,
                file_node,
                backing_node,
            },
        });
        Ok(json!({}))
    }

    fn block_export_add(&mut self, mut args: Args) -> Result<Value, QmpError> {
        args.opt_enum("type", &["nbd"])?
            .ok_or_else(|| QmpError::generic("Parameter 'type' is missing"))?;
        let id = args.str("id")?;
        let node = args.str("node-name")?;
        let name = args.opt_str("name")?;
        let description = args.opt_str("description")?;
        let writable = args.opt_bool("writable")?.unwrap_or(false);
        // Every write is made durable by the client's flush either way.
        args.opt_bool("writethrough")?;
        // qemu:allocation-depth is always offered.
        args.opt_bool("allocation-depth")?;
        let record = args.opt_str(&format!("{EXT_PREFIX}record-profile"))?;
        args.finish()?;
        if !id_wellformed(&id) {
            return Err(QmpError::generic(format!("Invalid block export id '{id}'")));
        }
        let (n, image) = self.image_node(&node).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{node}' nor node-name='{node}'"
            ))
        })?;
        let read_only = n.read_only;
        let image = Arc::clone(image);
        let device: Arc<dyn BlockDevice> = Arc::clone(&image) as Arc<dyn BlockDevice>;
        let export_id = id.clone();
        self.exports.add(NewExport {
            id,
            node,
            name,
            description,
            writable,
            device,
            node_read_only: read_only,
        })?;
        if let Some(path) = record {
            image
                .access()
                .start_profile(image.info().granularity.max(512));
            self.profiles.push((export_id, PathBuf::from(path), image));
        }
        Ok(json!({}))
    }

    /// `__com.diskstream_migrate-send`: the source side of post-copy
    /// migration in one step. Flushes the node, freezes it read-only for
    /// every holder (what QEMU reaches with `blockdev-reopen` to
    /// `read-only: true`; writes still arriving from a VM that was not
    /// stopped fail instead of diverging from what the destination copies),
    /// replaces its exports with one read-only export (`name`, default the
    /// node name, so the destination finds the disk under the name the VM
    /// used), and returns. The NBD server must run (`nbd-server-start`). A
    /// node with a block job is refused: it would still be changing.
    async fn migrate_send(&mut self, mut args: Args) -> Result<Value, QmpError> {
        let node = args.str("node-name")?;
        let id = args.opt_str("id")?;
        let name = args.opt_str("name")?;
        args.finish()?;
        let (_, image) = self.image_node(&node).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{node}' nor node-name='{node}'"
            ))
        })?;
        let image = Arc::clone(image);
        if let Some(id) = id.as_deref().filter(|i| !id_wellformed(i)) {
            return Err(QmpError::generic(format!("Invalid block export id '{id}'")));
        }
        if self
            .jobs
            .iter()
            .any(|j| j.node == node && j.status != JobStatus::Null)
        {
            return Err(QmpError::generic(format!(
                "Node '{node}' has a block job; cancel or finish it before migrating"
            )));
        }
        if !self.exports.server_running() {
            return Err(QmpError::generic("NBD server not running"));
        }
        image
            .flush()
            .await
            .map_err(|e| QmpError::generic(format!("Could not flush '{node}': {e}")))?;
        image.set_copy_on_read(false, None);
        image.freeze();
        if let Some(n) = self.nodes.iter_mut().find(|n| n.name == node) {
            n.read_only = true;
        }
        for old in self.exports.ids_of_node(&node) {
            self.exports.del(&old)?;
            self.emit("BLOCK_EXPORT_DELETED", json!({"id": old}));
        }
        self.exports.add(NewExport {
            id: id.unwrap_or_else(|| node.clone()),
            node: node.clone(),
            name,
            description: Some("post-copy migration source (read-only)".into()),
            writable: false,
            device: image as Arc<dyn BlockDevice>,
            node_read_only: true,
        })?;
        Ok(json!({}))
    }

    /// Why `name` cannot go away, if it cannot.
    fn node_busy(&self, name: &str) -> Option<String> {
        if self.exports.uses_node(name) {
            return Some(format!(
                "Node '{name}' is busy: block device is in use by block export"
            ));
        }
        if self
            .jobs
            .iter()
            .any(|j| j.node == name && j.status != JobStatus::Null)
        {
            return Some(format!(
                "Node '{name}' is busy: block device is in use by block job: stream"
            ));
        }
        for n in &self.nodes {
            if let NodeKind::Image {
                file_node,
                backing_node,
                ..
            } = &n.kind
            {
                if file_node.as_deref() == Some(name) {
                    return Some(format!(
                        "Node '{name}' is busy: node is used as file of '{}'",
                        n.name
                    ));
                }
                if backing_node.as_deref() == Some(name) {
                    return Some(format!(
                        "Node '{name}' is busy: node is used as backing hd of '{}'",
                        n.name
                    ));
                }
            }
        }
        None
    }

    async fn blockdev_del(&mut self, name: &str) -> Result<Value, QmpError> {
        let Some(idx) = self.nodes.iter().position(|n| n.name == name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        if let Some(why) = self.node_busy(name) {
            return Err(QmpError::generic(why));
        }
        let node = self.nodes.remove(idx);
        if let NodeKind::Image { image, .. } = &node.kind {
            image.close().await?;
        }
        Ok(json!({}))
    }

    async fn query_named_block_nodes(&self) -> Result<Value, QmpError> {
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push(self.node_info(n).await?);
        }
        Ok(Value::Array(out))
    }

    async fn node_info(&self, n: &Node) -> Result<Value, QmpError> {
        let path = n.path().display().to_string();
        let mut v = json!({
            "node-name": n.name,
            "file": path,
            "ro": n.read_only,
            "encrypted": false,
            "detect_zeroes": "off",
            "bps": 0, "bps_rd": 0, "bps_wr": 0,
            "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "write_threshold": 0,
            "active": true,
            "cache": {"writeback": true, "direct": n.direct, "no-flush": false},
            "backing_file_depth": 0,
        });
        match &n.kind {
            NodeKind::File { path: p } => {
                let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                v["drv"] = json!("file");
                v["image"] = json!({"filename": path, "format": "file", "virtual-size": size});
            }
            NodeKind::Http { driver, source } => {
                v["drv"] = json!(driver);
                v["image"] =
                    json!({"filename": path, "format": driver, "virtual-size": source.size()});
            }
            NodeKind::Image { image, driver, .. } => {
                v["drv"] = json!(driver);
                let depth = image.info().layers - 1;
                v["backing_file_depth"] = json!(depth);
                let mut img = json!({
                    "filename": path,
                    "format": driver,
                    "virtual-size": image.size(),
                });
                if let Some(spec) = image.backing_spec() {
                    v["backing_file"] = json!(spec.name);
                    img["backing-filename"] = json!(spec.name);
                    if let Some(f) = spec.format {
                        img["backing-filename-format"] = json!(f);
                    }
                }
                v["image"] = img;
                let (local, remote) = allocation(image).await?;
                v[format!("{EXT_PREFIX}local-bytes")] = json!(local);
                v[format!("{EXT_PREFIX}remote-bytes")] = json!(remote);
                v[format!("{EXT_PREFIX}copy-on-read")] = json!(image.copy_on_read());
            }
        }
        Ok(v)
    }

    // ---- jobs ------------------------------------------------------------

    fn job_index(&self, id: &str) -> Option<usize> {
        self.jobs.iter().position(|j| j.id == id)
    }

    fn block_job(&self, id: &str) -> Result<&BlockJob, QmpError> {
        self.jobs
            .iter()
            .find(|j| j.id == id)
            .ok_or_else(|| job_not_found_block(id))
    }

    /// `block-job-*` report a missing job as `DeviceNotActive`, `job-*` as
    /// a `GenericError` "Job not found", as QEMU does.
    fn find_job(&self, command: &str, id: &str) -> Result<&BlockJob, QmpError> {
        if command.starts_with("block-job-") {
            self.block_job(id)
        } else {
            self.jobs
                .iter()
                .find(|j| j.id == id)
                .ok_or_else(|| QmpError::generic("Job not found"))
        }
    }

    fn job_id_arg(&self, command: &str, args: &mut Args) -> Result<String, QmpError> {
        if command.starts_with("block-job-") {
            args.str("device")
        } else {
            args.str("id")
        }
    }

    fn transition(&mut self, idx: usize, to: JobStatus) {
        let job = &mut self.jobs[idx];
        let from = job.status;
        if from == to {
            return;
        }
        assert!(
            can_transition(from, to),
            "job {}: transition {} -> {} is not in QEMU's table",
            job.id,
            from.as_str(),
            to.as_str()
        );
        job.status = to;
        let data = json!({"id": job.id, "status": to.as_str()});
        self.emit("JOB_STATUS_CHANGE", data);
    }

    fn block_stream(&mut self, mut args: Args) -> Result<Value, QmpError> {
        let job_id = args.opt_str("job-id")?;
        let device = args.str("device")?;
        let base = args.opt_str("base")?;
        let base_node = args.opt_str("base-node")?;
        let backing_file = args.opt_str("backing-file")?;
        let speed = args.opt_i64("speed")?.unwrap_or(0);
        let on_error = args
            .opt_enum("on-error", OnErrorPolicy::NAMES)?
            .map_or(OnErrorPolicy::Report, |s| {
                OnErrorPolicy::parse(&s).expect("checked by opt_enum")
            });
        let auto_finalize = args.opt_bool("auto-finalize")?.unwrap_or(true);
        let auto_dismiss = args.opt_bool("auto-dismiss")?.unwrap_or(true);
        let ext_in_flight = format!("{EXT_PREFIX}max-in-flight");
        let ext_chunk = format!("{EXT_PREFIX}chunk-size");
        let in_flight = args.opt_u64(&ext_in_flight)?;
        let chunk = args.opt_u64(&ext_chunk)?;
        let policy = policy_args(&mut args, EXT_PREFIX, stream::policy::Policy::default())?
            .unwrap_or_default();
        let profile = args.opt_str(&format!("{EXT_PREFIX}profile"))?;
        args.finish()?;
        // A profile is a small text file (a line per range); reading it here
        // keeps a bad one from starting a job.
        let profile = match profile {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    QmpError::generic(format!("Could not read profile '{path}': {e}"))
                })?;
                let p = image::access::Profile::parse(&text)
                    .map_err(|e| QmpError::generic(format!("Profile '{path}': {e}")))?;
                Some(Arc::new(p))
            }
        };

        let (node, image) = self.image_node(&device).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ))
        })?;
        // Checked in QEMU's order: the chain, the node's users, then the job.
        let mut base = self.resolve_base(&device, image, base.as_deref(), base_node.as_deref())?;
        if let Some(bf) = backing_file {
            match &mut base.link {
                None => {
                    return Err(QmpError::generic(
                        "backing file specified, but streaming the entire chain",
                    ));
                }
                Some((spec, _)) => spec.name = bf,
            }
        }
        // A job holds its node until it is dismissed (reaches null).
        if self
            .jobs
            .iter()
            .any(|j| j.node == device && j.status != JobStatus::Null)
        {
            return Err(QmpError::generic(format!(
                "Node '{device}' is busy: block device is in use by block job: stream"
            )));
        }
        if node.read_only {
            return Err(QmpError::generic(format!(
                "Block node '{device}' is read-only"
            )));
        }
        // QEMU requires job-id for a node without a device name; diskstream
        // has no device names and defaults the job id to the node name.
        let id = job_id.unwrap_or_else(|| device.clone());
        if !id_wellformed(&id) {
            return Err(QmpError::generic(format!("Invalid job ID '{id}'")));
        }
        if self.job_index(&id).is_some() {
            return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
        }
        if speed < 0 {
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        let speed = speed as u64;
        let defaults = StreamOptions::default();
        let opts = StreamOptions {
            device: id.clone(),
            base,
            speed,
            on_error: on_error.engine(),
            max_in_flight: in_flight.map_or(defaults.max_in_flight, |n| n.max(1) as usize),
            chunk_size: chunk.unwrap_or(defaults.chunk_size),
            relink: auto_finalize,
            policy,
            record_copies: false,
            profile,
        };
        let deferred_link = (!auto_finalize).then(|| opts.base.clone());
        // Guest reads through an export copy what they fetch, as QEMU's
        // implicit copy-on-read filter does while a stream runs.
        let cor_before = image.copy_on_read();
        image.set_copy_on_read(true, opts.base.depth);
        let engine = Arc::new(StreamJob::start(Arc::clone(image), opts));
        let job = BlockJob {
            id: id.clone(),
            node: device,
            status: JobStatus::Undefined,
            user_paused: false,
            auto_finalize,
            auto_dismiss,
            on_error,
            io_status: "ok",
            error: None,
            ended: false,
            cor_before,
            deferred_link,
            engine,
        };
        // A finished job of the same node that was never dismissed stays
        // listed; a new job has its own id.
        self.jobs.push(job);
        let idx = self.jobs.len() - 1;
        self.transition(idx, JobStatus::Created);
        self.transition(idx, JobStatus::Running);
        self.jobs[idx].watch(self.engine_tx.clone());
        Ok(json!({}))
    }

    /// `base` (a file name) or `base-node` (a node name) to the engine's [`Base`].
    fn resolve_base(
        &self,
        device: &str,
        image: &Arc<Image>,
        base: Option<&str>,
        base_node: Option<&str>,
    ) -> Result<Base, QmpError> {
        let path: Option<PathBuf> = match (base, base_node) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'base' and 'base-node' cannot be specified at the same time",
                ));
            }
            (Some(b), None) => Some(PathBuf::from(b)),
            (None, Some(n)) => {
                let node = self.node(n).ok_or_else(|| {
                    QmpError::generic(format!("Cannot find device='' nor node-name='{n}'"))
                })?;
                Some(node.path())
            }
            (None, None) => None,
        };
        match path {
            None => Ok(Base::default()),
            Some(p) => stream::resolve_base(image, Some(&p)).map_err(|e| {
                if let Some(n) = base_node {
                    QmpError::generic(format!("Node '{n}' is not a backing image of '{device}'"))
                } else if matches!(
                    e.kind(),
                    image::ErrorKind::InvalidInput | image::ErrorKind::NotFound
                ) {
                    QmpError::generic(format!("Can't find '{}' in the backing chain", p.display()))
                } else {
                    e.into()
                }
            }),
        }
    }

    fn pause(&mut self, command: &str, id: &str) -> Result<Value, QmpError> {
        let job = self.find_job(command, id)?;
        apply_verb(id, JobVerb::Pause, job.status)?;
        if job.user_paused {
            return Err(QmpError::generic("Job is already paused"));
        }
        let idx = self.job_index(id).expect("found above");
        let job = &mut self.jobs[idx];
        job.user_paused = true;
        job.engine.pause();
        Ok(json!({}))
    }

    fn resume(&mut self, command: &str, id: &str) -> Result<Value, QmpError> {
        let job = self.find_job(command, id)?;
        if !job.user_paused {
            return Err(QmpError::generic("Can't resume a job that was not paused"));
        }
        apply_verb(id, JobVerb::Resume, job.status)?;
        let idx = self.job_index(id).expect("found above");
        let job = &mut self.jobs[idx];
        job.user_paused = false;
        job.io_status = "ok";
        job.engine.resume();
        Ok(json!({}))
    }

    fn cancel(&mut self, command: &str, id: &str) -> Result<Value, QmpError> {
        let job = self.find_job(command, id)?;
        apply_verb(id, JobVerb::Cancel, job.status)?;
        let idx = self.job_index(id).expect("found above");
        if self.jobs[idx].status == JobStatus::Pending {
            // The engine has ended (and relinked); cancelling now only
            // changes how the job is reported, as QEMU's abort of a
            // pending job does.
            self.abort(idx, true);
            return Ok(json!({}));
        }
        let job = &mut self.jobs[idx];
        job.user_paused = false;
        job.engine.cancel();
        Ok(json!({}))
    }

    /// An engine's state change or end.
    fn engine_event(&mut self, id: &str, ev: EngineEvent) {
        let Some(idx) = self.job_index(id) else {
            return;
        };
        match ev {
            EngineEvent::State(stream::JobState::Paused) => {
                if self.jobs[idx].status != JobStatus::Running {
                    return;
                }
                if !self.jobs[idx].user_paused {
                    if self.jobs[idx].engine.info().error.is_none() {
                        // A pause the user already took back (pause and
                        // resume before the engine got there): it is
                        // running again, or about to say so.
                        return;
                    }
                    // The engine paused itself: on-error=stop (or enospc
                    // and out of space) after a failed copy.
                    let kind = self.jobs[idx]
                        .engine
                        .info()
                        .error_kind
                        .unwrap_or(image::ErrorKind::Io);
                    let (io_status, operation) = io_status_of(kind);
                    let job = &mut self.jobs[idx];
                    // An outage pause ends by itself when the backing is
                    // back; any other is the user's to resume.
                    job.user_paused = kind != image::ErrorKind::Unavailable;
                    job.io_status = io_status;
                    let data = json!({"device": job.id, "operation": operation, "action": job.on_error.action(kind)});
                    self.emit("BLOCK_JOB_ERROR", data);
                }
                self.transition(idx, JobStatus::Paused);
            }
            EngineEvent::State(stream::JobState::Running) => {
                if self.jobs[idx].status == JobStatus::Paused {
                    self.jobs[idx].io_status = "ok";
                    self.transition(idx, JobStatus::Running);
                }
            }
            EngineEvent::State(_) => {}
            EngineEvent::Ended(r) => {
                self.jobs[idx].ended = true;
                let (node, cor) = (self.jobs[idx].node.clone(), self.jobs[idx].cor_before);
                if let Some((_, image)) = self.image_node(&node) {
                    image.set_copy_on_read(cor, None);
                }
                if self.jobs[idx].status == JobStatus::Paused {
                    // QEMU resumes a paused job to let it see the cancel.
                    self.transition(idx, JobStatus::Running);
                }
                match r {
                    Ok(s) if s.outcome == Outcome::Completed => {
                        self.transition(idx, JobStatus::Waiting);
                        self.transition(idx, JobStatus::Pending);
                        if self.jobs[idx].auto_finalize {
                            self.finalize(id);
                        } else {
                            let data = json!({"type": "stream", "id": id});
                            self.emit("BLOCK_JOB_PENDING", data);
                        }
                    }
                    Ok(_) => self.abort(idx, true),
                    Err(e) => {
                        let (io_status, operation) = io_status_of(e.kind());
                        let job = &mut self.jobs[idx];
                        job.error = Some(e.to_string());
                        job.io_status = io_status;
                        let data = json!({"device": job.id, "operation": operation, "action": job.on_error.action(e.kind())});
                        self.emit("BLOCK_JOB_ERROR", data);
                        self.abort(idx, false);
                    }
                }
            }
        }
    }

    /// aborting -> BLOCK_JOB_CANCELLED or BLOCK_JOB_COMPLETED(error) -> concluded.
    fn abort(&mut self, idx: usize, cancelled: bool) {
        self.transition(idx, JobStatus::Aborting);
        let data = self.jobs[idx].end_event_data();
        self.emit(
            if cancelled {
                "BLOCK_JOB_CANCELLED"
            } else {
                "BLOCK_JOB_COMPLETED"
            },
            data,
        );
        self.conclude(idx);
    }

    /// `block-job-finalize`: makes the link change the engine left for this
    /// moment, then concludes; a failed change aborts the job with its
    /// error, as a failed prepare does in QEMU.
    async fn finalize_deferred(&mut self, id: &str) {
        let Some(idx) = self.job_index(id) else {
            return;
        };
        if let Some(base) = self.jobs[idx].deferred_link.take() {
            let node = self.jobs[idx].node.clone();
            let image = self.image_node(&node).map(|(_, i)| Arc::clone(i));
            if let Some(image) = image
                && let Err(e) = stream::finish(&image, &base).await
            {
                let job = &mut self.jobs[idx];
                job.error = Some(e.to_string());
                self.abort(idx, false);
                return;
            }
        }
        self.finalize(id);
    }

    fn finalize(&mut self, id: &str) {
        let Some(idx) = self.job_index(id) else {
            return;
        };
        let data = self.jobs[idx].end_event_data();
        self.emit("BLOCK_JOB_COMPLETED", data);
        self.conclude(idx);
    }

    fn conclude(&mut self, idx: usize) {
        self.transition(idx, JobStatus::Concluded);
        if self.jobs[idx].auto_dismiss {
            let id = self.jobs[idx].id.clone();
            self.dismiss(&id);
        }
    }

    fn dismiss(&mut self, id: &str) {
        if let Some(idx) = self.job_index(id) {
            self.transition(idx, JobStatus::Null);
            self.jobs.remove(idx);
        }
    }

    /// `__com.diskstream_block-stream-step {device, offset, base?, base-node?}`:
    /// checks here, copies in its own task, which sends the reply.
    fn stream_step(&mut self, args: Args, reply: Reply) {
        let (image, offset, base) = match self.step_args(args) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        tokio::spawn(async move {
            let opts = StreamOptions {
                base,
                ..StreamOptions::default()
            };
            let r = stream::step(&image, offset, &opts)
                .await
                .map(|s| {
                    json!({
                        "next-offset": s.next_offset,
                        "copied": s.copied,
                        "zeroed": s.zeroed,
                        "completed": s.completed,
                        "len": image.size(),
                    })
                })
                .map_err(QmpError::from);
            let _ = reply.send(r);
        });
    }

    fn step_args(&self, mut args: Args) -> Result<(Arc<Image>, u64, Base), QmpError> {
        let device = args.str("device")?;
        let offset = args.u64("offset")?;
        let base = args.opt_str("base")?;
        let base_node = args.opt_str("base-node")?;
        args.finish()?;
        let (node, image) = self.image_node(&device).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ))
        })?;
        if node.read_only {
            return Err(QmpError::generic(format!(
                "Block node '{device}' is read-only"
            )));
        }
        // A job holds its node until it is dismissed (reaches null).
        if self
            .jobs
            .iter()
            .any(|j| j.node == device && j.status != JobStatus::Null)
        {
            return Err(QmpError::generic(format!(
                "Node '{device}' is busy: block device is in use by block job: stream"
            )));
        }
        let base = self.resolve_base(&device, image, base.as_deref(), base_node.as_deref())?;
        Ok((Arc::clone(image), offset, base))
    }

    /// Stops the NBD server (in-flight requests finish, exports are
    /// flushed), then cancels every job and waits for the engines (copies in flight finish,
    /// the image is flushed and keeps its backing link), then closes every
    /// node, top images first.
    /// Writes the recorded profiles of export `id` (of every export: `None`)
    /// and stops recording them. A profile is a few KiB of text: written
    /// from the core directly.
    fn write_profiles(&mut self, id: Option<&str>) -> Result<(), QmpError> {
        let (done, keep) = std::mem::take(&mut self.profiles)
            .into_iter()
            .partition(|(e, _, _)| id.is_none_or(|i| i == e));
        self.profiles = keep;
        let mut first_err = None;
        for (e, path, image) in done {
            let Some(p) = image.access().profile() else {
                continue;
            };
            if let Err(err) = std::fs::write(&path, p.to_text()) {
                first_err.get_or_insert(QmpError::generic(format!(
                    "export '{e}': could not write profile '{}': {err}",
                    path.display()
                )));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn shutdown(&mut self) {
        if let Err(e) = self.write_profiles(None) {
            eprintln!("diskstream daemon: {}", e.desc);
        }
        if self.exports.server_running()
            && let Err(e) = self.exports.stop().await
        {
            eprintln!("diskstream daemon: stopping the NBD server: {e}");
        }
        for j in &self.jobs {
            if !j.ended {
                j.engine.cancel();
            }
        }
        for j in &self.jobs {
            let _ = j.engine.wait().await;
        }
        for n in self.nodes.iter().rev() {
            if let NodeKind::Image { image, .. } = &n.kind
                && let Err(e) = image.close().await
            {
                eprintln!("diskstream daemon: closing node {}: {e}", n.name);
            }
        }
        self.nodes.clear();
    }
}

/// Bytes the image holds itself and bytes it still reads from below.
async fn allocation(image: &Image) -> Result<(u64, u64), QmpError> {
    let size = image.size();
    let (mut local, mut remote) = (0u64, 0u64);
    let mut pos = 0;
    // Bounded: every round advances `pos` by at least one byte.
    while pos < size {
        let n = (size - pos).min(1 << 30);
        let extents = image::device::block_status_all(image, pos, n).await?;
        for e in extents {
            match e.depth {
                Some(0) => local += e.length,
                Some(_) if e.kind == image::ExtentKind::Data => remote += e.length,
                _ => {}
            }
        }
        pos += n;
    }
    Ok((local, remote))
}

/// A stream policy from `{prefix}policy` and its parameters
/// (`{prefix}grace-ms`, `{prefix}floor`, `{prefix}latency-percent`,
/// `{prefix}pressure-percent`), each overriding `current`. `None` when no
/// policy name was given (parameters alone then are an error).
fn policy_args(
    args: &mut Args,
    prefix: &str,
    current: stream::policy::Policy,
) -> Result<Option<stream::policy::Policy>, QmpError> {
    use stream::policy::PolicyKind;
    let kind = args.opt_enum(&format!("{prefix}policy"), PolicyKind::NAMES)?;
    let grace = args.opt_u64(&format!("{prefix}grace-ms"))?;
    let floor = args.opt_u64(&format!("{prefix}floor"))?;
    let latency = args.opt_u64(&format!("{prefix}latency-percent"))?;
    let pressure = args.opt_u64(&format!("{prefix}pressure-percent"))?;
    let Some(kind) = kind else {
        if grace.or(floor).or(latency).or(pressure).is_some() {
            return Err(QmpError::generic(format!(
                "Parameter '{prefix}policy' is missing (policy parameters need a policy)"
            )));
        }
        return Ok(None);
    };
    let mut p = current;
    p.kind = PolicyKind::parse(&kind).expect("checked by opt_enum");
    if let Some(g) = grace {
        p.grace = std::time::Duration::from_millis(g);
    }
    if let Some(f) = floor {
        if f == 0 {
            return Err(QmpError::generic(format!(
                "Parameter '{prefix}floor' must be positive: a stream with no floor may never finish"
            )));
        }
        p.floor = f;
    }
    if let Some(l) = latency {
        if l < 100 {
            return Err(QmpError::generic(format!(
                "Parameter '{prefix}latency-percent' must be at least 100 (of the idle baseline)"
            )));
        }
        p.latency_factor = l as f64 / 100.0;
    }
    if let Some(pr) = pressure {
        if pr == 0 || pr > 100 {
            return Err(QmpError::generic(format!(
                "Parameter '{prefix}pressure-percent' must be between 1 and 100"
            )));
        }
        p.pressure_threshold = pr as f64 / 100.0;
    }
    Ok(Some(p))
}

/// The opener for remote backing names: NBD URIs and HTTP(S) URLs.
pub fn remote_opener() -> Arc<dyn image::open::Opener> {
    remote_opener_with(nbd::client::ClientOptions::default())
}

/// [`remote_opener`] with these NBD client options (TLS, reconnect window).
pub fn remote_opener_with(nbd: nbd::client::ClientOptions) -> Arc<dyn image::open::Opener> {
    Arc::new(image::open::Openers(vec![
        Arc::new(nbd::client::NbdOpener { options: nbd }),
        Arc::new(http::HttpOpener::default()),
    ]))
}

/// What a format node reads: a local file or a remote one.
enum FileSource {
    Path(PathBuf),
    Http(Arc<http::HttpSource>),
}

/// The QEMU driver name for HTTP protocol nodes, if `driver` is one.
fn http_driver(driver: &str) -> Option<&'static str> {
    match driver {
        "http" => Some("http"),
        "https" => Some("https"),
        _ => None,
    }
}

/// QEMU's limit on the curl driver's `timeout` (`CURL_TIMEOUT_MAX`, seconds).
const CURL_TIMEOUT_MAX: i64 = 10_000;

/// The options of an `http` / `https` node, as QEMU's curl driver takes
/// them (`BlockdevOptionsCurlHttp(s)`), checked with its messages.
///
/// - `url` (required) must start with the driver's scheme.
/// - `sslverify` (`https` only, default true): false accepts any server
///   certificate. Trusted roots are the system's; a private CA is added by
///   starting the daemon with `SSL_CERT_FILE` pointing at its PEM file.
/// - `timeout` (seconds, 0 to 10000): the limit for one request (and for
///   connecting). 0 keeps diskstream's default (30 s). Unlike QEMU's curl
///   driver, a request past it is retried with backoff within the retry
///   window (60 s), after which a stream job pauses (DESIGN.md's outage
///   policy).
/// - `readahead` is checked (a multiple of 512, as QEMU requires) and then
///   ignored: every read is one range request of the size the format engine
///   asks for, and what copy-on-read fetched stays in the overlay.
/// - The node is read-only: `read-only` or `auto-read-only` must be true.
/// - Credentials and cookies (`username`, `password-secret`, `cookie`, ...)
///   are not supported and refused by name.
struct HttpNodeSpec {
    driver: &'static str,
    url: String,
    writable_asked: bool,
    readahead: Option<i64>,
    timeout: Option<i64>,
    sslverify: bool,
}

impl HttpNodeSpec {
    /// Takes the curl options out of `a` (the caller finishes `a`).
    /// `read_only` is the node's `read-only`, already taken.
    fn take(driver: &'static str, a: &mut Args, read_only: bool) -> Result<Self, QmpError> {
        let url = a.str("url")?;
        let auto_read_only = a.opt_bool("auto-read-only")?.unwrap_or(false);
        let readahead = a.opt_i64("readahead")?;
        let timeout = a.opt_i64("timeout")?;
        // `http` has no sslverify in QEMU's schema: finish() rejects it.
        let sslverify = match driver {
            "https" => a.opt_bool("sslverify")?.unwrap_or(true),
            _ => true,
        };
        for key in [
            "username",
            "password-secret",
            "proxy-username",
            "proxy-password-secret",
            "cookie",
            "cookie-secret",
        ] {
            if a.opt_value(key).is_some() {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is not supported by diskstream's {driver} driver",
                    a.full(key)
                )));
            }
        }
        Ok(HttpNodeSpec {
            driver,
            url,
            writable_asked: !read_only && !auto_read_only,
            readahead,
            timeout,
            sslverify,
        })
    }

    /// Checks the values as QEMU's `curl_open` does, then opens the file:
    /// an unreachable server or an untrusted certificate fails the command
    /// at once (no retry window: the daemon's queue waits on it).
    async fn open(self) -> Result<Arc<http::HttpSource>, QmpError> {
        if self.writable_asked {
            return Err(QmpError::generic("curl driver does not support writes"));
        }
        if let Some(r) = self.readahead
            && (r < 0 || r % 512 != 0)
        {
            return Err(QmpError::generic(format!(
                "HTTP_READAHEAD_SIZE {r} is not a multiple of 512"
            )));
        }
        if let Some(t) = self.timeout
            && !(0..=CURL_TIMEOUT_MAX).contains(&t)
        {
            return Err(QmpError::generic(
                "timeout parameter is too large or negative",
            ));
        }
        let d = self.driver;
        if !self
            .url
            .strip_prefix(d)
            .is_some_and(|rest| rest.starts_with("://"))
        {
            return Err(QmpError::generic(format!(
                "{d} curl driver cannot handle the URL '{}' (does not start with '{d}://')",
                self.url
            )));
        }
        let mut opts = http::HttpOptions {
            accept_invalid_certs: !self.sslverify,
            open_retry_window: Some(std::time::Duration::ZERO),
            ..http::HttpOptions::default()
        };
        if let Some(t) = self.timeout.filter(|&t| t > 0) {
            let t = std::time::Duration::from_secs(t as u64);
            opts.request_timeout = t;
            opts.connect_timeout = opts.connect_timeout.min(t);
        }
        let source = http::HttpSource::open(&self.url, opts, None)
            .await
            .map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(Arc::new(source))
    }
}
