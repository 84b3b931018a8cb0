//! Model-based test: seeded random sequences of writes, write-zeroes and
//! discards (unaligned too, many small and some large) on a qcow2 overlay
//! over a raw or qcow2 backing with random content, checked against a flat
//! [`ContentModel`] after every batch. Each batch runs its operations
//! concurrently; the ranges inside one batch never share a byte (so any
//! order gives the same result) but often share a cluster, which exercises
//! the range locks and the copy-on-write of partial clusters under
//! concurrency. Now and then the image is flushed, or closed and reopened.
//! At the end `qemu-img check` must be clean (exit 0) and `qemu-img compare`
//! must find the image identical to a raw file of the model.
//!
//! Knobs: `DS_SEEDS` (default 3) seeds; `DS_SEED` shifts them.

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use image::device::{BlockDevice, ExtentKind, WriteFlags, block_status_all};
use image::open::{CreateOptions, FormatKind};
use image::testing::{ContentModel, TestRng, env_count};
use image::{Image, create, open};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write(o, d) => (*o, *o + d.len() as u64),
            Op::Zero(o, l, _) | Op::Discard(o, l) => (*o, *o + l),
        }
    }
}

fn random_op(rng: &mut TestRng, size: u64, cluster: u64) -> Op {
    let len = match rng.below(20) {
        0..=11 => rng.range(1, 8192),
        12..=15 => rng.range(1, 4) * cluster,
        16..=18 => rng.range(8192, 256 << 10),
        _ => rng.range(256 << 10, 1 << 20),
    }
    .min(size);
    let mut off = rng.below(size - len + 1);
    if rng.chance(1, 3) {
        off -= off % 512;
    }
    match rng.below(10) {
        0..=5 => Op::Write(off, rng.bytes(len as usize)),
        6..=7 => Op::Zero(off, len, rng.chance(1, 2)),
        _ => Op::Discard(off, len),
    }
}

async fn apply(dev: Arc<Image>, op: Op) -> (Op, image::Result<()>) {
    let r = match &op {
        Op::Write(o, d) => {
            dev.write(*o, Bytes::from(d.clone()), WriteFlags::default())
                .await
        }
        Op::Zero(o, l, u) => dev.write_zeroes(*o, *l, *u).await,
        Op::Discard(o, l) => dev.discard(*o, *l).await,
    };
    (op, r)
}

async fn check_against(dev: &Image, model: &mut ContentModel, ctx: &str) {
    let got = read_all(dev).await;
    if let Err(e) = model.check(0, &got) {
        panic!("{ctx}: {e}");
    }
    model.resolve(0, &got);
    // Block status agrees with the content: zeros where it says so.
    let ext = block_status_all(dev, 0, dev.size())
        .await
        .unwrap_or_else(|e| panic!("{ctx}: block status: {e}"));
    let mut pos = 0;
    for e in &ext {
        assert_eq!(e.offset, pos, "{ctx}: block status gap");
        if e.kind != ExtentKind::Data {
            let r = e.offset as usize..e.end() as usize;
            assert!(got[r].iter().all(|&b| b == 0), "{ctx}: {e:?} is not zero");
        }
        pos = e.end();
    }
    assert_eq!(pos, dev.size(), "{ctx}: block status short");
}

async fn run_seed(seed: u64) {
    run_seed_with(seed, "").await
}

/// One seed on a top image made with the extra `-o` options `opts`.
async fn run_seed_with(seed: u64, opts: &str) {
    let mut rng = TestRng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let cluster = if opts.contains("extended_l2=on") {
        *rng.pick(&[16384u64, 65536])
    } else {
        *rng.pick(&[512u64, 4096, 65536])
    };
    let size: u64 = 8 << 20;
    let bsize = if rng.chance(1, 3) { 6 << 20 } else { size };
    let content = patchy(&mut rng, bsize as usize);
    let braw = dir.path().join("base.raw");
    std::fs::write(&braw, &content).unwrap();
    let qcow2_backing = rng.chance(1, 2);
    let (bname, bfmt) = if qcow2_backing {
        let b = dir.path().join("base.qcow2");
        let (code, out) = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            braw.to_str().unwrap(),
            b.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{out}");
        ("base.qcow2", "qcow2")
    } else {
        ("base.raw", "raw")
    };
    let ctx =
        format!("seed {seed} (cluster {cluster}, {bfmt} backing of {bsize} bytes; -o {opts})");
    let top = dir.path().join("top.qcow2");
    // Made by qemu-img: this test is about I/O; our create is covered by
    // the conformance suite.
    let bytes = qemu_qcow2_bytes_with(size, cluster, Some((bname, bfmt)), opts);
    std::fs::write(&top, bytes).unwrap();
    let mut initial = content.clone();
    initial.resize(size as usize, 0);
    let mut model = ContentModel::new(initial);
    let mut dev = open(&top, &writable()).await.unwrap();
    let mut ops_run = 0;
    for batch in 0..16 {
        let n = rng.range(1, 9);
        let mut ops: Vec<Op> = Vec::new();
        while (ops.len() as u64) < n {
            let op = random_op(&mut rng, size, cluster);
            let (s, e) = op.range();
            if ops.iter().all(|o| {
                let (s2, e2) = o.range();
                e <= s2 || e2 <= s
            }) {
                ops.push(op);
            }
        }
        let tasks: Vec<_> = ops
            .into_iter()
            .map(|op| tokio::spawn(apply(dev.clone(), op)))
            .collect();
        for t in tasks {
            let (op, r) = t.await.unwrap();
            if let Err(e) = r {
                panic!("{ctx}: batch {batch}: {op:?}: {e}");
            }
            match op {
                Op::Write(o, d) => model.write(o, &d),
                Op::Zero(o, l, _) => model.write_zeroes(o, l),
                Op::Discard(o, l) => model.discard(o, l),
            }
            ops_run += 1;
        }
        check_against(&dev, &mut model, &format!("{ctx}, after batch {batch}")).await;
        match rng.below(6) {
            0 => dev.flush().await.unwrap(),
            1 => {
                dev.close().await.unwrap();
                drop(dev);
                dev = open(&top, &writable()).await.unwrap();
                check_against(
                    &dev,
                    &mut model,
                    &format!("{ctx}, reopened after batch {batch}"),
                )
                .await;
            }
            _ => {}
        }
    }
    dev.close().await.unwrap();
    drop(dev);
    qemu_verdict(&top, &dir.path().join("model.raw"), model.values(), &ctx);
    eprintln!("model {ctx}: {ops_run} operations");
}

