//! Stream policies: how fast a stream may copy, decided by a pure controller.
//!
//! [`Controller::decide`] takes the time, a sample of the guest's I/O on the
//! image, a PSI sample of host I/O pressure and the stream's own copy counts,
//! and returns how many copies may be in flight, the rate, and why it holds
//! back. It does no I/O and reads no clock, so its tests drive it with
//! explicit [`Instant`]s. The job loop calls it before every copy (idle
//! detection must react to the next guest request, not the next tick); the
//! slower feedback loops (AIMD on latency, pressure backoff) step once per
//! [`Tuning::tick`].
//!
//! The one decision to know: latency is judged against a baseline learned
//! only while the stream is quiet (no copy in flight for a whole tick), so
//! the stream never teaches the controller that its own slowdown is normal.

use std::time::Duration;

use std::time::Instant;

/// Which controller runs a job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// The token bucket at the job's speed, nothing else.
    #[default]
    Fixed,
    /// Copy only after the guest has had nothing in flight for the grace
    /// period; issue nothing while a guest request is in flight.
    Idle,
    /// Back off while the host's I/O is under pressure (Linux PSI).
    HostPressure,
    /// Keep guest latency near its idle baseline (AIMD), honour host
    /// pressure, never below the floor rate; full speed when the guest idles.
    Adaptive,
}

impl PolicyKind {
    pub const NAMES: &'static [&'static str] = &["fixed", "idle", "host-pressure", "adaptive"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "fixed" => PolicyKind::Fixed,
            "idle" => PolicyKind::Idle,
            "host-pressure" => PolicyKind::HostPressure,
            "adaptive" => PolicyKind::Adaptive,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Fixed => "fixed",
            PolicyKind::Idle => "idle",
            PolicyKind::HostPressure => "host-pressure",
            PolicyKind::Adaptive => "adaptive",
        }
    }
}

/// A policy and its parameters; every field has a default.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Policy {
    pub kind: PolicyKind,
    /// `idle` (and `adaptive`'s idea of an idle guest): how long the guest
    /// must have had nothing in flight.
    #[serde(serialize_with = "ser_ms", rename = "grace-ms")]
    pub grace: Duration,
    /// `host-pressure`, `adaptive`: the share of time (0..1) that other
    /// tasks may stall on I/O before the stream backs off.
    pub pressure_threshold: f64,
    /// `adaptive`: guest latency may be this many times its baseline.
    pub latency_factor: f64,
    /// `host-pressure`, `adaptive`: bytes per second the stream keeps
    /// whatever happens, so it finishes under constant load.
    pub floor: u64,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            kind: PolicyKind::Fixed,
            // A guest's think time between bursts is often 10-100 ms; a
            // longer grace wastes most of each gap.
            grace: Duration::from_millis(20),
            pressure_threshold: 0.10,
            latency_factor: 1.2,
            floor: 1 << 20,
        }
    }
}

impl Policy {
    pub fn of(kind: PolicyKind) -> Self {
        Policy {
            kind,
            ..Policy::default()
        }
    }
}

/// Stall samples kept for the stream's own-stall estimate (see
/// `Controller::self_stall_samples`).
const SELF_STALL_SAMPLES: usize = 16;

/// Controller constants that are not user parameters.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// How often the feedback loops step.
    pub tick: Duration,
    /// Fewer guest completions than this in a tick say nothing about latency.
    pub min_samples: u64,
    /// Rate added per tick while latency is on target (bytes/s).
    pub rate_step: f64,
    /// How long to hold copies to learn a baseline the controller lacks.
    pub learn: Duration,
    /// A baseline older than this is re-learned (one short hold).
    pub relearn_every: Duration,
    /// Latency slack in µs on top of the factor: at a few tens of µs the
    /// histogram's noise is larger than any factor.
    pub latency_slack_us: f64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            tick: Duration::from_millis(100),
            min_samples: 3,
            rate_step: 4.0 * (1 << 20) as f64,
            learn: Duration::from_millis(300),
            relearn_every: Duration::from_secs(30),
            latency_slack_us: 50.0,
        }
    }
}

/// Guest I/O on the image at one moment (from [`image::stats::IoStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestSample {
    pub in_flight: u64,
    /// Since the last guest request started or ended; `None`: never any.
    pub idle_for: Option<Duration>,
    /// Guest requests completed so far.
    pub completed: u64,
    /// Sum of their latencies, µs.
    pub latency_sum_us: u64,
}

