//! `diskstream daemon`: the QMP control socket and the core that owns block
//! nodes, jobs and NBD exports, until SIGTERM, SIGINT or the QMP `quit` command.
//!
//! Shutdown order matters for the images: stop accepting and close the
//! connections first (so nothing starts a new job), stop the NBD server
//! (in-flight requests finish), then cancel every job
//! (copies in flight finish, the image is flushed and keeps its backing
//! link, so a later stream resumes where this one stopped), then close
//! every image, then remove the socket and the pid file.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use daemon::export::NbdAddr;
use serde_json::json;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Args)]
#[command(
    after_help = "HTTPS: blockdev-add nodes with driver \"https\" (and https:// backings) \
                        trust the system's CA certificates; to trust a private CA, start the \
                        daemon with SSL_CERT_FILE=CA.pem (it then replaces the system list), \
                        or give the node \"sslverify\": false."
)]
pub struct DaemonArgs {
    /// Unix socket to serve QMP on (created; removed on exit).
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
    /// Start the NBD server at once, on unix:PATH or HOST:PORT (exports are
    /// then added with QMP block-export-add), like qemu-storage-daemon's
    /// --nbd-server.
    #[arg(long, value_name = "unix:PATH|HOST:PORT", value_parser = daemon::export::NbdAddr::parse)]
    nbd: Option<daemon::export::NbdAddr>,
    /// Write the daemon's process id to this file (removed on exit).
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
}

/// Binds `path`, replacing a stale socket nobody listens on (left by a
/// killed daemon) but never a live one or a file that is not a socket.
fn bind(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{}: exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{}: another daemon is listening on this socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("{}: remove stale socket", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("{}: bind QMP socket", path.display()))
}

fn write_pidfile(path: &Path) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("{}: create pid file", path.display()))?;
    writeln!(f, "{}", std::process::id())
        .with_context(|| format!("{}: write pid file", path.display()))?;
    Ok(())
}

pub async fn run(args: DaemonArgs) -> Result<ExitCode> {
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let listener = bind(&args.qmp)?;
    if let Some(p) = &args.pidfile
        && let Err(e) = write_pidfile(p)
    {
        let _ = std::fs::remove_file(&args.qmp);
        return Err(e);
    }
    let (core, handle) = daemon::core::new(&daemon::package());
    let core_task = tokio::spawn(core.run());
    if let Some(addr) = &args.nbd {
        let a = match addr {
            NbdAddr::Unix(p) => json!({"type": "unix", "data": {"path": p}}),
            NbdAddr::Inet { host, port } => {
                json!({"type": "inet", "data": {"host": host, "port": port}})
            }
        };
        let r = handle
            .execute(
                "nbd-server-start",
                json!({"addr": a}).as_object().cloned().unwrap_or_default(),
            )
            .await;
        if let Err(e) = r {
            handle.shutdown().await;
            let _ = std::fs::remove_file(&args.qmp);
            if let Some(p) = &args.pidfile {
                let _ = std::fs::remove_file(p);
            }
            bail!("--nbd: {}", e.desc);
        }
    }
    let quit = handle.clone();
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
            _ = quit.quit_requested() => {}
        }
    };
    daemon::server::run(listener, handle.clone(), shutdown).await;
    handle.shutdown().await;
    drop(handle);
    let core_result = core_task.await;
    let _ = std::fs::remove_file(&args.qmp);
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    if let Err(e) = core_result {
        bail!("the daemon core failed: {e}");
    }
    Ok(ExitCode::SUCCESS)
}
