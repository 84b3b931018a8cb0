//! `diskstream qmp`: send one raw QMP command to a daemon and print its
//! reply; plus the connection helper the other client commands share.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use daemon::qmp::client::{Client, ClientError};
use serde_json::Value;

#[derive(Debug, Args)]
pub struct QmpArgs {
    /// The daemon's QMP socket.
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
    /// The request, e.g. '{"execute": "query-block-jobs"}'.
    request: String,
}

/// Connects and negotiates capabilities.
pub async fn connect(path: &Path) -> Result<Client> {
    Client::connect(path)
        .await
        .with_context(|| format!("{}: connect to the daemon", path.display()))
}

/// A command error as `CLASS: description` (what QEMU's class says helps
/// scripts tell "no such job" from a real failure).
pub fn command_error(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Command(q) => anyhow::anyhow!("{}: {}", q.class.as_str(), q.desc),
        other => other.into(),
    }
}

pub async fn run(args: QmpArgs) -> Result<ExitCode> {
    let req: Value = serde_json::from_str(&args.request)
        .with_context(|| format!("request is not JSON: {}", args.request))?;
    let Value::Object(req) = req else {
        bail!("request must be a JSON object with \"execute\"");
    };
    let mut c = connect(&args.qmp).await?;
    let reply = c.raw(req).await.map_err(command_error)?;
    if let Some(r) = reply.get("return") {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let e = reply.get("error").cloned().unwrap_or(reply.clone());
    eprintln!(
        "diskstream: {}: {}",
        e.get("class").and_then(Value::as_str).unwrap_or("error"),
        e.get("desc").and_then(Value::as_str).unwrap_or("")
    );
    Ok(ExitCode::FAILURE)
}
