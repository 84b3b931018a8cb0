//! `diskstream job`: look at or control a daemon's block job, like `virsh
//! blockjob`: `--info` (the default), `--abort`, `--pause`, `--resume`,
//! `--bandwidth RATE`, and `--policy NAME` (with its parameters) to change
//! the stream policy of a running job.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::pull::{find_job, progress_line};
use super::qmp::{command_error, connect};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("action").args(["info", "abort", "pause", "resume", "bandwidth", "policy"])))]
pub struct JobArgs {
    /// The job's device (job id; `diskstream pull` uses the node name).
    device: String,
    /// The daemon's QMP socket.
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
    /// Print the job's progress (the default).
    #[arg(long)]
    info: bool,
    /// Cancel the job; the image stays resumable.
    #[arg(long)]
    abort: bool,
    #[arg(long)]
    pause: bool,
    #[arg(long)]
    resume: bool,
    /// Change the speed limit: bytes per second (suffixes K, M, G; 0 = none).
    #[arg(long, value_name = "RATE", value_parser = super::parse_size)]
    bandwidth: Option<u64>,
    /// Change the stream policy (and its parameters) while the job runs.
    #[command(flatten)]
    policy: super::policy::PolicyArgs,
    /// Output format of --info.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    output: String,
}

pub async fn run(args: JobArgs) -> Result<ExitCode> {
    let mut c = connect(&args.qmp).await?;
    let dev = json!({"device": args.device});
    let command = if args.abort {
        Some(("block-job-cancel", dev))
    } else if args.pause {
        Some(("block-job-pause", dev))
    } else if args.resume {
        Some(("block-job-resume", dev))
    } else if args.policy.policy.is_some() {
        let mut a = args.policy.qmp_args("");
        a.insert("device".into(), json!(args.device));
        Some((
            "__com.diskstream_block-job-set-policy",
            serde_json::Value::Object(a),
        ))
    } else {
        args.bandwidth.map(|s| {
            (
                "block-job-set-speed",
                json!({"device": args.device, "speed": s}),
            )
        })
    };
    if let Some((name, a)) = command {
        c.execute(name, a).await.map_err(command_error)?;
        return Ok(ExitCode::SUCCESS);
    }
    let job = find_job(&mut c, &args.device).await?;
    if args.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&job.unwrap_or(serde_json::Value::Null))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    match job {
        None => println!("No current block job for {}", args.device),
        Some(j) => {
            let speed = j["speed"].as_u64().unwrap_or(0);
            let mut line = progress_line(&j);
            if speed > 0 {
                line.push_str(&format!("    Bandwidth limit: {speed} bytes/s"));
            }
            line.push_str(&format!(
                "    Status: {}",
                j["status"].as_str().unwrap_or("?")
            ));
            println!("{line}");
            if let Some(p) = super::policy::policy_line(&j) {
                println!("{p}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
