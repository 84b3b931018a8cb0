//! `diskstream pull`: start a `block-stream` job on a daemon node, like
//! `virsh blockpull`; with `--wait`, follow it to the end.
//!
//! Waiting follows the job's events (`BLOCK_JOB_COMPLETED`,
//! `BLOCK_JOB_CANCELLED`) and polls `query-block-jobs` once a second for
//! the progress line, so a missed event cannot hang it: a job that is gone
//! from the list without an event ends the wait with an error. Ctrl-C or
//! `--timeout` cancel the job (the image keeps its backing link and a later
//! pull resumes) and the command fails.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use daemon::qmp::client::Client;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::qmp::{command_error, connect};

/// How long a cancelled job may take to stop before the command gives up.
const CANCEL_WAIT: Duration = Duration::from_secs(60);
/// How long a job may be gone from `query-block-jobs` before its end event
/// must have arrived.
const END_EVENT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The node to stream into (its node-name); also the job id.
    device: String,
    /// The daemon's QMP socket.
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
    /// File name of the image in the chain to stop at (it becomes the
    /// backing); default: stream everything and drop the backing.
    #[arg(long, value_name = "B")]
    base: Option<String>,
    /// Limit the copy rate: bytes per second (suffixes K, M, G).
    #[arg(long, value_name = "RATE", value_parser = super::parse_size)]
    bandwidth: Option<u64>,
    /// Wait for the job to end.
    #[arg(long)]
    wait: bool,
    /// With --wait: print a progress line.
    #[arg(long, requires = "wait")]
    verbose: bool,
    /// With --wait: cancel the job after this many seconds.
    #[arg(long, value_name = "S", requires = "wait")]
    timeout: Option<u64>,
}

pub async fn run(args: PullArgs) -> Result<ExitCode> {
    let mut c = connect(&args.qmp).await?;
    let mut a = json!({"device": args.device, "job-id": args.device});
    if let Some(b) = &args.base {
        a["base"] = json!(b);
    }
    if let Some(s) = args.bandwidth {
        a["speed"] = json!(s);
    }
    c.execute("block-stream", a).await.map_err(command_error)?;
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = args
        .timeout
        .map(|s| Instant::now() + Duration::from_secs(s));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let r = tokio::select! {
        r = follow(&mut c, &args.device, args.verbose, deadline) => r,
        _ = &mut ctrl_c => Err(anyhow::anyhow!("interrupted")),
    };
    match r {
        Ok(code) => Ok(code),
        Err(e) => {
            if args.verbose {
                eprintln!();
            }
            // Cancel, and wait (bounded) until the job says it stopped.
            let _ = c
                .execute("block-job-cancel", json!({"device": args.device}))
                .await;
            let end = Instant::now() + CANCEL_WAIT;
            while Instant::now() < end {
                match c.next_event(end).await.map_err(command_error)? {
                    Some(ev)
                        if matches!(
                            ev.name.as_str(),
                            "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_COMPLETED"
                        ) && ev.data["device"] == json!(args.device) =>
                    {
                        break;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            bail!(
                "{}: {e}; the pull was cancelled (run it again to resume)",
                args.device
            )
        }
    }
}

/// The job's `query-block-jobs` entry, if it is still listed.
pub async fn find_job(c: &mut Client, device: &str) -> Result<Option<Value>> {
    let jobs = c
        .execute("query-block-jobs", json!({}))
        .await
        .map_err(command_error)?;
    Ok(jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["device"] == json!(device)).cloned()))
}

/// `Block Pull: [ 45 %]`, as virsh prints it.
pub fn progress_line(job: &Value) -> String {
    let len = job["len"].as_u64().unwrap_or(0);
    let off = job["offset"].as_u64().unwrap_or(0);
    let pct = off.saturating_mul(100).checked_div(len).unwrap_or(100);
    format!("Block Pull: [{pct:3} %]")
}

pub(crate) async fn follow(
    c: &mut Client,
    device: &str,
    verbose: bool,
    deadline: Option<Instant>,
) -> Result<ExitCode> {
    let mut next_poll = Instant::now();
    let mut missing_since: Option<Instant> = None;
    // Bounded by the job ending (event, or gone from the list) or the deadline.
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            bail!("timed out");
        }
        if now >= next_poll {
            next_poll = now + Duration::from_secs(1);
            match find_job(c, device).await? {
                Some(job) => {
                    if verbose {
                        eprint!("\r{}", progress_line(&job));
                        let _ = std::io::stderr().flush();
                    }
                    if job["status"] == "concluded" {
                        // auto-dismiss off: the end event was already sent.
                        if let Some(e) = job.get("error").and_then(Value::as_str) {
                            bail!("the job failed: {e}");
                        }
                    }
                }
                // The end event may still be on its way (the daemon writes
                // a reply before events queued while the command ran).
                None => {
                    let since = *missing_since.get_or_insert(now);
                    if now.duration_since(since) > END_EVENT_GRACE {
                        bail!("the job disappeared without reporting how it ended");
                    }
                }
            }
        }
        let wake = deadline.map_or(next_poll, |d| d.min(next_poll));
        let Some(ev) = c.next_event(wake).await.map_err(command_error)? else {
            continue;
        };
        if ev.data["device"] != json!(device) {
            continue;
        }
        match ev.name.as_str() {
            "BLOCK_JOB_COMPLETED" => {
                if verbose {
                    eprintln!("\rBlock Pull: [100 %]");
                }
                if let Some(e) = ev.data.get("error").and_then(Value::as_str) {
                    bail!("{device}: the pull failed: {e}");
                }
                println!("Pull complete");
                return Ok(ExitCode::SUCCESS);
            }
            "BLOCK_JOB_CANCELLED" => {
                if verbose {
                    eprintln!();
                }
                eprintln!("diskstream: {device}: the pull was cancelled");
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
    }
}
