//! The engine `deploy`, `migrate receive` and `demo` share: create an
//! overlay on a source, serve it over NBD at once with copy-on-read, stream
//! it in the background, report progress, ride out source outages, and
//! verify the result.
//!
//! The decisions to know:
//! - "Ready" is the moment the export listens, with the overlay open on the
//!   connected source: nothing before it depends on the image size (the
//!   overlay header and an empty L1 table; no data is read), which the
//!   `ready` event proves by reporting the bytes read from the source so far.
//! - The export's device is a [`WriteLog`] over the overlay, so the guest's
//!   writes (and only those: not copy-on-read or the stream's copies) are
//!   recorded for [`Session::verify`].
//! - Outage policy: the NBD client holds guest requests while it reconnects
//!   (within its window); the session pauses the stream job when the source
//!   drops and resumes it when it is back, reporting both.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use daemon::export::NbdAddr;
use image::device::block_status_all;
use image::open::BackingChoice;
use image::tracking::WriteLog;
use image::{BackingSpec, BlockDevice, CreateOptions, ExtentKind, FormatKind, Image, OpenOptions};
use nbd::client::NbdClient;
use nbd::server::{self, Export, Listener, ServerConfig};
use serde_json::{Value, json};
use stream::{JobInfo, StreamJob, StreamOptions, StreamSummary};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::source::{self, SourceOptions};

/// How often progress is drawn and the source's connection looked at.
const TICK: Duration = Duration::from_millis(200);
/// How often a JSON progress event is printed.
const JSON_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Bytes compared at a time by [`Session::verify`].
const VERIFY_CHUNK: u64 = 4 << 20;

/// Where the session reports: people (stderr lines and a progress line on a
/// terminal) or scripts (`--output json`: one JSON event per stdout line).
#[derive(Clone, Debug)]
pub struct Reporter {
    pub json: bool,
    tty: bool,
    /// Command name prefixed to human lines.
    pub who: &'static str,
    quiet: bool,
}

impl Reporter {
    pub fn new(who: &'static str, json: bool) -> Self {
        Reporter {
            json,
            tty: !json && std::io::stderr().is_terminal(),
            who,
            quiet: false,
        }
    }

    /// A reporter that prints nothing (the demo's inner session).
    pub fn quiet(who: &'static str) -> Self {
        Reporter {
            json: false,
            tty: false,
            who,
            quiet: true,
        }
    }

    /// One event: a JSON line, or `human` on stderr (empty = nothing).
    pub fn event(&self, name: &str, mut data: Value, human: &str) {
        if self.json {
            data["event"] = json!(name);
            println!("{data}");
            let _ = std::io::stdout().flush();
        } else if !human.is_empty() && !self.quiet {
            if self.tty {
                eprint!("\r\x1b[K");
            }
            eprintln!("{}: {human}", self.who);
        }
    }

    fn progress(&self, i: &JobInfo, last_json: &mut Instant) {
        if self.json {
            if last_json.elapsed() >= JSON_PROGRESS_EVERY {
                *last_json = Instant::now();
                self.event("progress", json_info(i), "");
            }
        } else if self.tty {
            let pct = if i.size == 0 {
                100.0
            } else {
                i.offset as f64 * 100.0 / i.size as f64
            };
            let eta = i
                .eta_seconds
                .map_or("--".to_string(), |s| format!("{s:.0}s"));
            eprint!(
                "\r  streaming {pct:5.1}%  {} copied  {}/s  ETA {eta}  {:?}   ",
                human(i.copied),
                human(i.rate),
                i.state
            );
            let _ = std::io::stderr().flush();
        }
    }

