//! The `diskstream` command: wires the library crates to a clap interface.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Debug, Parser)]
#[command(
    name = "diskstream",
    version,
    about = "Copy-on-read disk images and background image streaming"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Copy an overlay's data from its backing chain until it is independent.
    Stream(cmd::stream::StreamArgs),
    /// Serve QMP on a Unix socket: block nodes, block-stream jobs.
    Daemon(cmd::daemon::DaemonArgs),
    /// Start streaming a daemon node from its backing (virsh blockpull).
    Pull(cmd::pull::PullArgs),
    /// Copy the next unit of a daemon node and print the next offset.
    PullStep(cmd::pull_step::PullStepArgs),
    /// Show or control a daemon's block job (virsh blockjob).
    Job(cmd::job::JobArgs),
    /// Send one raw QMP command to a daemon and print the reply.
    Qmp(cmd::qmp::QmpArgs),
    /// Export an image over NBD (like qemu-nbd).
    Serve(cmd::serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("diskstream: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        match cli.command {
            Command::Stream(a) => cmd::stream::run(a).await,
            Command::Daemon(a) => cmd::daemon::run(a).await,
            Command::Pull(a) => cmd::pull::run(a).await,
            Command::PullStep(a) => cmd::pull_step::run(a).await,
            Command::Job(a) => cmd::job::run(a).await,
            Command::Qmp(a) => cmd::qmp::run(a).await,
            Command::Serve(a) => cmd::serve::run(a).await,
        }
    });
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("diskstream: {e:#}");
            ExitCode::FAILURE
        }
    }
}
