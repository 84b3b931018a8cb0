//! The body of the `open_read` fuzz target: bytes → an image in memory →
//! open as qcow2, as QED and as raw, read-only → mapping, reads and a check
//! of a few ranges.
//!
//! It lives in the library so the cargo-fuzz target (`fuzz/`) and a unit test
//! that replays the committed corpus call the same code. The work per input
//! is bounded (a few ranges, each at most [`MAX_SPAN`] bytes) so a slow input
//! is an engine bug, not a slow harness. Besides "no panic", it asserts what
//! must hold for any input the engine accepts: a mapping covers exactly the
//! range asked, in order; a read's unallocated sub-ranges lie inside the read;
//! and a read-only open never changes a byte of the file.

use std::sync::Arc;

use crate::format::{Format, Mapping};
use crate::qcow2::{Qcow2, Qcow2Options};
use crate::qed::{Qed, QedOptions};
use crate::raw::Raw;
use crate::storage::{MemStorage, Storage};

/// Largest range mapped or read per step.
pub const MAX_SPAN: u64 = 256 << 10;
/// Metadata cache given to the engine (bounds its memory too).
const CACHE_BYTES: u64 = 1 << 20;

/// What an input did, for tests over known images.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FuzzOutcome {
    /// The qcow2 engine accepted the input.
    pub qcow2_opened: bool,
    /// The qcow2 engine's virtual size, when it opened.
    pub qcow2_size: Option<u64>,
    /// Bytes read through the qcow2 engine without error.
    pub qcow2_bytes_read: u64,
    /// `check()` found no corruption (when it opened and the check ran).
    pub qcow2_check_clean: Option<bool>,
    /// The same for the QED engine.
    pub qed_opened: bool,
    pub qed_size: Option<u64>,
    pub qed_bytes_read: u64,
    pub qed_check_clean: Option<bool>,
}

/// Runs one input. Panics only when an invariant above fails (or the engine
/// panics): that is a finding.
pub fn fuzz_open_read(data: &[u8]) -> FuzzOutcome {
    let mut out = FuzzOutcome::default();
    // qcow2
    let mem = Arc::new(MemStorage::from_bytes("fuzz.qcow2", data.to_vec()));
    let storage: Arc<dyn Storage> = mem.clone();
    // Field update syntax so new engine options keep their defaults.
    #[allow(clippy::needless_update)]
    let opts = Qcow2Options {
        writable: false,
        cache_bytes: Some(CACHE_BYTES),
        ..Default::default()
    };
    if let Ok(q) = Qcow2::open(storage, &opts) {
        let f: Arc<dyn Format> = Arc::new(q);
        out.qcow2_opened = true;
        out.qcow2_size = Some(f.virtual_size());
        out.qcow2_bytes_read = exercise(&*f, data);
        out.qcow2_check_clean = f.check(None).ok().map(|r| r.corruptions == 0);
        drop(f);
    }
    assert!(
        mem.snapshot() == data,
        "a read-only qcow2 open changed the file"
    );
    // QED
    let mem = Arc::new(MemStorage::from_bytes("fuzz.qed", data.to_vec()));
    let storage: Arc<dyn Storage> = mem.clone();
    let opts = QedOptions {
        writable: false,
        cache_bytes: Some(CACHE_BYTES),
    };
    if let Ok(q) = Qed::open(storage, &opts) {
        let f: Arc<dyn Format> = Arc::new(q);
        out.qed_opened = true;
        out.qed_size = Some(f.virtual_size());
        out.qed_bytes_read = exercise(&*f, data);
        out.qed_check_clean = f.check(None).ok().map(|r| r.corruptions == 0);
        drop(f);
    }
    assert!(
        mem.snapshot() == data,
        "a read-only QED open changed the file"
    );
    // raw: never fails to open, must read the bytes back as they are.
    let mem = Arc::new(MemStorage::from_bytes("fuzz.raw", data.to_vec()));
    let storage: Arc<dyn Storage> = mem.clone();
    let raw = Raw::open(storage, false).expect("raw opens anything");
    // Whole sectors, as QEMU counts them; the padding reads as zeros.
    let size = (data.len() as u64).next_multiple_of(512);
    assert_eq!(raw.virtual_size(), size);
    let n = (data.len() as u64).min(MAX_SPAN);
    let mut buf = vec![0u8; n as usize];
    let holes = raw.read(0, &mut buf).expect("raw read");
    assert!(holes.is_empty() && buf[..] == data[..n as usize]);
    let mut tail = vec![0xffu8; (size - data.len() as u64) as usize];
    raw.read(data.len() as u64, &mut tail)
        .expect("raw read of the padding");
    assert!(
        tail.iter().all(|&b| b == 0),
        "the sector padding reads as zeros"
    );
    exercise(&raw, data);
    assert!(
        mem.snapshot() == data,
        "a read-only raw open changed the file"
    );
    out
}

/// Maps and reads a few ranges chosen from the size and the input's bytes.
fn exercise(f: &dyn Format, data: &[u8]) -> u64 {
    let size = f.virtual_size();
    if size == 0 {
        return 0;
    }
    let g = f.granularity().max(1);
    let pick = |i: usize| -> u64 {
        let mut b = [0u8; 8];
        for (k, x) in b.iter_mut().enumerate() {
            *x = data
                .get((i * 8 + k) % data.len().max(1))
                .copied()
                .unwrap_or(0);
        }
        u64::from_le_bytes(b)
    };
    let mut ranges = vec![
        (0, size.min(MAX_SPAN)),
        (size - size.min(MAX_SPAN), size.min(MAX_SPAN)),
    ];
    for i in 0..3 {
        let off = pick(i) % size;
        let len = (pick(i + 3) % MAX_SPAN).clamp(1, size - off);
        ranges.push((off, len));
    }
    // One unit-aligned range in the middle.
    let mid = (size / 2) - (size / 2) % g;
    ranges.push((mid, g.min(size - mid).min(MAX_SPAN)));
    let mut read = 0;
    for (off, len) in ranges {
        if len == 0 {
            continue;
        }
        if let Ok(map) = f.map(off, len) {
            let mut pos = off;
            for r in &map {
                assert_eq!(
                    r.offset, pos,
                    "mapping of [{off}, +{len}) has a gap: {map:?}"
                );
                assert!(r.length > 0, "empty mapped range: {map:?}");
                if let Mapping::Data { host_offset } = r.mapping {
                    assert!(host_offset.checked_add(r.length).is_some());
                }
                pos += r.length;
            }
            assert_eq!(
                pos,
                off + len,
                "mapping of [{off}, +{len}) is short: {map:?}"
            );
        }
        let mut buf = vec![0u8; len as usize];
        if let Ok(holes) = f.read(off, &mut buf) {
            for (h, hl) in holes {
                assert!(
                    h >= off && h + hl <= off + len,
                    "hole ({h}, {hl}) outside read"
                );
            }
            read += len;
        }
    }
    read
}
