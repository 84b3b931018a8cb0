//! `diskstream demo`: the rapid-deployment use case on a built-in example,
//! with no setup.
//!
//! In a fresh directory it builds a sample base image (1 GiB virtual by
//! default, laid out like an installed system: boot loader, kernel and
//! initrd, file-system metadata every 128 MiB, packed /usr files, logs, and
//! holes in between), serves it over NBD as the "central repository",
//! deploys an overlay from it with the same engine as `diskstream deploy`,
//! and runs a guest-like boot workload against the overlay's export while
//! the stream runs: small reads of the boot sector, sequential reads of the
//! kernel and initrd, then scattered metadata and file reads. It reports
//! time to ready, the guest's read latency during the stream, what was
//! fetched on demand versus streamed, the stream rate, and whether the
//! result equals the source (a checksum of both, plus `qemu-img compare`
//! and `qemu-img check` when qemu-img is installed). The directory is
//! removed at the end unless `--keep DIR` names it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use image::device::block_status_all;
use image::{BlockDevice, CreateOptions, ExtentKind, FormatKind, OpenOptions, WriteFlags};
use nbd::client::{ClientOptions, NbdClient};
use nbd::server::{self, Export, Listener, ServerConfig};
use serde_json::{Value, json};

use super::session::{Reporter, Session, SessionConfig, human};
use super::source::SourceOptions;

/// The layout's unit: offsets and lengths below are for a 1 GiB image and
/// scale with `--size`.
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// Bytes hashed at a time for the checksum.
const HASH_BLOCK: u64 = MIB;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Virtual size of the sample base image (the data layout scales with
    /// it); smaller sizes make a quicker run.
    #[arg(long, default_value = "1G", value_parser = super::parse_size)]
    size: u64,
    /// Stream rate limit (bytes per second, K/M/G; 0 = unlimited). The
    /// default lets the stream take a couple of seconds, so the guest boots
    /// while it runs, as on a real deployment of a bigger image.
    #[arg(long, value_name = "RATE", default_value = "100M", value_parser = super::parse_size)]
    speed: u64,
    /// Work in DIR (created if missing) and keep the images there.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Output: human or json (the report as one JSON object on stdout).
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    output: String,
}

/// One region of the sample disk.
#[derive(Clone, Copy, Debug)]
struct Region {
    what: &'static str,
    offset: u64,
    len: u64,
}

/// The sample layout for `size` bytes: data regions in disk order.
fn layout(size: u64) -> Vec<Region> {
    // (what, offset, length) on a 1 GiB disk.
    let mut base: Vec<(&'static str, u64, u64)> = vec![
        ("partition table", 0, 64 * KIB),
        ("boot loader", MIB, MIB),
        ("kernel", 4 * MIB, 12 * MIB),
        ("initrd", 20 * MIB, 40 * MIB),
    ];
    // File-system metadata (inode tables) at the start of each 128 MiB group.
    for g in 1..8 {
        base.push(("fs metadata", g * 128 * MIB, 2 * MIB));
    }
    // /usr: 256 KiB files with 64 KiB gaps between them.
    let mut o = 200 * MIB;
    while o < 320 * MIB {
        base.push(("/usr files", o, 256 * KIB));
        o += 320 * KIB;
    }
    base.push(("/var/log", 600 * MIB, 20 * MIB));
    base.sort_by_key(|&(_, o, _)| o);
    let unit = 64 * KIB;
    let scale = |v: u64| -> u64 { ((v as u128 * size as u128 / GIB as u128) as u64) / unit * unit };
    let mut out: Vec<Region> = Vec::new();
    for (what, off, len) in base {
        let (o, l) = (scale(off), scale(len).max(unit));
        if o + l > size {
            continue;
        }
        // Scaling can make neighbours touch or overlap: keep them disjoint.
        if let Some(p) = out.last()
            && o < p.offset + p.len
        {
            continue;
        }
        out.push(Region {
            what,
            offset: o,
            len: l,
        });
    }
    out
}

