//! The `diskstream` command: wires the library crates to a clap interface.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "diskstream",
    version,
    about = "Copy-on-read disk images and background image streaming"
)]
struct Cli {}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    ExitCode::SUCCESS
}
