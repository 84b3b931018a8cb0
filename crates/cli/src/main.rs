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
