//! `diskstream migrate send|receive`: post-copy block migration.
//!
//! The rule that makes post-copy safe: the destination copies from the
//! source only once the source disk has stopped changing, and from then on
//! the source export is read-only. `send` enforces it on the source daemon
//! (`__com.diskstream_migrate-send`: flush, freeze read-only, export
//! read-only); `receive` runs the destination: an overlay backed by that
//! export, served to the local VM at once, streamed, with the NBD client's
//! reconnect window unlimited by default so a network blip holds the
//! guest's remote reads instead of failing them. When every byte is local
//! (and, with `--verify`, every byte the guest did not write equals the
//! source) it says the source may stop, and exits 0 once the last client
//! has left (or keeps serving with `--persistent`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::deploy::{Window, default_export, parse_window};
use super::session::{Reporter, Session, SessionConfig, report_summary};
use super::source::{Policy, SourceOptions, parse_policy};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(subcommand)]
    side: Side,
}

#[derive(Debug, Subcommand)]
enum Side {
    /// Source side, at switchover (the VM stopped): flush DEVICE, make it
    /// read-only and export it read-only to the destination.
    Send(SendArgs),
    /// Destination side: serve an overlay backed by the source export at
    /// once, stream it, and say when the source may stop.
    Receive(ReceiveArgs),
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The source daemon's QMP socket.
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
    /// Start the daemon's NBD server on this TCP address first.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "socket")]
    bind: Option<String>,
    /// Start the daemon's NBD server on this Unix socket first.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Export name (default: DEVICE).
    #[arg(long, value_name = "NAME")]
    export: Option<String>,
    /// The node to migrate (its node-name in the daemon).
    device: String,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// The source export: nbd://HOST:PORT/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH.
    #[arg(long, value_name = "URI")]
    from: String,
    /// The overlay to create on this host (must not exist).
    #[arg(long, value_name = "IMAGE")]
    to: PathBuf,
    /// Where to serve it to the local VM: unix:PATH or HOST:PORT (default:
    /// unix:IMAGE.sock).
    #[arg(long, value_name = "ADDR")]
    serve: Option<String>,
    /// Export name (default: IMAGE's file name without extension).
    #[arg(long, value_name = "NAME")]
    export: Option<String>,
    /// Stream policy.
    #[arg(long, default_value = "fixed", value_parser = parse_policy)]
    policy: Policy,
    /// Stream rate limit for --policy fixed (bytes per second, K/M/G).
    #[arg(long, value_name = "RATE", value_parser = super::parse_size)]
    speed: Option<u64>,
    /// Before declaring success, check that every range the guest has not
    /// written here equals the source.
    #[arg(long)]
    verify: bool,
    /// Keep serving after the migration completed and the last client left.
    #[arg(long)]
    persistent: bool,
    /// How long guest reads of remote data wait for a lost source: seconds,
    /// or "unlimited".
    #[arg(long, value_name = "S", default_value = "unlimited", value_parser = parse_window)]
    reconnect_window: Window,
    /// Output: human or json (one event per line on stdout).
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    output: String,
}

pub async fn run(args: MigrateArgs) -> Result<ExitCode> {
    match args.side {
        Side::Send(a) => send(a).await,
        Side::Receive(a) => receive(a).await,
    }
}

