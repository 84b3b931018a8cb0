//! Stream engine tests on real images made by qemu-img: completion and
//! relinking, sparse backings, partial chains, resume after cancel, one-unit
//! mode, copy-on-read, and guest I/O racing a stream against a flat model.
//! Results are judged by qemu-img (`check`, `compare`, `info`), not by us.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use image::device::block_status_all;
use image::{BlockDevice, Image, OpenOptions, WriteFlags};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stream::{Base, OnError, Outcome, StreamJob, StreamOptions};

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A raw file of `size` bytes with random data in `runs` runs of `run` bytes
/// at run-aligned random slots (the rest a hole); returns the file content.
fn make_raw(path: &Path, size: u64, run: u64, runs: u64, seed: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut rng = StdRng::seed_from_u64(seed);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    let slots = size / run;
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < runs.min(slots) {
        chosen.insert(rng.random_range(0..slots));
    }
    for s in chosen {
        let off = (s * run) as usize;
        rng.fill(&mut model[off..off + run as usize]);
        f.write_all_at(&model[off..off + run as usize], off as u64)
            .unwrap();
    }
    model
}

/// base.qcow2 (from a sparse raw file) and top.qcow2 over it.
struct Chain {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    base: PathBuf,
    top: PathBuf,
    model: Vec<u8>,
}

fn chain(size: u64, run: u64, runs: u64, seed: u64, base_fmt: &str) -> Chain {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_owned();
    let raw = dir.join("base.raw");
    let model = make_raw(&raw, size, run, runs, seed);
    let base = if base_fmt == "raw" {
        raw
    } else {
        let b = dir.join("base.qcow2");
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", p(&raw), p(&b)]);
        b
    };
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&base),
        "-F",
        base_fmt,
        p(&top),
    ]);
    Chain {
        _dir: d,
        dir,
        base,
        top,
        model,
    }
}

