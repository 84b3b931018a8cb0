//! Crash consistency under the daemon: `diskstream daemon` exports an
//! overlay with copy-on-read over NBD, a guest-like writer (our NBD client)
//! writes stamped data and flushes, journaling what was acknowledged, a
//! guest reader reads (copy-on-read), a rate-limited `block-stream` runs,
//! and the daemon is SIGKILLed at a random moment. After each kill:
//! `qemu-img check` finds no corruption, every acknowledged-and-flushed
//! write reads back, no sector reads data never written to it, and a new
//! daemon opens the image and restarts the stream, which completes to the
//! content the crash left.
//!
//! `DS_DAEMON_CRASH_ITERS` iterations per case (default 5; scripts/soak runs
//! hundreds), `DS_SEED` picks the workload. Prints `name=value` figures.

mod reliab;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use image::testing::TestRng;
use image::{BlockDevice, WriteFlags};
use nbd::client::{ClientOptions, NbdClient};
use reliab::*;
use serde_json::json;
use tokio::sync::Mutex;

const SIZE: usize = 8 << 20;

#[derive(Default)]
struct Totals {
    iterations: u64,
    corruptions: u64,
    lost: u64,
    foreign: u64,
    leaks: u64,
    writes_acked: u64,
    flushes: u64,
    guest_read_mismatches: u64,
}

/// The guest: stamped writes of 4..64 KiB at random sector-aligned places,
/// a flush every few writes, until the connection dies or `stop` is set.
async fn writer(
    c: Arc<NbdClient>,
    j: Arc<Mutex<Journal>>,
    rng: &mut TestRng,
    first_id: u64,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut id = first_id;
    // Bounded: the daemon is killed within a second, after which every
    // request fails at once (no reconnect window).
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..rng.range(1, 6) {
            let len = rng.range(8, 129) as usize * SECTOR;
            let off = rng.below(((SIZE - len) / SECTOR) as u64 + 1) * SECTOR as u64;
            j.lock().await.issue(id, off, len);
            if c.write(
                off,
                Bytes::from(stamped(id, off, len)),
                WriteFlags::default(),
            )
            .await
            .is_err()
            {
                return id;
            }
            j.lock().await.acked(id, off, len);
            id += 1;
        }
        if c.flush().await.is_err() {
            return id;
        }
        j.lock().await.flushed();
    }
    id
}

/// A guest reader: random reads (copy-on-read fills them), each checked
/// against the journal as the writes land.
async fn reader(c: Arc<NbdClient>, j: Arc<Mutex<Journal>>, base: Arc<Vec<u8>>, seed: u64) -> u64 {
    let mut rng = TestRng::new(seed);
    let mut bad = 0;
    // Bounded: ends when the daemon dies.
    loop {
        let len = rng.range(1, 65) as usize * 4096;
        let off = rng.below(((SIZE - len) / 4096) as u64 + 1) * 4096;
        // Read under the journal lock so the writes it may see are issued,
        // and at most the one in flight now can land during the read.
        let g = j.lock().await;
        let racing = g.in_flight;
        let Ok(data) = c.read(off, len).await else {
            return bad;
        };
        let mut v = Verdict::default();
        // Only "never written" counts here: durability is checked after the
        // crash, and a read racing a write may see either.
        g.check_skipping(&base, off, &data, &mut v, racing);
        if v.foreign > 0 {
            eprintln!(
                "guest read at {off}: {:?} (racing {racing:?})",
                v.first_problem
            );
            bad += 1;
        }
    }
}