async fn send(args: SendArgs) -> Result<ExitCode> {
    use super::qmp::{command_error, connect};
    let mut c = connect(&args.qmp).await?;
    let addr = match (&args.bind, &args.socket) {
        (Some(b), _) => {
            let a = daemon::export::NbdAddr::parse(b).map_err(anyhow::Error::msg)?;
            let daemon::export::NbdAddr::Inet { host, port } = a else {
                anyhow::bail!("--bind takes HOST:PORT (use --socket for a Unix socket)");
            };
            Some(json!({"type": "inet", "data": {"host": host, "port": port}}))
        }
        (None, Some(p)) => Some(json!({"type": "unix", "data": {"path": p.display().to_string()}})),
        (None, None) => None,
    };
    if let Some(addr) = addr {
        c.execute("nbd-server-start", json!({ "addr": addr }))
            .await
            .map_err(|e| {
                let e = command_error(e);
                let hint = if format!("{e:#}").contains("already running") {
                    " (the daemon already serves NBD, e.g. from its --nbd: leave out \
                     --bind/--socket and the destination reads from that server)"
                } else {
                    ""
                };
                anyhow::anyhow!("nbd-server-start: {e:#}{hint}")
            })?;
    }
    let name = args.export.clone().unwrap_or_else(|| args.device.clone());
    c.execute(
        "__com.diskstream_migrate-send",
        json!({"node-name": args.device, "name": name}),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{}: {:#}", args.device, command_error(e)))?;
    let from = match (&args.bind, &args.socket) {
        (Some(b), _) => format!("nbd://{b}/{name}"),
        (None, Some(p)) => format!("nbd+unix:///{name}?socket={}", p.display()),
        (None, None) => format!("nbd://SOURCE-HOST:PORT/{name}"),
    };
    println!(
        "{}: flushed, read-only, exported as '{name}'; on the destination run:\n  \
         diskstream migrate receive --from {from} --to IMAGE",
        args.device
    );
    Ok(ExitCode::SUCCESS)
}

async fn receive(args: ReceiveArgs) -> Result<ExitCode> {
    let report = Reporter::new("migrate", args.output == "json");
    let cfg = SessionConfig {
        source: args.from.clone(),
        source_format: None,
        image: args.to.clone(),
        serve: args
            .serve
            .clone()
            .unwrap_or_else(|| format!("unix:{}.sock", args.to.display())),
        export: args
            .export
            .clone()
            .unwrap_or_else(|| default_export(&args.to)),
        speed: args.speed.unwrap_or(0),
        policy: args.policy,
        source_opts: SourceOptions {
            reconnect_window: args.reconnect_window,
        },
        persistent: args.persistent,
    };
    let mut s = Session::start(&cfg, &report).await?;
    let outcome = s.follow(&report).await;
    let guest_came = s.image.stats().snapshot().completed > 0;
    let mut code = ExitCode::SUCCESS;
    match outcome {
        Ok(summary) if summary.outcome == stream::Outcome::Cancelled => {
            report_summary(&report, &summary, &cfg.image, json!({}));
            s.shutdown().await?;
            return Ok(ExitCode::from(130));
        }
        Ok(summary) => {
            report_summary(&report, &summary, &cfg.image, json!({}));
            let verified = if args.verify {
                match s.verify().await {
                    Ok(v) => {
                        report.event(
                            "verified",
                            serde_json::to_value(v)?,
                            &format!(
                                "verified: {} compared with the source, {} written by the guest",
                                super::session::human(v.compared),
                                super::session::human(v.written)
                            ),
                        );
                        true
                    }
                    Err(e) => {
                        report.event(
                            "verify-failed",
                            json!({"error": format!("{e:#}")}),
                            &format!("{e:#}; do NOT stop the source"),
                        );
                        code = ExitCode::FAILURE;
                        false
                    }
                }
            } else {
                true
            };
            if verified {
                report.event(
                    "complete",
                    json!({"source": cfg.source}),
                    &format!(
                        "migration complete: {} no longer needs {}; the source may stop now",
                        cfg.image.display(),
                        cfg.source
                    ),
                );
            }
        }
        Err(e) => {
            report.event(
                "stream-failed",
                json!({"error": format!("{e:#}")}),
                &format!("{e:#}; still serving what is local"),
            );
            code = ExitCode::FAILURE;
        }
    }
    // Keep the VM's disk while it is attached: without --persistent the
    // server ends once the last client has left (or at once if none came).
    if args.persistent || (guest_came && !s.server_finished()) {
        s.serve_until_done().await?;
    }
    s.shutdown().await?;
    Ok(code)
}