/// The `total` stall counters of a PSI `io` file, µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PsiSample {
    pub some_total_us: u64,
}

/// The stream's own copies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnSample {
    pub in_flight: usize,
    /// Bytes copied so far.
    pub copied: u64,
}

/// Everything the controller sees at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Inputs {
    pub now: Instant,
    pub guest: GuestSample,
    /// `None` when PSI is not available.
    pub psi: Option<PsiSample>,
    pub own: OwnSample,
}

/// Why the stream is not copying at full speed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldReason {
    /// Not held back.
    #[default]
    None,
    /// The job's speed limit.
    SpeedLimit,
    /// A guest request is in flight or the grace period has not passed.
    GuestBusy,
    /// Learning the guest's latency baseline with the stream quiet.
    Learning,
    /// Other tasks stall on I/O.
    HostPressure,
    /// Guest latency is above its target.
    LatencyAboveTarget,
    /// Held back as far as allowed: only the floor rate is left.
    Floor,
}

/// What the job may do now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Copies that may be in flight; 0 = issue none now.
    pub in_flight: usize,
    /// Bytes per second; 0 = unlimited.
    pub rate: u64,
    pub reason: HoldReason,
    /// When `in_flight` is 0: ask again after this long (or at the next
    /// guest event, whichever the caller sees first).
    pub retry_after: Duration,
}

/// A small xorshift generator: the backoff only needs to differ between
/// hosts, and a seed makes tests repeatable.
#[derive(Clone, Copy, Debug)]
struct Jitter(u64);

impl Jitter {
    /// Spreads a small seed over all bits (splitmix64's finaliser), or the
    /// first draws of nearby seeds would be tiny and alike.
    fn new(seed: u64) -> Jitter {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Jitter((z ^ (z >> 31)) | 1)
    }

    fn next_unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The controller of one job. Call [`Controller::decide`] as often as
/// wanted; feedback steps happen once per tick.
#[derive(Clone, Debug)]
pub struct Controller {
    policy: Policy,
    tuning: Tuning,
    /// The most copies in flight (the job's setting).
    max_in_flight: usize,
    /// The user's speed cap, 0 = none.
    speed: u64,
    // AIMD state.
    window: usize,
    /// Bytes/s; `None` = unlimited.
    rate: Option<f64>,
    reason: HoldReason,
    /// No new copies before this (randomised backoff).
    hold_until: Option<Instant>,
    jitter: Jitter,
    // Tick bookkeeping.
    last_tick: Option<(Instant, Inputs)>,
    /// Whether a copy was in flight at any call during the current tick.
    busy_in_tick: bool,
    /// Guest latency baseline, µs, and when it was last refreshed.
    baseline_us: Option<f64>,
    baseline_at: Option<Instant>,
    /// A hold to learn the baseline ends at this time.
    learning_until: Option<Instant>,
    /// Own copy rate measured over the last tick, bytes/s.
    own_rate: f64,
    /// PSI stall per copied byte (µs/B) of the last ticks that copied while
    /// not backing off for pressure: the stall the stream itself causes.
    /// Their mean without the largest is the estimate. (The smallest
    /// sample, used before, is 0 after any tick whose copies happened not to
    /// stall, seen often in bench/policy's trace; from then on all of the
    /// stream's own stall counted as foreign pressure.)
    self_stall_samples: std::collections::VecDeque<f64>,
    /// Last tick's stall share not explained by the stream.
    foreign_stall: f64,
}

impl Controller {
    pub fn new(policy: Policy, max_in_flight: usize, speed: u64, seed: u64) -> Self {
        Controller::with_tuning(policy, Tuning::default(), max_in_flight, speed, seed)
    }

    pub fn with_tuning(
        policy: Policy,
        tuning: Tuning,
        max_in_flight: usize,
        speed: u64,
        seed: u64,
    ) -> Self {
        let max_in_flight = max_in_flight.max(1);
        Controller {
            policy,
            tuning,
            max_in_flight,
            speed,
            window: max_in_flight,
            rate: None,
            reason: HoldReason::None,
            hold_until: None,
            jitter: Jitter::new(seed),
            last_tick: None,
            busy_in_tick: false,
            baseline_us: None,
            baseline_at: None,
            learning_until: None,
            own_rate: 0.0,
            self_stall_samples: std::collections::VecDeque::new(),
            foreign_stall: 0.0,
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Switches policy; the learned baseline and self-stall estimate stay.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
        self.window = self.max_in_flight;
        self.rate = None;
        self.hold_until = None;
        self.learning_until = None;
    }

    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
    }