fn qemu_verdict(top: &Path, model_raw: &Path, values: &[u8], ctx: &str) {
    let (code, out) = qemu_img(&["check", "-f", "qcow2", top.to_str().unwrap()]);
    assert_eq!(code, 0, "{ctx}: qemu-img check:\n{out}");
    std::fs::write(model_raw, values).unwrap();
    let (code, out) = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        top.to_str().unwrap(),
        model_raw.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{ctx}: qemu-img compare with the model:\n{out}");
}

#[test]
fn model_random_ops_on_qcow2_overlay() {
    let seeds = env_count("DS_SEEDS", 3);
    let shift = env_count("DS_SEED", 0);
    for s in 0..seeds {
        let seed = shift.wrapping_add(s);
        // A healthy engine runs a seed in about a second.
        with_deadline(
            &format!("model seed {seed}"),
            std::time::Duration::from_secs(60),
            run_seed(seed),
        );
    }
}

/// The same harness on a raw image (no backing, no metadata) runs today and
/// shows the model and the qemu-img verdict agree with a trivially correct
/// device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_random_ops_on_raw() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let size = 4u64 << 20;
    create(
        &path,
        FormatKind::Raw,
        &CreateOptions {
            size: Some(size),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    let dev = open(&path, &writable()).await.unwrap();
    let mut model = ContentModel::new(vec![0; size as usize]);
    let mut rng = TestRng::new(99);
    for batch in 0..8 {
        let mut ops: Vec<Op> = Vec::new();
        while ops.len() < 6 {
            let op = random_op(&mut rng, size, 4096);
            let (s, e) = op.range();
            if ops.iter().all(|o| e <= o.range().0 || o.range().1 <= s) {
                ops.push(op);
            }
        }
        let tasks: Vec<_> = ops
            .into_iter()
            .map(|op| tokio::spawn(apply(dev.clone(), op)))
            .collect();
        for t in tasks {
            let (op, r) = t.await.unwrap();
            r.unwrap();
            match op {
                Op::Write(o, d) => model.write(o, &d),
                Op::Zero(o, l, _) => model.write_zeroes(o, l),
                Op::Discard(o, l) => model.discard(o, l),
            }
        }
        check_against(&dev, &mut model, &format!("raw batch {batch}")).await;
    }
    dev.close().await.unwrap();
    drop(dev);
    let m = dir.path().join("model.raw");
    std::fs::write(&m, model.values()).unwrap();
    let (code, out) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        path.to_str().unwrap(),
        m.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
}

/// The model on overlays with extended L2 entries: concurrent requests on
/// different subclusters of one cluster, partial-subcluster copy-on-write,
/// zero subclusters.
#[test]
fn model_random_ops_on_qcow2_xl2_overlay() {
    let seeds = env_count("DS_SEEDS", 3);
    let shift = env_count("DS_SEED", 0);
    for s in 0..seeds {
        let seed = shift.wrapping_add(s).wrapping_add(1 << 40);
        with_deadline(
            &format!("model xl2 seed {seed}"),
            std::time::Duration::from_secs(60),
            run_seed_with(seed, "extended_l2=on"),
        );
    }
}

// ---- QED --------------------------------------------------------------------

/// The same random batches on a QED overlay made by `qemu-img create -f qed`
/// (random cluster and table sizes) over a raw backing (the "no probe" bit)
/// or a qcow2 one (found by probing); `qemu-img check -f qed` and `compare`
/// at the end.
async fn run_seed_qed(seed: u64) {
    let mut rng = TestRng::new(seed ^ 0x9ed);
    let dir = tempfile::tempdir().unwrap();
    let cluster = *rng.pick(&[4096u64, 16384, 65536]);
    let table = *rng.pick(&[2u64, 4, 16]);
    let size: u64 = 8 << 20;
    let bsize = if rng.chance(1, 3) { 6 << 20 } else { size };
    let content = patchy(&mut rng, bsize as usize);
    let braw = dir.path().join("base.raw");
    std::fs::write(&braw, &content).unwrap();
    let (bname, bfmt) = if rng.chance(1, 2) {
        let b = dir.path().join("base.qcow2");
        let (code, out) = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            braw.to_str().unwrap(),
            b.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{out}");
        ("base.qcow2", "qcow2")
    } else {
        ("base.raw", "raw")
    };
    let ctx = format!(
        "qed seed {seed} (cluster {cluster}, table {table}, {bfmt} backing of {bsize} bytes)"
    );
    let top = dir.path().join("top.qed");
    let (code, out) = qemu_img(&[
        "create",
        "-f",
        "qed",
        "-o",
        &format!("cluster_size={cluster},table_size={table}"),
        "-b",
        bname,
        "-F",
        bfmt,
        top.to_str().unwrap(),
        &size.to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
    let mut initial = content.clone();
    initial.resize(size as usize, 0);
    let mut model = ContentModel::new(initial);
    let mut dev = open(&top, &writable()).await.unwrap();
    let mut ops_run = 0;
    for batch in 0..16 {
        let n = rng.range(1, 9);
        let mut ops: Vec<Op> = Vec::new();
        while (ops.len() as u64) < n {
            let op = random_op(&mut rng, size, cluster);
            let (s, e) = op.range();
            if ops.iter().all(|o| {
                let (s2, e2) = o.range();
                e <= s2 || e2 <= s
            }) {
                ops.push(op);
            }
        }
        let tasks: Vec<_> = ops
            .into_iter()
            .map(|op| tokio::spawn(apply(dev.clone(), op)))
            .collect();
        for t in tasks {
            let (op, r) = t.await.unwrap();
            if let Err(e) = r {
                panic!("{ctx}: batch {batch}: {op:?}: {e}");
            }
            match op {
                Op::Write(o, d) => model.write(o, &d),
                Op::Zero(o, l, _) => model.write_zeroes(o, l),
                Op::Discard(o, l) => model.discard(o, l),
            }
            ops_run += 1;
        }
        check_against(&dev, &mut model, &format!("{ctx}, after batch {batch}")).await;
        match rng.below(6) {
            0 => dev.flush().await.unwrap(),
            1 => {
                dev.close().await.unwrap();
                drop(dev);
                dev = open(&top, &writable()).await.unwrap();
                check_against(
                    &dev,
                    &mut model,
                    &format!("{ctx}, reopened after batch {batch}"),
                )
                .await;
            }
            _ => {}
        }
    }
    dev.close().await.unwrap();
    drop(dev);
    let (code, out) = qemu_img(&["check", "-f", "qed", top.to_str().unwrap()]);
    assert_eq!(code, 0, "{ctx}: qemu-img check:\n{out}");
    let model_raw = dir.path().join("model.raw");
    std::fs::write(&model_raw, model.values()).unwrap();
    let (code, out) = qemu_img(&[
        "compare",
        "-f",
        "qed",
        "-F",
        "raw",
        top.to_str().unwrap(),
        model_raw.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{ctx}: qemu-img compare with the model:\n{out}");
    eprintln!("model {ctx}: {ops_run} operations");
}

#[test]
fn model_random_ops_on_qed_overlay() {
    let seeds = env_count("DS_SEEDS", 3);
    let shift = env_count("DS_SEED", 0);
    for s in 0..seeds {
        let seed = shift.wrapping_add(s);
        with_deadline(
            &format!("qed model seed {seed}"),
            std::time::Duration::from_secs(60),
            run_seed_qed(seed),
        );
    }
}

#[test]
fn model_random_ops_on_qcow2_lazy_refcounts() {
    let seeds = env_count("DS_SEEDS", 3);
    let shift = env_count("DS_SEED", 0);
    for s in 0..seeds {
        let seed = shift.wrapping_add(s).wrapping_add(1000);
        with_deadline(
            &format!("model lazy refcounts seed {seed}"),
            std::time::Duration::from_secs(60),
            run_seed_with(seed, "lazy_refcounts=on"),
        );
    }
}

#[test]
fn model_random_ops_on_qcow2_refcount_widths() {
    let seeds = env_count("DS_SEEDS", 3);
    let shift = env_count("DS_SEED", 0);
    for s in 0..seeds {
        let seed = shift.wrapping_add(s).wrapping_add(2000);
        let bits = [1, 2, 4, 8, 32, 64][(seed % 6) as usize];
        with_deadline(
            &format!("model refcount_bits={bits} seed {seed}"),
            std::time::Duration::from_secs(60),
            run_seed_with(seed, &format!("refcount_bits={bits}")),
        );
    }
}
