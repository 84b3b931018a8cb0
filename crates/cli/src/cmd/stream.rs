//! `diskstream stream`: pull an overlay's data from its backing chain.
//!
//! Full mode runs a [`stream::StreamJob`] with a progress line on a terminal
//! and a summary at the end; `--step OFFSET` copies one unit and prints the
//! next offset. Ctrl-C cancels: copies in flight finish, the image is flushed
//! and keeps its backing link, and running the command again resumes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use image::{CacheMode, OpenOptions};
use stream::{OnError, Outcome, StreamJob, StreamOptions};

#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Stop at this image of the chain: copy only what lies above it, and
    /// make it the backing when done (default: copy everything and drop the
    /// backing link).
    #[arg(long, value_name = "IMAGE")]
    base: Option<PathBuf>,
    /// Limit the copy rate, in bytes per second (suffixes K, M, G). Holes and
    /// zeros of the backing are never charged.
    #[arg(long, value_name = "RATE", value_parser = super::parse_size)]
    speed: Option<u64>,
    /// One-unit mode: copy the next unit at or after OFFSET that needs
    /// copying and print the offset after it (the virtual size when done).
    #[arg(long, value_name = "OFFSET", value_parser = super::parse_size)]
    step: Option<u64>,
    /// Copies in flight at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    in_flight: usize,
    /// Bytes per copy (a unit in --step mode).
    #[arg(long, default_value = "1M", value_name = "BYTES", value_parser = super::parse_size)]
    chunk_size: u64,
    /// What a failed copy does: report (fail), stop (pause; not useful
    /// without a controller, so treated as report here) or ignore (skip and
    /// report at the end, keeping the backing link).
    #[arg(long, default_value = "report", value_parser = parse_on_error)]
    on_error: OnError,
    /// Cache mode of the top image: writeback or none (O_DIRECT).
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: CacheMode,
    /// Output format of the result.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// The overlay to stream.
    image: PathBuf,
}

fn parse_on_error(s: &str) -> Result<OnError, String> {
    match s {
        "report" => Ok(OnError::Report),
        "stop" => Ok(OnError::Stop),
        "ignore" => Ok(OnError::Ignore),
        _ => Err(format!("'{s}': expected report, stop or ignore")),
    }
}

pub async fn run(args: StreamArgs) -> Result<ExitCode> {
    let opts = OpenOptions {
        writable: true,
        cache: args.cache,
        opener: Some(super::remote_opener()),
        ..OpenOptions::default()
    };
    let img = image::open(&args.image, &opts)
        .await
        .with_context(|| format!("{}", args.image.display()))?;
    let base = stream::resolve_base(&img, args.base.as_deref())?;
    let sopts = StreamOptions {
        device: args.image.display().to_string(),
        base,
        speed: args.speed.unwrap_or(0),
        on_error: match args.on_error {
            OnError::Stop => OnError::Report,
            other => other,
        },
        max_in_flight: args.in_flight.max(1),
        chunk_size: args.chunk_size.max(512),
    };
    let json = args.output == "json";
    if let Some(offset) = args.step {
        let out = stream::step(&img, offset, &sopts).await?;
        img.close().await?;
        if json {
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!("{}", out.next_offset);
            if out.completed {
                eprintln!(
                    "{}: streaming complete; the backing link was rewritten",
                    args.image.display()
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    let job = Arc::new(StreamJob::start(Arc::clone(&img), sopts));
    let tty = std::io::stderr().is_terminal() && !json;
    let progress = {
        let job = Arc::clone(&job);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let i = job.info();
                if i.state.is_final() {
                    break;
                }
                if tty {
                    let pct = if i.size == 0 {
                        100.0
                    } else {
                        i.offset as f64 * 100.0 / i.size as f64
                    };
                    let eta = i
                        .eta_seconds
                        .map_or("--".to_string(), |s| format!("{s:.0}s"));
                    eprint!(
                        "\r  {pct:5.1}%  {} copied  {}/s  ETA {eta}  {:?}   ",
                        human(i.copied),
                        human(i.rate),
                        i.state
                    );
                }
            }
        })
    };
    let waited = tokio::select! {
        r = job.wait() => r,
        _ = tokio::signal::ctrl_c() => {
            if tty { eprintln!(); }
            eprintln!("diskstream: cancelling; copies in flight finish first");
            job.cancel();
            job.wait().await
        }
    };
    progress.abort();
    if tty {
        eprint!("\r\x1b[K");
    }
    let summary = waited?;
    img.close().await?;
    let rate = if summary.seconds > 0.0 {
        summary.copied as f64 / summary.seconds
    } else {
        0.0
    };
    if json {
        let mut v = serde_json::to_value(&summary)?;
        v["device"] = serde_json::Value::String(args.image.display().to_string());
        v["rate"] = serde_json::json!(rate as u64);
        println!("{v}");
    } else {
        let what = match summary.outcome {
            Outcome::Completed => "complete",
            Outcome::Cancelled => "cancelled (resumable: run the command again)",
        };
        println!(
            "{}: stream {what}: {} copied, {} zeroed, {} skipped in {:.2}s ({}/s)",
            args.image.display(),
            human(summary.copied),
            human(summary.zeroed),
            human(summary.skipped),
            summary.seconds,
            human(rate as u64)
        );
    }
    Ok(match summary.outcome {
        Outcome::Completed => ExitCode::SUCCESS,
        Outcome::Cancelled => ExitCode::from(130),
    })
}

/// Bytes in binary units for humans.
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