/// Incompressible bytes like installed binaries: xorshift64* seeded by the
/// offset, so any piece can be regenerated.
fn fill(buf: &mut [u8], offset: u64) {
    let mut x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// FNV-1a over 64-bit words, continued from `h`.
fn hash_words(mut h: u64, data: &[u8]) -> u64 {
    for w in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A checksum of the device's whole content that does not depend on how
/// zeros are stored: blocks that read as zeros are hashed from a zero
/// buffer without reading them.
async fn checksum(dev: &dyn BlockDevice) -> Result<u64> {
    let size = dev.size();
    let zero_block = hash_words(0, &vec![0u8; HASH_BLOCK as usize]);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut off = 0;
    while off < size {
        let n = HASH_BLOCK.min(size - off);
        let ext = block_status_all(dev, off, n).await?;
        let zero = ext.iter().all(|e| e.kind != ExtentKind::Data);
        let bh = if zero && n == HASH_BLOCK {
            zero_block
        } else if zero {
            hash_words(0, &vec![0u8; n as usize])
        } else {
            hash_words(0, &dev.read(off, n as usize).await?)
        };
        h = hash_words(h, &bh.to_le_bytes());
        off += n;
    }
    Ok(h)
}

/// Removes the work directory on drop unless it is kept.
#[derive(Debug)]
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn work_dir(keep: Option<&Path>) -> Result<WorkDir> {
    let (path, keep) = match keep {
        Some(p) => (p.to_owned(), true),
        None => (
            std::env::temp_dir().join(format!("diskstream-demo-{}", std::process::id())),
            false,
        ),
    };
    std::fs::create_dir_all(&path).with_context(|| format!("{}: create", path.display()))?;
    for f in ["base.qcow2", "vm0.qcow2"] {
        anyhow::ensure!(
            !path.join(f).exists(),
            "{}: already holds a demo; give an empty directory",
            path.display()
        );
    }
    Ok(WorkDir { path, keep })
}

/// Builds the base image; returns the bytes of data written.
async fn build_base(path: &Path, size: u64, regions: &[Region]) -> Result<u64> {
    let copts = CreateOptions {
        size: Some(size),
        ..CreateOptions::default()
    };
    image::create(path, FormatKind::Qcow2, &copts)
        .await
        .map_err(|e| super::file_error(path, e))?;
    let img = image::open(
        path,
        &OpenOptions {
            writable: true,
            format: Some("qcow2".into()),
            ..OpenOptions::default()
        },
    )
    .await
    .map_err(|e| super::file_error(path, e))?;
    let mut total = 0;
    for r in regions {
        let mut o = r.offset;
        while o < r.offset + r.len {
            let n = (4 * MIB).min(r.offset + r.len - o);
            let mut buf = vec![0u8; n as usize];
            fill(&mut buf, o);
            img.write(o, Bytes::from(buf), WriteFlags::default())
                .await?;
            o += n;
        }
        total += r.len;
    }
    img.close().await?;
    Ok(total)
}

/// The reads a booting guest makes, in order: (offset, length).
fn boot_reads(regions: &[Region]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut rng: u64 = 0x5eed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let by = |w: &'static str| regions.iter().filter(move |r| r.what == w).copied();
    // Firmware and boot loader: small reads.
    for r in by("partition table").chain(by("boot loader")) {
        for o in (r.offset..r.offset + r.len).step_by(4096).take(64) {
            out.push((o, 4096));
        }
    }
    // Kernel and initrd: sequential, in growing readahead.
    for (w, chunk) in [("kernel", 128 * KIB), ("initrd", 256 * KIB)] {
        for r in by(w) {
            for o in (r.offset..r.offset + r.len).step_by(chunk as usize) {
                out.push((o, chunk.min(r.offset + r.len - o)));
            }
        }
    }
    // Mounting root and starting services: metadata, then files, scattered.
    let meta: Vec<Region> = by("fs metadata").collect();
    let files: Vec<Region> = by("/usr files").chain(by("/var/log")).collect();
    for i in 0..600 {
        let pool = if i % 3 == 0 && !meta.is_empty() {
            &meta
        } else if !files.is_empty() {
            &files
        } else {
            continue;
        };
        let r = pool[(next() % pool.len() as u64) as usize];
        let len = [4 * KIB, 16 * KIB, 64 * KIB][(next() % 3) as usize].min(r.len);
        let slots = (r.len - len) / 4096 + 1;
        out.push((r.offset + next() % slots * 4096, len));
    }
    out
}

/// What the guest saw.
#[derive(Debug, Default)]
struct GuestRun {
    /// Latencies of reads that completed while the stream was running.
    during: Vec<Duration>,
    /// All latencies.
    all: Vec<Duration>,
    first_read: Option<Duration>,
    bytes: u64,
}

async fn guest(
    uri: String,
    reads: Vec<(u64, u64)>,
    regions: Vec<Region>,
    job: Arc<stream::StreamJob>,
    t0: Instant,
) -> Result<GuestRun> {
    let c = NbdClient::connect_uri(&uri, ClientOptions::default())
        .await
        .with_context(|| format!("{uri}: the guest cannot attach"))?;
    let mut run = GuestRun::default();
    for (o, n) in reads {
        let t = Instant::now();
        let data = c.read(o, n as usize).await?;
        let dt = t.elapsed();
        run.first_read.get_or_insert_with(|| t0.elapsed());
        // Check each read as a guest would notice corruption.
        let mut want = vec![0u8; data.len()];
        expected(&mut want, o, &regions);
        anyhow::ensure!(data == want, "guest read at {o} returned wrong data");
        run.bytes += n;
        run.all.push(dt);
        if !job.info().state.is_final() {
            run.during.push(dt);
        }
    }
    Ok(run)
}

/// What the base holds at `offset` (data is written in 4 MiB pieces from
/// each region's start, each piece filled from its own offset).
fn expected(buf: &mut [u8], offset: u64, regions: &[Region]) {
    buf.fill(0);
    let end = offset + buf.len() as u64;
    for r in regions {
        let mut p = r.offset;
        while p < r.offset + r.len {
            let n = (4 * MIB).min(r.offset + r.len - p);
            let (s, e) = (p.max(offset), (p + n).min(end));
            if s < e {
                let mut piece = vec![0u8; n as usize];
                fill(&mut piece, p);
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&piece[(s - p) as usize..(e - p) as usize]);
            }
            p += n;
        }
    }
}

fn quantile_us(v: &[Duration], q: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s: Vec<Duration> = v.to_vec();
    s.sort();
    let i = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1;
    Some(s[i].as_micros() as u64)
}

/// `qemu-img compare` and `check` of the result, when qemu-img exists.
fn qemu_checks(base: &Path, top: &Path) -> (String, String) {
    let run = |args: &[&str]| std::process::Command::new("qemu-img").args(args).output();
    let (b, t) = (base.display().to_string(), top.display().to_string());
    let compare = match run(&["compare", "-f", "qcow2", "-F", "qcow2", &b, &t]) {
        Err(_) => "not installed".to_string(),
        Ok(o) if o.status.success() => "identical".to_string(),
        Ok(o) => format!(
            "differ: {}",
            String::from_utf8_lossy(&o.stdout).trim().to_string()
                + String::from_utf8_lossy(&o.stderr).trim()
        ),
    };
    let check = match run(&["check", &t]) {
        Err(_) => "not installed".to_string(),
        Ok(o) if o.status.success() => "clean".to_string(),
        Ok(o) => format!("errors: {}", String::from_utf8_lossy(&o.stdout).trim()),
    };
    (compare, check)
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    anyhow::ensure!(
        args.size >= 16 * MIB,
        "--size must be at least 16M (the sample layout needs room)"
    );
    let json_out = args.output == "json";
    let say = |m: &str| {
        if !json_out {
            eprintln!("demo: {m}");
        }
    };
    let t_all = Instant::now();
    let work = work_dir(args.keep.as_deref())?;
    let dir = work.path.clone();
    let (base_path, top_path) = (dir.join("base.qcow2"), dir.join("vm0.qcow2"));
    let regions = layout(args.size);

    say(&format!(
        "building a {} sample base image in {}",
        human(args.size),
        dir.display()
    ));
    let data = build_base(&base_path, args.size, &regions).await?;

    // The central repository: the base served read-only over NBD.
    let base = image::open(
        &base_path,
        &OpenOptions {
            format: Some("qcow2".into()),
            ..OpenOptions::default()
        },
    )
    .await
    .map_err(|e| super::file_error(&base_path, e))?;
    let repo_sock = dir.join("repo.sock");
    let repo_listener = Listener::bind_unix(&repo_sock)?;
    let (repo_stop, mut repo_stop_rx) = tokio::sync::watch::channel(false);
    let repo = tokio::spawn(server::run(
        repo_listener,
        ServerConfig::new(vec![Export {
            name: "base".into(),
            description: "diskstream demo repository".into(),
            device: Arc::clone(&base) as Arc<dyn BlockDevice>,
            read_only: true,
            multi_conn: true,
        }]),
        async move {
            let _ = repo_stop_rx.wait_for(|&s| s).await;
        },
    ));
    let repo_uri = format!("nbd+unix:///base?socket={}", repo_sock.display());
    say(&format!(
        "repository: {} of data served at {repo_uri}",
        human(data)
    ));

    // Deploy, and boot the guest at once.
    let report = if json_out {
        Reporter::quiet("demo")
    } else {
        Reporter::new("demo", false)
    };
    let cfg = SessionConfig {
        source: repo_uri.clone(),
        source_format: None,
        image: top_path.clone(),
        serve: format!("unix:{}", dir.join("vm0.sock").display()),
        export: "vm0".into(),
        speed: args.speed,
        policy: super::source::Policy::Fixed,
        source_opts: SourceOptions {
            reconnect_window: Some(Duration::from_secs(30)),
        },
        persistent: true,
    };
    let t0 = Instant::now();
    let s = Session::start(&cfg, &report).await?;
    let reads = boot_reads(&regions);
    let n_reads = reads.len();
    let guest_task = tokio::spawn(guest(
        s.uri.clone(),
        reads,
        regions.clone(),
        Arc::clone(&s.job),
        t0,
    ));
    let summary = s.follow(&report).await?;
    let run = guest_task.await.context("the guest task")??;
    let stats = s.image.stats().snapshot();

    say("verifying the result against the source");
    let (sum_src, sum_top) = (checksum(&*base).await?, checksum(&*s.image).await?);
    let independent = s.image.backing().is_none();
    // Time to ready ends at the first accepted connection (the guest's).
    let listening = s.ready;
    let ready = s.time_to_ready().unwrap_or(listening);
    let read_before_ready = s.source_bytes_before_ready;
    s.shutdown().await?;
    let _ = repo_stop.send(true);
    repo.await.context("the repository server")??;
    base.close().await?;
    drop(base);
    let (compare, check) = qemu_checks(&base_path, &top_path);
    let verified = sum_src == sum_top
        && independent
        && summary.outcome == stream::Outcome::Completed
        && !compare.starts_with("differ")
        && !check.starts_with("errors");

    let lat = if run.during.is_empty() {
        &run.all
    } else {
        &run.during
    };
    let rate = if summary.seconds > 0.0 {
        (summary.copied as f64 / summary.seconds) as u64
    } else {
        0
    };
    let report_v = json!({
        "size": args.size,
        "data-bytes": data,
        "ready-seconds": ready.as_secs_f64(),
        "listening-seconds": listening.as_secs_f64(),
        "source-bytes-read-before-ready": read_before_ready,
        "guest-reads": n_reads,
        "guest-reads-during-stream": run.during.len(),
        "first-read-seconds": run.first_read.map(|d| d.as_secs_f64()),
        "read-latency-p50-us": quantile_us(lat, 0.5),
        "read-latency-p99-us": quantile_us(lat, 0.99),
        "on-demand-bytes": stats.cor_bytes,
        "streamed-bytes": stats.populated_bytes,
        "stream-seconds": summary.seconds,
        "stream-bytes-per-second": rate,
        "checksum-source": format!("{sum_src:016x}"),
        "checksum-result": format!("{sum_top:016x}"),
        "independent": independent,
        "qemu-img-compare": compare,
        "qemu-img-check": check,
        "verified": verified,
        "total-seconds": t_all.elapsed().as_secs_f64(),
        "dir": dir.display().to_string(),
        "kept": args.keep.as_ref().map(|p| p.display().to_string()),
    });
    print_report(&report_v, json_out);
    drop(work);
    Ok(if verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(v: &Value, json_out: bool) {
    if json_out {
        println!("{v}");
        return;
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let us = |k: &str| {
        v[k].as_u64()
            .map_or("-".to_string(), |x| format!("{:.2} ms", x as f64 / 1e3))
    };
    println!(
        "diskstream demo: deploy a {} image ({} of data) from an NBD repository",
        human(u("size")),
        human(u("data-bytes"))
    );
    println!(
        "  time to ready            {:.1} ms to the guest's connection (listening at {:.1} ms; \
         bytes read from the source before: {})",
        f("ready-seconds") * 1e3,
        f("listening-seconds") * 1e3,
        u("source-bytes-read-before-ready")
    );
    if let Some(fr) = v["first-read-seconds"].as_f64() {
        println!("  first guest read done    {:.1} ms after start", fr * 1e3);
    }
    println!(
        "  guest reads              {} ({} during the stream)",
        u("guest-reads"),
        u("guest-reads-during-stream")
    );
    println!(
        "  guest read latency       p50 {}  p99 {}",
        us("read-latency-p50-us"),
        us("read-latency-p99-us")
    );
    println!("  fetched on demand        {}", human(u("on-demand-bytes")));
    println!("  streamed in background   {}", human(u("streamed-bytes")));
    println!(
        "  stream                   {:.2} s at {}/s",
        f("stream-seconds"),
        human(u("stream-bytes-per-second"))
    );
    println!(
        "  checksum source/result   {} / {}",
        v["checksum-source"].as_str().unwrap_or(""),
        v["checksum-result"].as_str().unwrap_or("")
    );
    println!(
        "  qemu-img compare         {}",
        v["qemu-img-compare"].as_str().unwrap_or("")
    );
    println!(
        "  qemu-img check           {}",
        v["qemu-img-check"].as_str().unwrap_or("")
    );
    println!("  overlay independent      {}", v["independent"]);
    println!(
        "  verified                 {}",
        if v["verified"] == true {
            "yes: the deployed image equals the source"
        } else {
            "NO"
        }
    );
    println!("  total                    {:.1} s", f("total-seconds"));
    if let Some(k) = v["kept"].as_str() {
        println!("  files kept in            {k}");
    }
}