    /// The guest latency baseline learned so far, µs.
    pub fn baseline_us(&self) -> Option<f64> {
        self.baseline_us
    }

    fn guest_idle(&self, g: &GuestSample) -> bool {
        g.in_flight == 0 && g.idle_for.is_none_or(|d| d >= self.policy.grace)
    }

    fn cap(&self, rate: u64, reason: HoldReason) -> (u64, HoldReason) {
        match (self.speed, rate) {
            (0, r) => (r, reason),
            (s, 0) => (s, HoldReason::SpeedLimit),
            (s, r) if s < r => (s, HoldReason::SpeedLimit),
            (_, r) => (r, reason),
        }
    }

    fn decision(&self, in_flight: usize, rate: u64, reason: HoldReason) -> Decision {
        let (rate, reason) = self.cap(rate, reason);
        Decision {
            in_flight,
            rate,
            reason,
            retry_after: Duration::ZERO,
        }
    }

    fn hold(&self, reason: HoldReason, retry_after: Duration) -> Decision {
        Decision {
            in_flight: 0,
            rate: 0,
            reason,
            retry_after: retry_after.max(Duration::from_millis(1)),
        }
    }

    /// What the job may do at `inp.now`.
    pub fn decide(&mut self, inp: &Inputs) -> Decision {
        if inp.own.in_flight > 0 {
            self.busy_in_tick = true;
        }
        self.maybe_tick(inp);
        match self.policy.kind {
            PolicyKind::Fixed => self.decision(self.max_in_flight, 0, HoldReason::None),
            PolicyKind::Idle => self.decide_idle(inp),
            PolicyKind::HostPressure | PolicyKind::Adaptive => self.decide_feedback(inp),
        }
    }

    fn decide_idle(&self, inp: &Inputs) -> Decision {
        let g = &inp.guest;
        if g.in_flight > 0 {
            return self.hold(HoldReason::GuestBusy, self.policy.grace);
        }
        match g.idle_for {
            Some(d) if d < self.policy.grace => {
                self.hold(HoldReason::GuestBusy, self.policy.grace - d)
            }
            _ => self.decision(self.max_in_flight, 0, HoldReason::None),
        }
    }

    fn decide_feedback(&mut self, inp: &Inputs) -> Decision {
        let adaptive = self.policy.kind == PolicyKind::Adaptive;
        let floor = self.policy.floor.max(1);
        // An idle guest cannot be slowed down: the latency backoff (not a
        // pressure one) does not hold the stream in the guest's gaps.
        if adaptive && self.reason != HoldReason::HostPressure && self.guest_idle(&inp.guest) {
            self.learning_until = None;
            return self.decision(self.max_in_flight, 0, HoldReason::None);
        }
        if let Some(until) = self.hold_until {
            if inp.now < until {
                // The floor still holds during a backoff: one copy at it.
                return self.decision(1, floor, HoldReason::Floor);
            }
            self.hold_until = None;
        }
        // A pressure backoff recovers step by step even with an idle guest.
        if adaptive && self.reason != HoldReason::HostPressure {
            if self.guest_idle(&inp.guest) {
                self.learning_until = None;
                return self.decision(self.max_in_flight, 0, HoldReason::None);
            }
            // A busy guest and no (fresh) baseline: hold everything for a
            // short while so the baseline is learned with the stream quiet.
            // The hold is bounded, so the floor holds on average.
            let stale = self
                .baseline_at
                .is_none_or(|t| inp.now.saturating_duration_since(t) > self.tuning.relearn_every);
            if !stale {
                self.learning_until = None;
            } else if self.learning_until.is_none() {
                self.learning_until = Some(inp.now + self.tuning.learn);
            }
            if let Some(until) = self.learning_until {
                if inp.now < until {
                    return self.hold(HoldReason::Learning, until - inp.now);
                }
                self.learning_until = None;
                // Learning failed (no quiet tick with samples): do not try
                // again before relearn_every.
                self.baseline_at.get_or_insert(inp.now);
            }
        }
        match self.rate {
            None => self.decision(self.window, 0, self.reason),
            Some(r) if r <= floor as f64 => self.decision(self.window, floor, HoldReason::Floor),
            Some(r) => self.decision(self.window, r as u64, self.reason),
        }
    }

