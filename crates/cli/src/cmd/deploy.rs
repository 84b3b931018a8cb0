//! `diskstream deploy`: give a VM its disk now, from a central repository.
//!
//! Creates a qcow2 overlay on SOURCE (a local image or an NBD export),
//! serves it over NBD at once with copy-on-read, streams the rest in the
//! background and keeps serving after the stream has made the overlay
//! independent, until SIGINT/SIGTERM (which, mid-stream, leaves the overlay
//! resumable: `diskstream stream IMAGE` finishes it). With `--qmp` the
//! overlay is handed to a running `diskstream daemon` instead
//! (`blockdev-add` with copy-on-read, `block-export-add`, `block-stream`)
//! and the command follows the job.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use super::session::{self, Reporter, Session, SessionConfig, report_summary};
use super::source::{Policy, SourceOptions, parse_policy};

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Where to serve the overlay: unix:PATH or HOST:PORT (default:
    /// unix:IMAGE.sock). Not with --qmp (the daemon's NBD server is used;
    /// give --serve to have it started).
    #[arg(long, value_name = "ADDR")]
    serve: Option<String>,
    /// Export name (default: IMAGE's file name without extension).
    #[arg(long, value_name = "NAME")]
    export: Option<String>,
    /// Stream policy.
    #[arg(long, default_value = "fixed", value_parser = parse_policy)]
    policy: Policy,
    /// Stream rate limit for --policy fixed: bytes per second (K, M, G
    /// suffixes); default unlimited. Holes and zeros are never charged.
    #[arg(long, value_name = "RATE", value_parser = super::parse_size)]
    speed: Option<u64>,
    /// Format of the overlay (qcow2).
    #[arg(short = 'f', long = "format", default_value = "qcow2", value_parser = parse_overlay_format)]
    format: String,
    /// Format of a local SOURCE (default: probed). NBD sources are raw.
    #[arg(short = 'F', long = "source-format", value_name = "FMT")]
    source_format: Option<String>,
    /// How long guest reads of remote data wait for a lost NBD source:
    /// seconds, or "unlimited".
    #[arg(long, value_name = "S", default_value = "60", value_parser = parse_window)]
    reconnect_window: Window,
    /// Hand the overlay to the `diskstream daemon` listening on this QMP
    /// socket instead of serving it from this process.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// With --qmp: the node name (and job id) in the daemon (default: the
    /// export name).
    #[arg(long, value_name = "NAME", requires = "qmp")]
    node_name: Option<String>,
    /// Output: human (progress line on a terminal) or json (one event per
    /// line on stdout).
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// The repository image: a local image path, nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH or an http(s):// URL (HTTPS trusts the
    /// system's CA certificates, or the PEM file named by SSL_CERT_FILE).
    source: String,
    /// The overlay to create (must not exist).
    image: PathBuf,
}

/// A reconnect window: `None` = unlimited.
pub type Window = Option<Duration>;

/// `--reconnect-window`: seconds or "unlimited".
pub fn parse_window(s: &str) -> Result<Window, String> {
    if s == "unlimited" {
        return Ok(None);
    }
    s.parse::<u64>()
        .map(|n| Some(Duration::from_secs(n)))
        .map_err(|_| format!("'{s}': expected a number of seconds or 'unlimited'"))
}

/// The overlay formats deploy creates.
pub fn parse_overlay_format(s: &str) -> Result<String, String> {
    match s {
        "qcow2" => Ok(s.to_string()),
        "qed" => Err("qed overlays are not available in this build; use qcow2".into()),
        other => Err(format!("'{other}': overlays are qcow2")),
    }
}

