//! Power-loss replay: a random workload runs on an engine over a
//! [`RecordingStorage`]; then many crash states are built from the log (the
//! durable prefix up to the last completed flush, plus a random subset of the
//! later writes, some torn at sector boundaries) and each must satisfy
//! DESIGN.md invariant 2: the image opens (a repair on open is allowed),
//! `check()` finds no corruption (leaks are fine), every write acknowledged
//! before a completed flush (or with FUA) reads back, and every other byte
//! reads as something that was legitimately there (old or new content of an
//! unflushed write, zeros or old data after a discard; never data that was
//! never written there, never the backing through a write-zeroes). A sample
//! of states also goes through the real `qemu-img check`.
//!
//! This is the test that catches a missing flush barrier (data after the L2
//! entry that points at it, a refcount decrease before the L2 entry is
//! cleared): a killed process cannot, because the page cache survives it.
//!
//! Knobs: `DS_POWERLOSS_STATES` crash states per configuration (default 60);
//! `DS_SEED` shifts every workload seed.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use image::device::{BlockDevice, WriteFlags};
use image::format::Format;
use image::storage::{MemStorage, Storage};
use image::testing::{
    ContentModel, CrashState, Event, Recording, RecordingStorage, TestRng, env_count,
};
use image::{Image, raw};

#[derive(Clone, Debug)]
enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// An operation and where its storage events sit in the log.
#[derive(Clone, Debug)]
struct Done {
    op: Op,
    start: usize,
    end: usize,
}

#[derive(Clone, Copy, Debug)]
enum Backing {
    None,
    /// A raw backing of this many bytes.
    Raw(u64),
    /// A qcow2 backing (cluster 64 KiB) of the overlay's size.
    Qcow2,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    cluster: u64,
    size: u64,
    backing: Backing,
    seed: u64,
}

/// A random offset and length: mostly small, some large; aligned to a
/// sector, a cluster, or nothing.
fn pick_range(rng: &mut TestRng, size: u64, cluster: u64) -> (u64, u64) {
    let len = match rng.below(10) {
        0 => rng.range(1, 200),
        1..=6 => rng.range(1, 9) * 512,
        7 | 8 => rng.range(1, 4) * cluster.max(4096),
        _ => rng.range(1, 128 << 10),
    }
    .min(size);
    let mut off = rng.below(size - len + 1);
    match rng.below(4) {
        0 | 1 => off -= off % 512,
        2 => off -= off % cluster,
        _ => {}
    }
    (off, len)
}

