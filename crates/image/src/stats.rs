//! Cheap statistics of guest I/O on an image, and of what it pulled from below.
//!
//! Guest requests (read, write, write-zeroes, discard, flush) are counted
//! with relaxed atomics: requests in flight now, completed, bytes, the time
//! of the last request, and a latency histogram with power-of-two buckets of
//! microseconds. Stream policies read these to tell whether the guest is idle
//! and how its latency moves; tests read the backing counters to prove what
//! was fetched. Nothing here takes a lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Buckets of the latency histogram: bucket `i` counts requests that took
/// less than `2^i` µs (and at least `2^(i-1)`); the last bucket takes the rest.
pub const LATENCY_BUCKETS: usize = 32;

/// Counters of one image.
#[derive(Debug)]
pub struct IoStats {
    epoch: Instant,
    in_flight: AtomicU64,
    completed: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    /// Nanoseconds after `epoch` of the last guest request start or end.
    last_request_ns: AtomicU64,
    latency_us: [AtomicU64; LATENCY_BUCKETS],
    /// Sum of the latencies of completed requests, µs (for a mean over an
    /// interval: deltas of this over deltas of `completed`).
    latency_sum_us: AtomicU64,
    /// Bytes read from the backing, for any reason.
    backing_read_bytes: AtomicU64,
    /// Bytes copied into this image from below by copy-on-read.
    cor_bytes: AtomicU64,
    /// Bytes copied into this image from below by populate (streaming).
    populated_bytes: AtomicU64,
}

impl Default for IoStats {
    fn default() -> Self {
        IoStats {
            epoch: Instant::now(),
            in_flight: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            last_request_ns: AtomicU64::new(0),
            latency_us: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
            backing_read_bytes: AtomicU64::new(0),
            cor_bytes: AtomicU64::new(0),
            populated_bytes: AtomicU64::new(0),
        }
    }
}

/// What a guest request was, for the byte counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Other,
}

/// Counts one guest request from creation until dropped.
#[derive(Debug)]
pub struct RequestGuard<'a> {
    stats: &'a IoStats,
    start: Instant,
}

impl IoStats {
    /// Starts counting a guest request of `bytes` bytes.
    pub fn begin(&self, op: Op, bytes: u64) -> RequestGuard<'_> {
        let start = Instant::now();
        self.in_flight.fetch_add(1, Relaxed);
        match op {
            Op::Read => self.read_bytes.fetch_add(bytes, Relaxed),
            Op::Write => self.write_bytes.fetch_add(bytes, Relaxed),
            Op::Other => 0,
        };
        self.touch(start);
        RequestGuard { stats: self, start }
    }

    fn touch(&self, at: Instant) {
        let ns = at.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.last_request_ns.fetch_max(ns, Relaxed);
    }

    pub(crate) fn add_backing_read(&self, bytes: u64) {
        self.backing_read_bytes.fetch_add(bytes, Relaxed);
    }

    pub(crate) fn add_cor(&self, bytes: u64) {
        self.cor_bytes.fetch_add(bytes, Relaxed);
    }

    pub(crate) fn add_populated(&self, bytes: u64) {
        self.populated_bytes.fetch_add(bytes, Relaxed);
    }

    /// Guest requests in flight right now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed)
    }

    /// Time since the last guest request started or ended; `None` if there
    /// never was one.
    pub fn idle_for(&self, now: Instant) -> Option<Duration> {
        let ns = self.last_request_ns.load(Relaxed);
        if ns == 0 && self.completed.load(Relaxed) == 0 && self.in_flight() == 0 {
            return None;
        }
        Some(now.saturating_duration_since(self.epoch + Duration::from_nanos(ns)))
    }

    pub fn snapshot(&self) -> IoStatsSnapshot {
        IoStatsSnapshot {
            in_flight: self.in_flight.load(Relaxed),
            completed: self.completed.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            latency_us_log2: self.latency_us.iter().map(|c| c.load(Relaxed)).collect(),
            latency_sum_us: self.latency_sum_us.load(Relaxed),
            backing_read_bytes: self.backing_read_bytes.load(Relaxed),
            cor_bytes: self.cor_bytes.load(Relaxed),
            populated_bytes: self.populated_bytes.load(Relaxed),
        }
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let end = Instant::now();
        let us = end.saturating_duration_since(self.start).as_micros() as u64;
        let bucket = (u64::BITS - us.leading_zeros()) as usize;
        self.stats.latency_us[bucket.min(LATENCY_BUCKETS - 1)].fetch_add(1, Relaxed);
        self.stats.latency_sum_us.fetch_add(us, Relaxed);
        self.stats.completed.fetch_add(1, Relaxed);
        self.stats.in_flight.fetch_sub(1, Relaxed);
        self.stats.touch(end);
    }
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IoStatsSnapshot {
    pub in_flight: u64,
    pub completed: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Requests per power-of-two latency bucket (µs).
    pub latency_us_log2: Vec<u64>,
    /// Sum of completed requests' latencies, µs.
    pub latency_sum_us: u64,
    pub backing_read_bytes: u64,
    pub cor_bytes: u64,
    pub populated_bytes: u64,
}

impl IoStatsSnapshot {
    /// An upper bound of the `q` quantile (0..=1) of guest latency, in µs.
    pub fn latency_quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency_us_log2.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_us_log2.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(1u64 << i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_in_flight_and_completion() {
        let s = IoStats::default();
        assert_eq!(s.idle_for(Instant::now()), None);
        let g = s.begin(Op::Read, 4096);
        assert_eq!(s.in_flight(), 1);
        drop(g);
        let snap = s.snapshot();
        assert_eq!(
            (snap.in_flight, snap.completed, snap.read_bytes),
            (0, 1, 4096)
        );
        assert_eq!(snap.latency_us_log2.iter().sum::<u64>(), 1);
        assert!(s.idle_for(Instant::now()).is_some());
    }

    #[test]
    fn quantile_reports_bucket_upper_bound() {
        let mut snap = IoStatsSnapshot {
            latency_us_log2: vec![0; LATENCY_BUCKETS],
            ..Default::default()
        };
        snap.latency_us_log2[3] = 99; // < 8 µs
        snap.latency_us_log2[10] = 1; // < 1024 µs
        assert_eq!(snap.latency_quantile_us(0.5), Some(8));
        assert_eq!(snap.latency_quantile_us(0.99), Some(8));
        assert_eq!(snap.latency_quantile_us(1.0), Some(1024));
    }
}
