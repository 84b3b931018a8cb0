//! `diskstream pull-step`: one-unit streaming over QMP, the original
//! proposal's `virDomainStreamDisk(ONE)`: copy the next unit at or after
//! OFFSET and print where the next step starts, for a management loop.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::qmp::{command_error, connect};

#[derive(Debug, Args)]
pub struct PullStepArgs {
    /// The node to stream into (its node-name).
    device: String,
    /// Where to look for the next unit to copy (suffixes K, M, G).
    #[arg(value_parser = super::parse_size)]
    offset: u64,
    /// The daemon's QMP socket.
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
}

pub async fn run(args: PullStepArgs) -> Result<ExitCode> {
    let mut c = connect(&args.qmp).await?;
    let r = c
        .execute(
            "__com.diskstream_block-stream-step",
            json!({"device": args.device, "offset": args.offset}),
        )
        .await
        .map_err(command_error)?;
    println!("{r}");
    Ok(ExitCode::SUCCESS)
}
