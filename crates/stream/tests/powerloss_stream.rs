//! Power-loss replay over a stream (DESIGN.md invariants 2 to 4): an overlay
//! on a recording storage is streamed to completion while a guest reads with
//! copy-on-read on; every crash state built from the log must open, check
//! without corruption, and read exactly the backing's content — with the
//! backing when the header still names it, and *alone* when the crash came
//! after the link was dropped. The second case is the one that proves the
//! link is rewritten only after every copied byte is durable.
//!
//! Knobs: `DS_POWERLOSS_STATES` (crash states per configuration).

use std::sync::Arc;

use image::format::{BackingSpec, Format};
use image::open::{FormatKind, OpenOptions, open_format};
use image::storage::{MemStorage, Storage};
use image::testing::{RecordingStorage, TestRng, env_count};
use image::{BlockDevice, Image, qcow2, raw};
use stream::{StreamJob, StreamOptions};

const SIZE: u64 = 4 << 20;

fn patchy(rng: &mut TestRng, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let end = (pos + (rng.range(1, 128) * 512) as usize).min(size);
        if rng.chance(1, 2) {
            rng.fill(&mut v[pos..end]);
        }
        pos = end;
    }
    v
}

async fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < dev.size() {
        let n = (dev.size() - pos).min(1 << 20);
        out.extend(dev.read(pos, n as usize).await.expect("read"));
        pos += n;
    }
    out
}

async fn open_qcow2(s: Arc<dyn Storage>) -> image::Result<Arc<dyn Format>> {
    let o = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    open_format(s, FormatKind::Qcow2, &o).await
}

async fn run(cluster: u64, seed: u64) {
    let mut rng = TestRng::new(seed);
    let content = patchy(&mut rng, SIZE as usize);
    let backing: Arc<dyn BlockDevice> = {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes("backing.raw", content.clone()));
        Arc::new(Image::new(
            Arc::new(raw::Raw::open(s, false).unwrap()),
            None,
        ))
    };
    let fresh = MemStorage::new("overlay.qcow2");
    qcow2::create(
        &fresh,
        &qcow2::CreateOptions {
            size: SIZE,
            cluster_size: Some(cluster),
            backing: Some(BackingSpec {
                name: "backing.raw".into(),
                format: Some("raw".into()),
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let rec = Arc::new(RecordingStorage::new("overlay.qcow2", fresh.snapshot()));
    let img = Arc::new(Image::new(
        open_qcow2(rec.clone()).await.unwrap(),
        Some(backing.clone()),
    ));
    img.set_copy_on_read(true, None);
    let job = StreamJob::start(
        Arc::clone(&img),
        StreamOptions {
            max_in_flight: 3,
            chunk_size: 3 * cluster,
            ..StreamOptions::default()
        },
    );
    // A guest reading while the stream runs: copy-on-read races the copies.
    for _ in 0..40 {
        let len = rng.range(1, 32768);
        let off = rng.below(SIZE - len);
        let got = img.read(off, len as usize).await.unwrap();
        assert!(
            got == content[off as usize..(off + len) as usize],
            "live read differs"
        );
    }
    job.wait().await.expect("stream completes");
    img.close().await.unwrap();
    drop(img);
    let recording = rec.recording();

    let states = env_count("DS_POWERLOSS_STATES", 60);
    let (mut linked, mut unlinked, mut torn) = (0, 0, 0);
    for i in 0..states {
        // Half the states cut anywhere; half cut among the last events, where
        // the final flush and the header rewrite that drops the link are.
        let sseed = seed.wrapping_mul(31).wrapping_add(i);
        let st = if i % 2 == 0 {
            recording.crash_state(sseed)
        } else {
            let n = recording.events.len();
            let mut r = TestRng::new(sseed);
            let cut = n - r.below(n.min(12) as u64 + 1) as usize;
            recording.crash_state_at(cut, &mut r, sseed)
        };
        torn += st.torn;
        let s: Arc<dyn Storage> =
            Arc::new(MemStorage::from_bytes("overlay.qcow2", st.bytes.clone()));
        let f = open_qcow2(s).await.unwrap_or_else(|e| {
            panic!(
                "cluster {cluster} seed {seed} state {} (cut {}): open: {e}",
                st.seed, st.cut
            )
        });
        let report = f.check(None).unwrap();
        assert_eq!(
            report.corruptions, 0,
            "state {}: {:?}",
            st.seed, report.messages
        );
        let below = f.backing().map(|_| backing.clone());
        if below.is_some() {
            linked += 1;
        } else {
            unlinked += 1;
        }
        let dev = Image::new(f, below);
        let got = read_all(&dev).await;
        assert!(
            got == content,
            "cluster {cluster} seed {seed} state {} (cut {} of {}, durable {}, link {}): content differs",
            st.seed,
            st.cut,
            recording.events.len(),
            st.durable,
            if dev.backing().is_some() {
                "kept"
            } else {
                "dropped"
            }
        );
        dev.close().await.ok();
    }
    eprintln!(
        "powerloss_stream cluster={cluster}: states={states} link_kept={linked} link_dropped={unlinked} torn_writes={torn} failures=0"
    );
    if states >= 30 {
        assert!(
            linked > 0 && unlinked > 0,
            "states must cover both sides of the relink"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_power_loss_64k_clusters() {
    run(65536, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_power_loss_4k_clusters() {
    run(4096, 12).await;
}