    fn maybe_tick(&mut self, inp: &Inputs) {
        let Some((t0, prev)) = self.last_tick else {
            self.last_tick = Some((inp.now, *inp));
            return;
        };
        let dt = inp.now.saturating_duration_since(t0);
        if dt < self.tuning.tick {
            return;
        }
        let secs = dt.as_secs_f64();
        let copied = inp.own.copied.saturating_sub(prev.own.copied);
        self.own_rate = copied as f64 / secs;
        let quiet = !self.busy_in_tick && copied == 0 && inp.own.in_flight == 0;
        self.busy_in_tick = inp.own.in_flight > 0;
        self.last_tick = Some((inp.now, *inp));

        // Host pressure: the stall share of this tick, minus what the
        // stream's own copies explain.
        self.foreign_stall = 0.0;
        if let (Some(p0), Some(p1)) = (prev.psi, inp.psi) {
            let stall_us = p1.some_total_us.saturating_sub(p0.some_total_us) as f64;
            // A backoff's ticks are left out: they hold the foreign load.
            if copied > 0 && self.reason != HoldReason::HostPressure {
                if self.self_stall_samples.len() == SELF_STALL_SAMPLES {
                    self.self_stall_samples.pop_front();
                }
                self.self_stall_samples.push_back(stall_us / copied as f64);
            }
            let own = self.self_stall_per_byte() * copied as f64;
            self.foreign_stall = ((stall_us - own).max(0.0) / 1e6) / secs;
        }

        // Guest latency over this tick.
        let n = inp.guest.completed.saturating_sub(prev.guest.completed);
        let lat = (n >= self.tuning.min_samples).then(|| {
            inp.guest
                .latency_sum_us
                .saturating_sub(prev.guest.latency_sum_us) as f64
                / n as f64
        });
        if quiet && let Some(l) = lat {
            self.baseline_us = Some(self.baseline_us.map_or(l, |b| 0.7 * b + 0.3 * l));
            self.baseline_at = Some(inp.now);
        }

        match self.policy.kind {
            PolicyKind::Fixed | PolicyKind::Idle => {}
            PolicyKind::HostPressure => {
                if self.foreign_stall > self.policy.pressure_threshold {
                    self.decrease(inp.now, HoldReason::HostPressure);
                } else {
                    self.increase();
                }
            }
            PolicyKind::Adaptive => {
                let target = self.baseline_us.map(|b| {
                    b * self.policy.latency_factor.max(1.0) + self.tuning.latency_slack_us
                });
                if self.foreign_stall > self.policy.pressure_threshold {
                    self.decrease(inp.now, HoldReason::HostPressure);
                } else if let (Some(l), Some(t)) = (lat, target)
                    && !quiet
                    && l > t
                {
                    self.decrease(inp.now, HoldReason::LatencyAboveTarget);
                } else if lat.is_some() || self.guest_idle(&inp.guest) {
                    self.increase();
                }
            }
        }
    }

    /// The stream's own PSI stall per copied byte (µs/B), 0 before any
    /// sample: the mean of the samples without the largest, which one tick
    /// spoiled by a foreign load's start would otherwise inflate.
    fn self_stall_per_byte(&self) -> f64 {
        let v = &self.self_stall_samples;
        let (sum, max) = v.iter().fold((0.0, 0.0f64), |(s, m), &x| (s + x, m.max(x)));
        match v.len() {
            0 => 0.0,
            1 | 2 => v.iter().copied().fold(f64::INFINITY, f64::min),
            n => (sum - max) / (n - 1) as f64,
        }
    }

    /// Multiplicative decrease and a randomised hold of up to one tick.
    fn decrease(&mut self, now: Instant, reason: HoldReason) {
        let floor = self.policy.floor.max(1) as f64;
        self.window = (self.window / 2).max(1);
        let current = self.rate.unwrap_or(self.own_rate.max(floor * 2.0));
        self.rate = Some((current / 2.0).max(floor));
        self.reason = reason;
        let hold = self.tuning.tick.mul_f64(self.jitter.next_unit());
        self.hold_until = Some(now + hold);
    }

