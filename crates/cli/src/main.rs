//! The `diskstream` command: wires the library crates to a clap interface.
//!
//! Each subcommand lives in its own module under [`cmd`] with its clap
//! `Args` and an async `run` that returns the process exit code; this file
//! only parses the command line, starts the tokio runtime and turns an error
//! into the one-line `diskstream: <file>: <problem>` message and exit code 1
//! (the only place `anyhow` meets the outside world).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Debug, Parser)]
#[command(
    name = "diskstream",
    version,
    about = "Copy-on-read disk images and background image streaming",
    long_about = "Copy-on-read disk images (qcow2 overlays over backing images) and \
                  background image streaming, compatible with QEMU's tools: images stay \
                  readable and checkable by qemu-img, and diskstream takes the same \
                  image locks QEMU takes."
)]
struct Cli {
    /// Connect to NBD servers (remote backings, `--from` sources) over TLS,
    /// trusting the CA certificates in this PEM file (QEMU: a tls-creds-x509
    /// object with endpoint=client and the nbd driver's tls-creds).
    #[arg(long, global = true, value_name = "PEM")]
    nbd_tls_ca: Option<std::path::PathBuf>,
    /// The name the NBD server's certificate must carry (default: the
    /// URI's host; "localhost" for a Unix socket).
    #[arg(long, global = true, value_name = "NAME", requires = "nbd_tls_ca")]
    nbd_tls_hostname: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Create(cmd::create::Args),
    Info(cmd::info::Args),
    Map(cmd::map::Args),
    Check(cmd::check::Args),
    Convert(cmd::convert::Args),
    /// Export an image over NBD (like qemu-nbd).
    Serve(cmd::serve::ServeArgs),
    /// Copy an overlay's data from its backing chain until it is independent.
    Stream(cmd::stream::StreamArgs),
    /// Serve QMP on a Unix socket: block nodes, NBD exports, block-stream jobs.
    Daemon(cmd::daemon::DaemonArgs),
    /// Start streaming a daemon node from its backing (virsh blockpull).
    Pull(cmd::pull::PullArgs),
    /// Copy the next unit of a daemon node and print the next offset.
    PullStep(cmd::pull_step::PullStepArgs),
    /// Show or control a daemon's block job (virsh blockjob).
    Job(cmd::job::JobArgs),
    /// Send one raw QMP command to a daemon and print the reply.
    Qmp(cmd::qmp::QmpArgs),
    /// Deploy an overlay on a repository image: serve it now, stream it in
    /// the background.
    Deploy(cmd::deploy::DeployArgs),
    /// Post-copy block migration: `send` on the source, `receive` on the
    /// destination.
    Migrate(cmd::migrate::MigrateArgs),
    /// Run the whole deployment on a built-in example and report.
    Demo(cmd::demo::DemoArgs),
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(ca) = &cli.nbd_tls_ca {
        cmd::nbd_tls::init(ca, cli.nbd_tls_hostname.as_deref())?;
    }
    match cli.command {
        Command::Create(a) => cmd::create::run(a).await,
        Command::Info(a) => cmd::info::run(a).await,
        Command::Map(a) => cmd::map::run(a).await,
        Command::Check(a) => cmd::check::run(a).await,
        Command::Convert(a) => cmd::convert::run(a).await,
        Command::Serve(a) => cmd::serve::run(a).await,
        Command::Stream(a) => cmd::stream::run(a).await,
        Command::Daemon(a) => cmd::daemon::run(a).await,
        Command::Pull(a) => cmd::pull::run(a).await,
        Command::PullStep(a) => cmd::pull_step::run(a).await,
        Command::Job(a) => cmd::job::run(a).await,
        Command::Qmp(a) => cmd::qmp::run(a).await,
        Command::Deploy(a) => cmd::deploy::run(a).await,
        Command::Migrate(a) => cmd::migrate::run(a).await,
        Command::Demo(a) => cmd::demo::run(a).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("diskstream: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("diskstream: {e:#}");
            ExitCode::FAILURE
        }
    }
}
