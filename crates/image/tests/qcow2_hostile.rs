//! Damaged and hostile qcow2 images: random byte changes in the metadata of
//! a small image must give clear errors from open, read, map and check,
//! never a panic or an unbounded allocation.

use std::sync::Arc;

use image::format::Format;
use image::qcow2::{self, Qcow2, Qcow2Options};
use image::storage::{MemStorage, Storage};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn small_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new("base.qcow2"));
    qcow2::create(
        &*st,
        &qcow2::CreateOptions {
            size: 2 << 20,
            cluster_size: Some(4096),
            backing: None,
            ..Default::default()
        },
    )
    .unwrap();
    let q = Qcow2::open(
        Arc::clone(&st) as Arc<dyn Storage>,
        &Qcow2Options {
            writable: true,
            cache_bytes: None,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..20u64 {
        q.write(i * 90_000, &vec![i as u8 + 1; 5000], &[]).unwrap();
    }
    q.write_zeroes(1 << 20, 8192, false, true).unwrap();
    q.close().unwrap();
    st.snapshot()
}

#[test]
fn mutated_metadata_never_panics() {
    let base = small_image();
    let mut rng = StdRng::seed_from_u64(99);
    // Header, refcount table and block, L1 and the first L2 table live in
    // the first few clusters.
    let meta_end = (6 * 4096).min(base.len());
    for _ in 0..400 {
        let mut img = base.clone();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..meta_end);
            img[at] = rng.random();
        }
        let st = Arc::new(MemStorage::from_bytes("mutated.qcow2", img));
        let Ok(q) = Qcow2::open(st as Arc<dyn Storage>, &Qcow2Options::default()) else {
            continue;
        };
        let size = q.virtual_size().min(4 << 20);
        let _ = q.map(0, size);
        let mut buf = vec![0u8; size as usize];
        let _ = q.read(0, &mut buf);
        let _ = q.check(None);
        let _ = q.allocated_bytes();
        let _ = q.format_specific();
    }
}

#[test]
fn writes_to_mutated_images_never_panic() {
    let base = small_image();
    let mut rng = StdRng::seed_from_u64(5);
    let meta_end = (6 * 4096).min(base.len());
    for _ in 0..300 {
        let mut img = base.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..meta_end);
            img[at] = rng.random();
        }
        let st = Arc::new(MemStorage::from_bytes("mutated.qcow2", img));
        let opts = Qcow2Options {
            writable: true,
            cache_bytes: Some(4096 * 4),
            ..Default::default()
        };
        let Ok(q) = Qcow2::open(st as Arc<dyn Storage>, &opts) else {
            continue;
        };
        let size = q.virtual_size();
        if size < 65536 {
            continue;
        }
        for i in 0..6u64 {
            let off = rng.random_range(0..size / 4096 - 8) * 4096;
            let _ = match i % 3 {
                0 => q.write(off + 100, &[7u8; 9000], &[]),
                1 => q.write_zeroes(off, 8192, i % 2 == 0, true),
                _ => q.discard(off, 4096, false),
            };
        }
        let _ = q.flush();
        let _ = q.check(None);
        let _ = q.close();
    }
}