    /// Additive increase, back to unlimited once the window is full again.
    fn increase(&mut self) {
        let Some(r) = self.rate else {
            self.reason = HoldReason::None;
            return;
        };
        self.window = (self.window + 1).min(self.max_in_flight);
        let r = r + self.tuning.rate_step;
        if self.window == self.max_in_flight && r >= self.own_rate * 2.0 && self.own_rate > 0.0 {
            self.rate = None;
            self.reason = HoldReason::None;
        } else {
            self.rate = Some(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn guest(in_flight: u64, idle_ms: Option<u64>) -> GuestSample {
        GuestSample {
            in_flight,
            idle_for: idle_ms.map(|m| MS * m as u32),
            ..Default::default()
        }
    }

    fn at(t0: Instant, ms: u64, guest: GuestSample) -> Inputs {
        Inputs {
            now: t0 + MS * ms as u32,
            guest,
            psi: None,
            own: OwnSample::default(),
        }
    }

    #[test]
    fn policy_names_round_trip() {
        for n in PolicyKind::NAMES {
            assert_eq!(PolicyKind::parse(n).unwrap().as_str(), *n);
        }
        assert_eq!(PolicyKind::parse("fast"), None);
    }

    #[test]
    fn fixed_always_allows_the_full_window() {
        let t0 = Instant::now();
        let mut c = Controller::new(Policy::of(PolicyKind::Fixed), 8, 0, 1);
        let d = c.decide(&at(t0, 0, guest(5, Some(0))));
        assert_eq!((d.in_flight, d.rate, d.reason), (8, 0, HoldReason::None));
        c.set_speed(1000);
        let d = c.decide(&at(t0, 1, guest(5, Some(0))));
        assert_eq!((d.rate, d.reason), (1000, HoldReason::SpeedLimit));
    }

    #[test]
    fn idle_waits_for_the_grace_period_after_the_last_request() {
        let t0 = Instant::now();
        let p = Policy {
            grace: MS * 50,
            ..Policy::of(PolicyKind::Idle)
        };
        let mut c = Controller::new(p, 8, 0, 1);
        // Never any guest I/O: copy at once.
        assert_eq!(c.decide(&at(t0, 0, guest(0, None))).in_flight, 8);
        // A request in flight: stop issuing, ask again in a grace period.
        let d = c.decide(&at(t0, 1, guest(1, Some(0))));
        assert_eq!((d.in_flight, d.reason), (0, HoldReason::GuestBusy));
        // It ended 20 ms ago: 30 ms of grace left.
        let d = c.decide(&at(t0, 21, guest(0, Some(20))));
        assert_eq!(d.in_flight, 0);
        assert_eq!(d.retry_after, MS * 30);
        // Grace passed: full speed.
        let d = c.decide(&at(t0, 51, guest(0, Some(50))));
        assert_eq!((d.in_flight, d.reason), (8, HoldReason::None));
        // A new request stops it again at once.
        let d = c.decide(&at(t0, 52, guest(1, Some(0))));
        assert_eq!(d.in_flight, 0);
    }

    /// Drives a controller through ticks of 100 ms with a guest doing `n`
    /// requests of `lat_us` each per tick, and own copies of `copied` bytes.
    struct Sim {
        c: Controller,
        t0: Instant,
        ms: u64,
        guest: GuestSample,
        own: OwnSample,
        psi: Option<PsiSample>,
    }

    impl Sim {
        fn new(policy: Policy) -> Sim {
            Sim {
                c: Controller::new(policy, 8, 0, 42),
                t0: Instant::now(),
                ms: 0,
                guest: GuestSample::default(),
                own: OwnSample::default(),
                psi: Some(PsiSample::default()),
            }
        }

        /// One tick: the guest completes `n` requests of `lat_us`, is busy
        /// at the end of it if `busy`; the stream copied `copied` bytes with
        /// `in_flight` copies; the host stalled `stall_ms`.
        fn tick(
            &mut self,
            n: u64,
            lat_us: u64,
            busy: bool,
            copied: u64,
            stall_ms: u64,
        ) -> Decision {
            self.ms += 100;
            self.guest.completed += n;
            self.guest.latency_sum_us += n * lat_us;
            self.guest.in_flight = busy as u64;
            self.guest.idle_for = if n > 0 || busy {
                Some(MS)
            } else {
                Some(MS * 100)
            };
            self.own.copied += copied;
            self.own.in_flight = if copied > 0 { 1 } else { 0 };
            if let Some(p) = &mut self.psi {
                p.some_total_us += stall_ms * 1000;
            }
            let inp = Inputs {
                now: self.t0 + MS * self.ms as u32,
                guest: self.guest,
                psi: self.psi,
                own: self.own,
            };
            self.c.decide(&inp)
        }
    }

    #[test]
    fn adaptive_learns_baseline_while_quiet_then_runs() {
        let mut s = Sim::new(Policy::of(PolicyKind::Adaptive));
        // First call starts the clock; the guest is busy: hold to learn.
        let d = s.tick(10, 100, true, 0, 0);
        assert_eq!((d.in_flight, d.reason), (0, HoldReason::Learning));
        // One quiet tick with samples is a baseline; copying starts.
        let d = s.tick(10, 100, true, 0, 0);
        assert_eq!(s.c.baseline_us(), Some(100.0));
        assert_eq!((d.in_flight, d.reason), (8, HoldReason::None));
        // Ticks with copies running do not move the baseline.
        s.tick(10, 150, true, 1 << 20, 0);
        assert_eq!(s.c.baseline_us(), Some(100.0));
    }

    #[test]
    fn adaptive_is_full_speed_when_the_guest_is_idle() {
        let mut s = Sim::new(Policy::of(PolicyKind::Adaptive));
        s.tick(0, 0, false, 0, 0);
        let d = s.tick(0, 0, false, 8 << 20, 0);
        assert_eq!((d.in_flight, d.rate, d.reason), (8, 0, HoldReason::None));
    }

    /// Gets a simulated adaptive controller past learning with a 100 µs
    /// baseline, copying at 80 MB/s.
    fn learned() -> Sim {
        let mut s = Sim::new(Policy::of(PolicyKind::Adaptive));
        for _ in 0..3 {
            s.tick(10, 100, true, 0, 0);
        }
        assert_eq!(s.c.baseline_us(), Some(100.0));
        for _ in 0..3 {
            s.tick(10, 100, true, 8 << 20, 0);
        }
        s
    }

    #[test]
    fn adaptive_halves_on_high_latency_and_adds_back_when_on_target() {
        let mut s = learned();
        assert_eq!(s.c.window, 8);
        // Latency 3x the baseline: multiplicative decrease.
        s.tick(10, 300, true, 8 << 20, 0);
        assert_eq!(s.c.window, 4);
        let r1 = s.c.rate.unwrap();
        assert!((r1 - 40.0 * (1 << 20) as f64).abs() < 1.0, "{r1}");
        assert_eq!(s.c.reason, HoldReason::LatencyAboveTarget);
        s.tick(10, 300, true, 4 << 20, 0);
        assert_eq!(s.c.window, 2);
        assert!((s.c.rate.unwrap() - r1 / 2.0).abs() < 1.0);
        // Back on target: +1 copy and +rate_step per tick.
        let r2 = s.c.rate.unwrap();
        s.tick(10, 100, true, 2 << 20, 0);
        assert_eq!(s.c.window, 3);
        assert_eq!(s.c.rate.unwrap(), r2 + Tuning::default().rate_step);
        // ... until the window is full and the rate well above what the
        // stream achieves: unlimited again.
        for _ in 0..20 {
            s.tick(10, 100, true, 2 << 20, 0);
        }
        assert_eq!((s.c.window, s.c.rate), (8, None));
        assert_eq!(s.c.reason, HoldReason::None);
    }

    #[test]
    fn decrease_holds_for_a_random_part_of_a_tick() {
        let mut s = learned();
        let d = s.tick(10, 1000, true, 8 << 20, 0);
        let until = s.c.hold_until.expect("backoff set");
        let now = s.t0 + MS * s.ms as u32;
        assert!(until >= now && until <= now + MS * 100);
        // During the hold only the floor is left.
        assert_eq!((d.in_flight, d.reason), (1, HoldReason::Floor));
        // Two controllers with other seeds hold for other times.
        let mut a = learned();
        a.c.jitter = Jitter::new(7);
        let mut b = learned();
        b.c.jitter = Jitter::new(99);
        a.tick(10, 1000, true, 8 << 20, 0);
        b.tick(10, 1000, true, 8 << 20, 0);
        assert_ne!(
            a.c.hold_until.unwrap() - a.t0,
            b.c.hold_until.unwrap() - b.t0
        );
    }

    #[test]
    fn adaptive_never_goes_below_the_floor_under_constant_load() {
        let mut s = learned();
        for _ in 0..50 {
            let d = s.tick(10, 5000, true, 128 << 10, 0);
            assert!(d.in_flight >= 1, "{d:?}");
            assert!(d.rate >= Policy::default().floor, "{d:?}");
        }
        assert_eq!(s.c.window, 1);
        assert_eq!(s.c.rate, Some(Policy::default().floor as f64));
        // Past the random hold, the decision names the floor.
        s.ms += 200;
        let inp = Inputs {
            now: s.t0 + MS * s.ms as u32,
            guest: s.guest,
            psi: s.psi,
            own: s.own,
        };
        let d = s.c.decide(&inp);
        assert_eq!(
            (d.in_flight, d.rate, d.reason),
            (1, 1 << 20, HoldReason::Floor)
        );
    }

    #[test]
    fn host_pressure_backs_off_and_recovers() {
        let mut s = Sim::new(Policy::of(PolicyKind::HostPressure));
        s.tick(0, 0, false, 0, 0);
        // The stream alone: 1 ms of stall per 8 MiB is its own cost.
        for _ in 0..3 {
            let d = s.tick(0, 0, false, 8 << 20, 1);
            assert_eq!(d.in_flight, 8);
        }
        assert_eq!(s.c.foreign_stall, 0.0);
        // Another load stalls 40 ms per 100 ms: back off.
        s.tick(0, 0, false, 8 << 20, 41);
        assert!(s.c.foreign_stall > 0.3);
        assert_eq!(s.c.reason, HoldReason::HostPressure);
        assert_eq!(s.c.window, 4);
        s.tick(0, 0, false, 4 << 20, 40);
        s.tick(0, 0, false, 2 << 20, 40);
        assert_eq!(s.c.window, 1);
        // The load ends: additive recovery back to unlimited.
        let mut ticks = 0;
        while s.c.rate.is_some() {
            s.tick(0, 0, false, 2 << 20, 0);
            ticks += 1;
            assert!(ticks < 100, "no recovery");
        }
        assert!(ticks >= 7, "recovery is additive: {ticks}");
        let d = s.tick(0, 0, false, 8 << 20, 1);
        assert_eq!((d.in_flight, d.rate, d.reason), (8, 0, HoldReason::None));
    }

    #[test]
    fn own_stall_does_not_count_as_pressure() {
        let mut s = Sim::new(Policy::of(PolicyKind::HostPressure));
        s.tick(0, 0, false, 0, 0);
        // The stream stalls itself 50% of the time, steadily: no backoff.
        for _ in 0..20 {
            s.tick(0, 0, false, 8 << 20, 50);
            assert_eq!(s.c.window, 8);
        }
    }

    #[test]
    fn a_tick_without_stall_does_not_make_all_own_stall_foreign() {
        let mut s = Sim::new(Policy::of(PolicyKind::HostPressure));
        s.tick(0, 0, false, 0, 0);
        // The stream stalls itself about 15% of the time, with one lucky
        // tick of no stall at all among them: no backoff, ever.
        for i in 0..30 {
            let stall = if i == 3 { 0 } else { 15 };
            s.tick(0, 0, false, 8 << 20, stall);
            assert_eq!(s.c.window, 8, "tick {i}: {}", s.c.foreign_stall);
        }
    }

    #[test]
    fn adaptive_backs_off_on_pressure_even_with_an_idle_guest() {
        let mut s = Sim::new(Policy::of(PolicyKind::Adaptive));
        s.tick(0, 0, false, 0, 0);
        s.tick(0, 0, false, 8 << 20, 1);
        s.tick(0, 0, false, 8 << 20, 60);
        assert_eq!(s.c.reason, HoldReason::HostPressure);
        s.ms += 200;
        let inp = Inputs {
            now: s.t0 + MS * s.ms as u32,
            guest: s.guest,
            psi: s.psi,
            own: s.own,
        };
        let d = s.c.decide(&inp);
        assert!(d.rate > 0 && d.in_flight < 8, "{d:?}");
    }

    #[test]
    fn set_policy_switches_behaviour_at_once() {
        let t0 = Instant::now();
        let mut c = Controller::new(Policy::of(PolicyKind::Fixed), 8, 0, 1);
        assert_eq!(c.decide(&at(t0, 0, guest(1, Some(0)))).in_flight, 8);
        c.set_policy(Policy::of(PolicyKind::Idle));
        assert_eq!(c.decide(&at(t0, 1, guest(1, Some(0)))).in_flight, 0);
    }
}