fn workload(rng: &mut TestRng, size: u64, cluster: u64, n: usize) -> Vec<Op> {
    let mut ops = Vec::new();
    for _ in 0..n {
        let op = match rng.below(20) {
            0..=10 => {
                let (offset, len) = pick_range(rng, size, cluster);
                Op::Write {
                    offset,
                    data: rng.bytes(len as usize),
                    fua: rng.chance(1, 8),
                }
            }
            11..=13 => {
                let (offset, len) = pick_range(rng, size, cluster);
                Op::Zero {
                    offset,
                    len,
                    unmap: rng.chance(1, 2),
                }
            }
            14 | 15 => {
                let (offset, len) = pick_range(rng, size, cluster);
                Op::Discard { offset, len }
            }
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops
}

async fn run_op(dev: &dyn BlockDevice, op: &Op) {
    match op {
        Op::Write { offset, data, fua } => dev
            .write(*offset, Bytes::from(data.clone()), WriteFlags { fua: *fua })
            .await
            .expect("write"),
        Op::Zero { offset, len, unmap } => dev
            .write_zeroes(*offset, *len, *unmap)
            .await
            .expect("write_zeroes"),
        Op::Discard { offset, len } => dev.discard(*offset, *len).await.expect("discard"),
        Op::Flush => dev.flush().await.expect("flush"),
    }
}

/// The model of what a crash state may read: ops made durable by a flush (or
/// FUA) that completed inside the durable prefix are definite; ops issued
/// before the cut but not made durable may or may not be there.
fn model_for(initial: &[u8], done: &[Done], st: &CrashState) -> ContentModel {
    let covered_upto = done
        .iter()
        .rposition(|d| matches!(d.op, Op::Flush) && d.end <= st.durable)
        .unwrap_or(0);
    let mut m = ContentModel::new(initial.to_vec());
    for (i, d) in done.iter().enumerate() {
        if d.start >= st.cut && d.start < d.end {
            break; // never issued
        }
        let sure =
            i < covered_upto || matches!(d.op, Op::Write { fua: true, .. }) && d.end <= st.durable;
        match (&d.op, sure) {
            (Op::Write { offset, data, .. }, true) => m.write(*offset, data),
            (Op::Write { offset, data, .. }, false) => m.maybe_write(*offset, data),
            (Op::Zero { offset, len, .. }, true) => m.write_zeroes(*offset, *len),
            (Op::Zero { offset, len, .. } | Op::Discard { offset, len }, false) => {
                m.maybe_zero(*offset, *len)
            }
            (Op::Discard { offset, len }, true) => m.discard(*offset, *len),
            (Op::Flush, _) => {}
        }
    }
    m
}

/// The backing device, its content seen from the overlay (zero-extended),
/// and (file name, format, bytes) to put next to a state for qemu-img.
type BackingParts = (
    Arc<dyn BlockDevice>,
    Vec<u8>,
    (&'static str, &'static str, Vec<u8>),
);

/// The backing device, its content seen from an overlay of `size` bytes,
/// and (name, format, bytes) to put next to a state for qemu-img.
async fn make_backing(cfg: &Config, rng: &mut TestRng) -> Option<BackingParts> {
    match cfg.backing {
        Backing::None => None,
        Backing::Raw(bsize) => {
            let content = patchy(rng, bsize as usize);
            let dev = mem_raw("backing.raw", content.clone());
            let mut seen = content.clone();
            seen.resize(cfg.size as usize, 0);
            Some((dev, seen, ("backing.raw", "raw", content)))
        }
        Backing::Qcow2 => {
            let mem = Arc::new(MemStorage::from_bytes(
                "backing.qcow2",
                mem_qcow2_bytes(cfg.size, 65536, None),
            ));
            let f = open_qcow2(mem.clone(), true).await.expect("open backing");
            let img = Image::new(f, None);
            let content = patchy(rng, cfg.size as usize);
            // Write only the data runs, so the backing has unallocated
            // clusters too.
            let mut pos = 0;
            while pos < content.len() {
                let end = (pos + 4096).min(content.len());
                if content[pos..end].iter().any(|&b| b != 0) {
                    img.write(
                        pos as u64,
                        Bytes::copy_from_slice(&content[pos..end]),
                        WriteFlags::default(),
                    )
                    .await
                    .unwrap();
                }
                pos = end;
            }
            img.close().await.unwrap();
            drop(img);
            let bytes = mem.snapshot();
            let s: Arc<dyn Storage> =
                Arc::new(MemStorage::from_bytes("backing.qcow2", bytes.clone()));
            let f = open_qcow2(s, false).await.expect("reopen backing");
            let dev: Arc<dyn BlockDevice> = Arc::new(Image::new(f, None));
            assert_eq!(read_all(&*dev).await, content, "backing content");
            Some((dev, content, ("backing.qcow2", "qcow2", bytes)))
        }
    }
}

/// One recorded workload.
struct Recorded {
    backing: Option<BackingParts>,
    initial: Vec<u8>,
    done: Vec<Done>,
    recording: Recording,
}

/// Runs the workload of `wseed` on a fresh overlay over a recording storage.
async fn record(cfg: &Config, wseed: u64) -> Recorded {
    record_with(cfg, wseed, "").await
}

/// [`record`] on an overlay made with the extra `-o` options `opts`.
async fn record_with(cfg: &Config, wseed: u64, opts: &str) -> Recorded {
    let mut rng = TestRng::new(wseed);
    let backing = make_backing(cfg, &mut rng).await;
    let initial = backing
        .as_ref()
        .map_or_else(|| vec![0; cfg.size as usize], |b| b.1.clone());
    let xl2_opts;
    let opts = if cfg.name.starts_with(XL2_PREFIX) {
        xl2_opts = [opts, "extended_l2=on"].join(",");
        xl2_opts.trim_start_matches(',')
    } else {
        opts
    };
    let base = qemu_qcow2_bytes_with(
        cfg.size,
        cfg.cluster,
        backing.as_ref().map(|b| (b.2.0, b.2.1)),
        opts,
    );
    let rec = Arc::new(RecordingStorage::new("overlay.qcow2", base));
    let f = open_qcow2(rec.clone(), true).await.expect("open overlay");
    let img = Image::new(f, backing.as_ref().map(|b| b.0.clone()));
    let ops = workload(&mut rng, cfg.size, cfg.cluster, 48);
    let mut done = Vec::new();
    for op in ops {
        let start = rec.position();
        run_op(&img, &op).await;
        done.push(Done {
            op,
            start,
            end: rec.position(),
        });
    }
    // Closing flushes and marks the image clean: crash states during the
    // close are states too.
    let start = rec.position();
    img.close().await.expect("close");
    done.push(Done {
        op: Op::Flush,
        start,
        end: rec.position(),
    });
    let recording = rec.recording();
    drop(img);
    Recorded {
        backing,
        initial,
        done,
        recording,
    }
}

async fn powerloss(cfg: Config) {
    powerloss_with(cfg, "").await
}

/// [`powerloss`] on overlays made with the extra `-o` options `opts`.
async fn powerloss_with(cfg: Config, opts: &str) {
    let states = env_count("DS_POWERLOSS_STATES", 60);
    let seed = cfg.seed ^ env_count("DS_SEED", 0);
    // More workloads when many states are asked for, so a soak explores
    // more than one log.
    let workloads = 1 + states / 1000;
    let per = states.div_ceil(workloads);
    let mut tried = 0;
    let mut torn = 0;
    let mut qemu_checked = 0;
    for w in 0..workloads {
        let wseed = seed.wrapping_add(w * 7919);
        let r = record_with(&cfg, wseed, opts).await;
        let dir = tempfile::tempdir().unwrap();
        if let Some(b) = &r.backing {
            std::fs::write(dir.path().join(b.2.0), &b.2.2).unwrap();
        }
        let qemu_every = (per / 6).max(1);
        for i in 0..per {
            let st = r
                .recording
                .crash_state(wseed.wrapping_mul(1_000_003).wrapping_add(i));
            torn += st.torn;
            let qemu_path = (i % qemu_every == 0).then(|| dir.path().join("overlay.qcow2"));
            let backing = r.backing.as_ref().map(|b| b.0.clone());
            let result = check_state(
                &cfg,
                &st,
                &r.initial,
                &r.done,
                backing,
                qemu_path.as_deref(),
            )
            .await;
            if let Err(e) = result {
                panic!(
                    "{}: workload seed {wseed}, crash state seed {} (cut {} of {}, durable {}): {e}",
                    cfg.name,
                    st.seed,
                    st.cut,
                    r.recording.events.len(),
                    st.durable
                );
            }
            qemu_checked += usize::from(qemu_path.is_some());
            tried += 1;
        }
    }
    eprintln!(
        "powerloss {}: {tried} crash states ({torn} torn writes), {qemu_checked} checked by qemu-img",
        cfg.name
    );
}

/// The replay has teeth on the real engine: the same workload, with every
/// flush barrier taken out of the log (as if the engine never flushed, or
/// the disk ignored it), must produce crash states that fail the oracle,
/// while the model still expects what a flushing engine guarantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_replay_catches_an_engine_whose_flushes_do_nothing() {
    let cfg = Config {
        name: "64k-raw-backing-no-barriers",
        cluster: 64 << 10,
        size: 4 << 20,
        backing: Backing::Raw(4 << 20),
        seed: 6,
    };
    let r = record(&cfg, cfg.seed).await;
    let no_barriers = Recording {
        base: r.recording.base.clone(),
        // An empty write keeps every later event at its index.
        events: r
            .recording
            .events
            .iter()
            .map(|e| match e {
                Event::Flush => Event::Write {
                    offset: 0,
                    data: Vec::new(),
                },
                e => e.clone(),
            })
            .collect(),
    };
    let mut failed = 0;
    let n = 60;
    for i in 0..n {
        let mut rng = TestRng::new(i);
        // Cuts in the second half, after several guest flushes.
        let len = no_barriers.events.len() as u64;
        let cut = rng.range(len / 2, len + 1) as usize;
        let mut st = no_barriers.crash_state_at(cut, &mut rng, i);
        assert_eq!(st.durable, 0);
        st.durable = r.recording.durable_prefix(cut);
        let backing = r.backing.as_ref().map(|b| b.0.clone());
        if check_state(&cfg, &st, &r.initial, &r.done, backing, None)
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    assert!(
        failed >= n / 10,
        "only {failed} of {n} barrier-less crash states failed"
    );
    eprintln!("powerloss without barriers: {failed} of {n} states rejected");
}

async fn check_state(
    cfg: &Config,
    st: &CrashState,
    initial: &[u8],
    done: &[Done],
    backing: Option<Arc<dyn BlockDevice>>,
    qemu_path: Option<&std::path::Path>,
) -> Result<(), String> {
    if let Some(p) = qemu_path
        && qcow2_dirty(&st.bytes)
    {
        // Lazy refcounts: before the repair, our check reports the stale
        // refcounts as qemu-img does.
        std::fs::write(p, &st.bytes).unwrap();
        check_agrees_with_qemu(p).await?;
    }
    let mem = Arc::new(MemStorage::from_bytes("overlay.qcow2", st.bytes.clone()));
    let f = open_qcow2(mem.clone(), true)
        .await
        .map_err(|e| format!("does not open: {e}"))?;
    let report = f.check(None).map_err(|e| format!("check failed: {e}"))?;
    if report.corruptions != 0 || report.check_errors != 0 {
        return Err(format!("check: {report:?}"));
    }
    let img = Image::new(f, backing);
    assert_eq!(img.size(), cfg.size);
    let model = model_for(initial, done, st);
    let actual = read_all(&img).await;
    model.check(0, &actual)?;
    img.close().await.map_err(|e| format!("close: {e}"))?;
    drop(img);
    if let Some(p) = qemu_path {
        // qemu-img check does not repair a dirty image first: give it the
        // state as diskstream left it after its repair on open.
        let bytes = if qcow2_dirty(&st.bytes) {
            mem.snapshot()
        } else {
            st.bytes.clone()
        };
        std::fs::write(p, &bytes).unwrap();
        qemu_check(p)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_512b_clusters_raw_backing() {
    powerloss(Config {
        name: "512b-raw-backing",
        cluster: 512,
        size: 1 << 20,
        backing: Backing::Raw(1 << 20),
        seed: 1,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_512b_clusters_no_backing() {
    powerloss(Config {
        name: "512b",
        cluster: 512,
        size: 1 << 20,
        backing: Backing::None,
        seed: 2,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_64k_clusters_no_backing() {
    powerloss(Config {
        name: "64k",
        cluster: 64 << 10,
        size: 4 << 20,
        backing: Backing::None,
        seed: 3,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_64k_clusters_short_raw_backing() {
    powerloss(Config {
        name: "64k-short-raw-backing",
        cluster: 64 << 10,
        size: 4 << 20,
        backing: Backing::Raw((3 << 20) + 4096),
        seed: 4,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_4k_clusters_qcow2_backing() {
    powerloss(Config {
        name: "4k-qcow2-backing",
        cluster: 4096,
        size: 2 << 20,
        backing: Backing::Qcow2,
        seed: 5,
    })
    .await;
}

// ---- The harness itself, on raw (no metadata: every write is in place) ----

/// Runs a workload on raw over a recording storage.
async fn raw_recording(seed: u64) -> (Vec<u8>, Vec<Done>, Recording) {
    let size = 256u64 << 10;
    let mut rng = TestRng::new(seed);
    let initial = patchy(&mut rng, size as usize);
    let rec = Arc::new(RecordingStorage::new("disk.raw", initial.clone()));
    let f: Arc<dyn Format> = Arc::new(raw::Raw::open(rec.clone(), true).unwrap());
    let img = Image::new(f, None);
    let mut done = Vec::new();
    for op in workload(&mut rng, size, 4096, 60) {
        let start = rec.position();
        run_op(&img, &op).await;
        done.push(Done {
            op,
            start,
            end: rec.position(),
        });
    }
    let rec2 = rec.recording();
    drop(img);
    (initial, done, rec2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_oracle_accepts_every_crash_state_of_raw() {
    let states = env_count("DS_POWERLOSS_STATES", 60);
    for seed in 0..4 {
        let (initial, done, rec) = raw_recording(seed).await;
        for i in 0..states {
            let st = rec.crash_state(seed * 100_000 + i);
            let model = model_for(&initial, &done, &st);
            let mut bytes = st.bytes.clone();
            bytes.resize(initial.len(), 0);
            model
                .check(0, &bytes)
                .unwrap_or_else(|e| panic!("raw seed {seed} state {i}: {e}"));
        }
    }
}

/// The oracle has teeth: if every acknowledged write were taken as durable
/// (ignoring flushes), some crash states of the same log must be rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_oracle_rejects_states_that_lost_unflushed_writes_if_claimed_durable() {
    let (initial, done, rec) = raw_recording(42).await;
    let mut rejected = 0;
    for i in 0..200 {
        let st = rec.crash_state(i);
        let mut all = initial.clone();
        let mut m = ContentModel::new(initial.clone());
        for d in done.iter().filter(|d| d.end <= st.cut) {
            match &d.op {
                Op::Write { offset, data, .. } => m.write(*offset, data),
                Op::Zero { offset, len, .. } => m.write_zeroes(*offset, *len),
                Op::Discard { offset, len } => m.discard(*offset, *len),
                Op::Flush => {}
            }
        }
        all.copy_from_slice(&st.bytes[..initial.len()]);
        if m.check(0, &all).is_err() {
            rejected += 1;
        }
    }
    assert!(rejected > 20, "only {rejected} of 200 states lost anything");
}

// ---- qcow2 with extended L2 entries (subclusters) ----

/// Configs named with this prefix run on overlays with extended L2 entries
/// (a name rather than a field, so the configs above stay as they are).
const XL2_PREFIX: &str = "xl2-";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_xl2_16k_clusters_raw_backing() {
    powerloss(Config {
        name: "xl2-16k-raw-backing",
        cluster: 16 << 10,
        size: 1 << 20,
        backing: Backing::Raw(1 << 20),
        seed: 6,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_xl2_64k_clusters_qcow2_backing() {
    powerloss(Config {
        name: "xl2-64k-qcow2-backing",
        cluster: 64 << 10,
        size: 2 << 20,
        backing: Backing::Qcow2,
        seed: 7,
    })
    .await;
}

// ---- QED ----------------------------------------------------------------------

/// A fresh QED overlay (made by our create, in memory).
fn qed_bytes(cfg: &Config, table: u32, backing: Option<(&str, &str)>) -> Vec<u8> {
    let mem = MemStorage::new("overlay.qed");
    image::qed::create(
        &mem,
        &image::qed::CreateOptions {
            size: cfg.size,
            cluster_size: Some(cfg.cluster),
            table_size: Some(table),
            backing: backing.map(|(n, f)| image::format::BackingSpec {
                name: n.into(),
                format: Some(f.into()),
            }),
        },
    )
    .unwrap();
    mem.snapshot()
}

async fn open_qed(s: Arc<dyn Storage>) -> image::Result<Arc<dyn Format>> {
    let opts = image::OpenOptions {
        writable: true,
        ..image::OpenOptions::default()
    };
    image::open::open_format(s, image::FormatKind::Qed, &opts).await
}

/// [`record`] on a QED overlay.
async fn record_qed(cfg: &Config, table: u32, wseed: u64) -> Recorded {
    let mut rng = TestRng::new(wseed);
    let backing = make_backing(cfg, &mut rng).await;
    let initial = backing
        .as_ref()
        .map_or_else(|| vec![0; cfg.size as usize], |b| b.1.clone());
    let base = qed_bytes(cfg, table, backing.as_ref().map(|b| (b.2.0, b.2.1)));
    let rec = Arc::new(RecordingStorage::new("overlay.qed", base));
    let f = open_qed(rec.clone()).await.expect("open overlay");
    let img = Image::new(f, backing.as_ref().map(|b| b.0.clone()));
    let ops = workload(&mut rng, cfg.size, cfg.cluster, 48);
    let mut done = Vec::new();
    for op in ops {
        let start = rec.position();
        run_op(&img, &op).await;
        done.push(Done {
            op,
            start,
            end: rec.position(),
        });
    }
    let start = rec.position();
    img.close().await.expect("close");
    done.push(Done {
        op: Op::Flush,
        start,
        end: rec.position(),
    });
    let recording = rec.recording();
    drop(img);
    Recorded {
        backing,
        initial,
        done,
        recording,
    }
}

/// [`check_state`] on a QED overlay: the read-write open checks (and
/// repairs) an image whose need-check flag is set; then no corruption, the
/// model holds, and qemu-img check finds leaks at most.
async fn check_state_qed(
    cfg: &Config,
    st: &CrashState,
    initial: &[u8],
    done: &[Done],
    backing: Option<Arc<dyn BlockDevice>>,
    qemu_path: Option<&std::path::Path>,
) -> Result<(), String> {
    let mem = Arc::new(MemStorage::from_bytes("overlay.qed", st.bytes.clone()));
    let f = open_qed(mem.clone())
        .await
        .map_err(|e| format!("does not open: {e}"))?;
    let report = f.check(None).map_err(|e| format!("check failed: {e}"))?;
    if report.corruptions != 0 || report.check_errors != 0 {
        return Err(format!("check: {report:?}"));
    }
    let img = Image::new(f, backing);
    assert_eq!(img.size(), cfg.size);
    let model = model_for(initial, done, st);
    let actual = read_all(&img).await;
    model.check(0, &actual)?;
    img.close().await.map_err(|e| format!("close: {e}"))?;
    drop(img);
    let after = mem.snapshot();
    if after[16] & 2 != 0 {
        return Err("need-check flag still set after close".into());
    }
    if let Some(p) = qemu_path {
        // The state as the crash left it (need-check maybe set, not
        // repaired): qemu-img check must find no corruption.
        std::fs::write(p, &st.bytes).unwrap();
        qemu_check_as(p, "qed")?;
        std::fs::write(p, &after).unwrap();
        qemu_check_as(p, "qed")?;
    }
    Ok(())
}

async fn powerloss_qed(cfg: Config, table: u32) {
    let states = env_count("DS_POWERLOSS_STATES", 60);
    let seed = cfg.seed ^ env_count("DS_SEED", 0);
    let workloads = 1 + states / 1000;
    let per = states.div_ceil(workloads);
    let (mut tried, mut torn, mut need_check) = (0, 0, 0);
    for w in 0..workloads {
        let wseed = seed.wrapping_add(w * 7919);
        let r = record_qed(&cfg, table, wseed).await;
        let dir = tempfile::tempdir().unwrap();
        if let Some(b) = &r.backing {
            std::fs::write(dir.path().join(b.2.0), &b.2.2).unwrap();
        }
        let qemu_every = (per / 6).max(1);
        for i in 0..per {
            let st = r
                .recording
                .crash_state(wseed.wrapping_mul(1_000_003).wrapping_add(i));
            torn += st.torn;
            need_check += usize::from(st.bytes[16] & 2 != 0);
            let qemu_path = (i % qemu_every == 0).then(|| dir.path().join("overlay.qed"));
            let backing = r.backing.as_ref().map(|b| b.0.clone());
            if let Err(e) = check_state_qed(
                &cfg,
                &st,
                &r.initial,
                &r.done,
                backing,
                qemu_path.as_deref(),
            )
            .await
            {
                panic!(
                    "{}: workload seed {wseed}, crash state seed {} (cut {} of {}, durable {}): {e}",
                    cfg.name,
                    st.seed,
                    st.cut,
                    r.recording.events.len(),
                    st.durable
                );
            }
            tried += 1;
        }
    }
    eprintln!(
        "powerloss {}: {tried} crash states ({torn} torn writes, {need_check} with need-check set)",
        cfg.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qed_4k_clusters_raw_backing() {
    powerloss_qed(
        Config {
            name: "qed-4k-raw-backing",
            cluster: 4096,
            size: 4 << 20,
            backing: Backing::Raw(3 << 20),
            seed: 31,
        },
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qed_64k_clusters_no_backing() {
    powerloss_qed(
        Config {
            name: "qed-64k-no-backing",
            cluster: 64 << 10,
            size: 4 << 20,
            backing: Backing::None,
            seed: 32,
        },
        4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qed_16k_clusters_qcow2_backing() {
    powerloss_qed(
        Config {
            name: "qed-16k-qcow2-backing",
            cluster: 16 << 10,
            size: 4 << 20,
            backing: Backing::Qcow2,
            seed: 33,
        },
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_lazy_refcounts_64k_clusters_raw_backing() {
    powerloss_with(
        Config {
            name: "lazy-refcounts-64k-raw-backing",
            cluster: 64 << 10,
            size: 4 << 20,
            backing: Backing::Raw(4 << 20),
            seed: 21,
        },
        "lazy_refcounts=on",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_lazy_refcounts_512b_clusters_no_backing() {
    powerloss_with(
        Config {
            name: "lazy-refcounts-512b-no-backing",
            cluster: 512,
            size: 1 << 20,
            backing: Backing::None,
            seed: 22,
        },
        "lazy_refcounts=on",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powerloss_qcow2_8bit_refcounts_4k_clusters() {
    powerloss_with(
        Config {
            name: "refcount-bits-8-4k",
            cluster: 4096,
            size: 2 << 20,
            backing: Backing::Raw(2 << 20),
            seed: 23,
        },
        "refcount_bits=8",
    )
    .await;
}
