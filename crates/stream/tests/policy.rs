//! Stream policies end to end: a guest-like client doing bursty QD1 reads
//! over NBD on the overlay while it streams from a slow NBD backing (nbdkit
//! with the delay filter) under the `idle` policy. Copies must be issued only
//! in the guest's gaps, and the stream must complete. Then hot data first:
//! access profiles recorded and replayed (allocation order, backing
//! fetches counted), and a guest read of remote data moving the stream.
//!
//! No assertion is on speed. The margins are wide (tens of milliseconds) so
//! a loaded machine's scheduling delays do not make a copy look misplaced.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::{BlockDevice, OpenOptions, WriteFlags};
use nbd::client::{ClientOptions, NbdClient};
use nbd::server::{self, Export, Listener, ServerConfig};
use stream::policy::{Policy, PolicyKind};
use stream::{Outcome, StreamJob, StreamOptions};

use common::{Kill, run, wait_for};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_policy_copies_only_in_the_guests_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    let size = 8 * MIB;
    std::fs::write(
        &base,
        (0..size)
            .map(|i| (i / 4096 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    // A slow backing: every read waits 4 ms, as over a real network.
    let bsock = d.join("base.sock");
    let _nbdkit = Kill(
        Command::new("nbdkit")
            .args(["-f", "-U", bsock.to_str().unwrap(), "--filter=delay"])
            .args(["file", base.to_str().unwrap(), "rdelay=4ms"])
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
    // The guest's working set is local already: every backing read is then
    // a stream copy, never a guest fetch.
    img.write(
        0,
        Bytes::from(vec![7u8; MIB as usize]),
        WriteFlags::default(),
    )
    .await
    .unwrap();

    // The overlay, exported over NBD to the guest-like client.
    let gsock = d.join("guest.sock");
    let listener = Listener::bind_unix(&gsock).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let export = Export {
        name: String::new(),
        description: String::new(),
        device: img.clone() as Arc<dyn BlockDevice>,
        read_only: false,
        multi_conn: false,
    };
    let srv = tokio::spawn(server::run(
        listener,
        ServerConfig::new(vec![export]),
        async {
            let _ = stop_rx.await;
        },
    ));
    let guest = NbdClient::connect_uri(
        &format!("nbd+unix:///?socket={}", gsock.display()),
        ClientOptions::default(),
    )
    .await
    .unwrap();

    let grace = Duration::from_millis(60);
    let job = Arc::new(StreamJob::start(
        img.clone(),
        StreamOptions {
            max_in_flight: 2,
            chunk_size: 128 << 10,
            policy: Policy {
                grace,
                ..Policy::of(PolicyKind::Idle)
            },
            record_copies: true,
            ..StreamOptions::default()
        },
    ));

    // Bursts of 40 ms of back-to-back 4 KiB reads, gaps of 150 ms, until
    // the job ends (bounded: at most 600 bursts, two minutes).
    let mut requests: Vec<(Instant, Instant)> = Vec::new();
    let mut i = 0u64;
    let mut held_seen = false;
    for _ in 0..600 {
        if job.info().state.is_final() {
            break;
        }
        let burst = Instant::now();
        while burst.elapsed() < Duration::from_millis(40) {
            let off = (i * 7919 % 256) * 4096;
            i += 1;
            let t0 = Instant::now();
            let data = guest.read(off, 4096).await.unwrap();
            requests.push((t0, Instant::now()));
            assert!(data.iter().all(|&b| b == 7), "guest data at {off}");
        }
        held_seen |= job.info().held_by == stream::policy::HoldReason::GuestBusy;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let summary = tokio::time::timeout(Duration::from_secs(120), job.wait())
        .await
        .expect("stream ends")
        .unwrap();
    assert_eq!(summary.outcome, Outcome::Completed);
    assert!(held_seen, "job info never said guest-busy during a burst");

    let copies = job.copy_log();
    assert_eq!(
        copies.iter().map(|c| c.len).sum::<u64>(),
        size - MIB,
        "every remote byte copied once"
    );
    let first = copies.iter().map(|c| c.issued).min().unwrap();
    let last = copies.iter().map(|c| c.issued).max().unwrap();
    let bursts_during = requests
        .windows(2)
        .filter(|w| w[1].0.saturating_duration_since(w[0].1) > Duration::from_millis(100))
        .filter(|w| w[1].0 > first && w[1].0 < last)
        .count();
    assert!(
        bursts_during >= 1,
        "the stream ran within one gap; the test proved nothing"
    );
    // No copy may be issued while a guest request is in flight or within
    // its grace period after it: (start + margin, end + grace - margin).
    let margin = Duration::from_millis(20);
    for c in &copies {
        for &(s, e) in &requests {
            assert!(
                !(c.issued > s + margin && c.issued + margin < e + grace),
                "copy at {} issued {:?} after a guest request started, {:?} after it ended",
                c.offset,
                c.issued.saturating_duration_since(s),
                c.issued.checked_duration_since(e),
            );
        }
    }
    drop(guest);
    let _ = stop_tx.send(());
    let _ = srv.await;
    img.close().await.unwrap();
    drop(job);
    drop(img);
    run("qemu-img", &["check", "-q", top.to_str().unwrap()]);
}

const UNIT: u64 = 64 << 10;
/// The guest's deterministic first touches: units in the upper half of an
/// 8 MiB disk, out of order.
const TOUCHED: [u64; 12] = [100, 70, 120, 65, 90, 127, 80, 110, 75, 101, 66, 119];

/// A fresh qcow2 overlay (64 KiB clusters) over `base` in `dir`.
async fn overlay(dir: &Path, base: &Path, name: &str) -> Arc<image::Image> {
    let top = dir.join(name);
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
    image::open(
        &top,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap()
}

/// The guest run: a 4 KiB read in each touched unit, twice.
async fn guest_run(img: &image::Image) {
    for _ in 0..2 {
        for u in TOUCHED {
            img.read(u * UNIT + 512, 4096).await.unwrap();
        }
    }
}

fn base_image(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    std::fs::write(
        &base,
        (0..8 * MIB)
            .map(|i| (i / 4096 % 253) as u8 + 1)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    base
}

/// Streams `img` at 2 MiB/s, one copy in flight, until at least `bytes`
/// are copied, then cancels.
async fn stream_some(
    img: &Arc<image::Image>,
    profile: Option<Arc<image::access::Profile>>,
    bytes: u64,
) {
    let job = StreamJob::start(
        img.clone(),
        StreamOptions {
            speed: 2 * MIB,
            max_in_flight: 1,
            chunk_size: UNIT,
            profile,
            ..StreamOptions::default()
        },
    );
    for _ in 0..3000 {
        if job.info().copied >= bytes {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    job.cancel();
    assert_eq!(job.wait().await.unwrap().outcome, Outcome::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_records_first_touches_and_a_replay_copies_them_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = base_image(d);

    // Record: the guest's first touches, in order, once each.
    let a = overlay(d, &base, "a.qcow2").await;
    a.access().start_profile(UNIT);
    guest_run(&a).await;
    let profile = a.access().profile().unwrap();
    let want: Vec<u64> = TOUCHED.iter().map(|u| u * UNIT).collect();
    assert_eq!(profile.offsets, want);
    let file = d.join("boot.profile");
    std::fs::write(&file, profile.to_text()).unwrap();
    let profile =
        Arc::new(image::access::Profile::parse(&std::fs::read_to_string(&file).unwrap()).unwrap());
    let profiled_bytes = TOUCHED.len() as u64 * UNIT;

    // Replay with the profile, then without: the same guest run fetches
    // nothing from the backing in the first case.
    let mut fetched = Vec::new();
    for (name, p) in [("c.qcow2", Some(profile.clone())), ("d.qcow2", None)] {
        let img = overlay(d, &base, name).await;
        stream_some(&img, p, profiled_bytes).await;
        let before = img.stats().snapshot().backing_read_bytes;
        guest_run(&img).await;
        fetched.push(img.stats().snapshot().backing_read_bytes - before);
        img.close().await.unwrap();
    }
    assert_eq!(fetched[0], 0, "profiled ranges were local: {fetched:?}");
    assert!(
        fetched[1] > 0,
        "without a profile the guest fetches: {fetched:?}"
    );

    // A full stream with the profile allocates the profiled units first,
    // in profile order: their host offsets increase and precede the rest.
    let b = overlay(d, &base, "b.qcow2").await;
    let job = StreamJob::start(
        b.clone(),
        StreamOptions {
            max_in_flight: 1,
            chunk_size: UNIT,
            profile: Some(profile.clone()),
            ..StreamOptions::default()
        },
    );
    assert_eq!(job.wait().await.unwrap().outcome, Outcome::Completed);
    b.close().await.unwrap();
    drop(job);
    drop(b);
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(d.join("b.qcow2"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    // Host offset of each guest unit.
    let host = |guest: u64| -> u64 {
        let e = map
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= guest && guest < s + e["length"].as_u64().unwrap()
            })
            .unwrap();
        e["offset"].as_u64().expect("allocated") + (guest - e["start"].as_u64().unwrap())
    };
    let hosts: Vec<u64> = want.iter().map(|&g| host(g)).collect();
    assert!(
        hosts.windows(2).all(|w| w[0] < w[1]),
        "profile order: {hosts:?}"
    );
    let last_profiled = *hosts.last().unwrap();
    for u in 0..8 * MIB / UNIT {
        if !TOUCHED.contains(&u) {
            assert!(
                host(u * UNIT) > last_profiled,
                "unit {u} allocated before the profile"
            );
        }
    }
    run(
        "qemu-img",
        &["check", "-q", d.join("b.qcow2").to_str().unwrap()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_read_of_remote_data_moves_the_stream_there() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = base_image(d);
    let img = overlay(d, &base, "e.qcow2").await;
    let job = StreamJob::start(
        img.clone(),
        StreamOptions {
            speed: MIB,
            max_in_flight: 1,
            chunk_size: UNIT,
            record_copies: true,
            ..StreamOptions::default()
        },
    );
    for _ in 0..2000 {
        if job.info().copied > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The guest reads remote data at 6 MiB (copy-on-read is off: the read
    // itself copies nothing).
    let read_at = Instant::now();
    img.read(6 * MIB + 100, 4096).await.unwrap();
    for _ in 0..2000 {
        if job.copy_log().iter().any(|c| c.offset == 6 * MIB) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    job.cancel();
    job.wait().await.unwrap();
    let log = job.copy_log();
    let i = log
        .iter()
        .position(|c| c.offset == 6 * MIB)
        .expect("the range after the guest read was copied");
    assert!(log[i].issued >= read_at);
    // The scan was far below 6 MiB when it jumped there, and went on
    // after the read: 6 MiB + 64 KiB is next.
    assert!(
        log[..i].iter().all(|c| c.offset < 2 * MIB),
        "{:?}",
        &log[..i]
    );
    if let Some(next) = log.get(i + 1) {
        assert_eq!(next.offset, 6 * MIB + UNIT);
    }
}
