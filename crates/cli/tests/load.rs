//! Load: many NBD clients at a queue depth against one `diskstream daemon`,
//! mixed reads and writes on several exports (copy-on-read overlays over
//! one base) while a rate-limited stream runs on each. Every request must
//! succeed, every read must return exactly what the model says (each queue
//! slot owns a disjoint range, so its model is exact), and after the load
//! the streams complete and qemu-img reads the models back. The daemon's
//! peak RSS (VmHWM) must not grow with the number of requests served: a run
//! three times longer stays within a generous bound of the short one.
//!
//! `DS_LOAD_CLIENTS` (default 32: with 4 connections each, past the
//! 100 connections the daemon once limited itself to), `DS_LOAD_QD` (default 8), `DS_LOAD_SECS`
//! (default 1; the long run is three times that); scripts/soak runs 64
//! clients at depth 32 for 60 s. Prints `name=value` figures.

mod reliab;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::testing::TestRng;
use image::{BlockDevice, WriteFlags};
use nbd::client::{ClientOptions, NbdClient};
use reliab::*;
use serde_json::json;

const EXPORTS: usize = 4;

#[derive(Debug, Default)]
struct Counts {
    ops: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
}

/// One queue slot: sequential reads and writes inside `[start, start+len)`,
/// checked against its exact model.
async fn slot(
    c: Arc<NbdClient>,
    start: u64,
    mut model: Vec<u8>,
    id0: u64,
    until: Instant,
    counts: Arc<Counts>,
) -> (u64, Vec<u8>) {
    let len = model.len() as u64;
    let mut rng = TestRng::new(id0);
    let mut id = id0;
    // Bounded by the deadline.
    while Instant::now() < until {
        let n = rng.range(1, 17).min(len / 4096) * 4096;
        let off = rng.below((len - n) / 4096 + 1) * 4096;
        let (a, b) = (off as usize, (off + n) as usize);
        let r = if rng.chance(1, 2) {
            id += 1;
            let data = stamped(id, start + off, n as usize);
            let r = c
                .write(
                    start + off,
                    Bytes::from(data.clone()),
                    WriteFlags::default(),
                )
                .await;
            if r.is_ok() {
                model[a..b].copy_from_slice(&data);
            }
            r
        } else {
            match c.read(start + off, n as usize).await {
                Ok(v) => {
                    if v != model[a..b] {
                        counts.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        let r = if r.is_ok() && rng.chance(1, 64) {
            c.flush().await
        } else {
            r
        };
        counts.ops.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r
            && counts.errors.fetch_add(1, Ordering::Relaxed) == 0
        {
            eprintln!("load: first error: {e}");
        }
    }
    (start, model)
}

struct RunFigures {
    ops: u64,
    hwm_kib: u64,
    secs: f64,
}

async fn run(case: &Case, clients: usize, qd: usize, secs: u64, size: usize) -> RunFigures {
    let dir = tempfile::tempdir().unwrap();
    let basep = dir.path().join("base.raw");
    let base = base_content(size);
    write_base(&basep, &base);
    let d = Daemon::start(dir.path());
    let mut q = d.client().await;
    let mut tops = Vec::new();
    for e in 0..EXPORTS {
        let top = dir.path().join(format!("top{e}.{}", case.format));
        create_top(case, &basep, &top, size as u64);
        let node = format!("d{e}");
        add_node(&mut q, case, &node, &top, case.backing).await;
        export(&mut q, &node).await;
        if case.backing {
            // Slow enough to run through the whole load.
            q.execute(
                "block-stream",
                json!({"device": node, "speed": (size as u64) / (secs * 4 + 4),
                       "__com.diskstream_chunk-size": 65536}),
            )
            .await
            .unwrap();
        }
        tops.push(top);
    }
    let counts = Arc::new(Counts::default());
    let per_export = clients.div_ceil(EXPORTS);
    let slot_len = (size / (per_export * qd)) as u64 / 4096 * 4096;
    assert!(slot_len >= 16 * 4096, "image too small for {clients}x{qd}");
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let e = i % EXPORTS;
        let k = i / EXPORTS;
        let c = Arc::new(
            NbdClient::connect_uri(&d.uri(&format!("d{e}")), ClientOptions::default())
                .await
                .unwrap(),
        );
        for s in 0..qd {
            let start = ((k * qd + s) as u64) * slot_len;
            let model = base[start as usize..(start + slot_len) as usize].to_vec();
            let id0 = ((i * qd + s) as u64 + 1) << 32;
            let (c, counts) = (Arc::clone(&c), Arc::clone(&counts));
            tasks.push((e, tokio::spawn(slot(c, start, model, id0, until, counts))));
        }
    }
    let mut want: Vec<Vec<u8>> = vec![base.clone(); EXPORTS];
    for (e, t) in tasks {
        let (start, model) = t.await.unwrap();
        want[e][start as usize..start as usize + model.len()].copy_from_slice(&model);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let hwm_kib = d.vm_hwm_kib();
    let ops = counts.ops.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    let mismatches = counts.mismatches.load(Ordering::Relaxed);
    assert_eq!(errors, 0, "{}: requests failed under load", case.name);
    assert_eq!(mismatches, 0, "{}: reads returned wrong data", case.name);
    assert!(ops > 0);
    if case.backing {
        for e in 0..EXPORTS {
            let node = format!("d{e}");
            q.execute("block-job-set-speed", json!({"device": node, "speed": 0}))
                .await
                .unwrap();
        }
        let ids: Vec<String> = (0..EXPORTS).map(|e| format!("d{e}")).collect();
        for ev in wait_all_completed(&mut q, &ids, Duration::from_secs(300)).await {
            assert!(ev.get("error").is_none(), "{ev}");
        }
    }
    d.quit(&mut q).await;
    for (e, top) in tops.iter().enumerate() {
        let (code, out) = qemu_img_check(case, top);
        assert_eq!(code, 0, "{}: qemu-img check: {out}", top.display());
        if case.backing {
            assert!(!has_backing(top));
        }
        let got = qemu_read_all(case, top, &dir.path().join("read.raw"));
        assert!(got == want[e], "{}: lost data under load", top.display());
    }
    RunFigures {
        ops,
        hwm_kib,
        secs: elapsed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_mixed_io_with_streams_lose_nothing_and_memory_is_bounded() {
    let clients = env_u64("DS_LOAD_CLIENTS", 32) as usize;
    let qd = env_u64("DS_LOAD_QD", 8) as usize;
    let secs = env_u64("DS_LOAD_SECS", 1);
    // 64 KiB per queue slot at least, 16 MiB at least, 256 MiB at most.
    let size = (clients.div_ceil(EXPORTS) * qd * (128 << 10)).clamp(16 << 20, 256 << 20);
    for case in cases() {
        let n = case.name;
        let short = run(&case, clients, qd, secs, size).await;
        let long = run(&case, clients, qd, secs * 3, size).await;
        println!("load.{n}.clients={clients}");
        println!("load.{n}.queue_depth={qd}");
        println!("load.{n}.exports={EXPORTS}");
        println!("load.{n}.errors=0");
        println!("load.{n}.lost_data=0");
        for (tag, r) in [("short", &short), ("long", &long)] {
            println!("load.{n}.{tag}.seconds={:.1}", r.secs);
            println!("load.{n}.{tag}.requests={}", r.ops);
            println!("load.{n}.{tag}.requests_per_s={:.0}", r.ops as f64 / r.secs);
            println!("load.{n}.{tag}.vm_hwm_kib={}", r.hwm_kib);
        }
        // Peak memory must not follow the request count: the long run
        // served about three times as many requests.
        let bound = short.hwm_kib * 3 / 2 + 32 * 1024;
        println!("load.{n}.vm_hwm_bound_kib={bound}");
        assert!(
            long.hwm_kib <= bound,
            "{n}: peak RSS grew with requests served: {} KiB after {} requests, {} KiB after {}",
            short.hwm_kib,
            short.ops,
            long.hwm_kib,
            long.ops
        );
    }
}
