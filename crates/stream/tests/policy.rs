//! Stream policies end to end: a guest-like client doing bursty QD1 reads
//! over NBD on the overlay while it streams from a slow NBD backing (nbdkit
//! with the delay filter) under the `idle` policy. Copies must be issued only
//! in the guest's gaps, and the stream must complete.
//!
//! No assertion is on speed. The margins are wide (tens of milliseconds) so
//! a loaded machine's scheduling delays do not make a copy look misplaced.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::{BlockDevice, OpenOptions, WriteFlags};
use nbd::client::{ClientOptions, NbdClient};
use nbd::server::{self, Export, Listener, ServerConfig};
use stream::policy::{Policy, PolicyKind};
use stream::{Outcome, StreamJob, StreamOptions};

const MIB: u64 = 1 << 20;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_for(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{} did not appear", path.display());
}

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