async fn one_iteration(case: &Case, seed: u64, t: &mut Totals) {
    let dir = tempfile::tempdir().unwrap();
    let basep = dir.path().join("base.raw");
    let top = dir.path().join(format!("top.{}", case.format));
    let base = Arc::new(base_content(SIZE));
    write_base(&basep, &base);
    create_top(case, &basep, &top, SIZE as u64);
    let mut rng = TestRng::new(seed);

    let d = Daemon::start(dir.path());
    let mut q = d.client().await;
    add_node(&mut q, case, "top", &top, case.backing).await;
    export(&mut q, "top").await;
    let opts = ClientOptions {
        reconnect_window: Some(Duration::ZERO),
        request_timeout: Some(Duration::from_secs(20)),
        ..ClientOptions::default()
    };
    let c = Arc::new(NbdClient::connect_uri(&d.uri("top"), opts).await.unwrap());
    let journal = Arc::new(Mutex::new(Journal::new(SIZE)));
    if case.backing {
        // 6 MiB of remote data at 4 MiB/s: still copying when the kill
        // comes (at most 600 ms in).
        q.execute(
            "block-stream",
            json!({"device": "top", "speed": 4 << 20, "__com.diskstream_chunk-size": 65536}),
        )
        .await
        .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (c, j, stop) = (Arc::clone(&c), Arc::clone(&journal), Arc::clone(&stop));
        let mut wrng = TestRng::new(seed ^ 0xA5A5);
        tokio::spawn(async move { writer(c, j, &mut wrng, 1, stop).await })
    };
    let r = tokio::spawn(reader(
        Arc::clone(&c),
        Arc::clone(&journal),
        Arc::clone(&base),
        seed ^ 0x5A5A,
    ));
    tokio::time::sleep(Duration::from_millis(rng.range(20, 600))).await;
    d.kill();
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    t.guest_read_mismatches += r.await.unwrap();
    drop(q);
    let j = journal.lock().await.clone();
    t.writes_acked += j.writes_acked;
    t.flushes += j.flushes;

    // After the crash: consistent, nothing durable lost, nothing foreign.
    let (code, out) = qemu_img_check(case, &top);
    match code {
        0 => {}
        3 => t.leaks += 1,
        _ => {
            t.corruptions += 1;
            eprintln!("seed {seed}: qemu-img check exit {code}: {out}");
        }
    }
    let after = qemu_read_all(case, &top, &dir.path().join("read.raw"));
    let mut v = Verdict::default();
    j.check(&base, 0, &after, &mut v);
    t.lost += v.lost;
    t.foreign += v.foreign;
    if let Some(p) = &v.first_problem {
        eprintln!("seed {seed} ({}): {p}", case.name);
    }

    // A new daemon opens the image; the stream restarts and completes to
    // exactly what the crash left.
    let d = Daemon::start(dir.path());
    let mut q = d.client().await;
    add_node(&mut q, case, "top", &top, false).await;
    if case.backing {
        q.execute("block-stream", json!({"device": "top"}))
            .await
            .unwrap();
        let ev = wait_completed(&mut q, "top", Duration::from_secs(120)).await;
        assert!(
            ev.get("error").is_none(),
            "seed {seed}: restarted stream: {ev}"
        );
    }
    d.quit(&mut q).await;
    if case.backing {
        assert!(!has_backing(&top), "seed {seed}: backing link kept");
    }
    let (code, out) = qemu_img_check(case, &top);
    if code == 2 || code == 1 {
        t.corruptions += 1;
        eprintln!("seed {seed}: after the restarted stream: {out}");
    }
    let streamed = qemu_read_all(case, &top, &dir.path().join("read.raw"));
    assert!(
        streamed == after,
        "seed {seed} ({}): the restarted stream changed the content",
        case.name
    );
    t.iterations += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_stream_cor_and_guest_writes_loses_nothing() {
    let iters = env_u64("DS_DAEMON_CRASH_ITERS", 5);
    let seed0 = env_u64("DS_SEED", 0);
    for case in cases() {
        let mut t = Totals::default();
        for i in 0..iters {
            one_iteration(&case, seed0 * 1_000_003 + i, &mut t).await;
        }
        let n = case.name;
        println!("daemon_crash.{n}.iterations={}", t.iterations);
        println!("daemon_crash.{n}.corruptions={}", t.corruptions);
        println!("daemon_crash.{n}.lost_acked_writes={}", t.lost);
        println!("daemon_crash.{n}.foreign_sectors={}", t.foreign);
        println!("daemon_crash.{n}.leak_only_checks={}", t.leaks);
        println!("daemon_crash.{n}.writes_acked={}", t.writes_acked);
        println!("daemon_crash.{n}.flushes={}", t.flushes);
        println!(
            "daemon_crash.{n}.guest_read_mismatches={}",
            t.guest_read_mismatches
        );
        assert_eq!(t.corruptions, 0, "{n}: corruptions");
        assert_eq!(t.lost, 0, "{n}: lost acknowledged-and-flushed writes");
        assert_eq!(t.foreign, 0, "{n}: sectors with data never written there");
        assert_eq!(
            t.guest_read_mismatches, 0,
            "{n}: guest reads of foreign data"
        );
        assert!(
            t.writes_acked > 0 && t.flushes > 0,
            "{n}: the guest wrote nothing"
        );
    }
}

/// The checker itself: a lost flushed write and a foreign sector are found.
#[test]
fn journal_check_finds_lost_writes_and_foreign_data() {
    let size = 64 * SECTOR;
    let base = base_content(size);
    let mut j = Journal::new(size);
    j.issue(1, 0, 2 * SECTOR);
    j.acked(1, 0, 2 * SECTOR);
    j.flushed();
    j.issue(2, 0, SECTOR);
    let mut img = base.clone();
    img[..2 * SECTOR].copy_from_slice(&stamped(1, 0, 2 * SECTOR));
    let mut v = Verdict::default();
    j.check(&base, 0, &img, &mut v);
    assert_eq!((v.lost, v.foreign), (0, 0));
    // Write 2 (issued, unflushed) may have landed.
    img[..SECTOR].copy_from_slice(&stamped(2, 0, SECTOR));
    j.check(&base, 0, &img, &mut v);
    assert_eq!((v.lost, v.foreign), (0, 0));
    // The flushed write reverted to the base: lost.
    img[SECTOR..2 * SECTOR].copy_from_slice(&base[SECTOR..2 * SECTOR]);
    j.check(&base, 0, &img, &mut v);
    assert_eq!((v.lost, v.foreign), (1, 0));
    // Write 1's sector 0 stamp placed at sector 5: foreign.
    let mut v = Verdict::default();
    img[5 * SECTOR..6 * SECTOR].copy_from_slice(&stamped(1, 0, SECTOR));
    j.check(&base, 0, &img, &mut v);
    assert_eq!(v.foreign, 1);
}
