//! NBD exports of block nodes: QMP's `nbd-server-start`/`-stop`,
//! `block-export-add`/`-del` and `query-block-exports`, over the `nbd`
//! crate's server.
//!
//! The core owns this table like nodes and jobs. The running server reads
//! the export list through a shared table the core alone writes, so adding
//! or removing an export never restarts the server or drops a client;
//! removing one stops new connections to it while connected clients finish
//! (QEMU's `safe` mode would refuse while clients are connected).

use std::sync::{Arc, RwLock};

use image::BlockDevice;
use nbd::server::{self, Export, Listener, ServerConfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::qmp::QmpError;
use crate::qmp::args::Args;

/// Where the NBD server listens (`SocketAddressLegacy` of `nbd-server-start`,
/// or the daemon's `--nbd`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(std::path::PathBuf),
    Inet { host: String, port: String },
}

impl NbdAddr {
    /// `unix:PATH` or `HOST:PORT`, as the daemon's `--nbd` takes it.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(NbdAddr::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => {
                Ok(NbdAddr::Inet {
                    host: h.trim_matches(['[', ']']).to_string(),
                    port: p.to_string(),
                })
            }
            _ => Err(format!("'{s}': expected unix:PATH or HOST:PORT")),
        }
    }

    /// `addr` of `nbd-server-start`: `{"type": "unix", "data": {"path"}}`
    /// or `{"type": "inet", "data": {"host", "port"}}`.
    pub fn from_args(mut a: Args) -> Result<Self, QmpError> {
        let ty = a
            .opt_enum("type", &["unix", "inet"])?
            .ok_or_else(|| QmpError::generic("Parameter 'addr.type' is missing"))?;
        let mut d = a
            .opt_object("data")?
            .ok_or_else(|| QmpError::generic("Parameter 'addr.data' is missing"))?;
        let addr = if ty == "unix" {
            NbdAddr::Unix(d.str("path")?.into())
        } else {
            NbdAddr::Inet {
                host: d.str("host")?,
                port: d.str("port")?,
            }
        };
        d.finish()?;
        a.finish()?;
        Ok(addr)
    }
}

#[derive(Debug)]
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
    /// `max-connections` is 1: exports do not offer multi-conn.
    single_client: bool,
}

/// One export as QMP sees it.
#[derive(Debug)]
struct ExportRec {
    id: String,
    node: String,
    name: String,
}

/// What `block-export-add` asks for.
#[derive(Debug)]
pub struct NewExport {
    pub id: String,
    pub node: String,
    /// The NBD export name; the node name when absent (as QEMU).
    pub name: Option<String>,
    pub description: Option<String>,
    pub writable: bool,
    pub device: Arc<dyn BlockDevice>,
    pub node_read_only: bool,
}

/// The NBD server and its exports.
#[derive(Debug, Default)]
pub struct Exports {
    server: Option<Running>,
    table: Arc<RwLock<Vec<Export>>>,
    recs: Vec<ExportRec>,
}

impl Exports {
    pub fn server_running(&self) -> bool {
        self.server.is_some()
    }

    /// Whether an export serves `node`.
    pub fn uses_node(&self, node: &str) -> bool {
        self.recs.iter().any(|r| r.node == node)
    }

    /// The ids of the exports of `node`.
    pub fn ids_of_node(&self, node: &str) -> Vec<String> {
        self.recs
            .iter()
            .filter(|r| r.node == node)
            .map(|r| r.id.clone())
            .collect()
    }

    /// Starts the NBD server; with `tls`, every client must upgrade to TLS
    /// before it sees anything (the export list included). At most
    /// `max_connections` clients are served at once, 0 for no limit (QEMU's
    /// `max-connections`); further ones wait to be accepted.
    pub async fn start(
        &mut self,
        addr: &NbdAddr,
        tls: Option<nbd::tls::ServerTls>,
        max_connections: u64,
    ) -> Result<(), QmpError> {
        if self.server.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let listener = match addr {
            NbdAddr::Unix(p) => Listener::bind_unix(p),
            NbdAddr::Inet { host, port } => {
                let h = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                Listener::bind_tcp(&format!("{h}:{port}")).await
            }
        }
        .map_err(|e| QmpError::generic(format!("Failed to start the NBD server: {e}")))?;
        let mut config = ServerConfig::new(Vec::new());
        config.shared_exports = Some(Arc::clone(&self.table));
        config.persistent = true;
        config.tls = tls;
        config.max_connections = match max_connections {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        };
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async move {
            let _ = rx.await;
        }));
        self.server = Some(Running {
            stop,
            task,
            single_client: max_connections == 1,
        });
        Ok(())
    }

    /// Stops the server: in-flight requests finish, writable exports are
    /// flushed. Returns the ids of the exports that went away.
    pub async fn stop(&mut self) -> Result<Vec<String>, QmpError> {
        let Some(r) = self.server.take() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        let _ = r.stop.send(());
        let res = r.task.await;
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let ids = self.recs.drain(..).map(|r| r.id).collect();
        match res {
            Ok(Ok(())) => Ok(ids),
            Ok(Err(e)) => Err(QmpError::generic(format!("NBD server: {e}"))),
            Err(e) => Err(QmpError::generic(format!("NBD server task failed: {e}"))),
        }
    }

    /// `block-export-add` of an NBD export.
    pub fn add(&mut self, new: NewExport) -> Result<(), QmpError> {
        let NewExport {
            id,
            node,
            name,
            description,
            writable,
            device,
            node_read_only,
        } = new;
        if self.server.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        if self.recs.iter().any(|r| r.id == id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        let name = name.unwrap_or_else(|| node.clone());
        if self.recs.iter().any(|r| r.name == name) {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        if writable && node_read_only {
            return Err(QmpError::generic(format!(
                "Block node '{node}' is read-only; cannot export it writable"
            )));
        }
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Export {
                name: name.clone(),
                description: description.unwrap_or_default(),
                device,
                read_only: !writable,
                // One Image object serves every connection; but a server
                // taking one client at a time does not offer multi-conn
                // (QEMU: never with max-connections=1).
                multi_conn: !self.server.as_ref().is_some_and(|r| r.single_client),
            });
        self.recs.push(ExportRec { id, node, name });
        Ok(())
    }

    pub fn del(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(i) = self.recs.iter().position(|r| r.id == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        let rec = self.recs.remove(i);
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|e| e.name != rec.name);
        Ok(())
    }

    /// `query-block-exports`.
    pub fn query(&self) -> Value {
        Value::Array(
            self.recs
                .iter()
                .map(|r| json!({"type": "nbd", "id": r.id, "node-name": r.node, "shutting-down": false}))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_addresses_parse_like_the_daemon_flag() {
        assert_eq!(
            NbdAddr::parse("unix:/tmp/x.sock"),
            Ok(NbdAddr::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            NbdAddr::parse("127.0.0.1:10809"),
            Ok(NbdAddr::Inet {
                host: "127.0.0.1".into(),
                port: "10809".into()
            })
        );
        assert_eq!(
            NbdAddr::parse("[::1]:0"),
            Ok(NbdAddr::Inet {
                host: "::1".into(),
                port: "0".into()
            })
        );
        assert!(NbdAddr::parse("nonsense").is_err());
    }
}