async fn open_rw(path: &Path) -> Arc<Image> {
    image::open(
        path,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn info_json(path: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "--output=json", "-U", p(path)]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", p(path)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of an image (with its chain) against a raw model.
fn assert_same_as_model(path: &Path, model: &[u8], scratch: &Path) {
    let raw = scratch.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-F", "raw", p(path), p(&raw)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} differs from the model: {}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn seeds() -> u64 {
    std::env::var("DS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

async fn stream_to_end(img: &Arc<Image>, opts: StreamOptions) -> stream::StreamSummary {
    let job = StreamJob::start(Arc::clone(img), opts);
    job.wait().await.expect("stream completes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_stream_over_qcow2_and_raw_backings_completes_and_drops_the_link() {
    for fmt in ["qcow2", "raw"] {
        let c = chain(64 * MIB, MIB, 20, 1, fmt);
        let img = open_rw(&c.top).await;
        let s = stream_to_end(&img, StreamOptions::default()).await;
        assert_eq!(s.outcome, Outcome::Completed);
        assert_eq!(s.copied, 20 * MIB, "{fmt}: copies exactly the data");
        img.close().await.unwrap();
        drop(img);
        let info = info_json(&c.top);
        assert!(
            info.get("backing-filename").is_none(),
            "{fmt}: link dropped: {info}"
        );
        assert_check_clean(&c.top);
        assert_same_as_model(&c.top, &c.model, &c.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_backing_streams_only_its_data() {
    // 256 MiB backing holding 128 MiB of data in 1 MiB runs.
    let c = chain(256 * MIB, MIB, 128, 2, "raw");
    let img = open_rw(&c.top).await;
    let s = stream_to_end(&img, StreamOptions::default()).await;
    let st = img.stats().snapshot();
    assert_eq!(s.copied, 128 * MIB);
    assert_eq!(
        st.backing_read_bytes,
        128 * MIB,
        "reads only the data, never the holes"
    );
    assert_eq!(s.skipped, 128 * MIB, "the holes are passed over");
    img.close().await.unwrap();
    drop(img);
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", p(&c.top)])
        .output()
        .unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap();
    let data: u64 = map
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(
        data,
        128 * MIB,
        "the top holds 128 MiB of data, no zero copies"
    );
    assert_same_as_model(&c.top, &c.model, &c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_chain_streams_mid_and_keeps_base() {
    let c = chain(32 * MIB, MIB, 10, 3, "qcow2");
    // top -> mid -> base: mid gets its own data, zeros over base data, and
    // the old top is replaced by a new top over mid.
    let mid = c.dir.join("mid.qcow2");
    std::fs::rename(&c.top, &mid).unwrap();
    let mut model = c.model.clone();
    let io = |cmd: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, p(&mid)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-io {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    io("write -P 0x5a 3M 2M");
    model[3 * MIB as usize..5 * MIB as usize].fill(0x5a);
    // Zero clusters over whatever the base has at 8-10 MiB.
    io("write -z 8M 2M");
    model[8 * MIB as usize..10 * MIB as usize].fill(0);
    io("write -P 0x11 20M 64k");
    model[20 * MIB as usize..(20 * MIB + 65536) as usize].fill(0x11);
    let top = c.dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&mid),
        "-F",
        "qcow2",
        p(&top),
    ]);

    let img = open_rw(&top).await;
    let base = stream::resolve_base(&img, Some(&c.base)).unwrap();
    assert_eq!(base.depth, Some(2));
    let s = stream_to_end(
        &img,
        StreamOptions {
            base,
            ..StreamOptions::default()
        },
    )
    .await;
    assert_eq!(
        s.copied,
        2 * MIB + 65536,
        "copies what mid holds, nothing of base"
    );
    img.close().await.unwrap();
    drop(img);
    let info = info_json(&top);
    let backing = info["full-backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        std::fs::canonicalize(&backing).unwrap(),
        std::fs::canonicalize(&c.base).unwrap(),
        "top now backs onto base: {info}"
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_check_clean(&top);
    assert_same_as_model(&top, &model, &c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stream_resumes_without_copying_twice() {
    let c = chain(64 * MIB, MIB, 32, 4, "qcow2");
    let chunk = MIB;
    let in_flight = 4;
    let img = open_rw(&c.top).await;
    // Slow enough that the cancel lands mid-way.
    let job = StreamJob::start(
        Arc::clone(&img),
        StreamOptions {
            speed: 16 * MIB,
            max_in_flight: in_flight,
            chunk_size: chunk,
            ..StreamOptions::default()
        },
    );
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    job.cancel();
    let first = job.wait().await.unwrap();
    assert_eq!(first.outcome, Outcome::Cancelled);
    assert!(
        first.copied > 0 && first.copied < 32 * MIB,
        "cancel landed mid-way: {first:?}"
    );
    let read_first = img.stats().snapshot().backing_read_bytes;
    img.close().await.unwrap();
    drop(img);
    assert!(
        info_json(&c.top).get("backing-filename").is_some(),
        "cancel keeps the link"
    );
    assert_check_clean(&c.top);

    let img = open_rw(&c.top).await;
    let second = stream_to_end(&img, StreamOptions::default()).await;
    let read_second = img.stats().snapshot().backing_read_bytes;
    img.close().await.unwrap();
    drop(img);
    assert_eq!(
        first.copied + second.copied,
        32 * MIB,
        "nothing copied twice"
    );
    assert!(
        read_first + read_second <= 32 * MIB + in_flight as u64 * chunk,
        "backing reads {} + {} exceed data + ranges in flight at the cancel",
        read_first,
        read_second
    );
    assert_same_as_model(&c.top, &c.model, &c.dir);
    assert_check_clean(&c.top);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_mode_loop_completes_with_increasing_offsets() {
    let c = chain(32 * MIB, 256 * 1024, 40, 5, "qcow2");
    let img = open_rw(&c.top).await;
    let opts = StreamOptions::default();
    let mut offset = 0;
    let mut steps = 0;
    loop {
        let out = stream::step(&img, offset, &opts).await.unwrap();
        assert!(
            out.next_offset > offset || out.next_offset == img.size(),
            "strictly increasing"
        );
        offset = out.next_offset;
        steps += 1;
        assert!(steps < 10_000, "step loop does not end");
        if out.completed {
            break;
        }
        assert!(
            offset < img.size() || out.completed,
            "reached the end without completing"
        );
    }
    img.close().await.unwrap();
    drop(img);
    assert!(info_json(&c.top).get("backing-filename").is_none());
    assert_same_as_model(&c.top, &c.model, &c.dir);
    assert_check_clean(&c.top);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_on_read_keeps_what_the_guest_read() {
    let c = chain(16 * MIB, MIB, 8, 6, "qcow2");
    let img = open_rw(&c.top).await;
    img.set_copy_on_read(true, None);
    let data = img.read(0, (16 * MIB) as usize).await.unwrap();
    assert_eq!(data, c.model);
    let after_first = img.stats().snapshot().backing_read_bytes;
    assert_eq!(
        after_first,
        8 * MIB,
        "reads each data run from the backing once"
    );
    let again = img.read(0, (16 * MIB) as usize).await.unwrap();
    assert_eq!(again, c.model);
    assert_eq!(
        img.stats().snapshot().backing_read_bytes,
        after_first,
        "second read is local"
    );
    for e in block_status_all(&*img, 0, 16 * MIB).await.unwrap() {
        assert!(
            e.depth != Some(1),
            "nothing still read from the backing: {e:?}"
        );
    }
    img.close().await.unwrap();
    drop(img);
    assert_check_clean(&c.top);
}

/// Guest reads and writes (unaligned, overlapping) race a full stream with
/// copy-on-read on; every read matches the model of what was written over
/// the backing, and so does the final image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_io_racing_a_stream_matches_the_model() {
    for seed in 0..seeds() {
        let c = chain(32 * MIB, 512 * 1024, 40, 100 + seed, "qcow2");
        let img = open_rw(&c.top).await;
        img.set_copy_on_read(true, None);
        let model = Arc::new(tokio::sync::Mutex::new(c.model.clone()));
        let job = StreamJob::start(
            Arc::clone(&img),
            StreamOptions {
                max_in_flight: 4,
                chunk_size: 256 * 1024,
                on_error: OnError::Report,
                ..StreamOptions::default()
            },
        );
        let mut guests = Vec::new();
        for g in 0..4u64 {
            let img = Arc::clone(&img);
            let model = Arc::clone(&model);
            guests.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed * 1000 + g);
                let size = img.size();
                for _ in 0..150 {
                    let len = rng.random_range(1..=200_000u64);
                    let off = rng.random_range(0..size - len);
                    // The model lock spans the request: the model is exact.
                    let mut m = model.lock().await;
                    if rng.random_bool(0.5) {
                        let mut buf = vec![0u8; len as usize];
                        rng.fill(&mut buf[..]);
                        img.write(off, Bytes::from(buf.clone()), WriteFlags::default())
                            .await
                            .unwrap();
                        m[off as usize..(off + len) as usize].copy_from_slice(&buf);
                    } else {
                        let got = img.read(off, len as usize).await.unwrap();
                        assert!(
                            got == m[off as usize..(off + len) as usize],
                            "seed {seed}: read at {off}+{len} differs"
                        );
                    }
                }
            }));
        }
        for g in guests {
            g.await.unwrap();
        }
        let s = job.wait().await.unwrap();
        assert_eq!(s.outcome, Outcome::Completed);
        let m = model.lock().await.clone();
        assert!(
            img.read(0, m.len()).await.unwrap() == m,
            "seed {seed}: final content differs"
        );
        img.close().await.unwrap();
        drop(img);
        assert_check_clean(&c.top);
        assert_same_as_model(&c.top, &m, &c.dir);
        assert!(info_json(&c.top).get("backing-filename").is_none());
    }
}

#[test]
fn base_default_streams_everything() {
    let b = Base::default();
    assert_eq!(b.depth, None);
    assert!(b.link.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_wait_leaves_the_result_for_the_next() {
    let c = chain(32 * MIB, MIB, 16, 7, "qcow2");
    let img = open_rw(&c.top).await;
    let job = StreamJob::start(
        Arc::clone(&img),
        StreamOptions {
            speed: 8 * MIB,
            ..StreamOptions::default()
        },
    );
    // A wait that loses a select, as when Ctrl-C arrives first.
    tokio::select! {
        _ = job.wait() => panic!("a throttled 16 MiB stream cannot finish in 100 ms"),
        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
    }
    job.cancel();
    let s = job.wait().await.expect("the second wait gets the result");
    assert_eq!(s.outcome, Outcome::Cancelled);
    img.close().await.unwrap();
    drop(img);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_rate_follows_the_speed_limit() {
    let c = chain(32 * MIB, MIB, 24, 8, "qcow2");
    let img = open_rw(&c.top).await;
    let job = StreamJob::start(
        Arc::clone(&img),
        StreamOptions {
            speed: 4 * MIB,
            ..StreamOptions::default()
        },
    );
    let mut worst = 0;
    for _ in 0..12 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let i = job.info();
        worst = worst.max(i.rate);
    }
    job.cancel();
    job.wait().await.unwrap();
    // The burst allowance and the chunks in flight at the start add a little.
    assert!(worst > 0, "a running job reports a rate");
    assert!(worst < 12 * MIB, "rate {worst} B/s under a 4 MiB/s limit");
    img.close().await.unwrap();
    drop(img);
}

/// With extended L2 entries the stream copies per subcluster: 64 KiB runs
/// of backing data under 2 MiB clusters are copied as 64 KiB, not as the
/// clusters around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_l2_overlay_streams_per_subcluster() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("base.raw");
    let model = make_raw(&raw, 32 * MIB, 64 << 10, 40, 9);
    let top = d.path().join("top.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=2M",
        "-b",
        p(&raw),
        "-F",
        "raw",
        p(&top),
    ]);
    assert!(out.status.success());
    let img = open_rw(&top).await;
    assert_eq!(img.info().granularity, 64 << 10);
    let s = stream_to_end(&img, StreamOptions::default()).await;
    assert_eq!(s.outcome, Outcome::Completed);
    assert_eq!(s.copied, 40 * (64 << 10), "copies exactly the data");
    assert_eq!(img.stats().snapshot().backing_read_bytes, 40 * (64 << 10));
    img.close().await.unwrap();
    drop(img);
    assert!(info_json(&top).get("backing-filename").is_none());
    assert_check_clean(&top);
    assert_same_as_model(&top, &model, d.path());
}

// ---- QED ------------------------------------------------------------------

/// [`chain`] with a QED top (made by qemu-img) instead of qcow2.
fn qed_chain(size: u64, run: u64, runs: u64, seed: u64, base_fmt: &str) -> Chain {
    let c = chain(size, run, runs, seed, base_fmt);
    let top = c.dir.join("top.qed");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        p(&c.base),
        "-F",
        base_fmt,
        p(&top),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Chain { top, ..c }
}

/// The streaming design's original format: a full stream of a QED overlay
/// completes, copies exactly the data, drops the link, and leaves an image
/// qemu-img checks clean and finds identical to the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_stream_of_a_qed_overlay_completes_and_drops_the_link() {
    for fmt in ["qcow2", "raw"] {
        let c = qed_chain(32 * MIB, MIB, 12, 11, fmt);
        let img = open_rw(&c.top).await;
        let s = stream_to_end(&img, StreamOptions::default()).await;
        assert_eq!(s.outcome, Outcome::Completed);
        assert_eq!(s.copied, 12 * MIB, "{fmt}: copies exactly the data");
        img.close().await.unwrap();
        drop(img);
        let info = info_json(&c.top);
        assert_eq!(info["format"], "qed");
        assert!(
            info.get("backing-filename").is_none(),
            "{fmt}: link dropped: {info}"
        );
        assert_check_clean(&c.top);
        assert_same_as_model(&c.top, &c.model, &c.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_on_read_of_a_qed_overlay_keeps_what_the_guest_read() {
    let c = qed_chain(16 * MIB, MIB, 8, 12, "qcow2");
    let img = open_rw(&c.top).await;
    img.set_copy_on_read(true, None);
    let data = img.read(0, (16 * MIB) as usize).await.unwrap();
    assert_eq!(data, c.model);
    let after_first = img.stats().snapshot().backing_read_bytes;
    assert_eq!(
        after_first,
        8 * MIB,
        "reads each data run from the backing once"
    );
    let again = img.read(0, (16 * MIB) as usize).await.unwrap();
    assert_eq!(again, c.model);
    assert_eq!(
        img.stats().snapshot().backing_read_bytes,
        after_first,
        "second read is local"
    );
    for e in block_status_all(&*img, 0, 16 * MIB).await.unwrap() {
        assert!(e.depth != Some(1), "still read from the backing: {e:?}");
    }
    img.close().await.unwrap();
    drop(img);
    assert_check_clean(&c.top);
    assert_same_as_model(&c.top, &c.model, &c.dir);
}
