//! The `diskstream` command: wires the library crates to a clap interface.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd {
    pub mod serve;
}

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
    /// Export an image over NBD (like qemu-nbd).
    Serve(cmd::serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("diskstream: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(a) => cmd::serve::run(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("diskstream: {e:#}");
            ExitCode::FAILURE
        }
    }
}
