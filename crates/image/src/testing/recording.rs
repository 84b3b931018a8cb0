//! A [`Storage`] that records every write and flush barrier, and the
//! power-loss crash states that such a log allows.
//!
//! The model of a power loss: everything written before the last *completed*
//! flush barrier is on the medium; of the writes issued after it, any subset
//! may have reached it, in any order, and a write may be torn at 512-byte
//! sector boundaries (some of its sectors landed, others did not). A crash
//! state is built from the bytes the storage held when recording started, the
//! log up to that barrier, and a seeded random choice among the rest, so every
//! state is reproducible from its seed. Applying the chosen writes in log
//! order still covers every outcome a reordering disk can produce, because a
//! sector written twice ends up with either version or neither depending on
//! which of the two writes were kept.

use std::path::Path;
use std::sync::Mutex;
use std::{fmt, io};

use super::TestRng;
use crate::storage::{MemStorage, Storage};

/// Sector size at which writes may tear.
pub const SECTOR: u64 = 512;

/// One logged storage operation.
#[derive(Clone, PartialEq, Eq)]
pub enum Event {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// A change of the file length (extend or truncate).
    SetLen(u64),
    /// A completed flush barrier.
    Flush,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Write { offset, data } => write!(f, "Write({offset}, {} bytes)", data.len()),
            Event::SetLen(l) => write!(f, "SetLen({l})"),
            Event::Flush => write!(f, "Flush"),
        }
    }
}

/// In-memory storage that logs what is done to it. Reads see every write at
/// once (like a page cache); only the log says what was durable when.
#[derive(Debug)]
pub struct RecordingStorage {
    inner: MemStorage,
    base: Vec<u8>,
    log: Mutex<Vec<Event>>,
}