    fn end_progress(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

fn json_info(i: &JobInfo) -> Value {
    serde_json::to_value(i).unwrap_or(Value::Null)
}

/// What a session is asked to do.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// A local image path or an NBD URI.
    pub source: String,
    /// Format of a local source (probed when `None`).
    pub source_format: Option<String>,
    /// The overlay to create.
    pub image: PathBuf,
    /// `unix:PATH` or `HOST:PORT`.
    pub serve: String,
    pub export: String,
    /// Bytes per second of streamed data; 0 = unlimited.
    pub speed: u64,
    /// How the stream paces itself against the guest and the host.
    pub policy: super::source::Policy,
    pub source_opts: SourceOptions,
    /// Keep serving after the last client has gone.
    pub persistent: bool,
}

/// A running deployment: the overlay, its export and its stream job.
#[derive(Debug)]
pub struct Session {
    pub image: Arc<Image>,
    pub log: Arc<WriteLog>,
    /// The source, held beyond the relink for [`Session::verify`].
    pub source: Arc<dyn BlockDevice>,
    pub job: Arc<StreamJob>,
    /// From the start of [`Session::start`] to the export listening.
    pub ready: Duration,
    /// When [`Session::start`] began.
    pub started: Instant,
    /// Set by the NBD server when it accepts its first connection: the
    /// time to ready is from `started` to then.
    pub first_accept: Arc<std::sync::OnceLock<Instant>>,
    /// Bytes read from the source by the time the export listened.
    pub source_bytes_before_ready: u64,
    /// The URI a client attaches to.
    pub uri: String,
    server: Option<JoinHandle<std::io::Result<()>>>,
    stop: watch::Sender<bool>,
}

/// Opens the source and creates the qcow2 overlay `cfg.image` on it
/// (refusing an existing file). Returns the open source.
pub async fn create_overlay(cfg: &SessionConfig) -> Result<source::Source> {
    if cfg.image.exists() {
        bail!(
            "{}: already exists; give a new file for the overlay",
            cfg.image.display()
        );
    }
    let src =
        source::open_source(&cfg.source, cfg.source_format.as_deref(), &cfg.source_opts).await?;
    let copts = CreateOptions {
        size: Some(src.device.size()),
        backing: Some(BackingSpec {
            name: src.name.clone(),
            format: Some(src.format.clone()),
        }),
        ..CreateOptions::default()
    };
    image::create(&cfg.image, FormatKind::Qcow2, &copts)
        .await
        .map_err(|e| super::file_error(&cfg.image, e))?;
    Ok(src)
}

/// The URI of an export at `addr`.
fn export_uri(listener: &Listener, addr: &NbdAddr, export: &str) -> String {
    match addr {
        NbdAddr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
        NbdAddr::Inet { .. } => format!("nbd://{}/{export}", listener.describe()),
    }
}

impl Session {
    /// Creates the overlay, serves it, starts streaming. Refuses to
    /// overwrite an existing file.
    pub async fn start(cfg: &SessionConfig, report: &Reporter) -> Result<Session> {
        let t0 = Instant::now();
        let addr = NbdAddr::parse(&cfg.serve).map_err(anyhow::Error::msg)?;
        if cfg.image.exists() {
            bail!(
                "{}: already exists; give a new file for the overlay",
                cfg.image.display()
            );
        }
        // Bound first: an address in use fails before any file is made.
        // Clients queue in the backlog until the server runs below.
        let listener = match &addr {
            NbdAddr::Unix(p) => Listener::bind_unix(p)?,
            NbdAddr::Inet { host, port } => Listener::bind_tcp(&format!("{host}:{port}")).await?,
        };
        let src = create_overlay(cfg).await?;
        let oopts = OpenOptions {
            writable: true,
            format: Some("qcow2".into()),
            backing: BackingChoice::Device(Arc::clone(&src.device)),
            ..OpenOptions::default()
        };
        let img = match image::open(&cfg.image, &oopts).await {
            Ok(img) => img,
            Err(e) => {
                // Made just now and never served: leave nothing behind.
                let _ = std::fs::remove_file(&cfg.image);
                return Err(super::file_error(&cfg.image, e));
            }
        };
        img.set_copy_on_read(true, None);
        let log = Arc::new(WriteLog::new(Arc::clone(&img) as Arc<dyn BlockDevice>));
        let ready = t0.elapsed();
        let source_bytes_before_ready = img.stats().snapshot().backing_read_bytes;
        let uri = export_uri(&listener, &addr, &cfg.export);
        let mut config = ServerConfig::new(vec![Export {
            name: cfg.export.clone(),
            description: format!("diskstream overlay on {}", src.name),
            device: Arc::clone(&log) as Arc<dyn BlockDevice>,
            read_only: false,
            multi_conn: true,
        }]);
        config.persistent = cfg.persistent;
        let first_accept = Arc::new(std::sync::OnceLock::new());
        config.first_accept = Some(Arc::clone(&first_accept));
        let (stop, mut stop_rx) = watch::channel(false);
        let server = tokio::spawn(server::run(listener, config, async move {
            let _ = stop_rx.wait_for(|&s| s).await;
        }));
        report.event(
            "ready",
            json!({
                "image": cfg.image.display().to_string(),
                "source": src.name,
                "source-format": src.format,
                "size": img.size(),
                "uri": uri,
                "ready-seconds": ready.as_secs_f64(),
                "source-bytes-read": source_bytes_before_ready,
            }),
            &format!(
                "serving {} at {uri} (listening in {:.1} ms; {} virtual, backed by {} ({}))",
                cfg.image.display(),
                ready.as_secs_f64() * 1e3,
                human(img.size()),
                src.name,
                src.format,
            ),
        );
        let sopts = StreamOptions {
            device: cfg.image.display().to_string(),
            speed: cfg.speed,
            policy: stream::policy::Policy {
                kind: cfg.policy,
                ..Default::default()
            },
            ..StreamOptions::default()
        };
        let job = Arc::new(StreamJob::start(Arc::clone(&img), sopts));
        Ok(Session {
            image: img,
            log,
            source: src.device,
            job,
            ready,
            started: t0,
            first_accept,
            source_bytes_before_ready,
            uri,
            server: Some(server),
            stop,
        })
    }

