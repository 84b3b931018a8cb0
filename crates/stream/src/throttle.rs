//! A token bucket in bytes per second, as pure arithmetic over a clock the
//! caller passes in, so tests drive it with tokio's paused time.
//!
//! Only bytes actually copied are charged: holes and zero ranges of the
//! backing cost nothing (QEMU charges them, which is why its rate-limited
//! streams of sparse images crawl).

use std::time::Duration;

use tokio::time::Instant;

/// Rate limiter; a rate of 0 means unlimited.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    /// Bytes that may be spent at once after an idle period.
    burst: f64,
    /// May go negative: a large request is let through and paid off later.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// One tenth of a second's worth of burst, as QEMU's `ratelimit` allows
    /// one slice of 100 ms.
    const BURST_SECONDS: f64 = 0.1;

    pub fn new(rate: u64, now: Instant) -> Self {
        let burst = rate as f64 * Self::BURST_SECONDS;
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Changes the rate; takes effect for the next charge.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = rate as f64 * Self::BURST_SECONDS;
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst);
    }

    /// How long until what was charged is paid off at the current rate;
    /// zero when it is, or when the rate is unlimited (which forgives it).
    pub fn debt(&mut self, now: Instant) -> Duration {
        if self.rate == 0 {
            self.tokens = self.tokens.max(0.0);
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }

    /// Charges `bytes` and returns how long to wait before spending them.
    pub fn charge(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let now = Instant::now();
        let mut b = TokenBucket::new(0, now);
        assert_eq!(b.charge(1 << 40, now), Duration::ZERO);
    }

    #[test]
    fn steady_rate_waits_in_proportion() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        // The burst (100 KB) is free, the rest costs 1 µs per byte.
        assert_eq!(b.charge(100_000, t0), Duration::ZERO);
        let w = b.charge(500_000, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        // After paying the debt off, a second's worth is a second again.
        let t1 = t0 + Duration::from_millis(500);
        let w = b.charge(1_000_000, t1);
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn idle_time_accumulates_only_one_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        b.charge(100_000, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.charge(100_000, later), Duration::ZERO);
        assert!(b.charge(1, later) > Duration::ZERO);
    }

    #[test]
    fn debt_is_paid_over_time_and_forgiven_when_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        let w = b.charge(1_100_000, t0);
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6, "{w:?}");
        let half = t0 + Duration::from_millis(500);
        let d = b.debt(half);
        assert!((d.as_secs_f64() - 0.5).abs() < 1e-6, "{d:?}");
        b.set_rate(0, half);
        assert_eq!(b.debt(half), Duration::ZERO);
        // Back to a rate: the old debt is not charged again.
        b.set_rate(1_000_000, half);
        assert_eq!(b.debt(half), Duration::ZERO);
    }

    #[test]
    fn rate_change_applies_to_next_charge() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        b.charge(100_000, t0);
        b.set_rate(2_000_000, t0);
        let w = b.charge(1_000_000, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
    }
}