impl RecordingStorage {
    /// Starts recording over storage that holds `base`.
    pub fn new(name: &str, base: Vec<u8>) -> Self {
        RecordingStorage {
            inner: MemStorage::from_bytes(name, base.clone()),
            base,
            log: Mutex::new(Vec::new()),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of events logged so far (a position in the log).
    pub fn position(&self) -> usize {
        self.log().len()
    }

    /// A copy of what the storage holds now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.snapshot()
    }

    /// The base and the log so far.
    pub fn recording(&self) -> Recording {
        Recording {
            base: self.base.clone(),
            events: self.log().clone(),
        }
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Log and apply under the log lock so the log order is the order in
        // which the writes hit the storage.
        let mut log = self.log();
        self.inner.write_at(buf, offset)?;
        log.push(Event::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut log = self.log();
        self.inner.flush()?;
        log.push(Event::Flush);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut log = self.log();
        self.inner.set_len(len)?;
        log.push(Event::SetLen(len));
        Ok(())
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// A recorded run: the bytes at the start and every event since.
#[derive(Clone, Debug)]
pub struct Recording {
    pub base: Vec<u8>,
    pub events: Vec<Event>,
}

/// One power-loss state.
#[derive(Clone, Debug)]
pub struct CrashState {
    pub seed: u64,
    /// The power went out after this many events had been issued.
    pub cut: usize,
    /// Events `[0, durable)` are all on the medium: `durable` is just past
    /// the last completed flush before `cut` (0 when there was none).
    pub durable: usize,
    /// The bytes on the medium.
    pub bytes: Vec<u8>,
    /// Among events `[durable, cut)`: how many were kept whole, kept torn,
    /// and dropped.
    pub kept: usize,
    pub torn: usize,
    pub dropped: usize,
}

fn apply(bytes: &mut Vec<u8>, e: &Event) {
    match e {
        Event::Write { offset, data } => {
            let off = *offset as usize;
            if bytes.len() < off + data.len() {
                bytes.resize(off + data.len(), 0);
            }
            bytes[off..off + data.len()].copy_from_slice(data);
        }
        Event::SetLen(l) => bytes.resize(*l as usize, 0),
        Event::Flush => {}
    }
}

impl Recording {
    /// The durable prefix for a cut: just past the last flush in `[0, cut)`.
    pub fn durable_prefix(&self, cut: usize) -> usize {
        self.events[..cut]
            .iter()
            .rposition(|e| *e == Event::Flush)
            .map_or(0, |i| i + 1)
    }

    /// The bytes after applying events `[0, upto)` in full.
    pub fn replay(&self, upto: usize) -> Vec<u8> {
        let mut bytes = self.base.clone();
        for e in &self.events[..upto] {
            apply(&mut bytes, e);
        }
        bytes
    }

    /// The crash state of `seed`: a random cut, the durable prefix before it,
    /// and a random subset of the later events, a third of the kept
    /// multi-sector writes torn at sector boundaries.
    pub fn crash_state(&self, seed: u64) -> CrashState {
        let mut rng = TestRng::new(seed);
        let cut = rng.below(self.events.len() as u64 + 1) as usize;
        self.crash_state_at(cut, &mut rng, seed)
    }

    /// A crash state with a given cut, choices drawn from `rng`.
    pub fn crash_state_at(&self, cut: usize, rng: &mut TestRng, seed: u64) -> CrashState {
        let durable = self.durable_prefix(cut);
        let mut bytes = self.replay(durable);
        let (mut kept, mut torn, mut dropped) = (0, 0, 0);
        for e in &self.events[durable..cut] {
            if !rng.chance(1, 2) {
                dropped += 1;
                continue;
            }
            match e {
                Event::Write { offset, data }
                    if (offset + data.len() as u64).div_ceil(SECTOR) - offset / SECTOR > 1
                        && rng.chance(1, 3) =>
                {
                    torn += 1;
                    let end = offset + data.len() as u64;
                    let mut s = *offset;
                    while s < end {
                        let next = ((s / SECTOR) + 1) * SECTOR;
                        let e2 = next.min(end);
                        if rng.chance(1, 2) {
                            let piece = Event::Write {
                                offset: s,
                                data: data[(s - offset) as usize..(e2 - offset) as usize].to_vec(),
                            };
                            apply(&mut bytes, &piece);
                        }
                        s = e2;
                    }
                }
                _ => {
                    kept += 1;
                    apply(&mut bytes, e);
                }
            }
        }
        CrashState {
            seed,
            cut,
            durable,
            bytes,
            kept,
            torn,
            dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> Recording {
        let s = RecordingStorage::new("t", vec![1u8; 2048]);
        s.write_at(&[2u8; 1024], 0).unwrap(); // 0
        s.flush().unwrap(); // 1
        s.write_at(&[3u8; 1536], 256).unwrap(); // 2: spans 4 sectors
        s.set_len(4096).unwrap(); // 3
        s.flush().unwrap(); // 4
        s.write_at(&[4u8; 10], 3000).unwrap(); // 5
        s.recording()
    }

    #[test]
    fn durable_prefix_ends_after_the_last_flush_before_the_cut() {
        let r = recorded();
        assert_eq!(r.durable_prefix(0), 0);
        assert_eq!(r.durable_prefix(1), 0);
        assert_eq!(r.durable_prefix(2), 2);
        assert_eq!(r.durable_prefix(4), 2);
        assert_eq!(r.durable_prefix(5), 5);
        assert_eq!(r.durable_prefix(6), 5);
    }

    #[test]
    fn replay_of_everything_matches_the_live_storage() {
        let s = RecordingStorage::new("t", vec![9u8; 100]);
        s.write_at(&[1, 2, 3], 98).unwrap();
        s.set_len(50).unwrap();
        s.write_at(&[7; 4], 60).unwrap();
        let r = s.recording();
        assert_eq!(r.replay(r.events.len()), s.snapshot());
    }

    #[test]
    fn crash_states_keep_the_durable_prefix_and_only_written_sectors() {
        let r = recorded();
        let mut saw_torn = false;
        let mut saw_whole = false;
        let mut saw_dropped = false;
        for seed in 0..400 {
            let st = r.crash_state(seed);
            let again = r.crash_state(seed);
            assert!(
                st.bytes == again.bytes && st.cut == again.cut,
                "seed {seed}"
            );
            let b = &st.bytes;
            if st.durable >= 2 {
                // The first write was flushed: bytes outside the later
                // write's range hold it.
                assert!(b[..256].iter().all(|&x| x == 2), "seed {seed}");
            }
            if st.cut >= 3 && st.durable == 2 {
                // Each sector of the second write holds old or new content,
                // never a mix inside one sector.
                for sec in 0..4u64 {
                    let (s, e) = ((sec * 512).max(256) as usize, ((sec + 1) * 512) as usize);
                    let e = e.min(1792);
                    let all_new = b[s..e].iter().all(|&x| x == 3);
                    let old = if s < 1024 { 2 } else { 1 };
                    let all_old = b[s..e].iter().all(|&x| x == old);
                    assert!(all_new || all_old, "seed {seed} sector {sec} mixed");
                }
                let n = (256..1792).filter(|&i| b[i] == 3).count();
                saw_torn |= n > 0 && n < 1536;
                saw_whole |= n == 1536;
                saw_dropped |= n == 0;
            }
            if st.durable == 5 {
                assert_eq!(b.len(), 4096);
                assert!(b[256..1792].iter().all(|&x| x == 3));
            }
        }
        assert!(saw_torn && saw_whole && saw_dropped);
    }
}