    /// From the start to the export's first accepted connection, once a
    /// client has connected.
    pub fn time_to_ready(&self) -> Option<Duration> {
        self.first_accept
            .get()
            .map(|t| t.saturating_duration_since(self.started))
    }

    /// Follows the stream to its end with progress, pausing it while the
    /// source is unreachable. Returns the job's summary; a cancelled job
    /// (Ctrl-C, SIGTERM) is reported as such by the summary's outcome.
    pub async fn follow(&self, report: &Reporter) -> Result<StreamSummary> {
        let nbd = (&*self.source as &dyn std::any::Any).downcast_ref::<NbdClient>();
        let mut paused_for_outage = false;
        let mut connected_reported = false;
        let mut last_json = Instant::now() - JSON_PROGRESS_EVERY;
        let stop = stop_signal();
        tokio::pin!(stop);
        let wait = self.job.wait();
        tokio::pin!(wait);
        let result = loop {
            tokio::select! {
                r = &mut wait => break r,
                _ = &mut stop => {
                    report.end_progress();
                    report.event("cancelling", json!({}), "stopping: copies in flight finish first; the overlay stays resumable");
                    self.job.cancel();
                    break self.job.wait().await;
                }
                _ = tokio::time::sleep(TICK) => {}
            }
            if !connected_reported && let Some(ttr) = self.time_to_ready() {
                connected_reported = true;
                report.end_progress();
                report.event(
                    "connected",
                    json!({"time-to-ready-seconds": ttr.as_secs_f64()}),
                    &format!(
                        "first client connected: time to ready {:.1} ms (start to first accepted connection)",
                        ttr.as_secs_f64() * 1e3
                    ),
                );
            }
            if let Some(c) = nbd {
                let up = c.is_connected();
                if !up && !paused_for_outage {
                    paused_for_outage = true;
                    self.job.pause();
                    report.end_progress();
                    report.event(
                        "source-lost",
                        json!({"source": c.uri()}),
                        &format!("{} stopped answering: stream paused, guest reads of remote data wait for it", c.uri()),
                    );
                } else if up && paused_for_outage {
                    paused_for_outage = false;
                    self.job.resume();
                    report.end_progress();
                    report.event(
                        "source-back",
                        json!({"source": c.uri()}),
                        &format!("{} is back: stream resumed", c.uri()),
                    );
                }
            }
            report.progress(&self.job.info(), &mut last_json);
        };
        report.end_progress();
        let summary = result
            .map_err(|e| anyhow::anyhow!("{}: stream failed: {e}", self.image.info().name))?;
        self.image.flush().await?;
        Ok(summary)
    }

