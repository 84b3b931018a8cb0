//! `diskstream serve`: export one image over NBD, like `qemu-nbd`.
//!
//! Options mirror qemu-nbd where they overlap (`--read-only`, `--socket`,
//! `--export`, `--persistent`, `--shared`, `--format`); `--bind HOST:PORT`
//! replaces qemu-nbd's `-b`/`-p` pair and `-t` is the cache mode, as in
//! `qemu-img`. Without `--persistent` the server exits once the last client
//! has disconnected; SIGINT/SIGTERM stop it gracefully (in-flight requests
//! finish and the image is flushed and closed). `--tls-cert`/`--tls-key`
//! make TLS required (qemu-nbd's `--tls-creds` with an x509 object).
//! `--copy-on-read` keeps what clients read from an overlay's backing in the
//! overlay (QEMU's `copy-on-read=on` drive option), so a VM booting from the
//! export populates its own disk.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use image::{BlockDevice, CacheMode, OpenOptions};
use nbd::server::{self, Export, Listener, ServerConfig};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Export read-only.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Listen on this Unix socket.
    #[arg(short = 'k', long, value_name = "PATH", conflicts_with = "bind")]
    pub socket: Option<PathBuf>,
    /// Listen on this TCP address (default 0.0.0.0:10809, as qemu-nbd).
    #[arg(short = 'b', long, value_name = "HOST:PORT")]
    pub bind: Option<String>,
    /// Export name (default "", as qemu-nbd).
    #[arg(short = 'x', long = "export", value_name = "NAME", default_value = "")]
    pub export: String,
    /// Export description (shown by `nbdinfo --list`).
    #[arg(short = 'D', long, value_name = "TEXT", default_value = "")]
    pub description: String,
    /// Keep serving after the last client disconnects.
    #[arg(long)]
    pub persistent: bool,
    /// Serve at most N clients at once (default 1, as qemu-nbd).
    #[arg(short = 'e', long, value_name = "N", default_value_t = 1)]
    pub shared: usize,
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Cache mode: writeback or none.
    #[arg(
        short = 't',
        long = "cache",
        value_name = "CACHE",
        default_value = "writeback"
    )]
    pub cache: CacheMode,
    /// Seconds a client may take to negotiate (0 = unlimited).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub handshake_limit: u64,
    /// Require TLS with this X.509 certificate chain (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Populate IMAGE from client reads: data read from its backing chain
    /// is written into IMAGE, so the next read of it is local (QEMU's
    /// copy-on-read). Needs a writable export.
    #[arg(long, conflicts_with = "read_only")]
    pub copy_on_read: bool,
    /// Report connection errors on stderr.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Record the order in which clients first touch each range (at the
    /// image's allocation unit) and write it to FILE when the server stops,
    /// for `diskstream stream --profile` / `pull --profile`.
    #[arg(long, value_name = "FILE")]
    pub record_profile: Option<PathBuf>,
    pub image: PathBuf,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.shared >= 1, "--shared must be at least 1");
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(nbd::tls::server_config(c, k)?),
        _ => None,
    };
    let opts = OpenOptions {
        writable: !args.read_only,
        cache: args.cache,
        format: args.format.clone(),
        opener: Some(super::network_opener()),
        ..OpenOptions::default()
    };
    let img = image::open(&args.image, &opts)
        .await
        .with_context(|| format!("opening {}", args.image.display()))?;
    if args.record_profile.is_some() {
        img.access().start_profile(img.info().granularity.max(512));
    }
    if args.copy_on_read {
        img.set_copy_on_read(true, None);
    }
    let listener = match (&args.socket, &args.bind) {
        (Some(p), _) => Listener::bind_unix(p)?,
        (None, Some(a)) => Listener::bind_tcp(a).await?,
        (None, None) => Listener::bind_tcp("0.0.0.0:10809").await?,
    };
    if args.verbose {
        eprintln!(
            "diskstream serve: exporting {} as '{}' on {}",
            args.image.display(),
            args.export,
            listener.describe()
        );
    }
    let device: Arc<dyn BlockDevice> = img.clone();
    let mut config = ServerConfig::new(vec![Export {
        name: args.export.clone(),
        description: args.description.clone(),
        device,
        read_only: args.read_only,
        // One Image object serves every connection, so a flush covers them
        // all; but a client that opens several connections needs the
        // server to take them: offered only with --shared above 1, as
        // qemu-nbd does (nbdcopy waited forever on a second connection).
        multi_conn: args.shared > 1,
    }]);
    config.max_connections = args.shared;
    config.persistent = args.persistent;
    config.verbose = args.verbose;
    config.tls = tls;
    config.handshake_timeout = match args.handshake_limit {
        0 => Duration::MAX,
        s => Duration::from_secs(s),
    };
    server::run(listener, config, shutdown_signal()).await?;
    if let (Some(path), Some(p)) = (&args.record_profile, img.access().profile()) {
        std::fs::write(path, p.to_text())
            .with_context(|| format!("writing profile {}", path.display()))?;
        if args.verbose {
            eprintln!(
                "diskstream serve: {} ranges recorded in {}",
                p.offsets.len(),
                path.display()
            );
        }
    }
    img.close()
        .await
        .with_context(|| format!("closing {}", args.image.display()))?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
