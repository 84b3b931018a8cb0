//! Test infrastructure that proves the image engines correct, shared by the
//! crate's integration tests, the fuzz target and (later) the stream and
//! daemon tests.
//!
//! The one decision to know: everything here is deterministic from a seed.
//! [`TestRng`] is a tiny self-contained generator (SplitMix64), so a failing
//! seed printed by a test reproduces the same workload, the same crash states
//! and the same torn sectors on any machine, without a dependency on a
//! random-number crate's changing API. Iteration counts come from the
//! environment ([`env_count`]) so the default run stays short and
//! `scripts/soak` can run the same tests large.
//!
//! - [`recording`]: a [`crate::storage::Storage`] that logs every write and
//!   flush barrier, and generates power-loss crash states from the log.
//! - [`model`]: a flat content model that knows, per byte, which values a
//!   device may legitimately read back (after discards, and after a crash
//!   where unflushed writes may or may not have landed).
//! - [`fuzz`]: the body of the `open_read` fuzz target, also replayed over
//!   the committed corpus by a unit test.

pub mod fuzz;
pub mod model;
pub mod recording;

pub use fuzz::{FuzzOutcome, fuzz_open_read};
pub use model::ContentModel;
pub use recording::{CrashState, Event, Recording, RecordingStorage};

/// A small seeded pseudo-random generator (SplitMix64). Not for anything but
/// tests: it is fast, has a 64-bit state, and its output never changes.
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        // Mix the seed once so that seeds 0, 1, 2 ... start far apart.
        let mut r = TestRng(seed ^ 0x5851_F42D_4C95_7F2D);
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `[0, n)`; `0` when `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A value in `[lo, hi)`; `lo` when the range is empty.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo))
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }

    /// Picks one element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// An iteration count from the environment variable `var`, or `default`
/// when it is unset or not a number.
pub fn env_count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let mut a = TestRng::new(7);
        let mut b = TestRng::new(7);
        let mut c = TestRng::new(8);
        let va: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        let vc: Vec<u64> = (0..16).map(|_| c.next_u64()).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
        let mut hits = [0u32; 10];
        for _ in 0..10_000 {
            let v = a.range(5, 15);
            assert!((5..15).contains(&v));
            hits[(v - 5) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "skewed: {hits:?}");
        assert_eq!(a.below(0), 0);
    }
}
