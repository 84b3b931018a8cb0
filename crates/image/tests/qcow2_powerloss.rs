//! Power-loss states of the qcow2 engine, replayed from a recording storage.
//!
//! Every write and flush the engine issues is logged. A power loss at log
//! position `k` keeps everything before the last flush before `k`, and any
//! subset of the writes after it (the page cache reorders them). Each such
//! state must open, check without corruption (leaks are fine) and read only
//! data that some write put at that place, or zeros.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use image::format::{Format, Repair};
use image::qcow2::{self, Qcow2, Qcow2Options};
use image::storage::{MemStorage, Storage};
use rand::{RngExt, SeedableRng, rngs::StdRng};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Flush,
    SetLen(u64),
}

#[derive(Debug)]
struct Recording {
    mem: MemStorage,
    log: Mutex<Vec<Op>>,
}

impl Recording {
    fn push(&self, op: Op) {
        self.log.lock().unwrap().push(op);
    }
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.push(Op::Write(offset, buf.to_vec()));
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.push(Op::Flush);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.push(Op::SetLen(len));
        self.mem.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0u8; len as usize], offset)
    }
    fn path(&self) -> &Path {
        self.mem.path()
    }
}

fn apply(state: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(off, data) => {
            let end = *off as usize + data.len();
            if state.len() < end {
                state.resize(end, 0);
            }
            state[*off as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => state.resize(*len as usize, 0),
        Op::Flush => {}
    }
}

const SECTOR: u64 = 512;

#[test]
fn every_power_loss_state_opens_checks_clean_and_reads_only_written_data() {
    power_loss_states(4096, 4 << 20, 6 * 4096, 42);
}

/// 512-byte clusters over 12 MiB: the refcount table (64 blocks of 256
/// clusters = 8 MiB) has to move while writes are in flight.
#[test]
fn power_loss_while_the_refcount_table_grows() {
    power_loss_states(512, 12 << 20, 192 << 10, 7);
}

fn power_loss_states(cluster: u64, size: u64, max_write: u64, seed: u64) {
    let rec = Arc::new(Recording {
        mem: MemStorage::new("powerloss.qcow2"),
        log: Mutex::new(Vec::new()),
    });
    qcow2::create(
        &*rec,
        &qcow2::CreateOptions {
            size,
            cluster_size: Some(cluster),
            backing: None,
            ..Default::default()
        },
    )
    .unwrap();
    let q = Qcow2::open(
        Arc::clone(&rec) as Arc<dyn Storage>,
        &Qcow2Options {
            writable: true,
            cache_bytes: Some(cluster * 6),
            ..Default::default()
        },
    )
    .unwrap();
    // Per sector, the tags any write ever put there (0 = zeros).
    let mut allowed: Vec<HashSet<u8>> = vec![HashSet::from([0u8]); (size / SECTOR) as usize];
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..400u32 {
        let tag = (i % 255) as u8 + 1;
        match rng.random_range(0..10) {
            0..=5 => {
                let len = rng.random_range(1..(max_write / SECTOR)) * SECTOR;
                let off = rng.random_range(0..(size - len) / SECTOR) * SECTOR;
                for s in off / SECTOR..(off + len) / SECTOR {
                    allowed[s as usize].insert(tag);
                }
                q.write(off, &vec![tag; len as usize], &[]).unwrap();
            }
            6 | 7 => {
                let n = rng.random_range(1..8);
                let off = rng.random_range(0..size / cluster - n) * cluster;
                q.write_zeroes(off, n * cluster, rng.random(), rng.random())
                    .unwrap();
            }
            8 => {
                let n = rng.random_range(1..8);
                let off = rng.random_range(0..size / cluster - n) * cluster;
                q.discard(off, n * cluster, rng.random()).unwrap();
            }
            _ => q.flush().unwrap(),
        }
    }
    q.close().unwrap();
    if cluster == 512 {
        let img = rec.mem.snapshot();
        let reftable = u64::from_be_bytes(img[48..56].try_into().unwrap());
        assert_ne!(reftable, cluster, "the refcount table should have moved");
    }
    let log = rec.log.lock().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let mut checked_with_qemu = 0;
    for trial in 0..120 {
        let k = rng.random_range(1..=log.len());
        let last_flush = log[..k]
            .iter()
            .rposition(|o| matches!(o, Op::Flush))
            .unwrap_or(0);
        let mut state = Vec::new();
        for op in &log[..last_flush] {
            apply(&mut state, op);
        }
        for op in &log[last_flush..k] {
            if rng.random::<bool>() {
                apply(&mut state, op);
            }
        }
        let st = Arc::new(MemStorage::from_bytes("state.qcow2", state.clone()));
        let img = match Qcow2::open(st as Arc<dyn Storage>, &Qcow2Options::default()) {
            Ok(img) => img,
            // Before the creating write completed there is no image yet.
            Err(_) if last_flush == 0 => continue,
            Err(e) => panic!("trial {trial} (log {k}/{}): open failed: {e}", log.len()),
        };
        let r = img.check(None).unwrap();
        assert_eq!(
            r.corruptions,
            0,
            "trial {trial} (log {k}): {:?}",
            &r.messages[..r.messages.len().min(8)]
        );
        let mut buf = vec![0u8; size as usize];
        img.read(0, &mut buf).unwrap();
        for (s, chunk) in buf.chunks(SECTOR as usize).enumerate() {
            let first = chunk[0];
            assert!(
                chunk.iter().all(|&b| b == first) && allowed[s].contains(&first),
                "trial {trial} (log {k}): sector {s} reads data never written there ({first})"
            );
        }
        if trial % 12 == 0 {
            let path = dir.path().join(format!("state-{trial}.qcow2"));
            std::fs::write(&path, &state).unwrap();
            let out = Command::new("qemu-img")
                .args(["check", "--output=json", path.to_str().unwrap()])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                v["corruptions"].as_u64().unwrap_or(0),
                0,
                "trial {trial}: {v}"
            );
            checked_with_qemu += 1;
            // Leaks repair to a clean image.
            let st = Arc::new(MemStorage::from_bytes("state.qcow2", state));
            let img = Qcow2::open(
                st as Arc<dyn Storage>,
                &Qcow2Options {
                    writable: true,
                    cache_bytes: None,
                    ..Default::default()
                },
            )
            .unwrap();
            img.check(Some(Repair::Leaks)).unwrap();
            let r = img.check(None).unwrap();
            assert_eq!((r.leaks, r.corruptions), (0, 0), "trial {trial}");
        }
    }
    assert!(checked_with_qemu > 0);
}
