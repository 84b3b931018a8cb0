//! `adaptive` held at its floor must not keep a copy asleep through the
//! guest's idle time: the token-bucket wait of a copy charged at the floor
//! rate is slept in slices, with the policy asked again after each. Before,
//! a copy charged during a backoff of a tenth of a second (at the floor, or
//! at a rate halved towards it) slept its whole debt, minutes here, while
//! the guest was idle; in the benchmark every guest burst re-armed such a
//! sleep and the stream crawled at the floor.
//!
//! The only time bound is a hang detector with a wide margin: the stream
//! needs a few seconds unthrottled, the bug made it wait over a minute.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use image::{BlockDevice, OpenOptions};
use stream::policy::{HoldReason, Policy, PolicyKind};
use stream::{Outcome, StreamJob, StreamOptions};

use common::{Kill, run, wait_for};

const MIB: u64 = 1 << 20;
const UNIT: u64 = 64 << 10;
/// 4 KiB/s: one 256 KiB copy charged at it waits 64 s.
const FLOOR: u64 = 4 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_at_its_floor_runs_at_full_speed_once_the_guest_is_idle() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 32 * MIB;
    let base = d.join("base.raw");
    std::fs::write(
        &base,
        (0..size)
            .map(|i| (i / 4096 % 251) as u8 + 1)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    // Every backing read waits 50 ms: remote guest reads are slow, and the
    // stream (one 256 KiB copy in flight) needs about 6 s at full speed.
    let bsock = d.join("base.sock");
    let _nbdkit = Kill(
        Command::new("nbdkit")
            .args(["-f", "-U", bsock.to_str().unwrap(), "--filter=delay"])
            .args(["file", base.to_str().unwrap(), "rdelay=50ms"])
            .spawn()
            .expect("nbdkit"),
    );
    wait_for(&bsock);
    let uri = format!("nbd+unix:///?socket={}", bsock.display());
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &uri,
            "-F",
            "raw",
            top.to_str().unwrap(),
        ],
    );
    let img = image::open(
        &top,
        &OpenOptions {
            writable: true,
            opener: Some(Arc::new(nbd::client::NbdOpener::default())),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    img.set_copy_on_read(true, None);
    // A local working set for the quiet baseline: the guest's first reads.
    img.read(0, MIB as usize).await.unwrap();

    let job = Arc::new(StreamJob::start(
        img.clone(),
        StreamOptions {
            max_in_flight: 1,
            chunk_size: 256 << 10,
            policy: Policy {
                grace: Duration::from_millis(30),
                floor: FLOOR,
                ..Policy::of(PolicyKind::Adaptive)
            },
            ..StreamOptions::default()
        },
    ));

    // The guest: back-to-back local reads (the baseline: fast), then
    // remote reads from the top of the disk down, four at a time (50 ms
    // each: far above target), until told to stop. Bounded by the units.
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (img, stop) = (img.clone(), stop.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut i = 0u64;
            while t0.elapsed() < Duration::from_millis(600) {
                img.read((i * 4096) % MIB, 4096).await.unwrap();
                i += 1;
            }
            // Four readers at once: enough completions in every 100 ms
            // controller tick for it to judge the latency.
            let top = size / UNIT - 1;
            let readers: Vec<_> = (0..4u64)
                .map(|k| {
                    let (img, stop) = (img.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut u = top - k;
                        while !stop.load(Ordering::Relaxed) && u > 64 {
                            img.read(u * UNIT, 4096).await.unwrap();
                            u -= 4;
                        }
                    })
                })
                .collect();
            for r in readers {
                r.await.unwrap();
            }
        })
    };

    // Wait (bounded) for the controller to reach its floor.
    let mut floored = false;
    for _ in 0..2000 {
        let info = job.info();
        if info.state.is_final() {
            break;
        }
        if info.held_by == HoldReason::Floor {
            floored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        floored,
        "adaptive never reached its floor while the guest read slow remote data: {:?}",
        job.info()
    );
    // Let a copy be charged at the floor rate, then the guest goes idle.
    // Long enough for a copy to be charged during the backoff.
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    guest.await.unwrap();
    let idle_at = Instant::now();
    let left = job.info().remote;
    // From now on the guest is idle: copies must follow each other (each
    // takes 50 ms); the bug showed as one copy asleep for 16 s to minutes.
    let mut longest = Duration::ZERO;
    let (mut last, mut since) = (job.info().copied, Instant::now());
    for _ in 0..3000 {
        let i = job.info();
        if i.state.is_final() {
            break;
        }
        if i.copied != last {
            (last, since) = (i.copied, Instant::now());
        }
        longest = longest.max(since.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        longest < Duration::from_secs(5),
        "with the guest idle, the stream copied nothing for {longest:?} ({left} bytes were \
         left when the guest stopped): {:?}",
        job.info()
    );
    let summary = tokio::time::timeout(Duration::from_secs(60), job.wait())
        .await
        .expect("the stream ends")
        .unwrap();
    assert_eq!(summary.outcome, Outcome::Completed);
    eprintln!(
        "policy_floor: {left} remote bytes left at idle, completed {:?} later",
        idle_at.elapsed()
    );
    img.close().await.unwrap();
    drop(job);
    drop(img);
    run("qemu-img", &["check", "-q", top.to_str().unwrap()]);
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "qcow2",
            base.to_str().unwrap(),
            top.to_str().unwrap(),
        ],
    );
}

/// Under `adaptive` and `idle`, copies are at most 256 KiB and at most 4
/// run at once, whatever the job's chunk size and window (the guest waits
/// behind the copies in flight when its burst starts); `fixed` keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gentle_policies_copy_small_pieces_few_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(
        &base,
        (0..8 * MIB)
            .map(|i| (i / 4096 % 13) as u8 + 1)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    for (i, kind) in [PolicyKind::Adaptive, PolicyKind::Idle, PolicyKind::Fixed]
        .into_iter()
        .enumerate()
    {
        let top = d.join(format!("top{i}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "raw",
                top.to_str().unwrap(),
            ],
        );
        let img = image::open(
            &top,
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .await
        .unwrap();
        let job = StreamJob::start(
            img.clone(),
            StreamOptions {
                policy: Policy::of(kind),
                record_copies: true,
                ..StreamOptions::default()
            },
        );
        let mut widest = 0;
        for _ in 0..20_000 {
            let info = job.info();
            widest = widest.max(info.allowed_in_flight.max(info.in_flight));
            if info.state.is_final() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        assert_eq!(job.wait().await.unwrap().outcome, Outcome::Completed);
        let biggest = job.copy_log().iter().map(|c| c.len).max().unwrap();
        if kind == PolicyKind::Fixed {
            assert_eq!(biggest, MIB, "fixed keeps the job's 1 MiB chunks");
        } else {
            assert_eq!(biggest, 256 << 10, "{kind:?}: copies of at most 256 KiB");
            assert!(widest <= 4, "{kind:?}: {widest} copies allowed at once");
        }
        img.close().await.unwrap();
    }
}