    /// Whether the NBD server has stopped (without `persistent`: every
    /// client that came has gone).
    pub fn server_finished(&self) -> bool {
        self.server.as_ref().is_none_or(|s| s.is_finished())
    }

    /// Waits until the server ends by itself or a stop signal arrives.
    pub async fn serve_until_done(&mut self) -> Result<()> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        tokio::select! {
            r = server => {
                self.server = None;
                r.context("the NBD server task")??;
            }
            _ = stop_signal() => {}
        }
        Ok(())
    }

    /// Checks that every range the guest did not write reads the same here
    /// as on the source. Fails naming the first differing offset.
    pub async fn verify(&self) -> Result<VerifyReport> {
        let size = self.image.size();
        let mut compared = 0u64;
        let mut off = 0u64;
        while off < size {
            let end = (off + VERIFY_CHUNK).min(size);
            let gaps = self.log.written().gaps(off, end);
            if gaps.is_empty() {
                off = end;
                continue;
            }
            let here = self.image.read(off, (end - off) as usize).await?;
            let there = block_status_all(&*self.source, off, end - off).await?;
            for e in there {
                for &(gs, ge) in &gaps {
                    let (s, t) = (gs.max(e.offset), ge.min(e.end()));
                    if s >= t {
                        continue;
                    }
                    let mine = &here[(s - off) as usize..(t - off) as usize];
                    let bad = if e.kind == ExtentKind::Data {
                        let theirs = self.source.read(s, (t - s) as usize).await?;
                        mine.iter().zip(&theirs).position(|(a, b)| a != b)
                    } else {
                        mine.iter().position(|&b| b != 0)
                    };
                    if let Some(i) = bad {
                        let at = s + i as u64;
                        // The guest may have written it since the gaps were taken.
                        if self.log.written().gaps(at, at + 1).is_empty() {
                            continue;
                        }
                        bail!(
                            "verification failed: {} differs from the source at offset {at} \
                             (a range the guest did not write)",
                            self.image.info().name
                        );
                    }
                    compared += t - s;
                }
            }
            off = end;
        }
        let written = self.log.written().bytes();
        Ok(VerifyReport { compared, written })
    }

    /// Stops the job (resumable) if it still runs, stops serving, flushes and
    /// closes the overlay.
    pub async fn shutdown(mut self) -> Result<()> {
        if !self.job.info().state.is_final() {
            self.job.cancel();
        }
        let _ = self.job.wait().await;
        let _ = self.stop.send(true);
        if let Some(s) = self.server.take() {
            s.await.context("the NBD server task")??;
        }
        self.image
            .close()
            .await
            .map_err(|e| super::file_error(Path::new(&self.image.info().name), e))?;
        Ok(())
    }
}

/// What [`Session::verify`] checked.
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    /// Bytes compared with the source.
    pub compared: u64,
    /// Bytes the guest wrote (not compared).
    pub written: u64,
}

/// Resolves on SIGINT or SIGTERM.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Prints the end of a stream.
pub fn report_summary(report: &Reporter, s: &StreamSummary, image: &Path, extra: Value) {
    let rate = if s.seconds > 0.0 {
        s.copied as f64 / s.seconds
    } else {
        0.0
    };
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    v["rate"] = json!(rate as u64);
    v["image"] = json!(image.display().to_string());
    if let (Value::Object(m), Value::Object(x)) = (&mut v, extra) {
        m.extend(x);
    }
    let human_line = match s.outcome {
        stream::Outcome::Completed => format!(
            "stream complete: {} copied, {} skipped in {:.2}s ({}/s); {} no longer needs its source",
            human(s.copied),
            human(s.skipped),
            s.seconds,
            human(rate as u64),
            image.display()
        ),
        stream::Outcome::Cancelled => format!(
            "stream stopped after {} copied; {} keeps its backing link",
            human(s.copied),
            image.display()
        ),
    };
    report.event("stream-end", v, &human_line);
}

/// Bytes in binary units for humans.
pub fn human(n: u64) -> String {
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