/// The default export name: the image's file name without extension.
pub fn default_export(image: &std::path::Path) -> String {
    image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub async fn run(args: DeployArgs) -> Result<ExitCode> {
    let report = Reporter::new("deploy", args.output == "json");
    let export = args
        .export
        .clone()
        .unwrap_or_else(|| default_export(&args.image));
    let cfg = SessionConfig {
        source: args.source.clone(),
        source_format: args.source_format.clone(),
        image: args.image.clone(),
        serve: args
            .serve
            .clone()
            .unwrap_or_else(|| format!("unix:{}.sock", args.image.display())),
        export,
        speed: args.speed.unwrap_or(0),
        policy: args.policy,
        source_opts: SourceOptions {
            reconnect_window: args.reconnect_window,
        },
        persistent: true,
    };
    if let Some(qmp) = &args.qmp {
        return via_daemon(&args, &cfg, qmp, &report).await;
    }
    let mut s = Session::start(&cfg, &report).await?;
    let outcome = s.follow(&report).await;
    let code = match &outcome {
        Ok(summary) => {
            report_summary(&report, summary, &cfg.image, json!({}));
            match summary.outcome {
                stream::Outcome::Completed => None,
                // Stopped by a signal: do not keep serving.
                stream::Outcome::Cancelled => Some(ExitCode::from(130)),
            }
        }
        Err(e) => {
            report.event(
                "stream-failed",
                json!({"error": format!("{e:#}")}),
                &format!("{e:#}; still serving what is local (Ctrl-C stops)"),
            );
            None
        }
    };
    let code = match code {
        Some(c) => c,
        None => {
            report.event(
                "serving",
                json!({"uri": s.uri}),
                &format!("still serving at {} (Ctrl-C stops)", s.uri),
            );
            s.serve_until_done().await?;
            if outcome.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    };
    s.shutdown().await?;
    Ok(code)
}

/// `--qmp`: the daemon serves and streams; this process creates the
/// overlay, wires it up and follows the job.
async fn via_daemon(
    args: &DeployArgs,
    cfg: &SessionConfig,
    qmp: &std::path::Path,
    report: &Reporter,
) -> Result<ExitCode> {
    use super::qmp::{command_error, connect};
    let t0 = Instant::now();
    let src = session::create_overlay(cfg).await?;
    drop(src);
    let node = args.node_name.clone().unwrap_or_else(|| cfg.export.clone());
    let image =
        std::fs::canonicalize(&cfg.image).with_context(|| format!("{}", cfg.image.display()))?;
    let mut c = connect(qmp).await?;
    if let Some(serve) = &args.serve {
        let addr = daemon::export::NbdAddr::parse(serve).map_err(anyhow::Error::msg)?;
        let addr = match addr {
            daemon::export::NbdAddr::Unix(p) => {
                json!({"type": "unix", "data": {"path": p.display().to_string()}})
            }
            daemon::export::NbdAddr::Inet { host, port } => {
                json!({"type": "inet", "data": {"host": host, "port": port}})
            }
        };
        c.execute("nbd-server-start", json!({ "addr": addr }))
            .await
            .map_err(command_error)?;
    }
    let steps = [
        (
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": image.display().to_string()},
                "__com.diskstream_copy-on-read": true,
            }),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": node, "node-name": node, "name": cfg.export, "writable": true}),
        ),
    ];
    for (cmd, a) in steps {
        if let Err(e) = c.execute(cmd, a).await {
            bail!("{cmd}: {:#}", command_error(e));
        }
    }
    let ready = t0.elapsed();
    report.event(
        "ready",
        json!({"image": image.display().to_string(), "node-name": node, "export": cfg.export,
               "ready-seconds": ready.as_secs_f64()}),
        &format!(
            "the daemon serves {} as export '{}' (ready in {:.1} ms); streaming",
            image.display(),
            cfg.export,
            ready.as_secs_f64() * 1e3
        ),
    );
    let mut a = json!({"device": node, "job-id": node});
    if cfg.speed > 0 {
        a["speed"] = json!(cfg.speed);
    }
    c.execute("block-stream", a).await.map_err(command_error)?;
    super::pull::follow(&mut c, &node, !report.json, None).await
}
