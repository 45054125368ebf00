//! The pure scaling decision, in the manner of Knative's KPA with Kubernetes HPA's stabilization:
//!
//! - **Load** is a model's metric summed over its ready replicas, plus the requests the gateway holds for want of
//!   one. The recommendation is `ceil(load / target)` averaged over the **stable window** (60 s by default).
//! - **Panic**: when the **panic window** (6 s) averages at least twice what the ready replicas are sized for, the
//!   recommendation comes from the panic window, never below the current count, and skips the scale-up
//!   stabilization: bursts are met at once.
//! - **Stabilization** (the CRD's `scaleUpStabilizationSeconds` / `scaleDownStabilizationSeconds`): a scale-up
//!   goes to the lowest recommendation of the scale-up window, a scale-down to the highest of the scale-down
//!   window, and a scale-down needs a recommendation history as long as that window (a restarted gateway does
//!   not scale down on its first look).
//! - **Zero**: with `minReplicas: 0` a model goes to zero only after `scaleToZeroAfterSeconds` without a request
//!   (in flight or arriving) and with no load; until then it keeps one replica. At zero a held request scales it
//!   up at once.
//! - **Missing or stale metrics hold** the current count (bounds still apply); a failed scrape in the stable
//!   window blocks a scale-down, to zero included.

use std::fmt;
use std::time::{Duration, Instant};

use baleen_api::crd::AutoscalingSpec;

/// The stable window's default length.
pub const STABLE_WINDOW: Duration = Duration::from_secs(60);
/// The panic window's default length (a tenth of the stable window, as Knative's).
pub const PANIC_WINDOW: Duration = Duration::from_secs(6);
/// The panic threshold: the panic window's load over what the ready replicas are sized for.
pub const PANIC_THRESHOLD: f64 = 2.0;
/// `scaleUpStabilizationSeconds` when the spec leaves it out.
pub const DEFAULT_SCALE_UP_STABILIZATION: Duration = Duration::ZERO;
/// `scaleDownStabilizationSeconds` when the spec leaves it out.
pub const DEFAULT_SCALE_DOWN_STABILIZATION: Duration = Duration::from_secs(300);
/// `scaleToZeroAfterSeconds` when the spec leaves it out.
pub const DEFAULT_SCALE_TO_ZERO_AFTER: Duration = Duration::from_secs(600);

/// A model's scaling rules: the CRD's `spec.autoscaling` and the gateway's windows.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePolicy {
    pub min: u32,
    pub max: u32,
    /// The metric per ready replica to aim for (above 0).
    pub target: f64,
    pub scale_up_stabilization: Duration,
    pub scale_down_stabilization: Duration,
    pub scale_to_zero_after: Duration,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// A sample older than this is stale (three scrape intervals).
    pub stale_after: Duration,
}

impl ScalePolicy {
    /// The rules of a (validated) `spec.autoscaling` with the gateway's windows.
    pub fn from_spec(spec: &AutoscalingSpec, windows: Windows) -> Self {
        let secs = |s: Option<u32>, default: Duration| s.map_or(default, |s| Duration::from_secs(u64::from(s)));
        Self {
            min: spec.min_replicas(),
            max: spec.max_replicas,
            target: spec.target,
            scale_up_stabilization: secs(spec.scale_up_stabilization_seconds, DEFAULT_SCALE_UP_STABILIZATION),
            scale_down_stabilization: secs(spec.scale_down_stabilization_seconds, DEFAULT_SCALE_DOWN_STABILIZATION),
            scale_to_zero_after: secs(spec.scale_to_zero_after_seconds, DEFAULT_SCALE_TO_ZERO_AFTER),
            stable_window: windows.stable,
            panic_window: windows.panic,
            stale_after: windows.stale_after,
        }
    }

    /// How long the caller keeps samples and recommendations.
    pub fn history(&self) -> Duration {
        self.stable_window.max(self.scale_up_stabilization).max(self.scale_down_stabilization)
    }

    fn bound(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max)
    }
}

/// The gateway's averaging windows and staleness limit (flags, the same for every model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub stable: Duration,
    pub panic: Duration,
    pub stale_after: Duration,
}

/// One look at a model's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: Instant,
    /// The metric summed over the ready replicas plus the held requests; `None` when a ready replica's metrics
    /// could not be read (a failed or stale scrape, a Prometheus error).
    pub load: Option<f64>,
}

/// What `decide` looks at.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// Samples, oldest first.
    pub samples: &'a [Sample],
    /// Earlier recommendations (`Decision::recommendation`), oldest first.
    pub recommendations: &'a [(Instant, u32)],
    /// Replicas asked for now.
    pub current: u32,
    /// Replicas serving now.
    pub ready: u32,
    /// Requests held for want of a ready replica.
    pub held: usize,
    /// The last time a request arrived or was in flight (the start of observation when none has).
    pub last_active: Instant,
}

/// Why a decision is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A request is held at zero replicas.
    FromZero,
    /// The panic window's load is at least twice what the ready replicas are sized for.
    Panic,
    /// The stable window's load asks for more replicas.
    ScaleUp,
    /// The stable window's load asks for fewer replicas (held for the scale-down window).
    ScaleDown,
    /// No request and no load for `scaleToZeroAfterSeconds`.
    ToZero,
    /// Idle, but not yet for `scaleToZeroAfterSeconds`: one replica stays.
    KeepOne,
    /// The load fits the current count.
    Steady,
    /// A change is recommended but has not held for its stabilization window.
    Stabilizing,
    /// The current count is outside `minReplicas..=maxReplicas`.
    Bounds,
    /// No sample yet, or the newest is older than three scrape intervals.
    StaleMetrics,
    /// The newest sample, or one in the stable window when scaling down, failed.
    ScrapeFailed,
}

impl Reason {
    /// A short label (log lines, events).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FromZero => "FromZero",
            Self::Panic => "Panic",
            Self::ScaleUp => "ScaleUp",
            Self::ScaleDown => "ScaleDown",
            Self::ToZero => "ToZero",
            Self::KeepOne => "KeepOne",
            Self::Steady => "Steady",
            Self::Stabilizing => "Stabilizing",
            Self::Bounds => "Bounds",
            Self::StaleMetrics => "StaleMetrics",
            Self::ScrapeFailed => "ScrapeFailed",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Replicas to ask for.
    pub desired: u32,
    pub reason: Reason,
    /// The bounded recommendation of this look, for the caller's history (`None` when metrics were unusable).
    pub recommendation: Option<u32>,
    /// The stable window's average load (for messages).
    pub load: Option<f64>,
}

impl Decision {
    /// `from 1 to 2 replicas (Panic; load 4.00)`, for progress lines and Events.
    pub fn describe(&self, from: u32) -> String {
        let plural = if self.desired == 1 { "" } else { "s" };
        let load = self.load.map_or_else(|| "unknown".to_string(), |l| format!("{l:.2}"));
        format!("from {from} to {} replica{plural} ({}; load {load})", self.desired, self.reason)
    }
}

fn average(samples: &[Sample], from: Instant) -> (Option<f64>, bool) {
    let mut sum = 0.0;
    let mut n = 0u32;
    let mut failed = false;
    for s in samples.iter().filter(|s| s.at >= from) {
        match s.load {
            Some(load) => {
                sum += load;
                n += 1;
            }
            None => failed = true,
        }
    }
    ((n > 0).then(|| sum / f64::from(n)), failed)
}

fn replicas_for(load: f64, target: f64) -> u32 {
    let n = (load.max(0.0) / target).ceil();
    if n >= f64::from(u32::MAX) { u32::MAX } else { n as u32 }
}

/// The decision for one model at `now` (see the module docs).
pub fn decide(o: &Observed<'_>, p: &ScalePolicy, now: Instant) -> Decision {
    let hold = |reason, load| Decision { desired: p.bound(o.current), reason, recommendation: None, load };
    if o.current == 0 {
        if o.held > 0 {
            let desired = p.bound(replicas_for(o.held as f64, p.target).max(1));
            return Decision { desired, reason: Reason::FromZero, recommendation: Some(desired), load: None };
        }
        // Nothing runs, so nothing can be measured: zero stays zero (unless minReplicas says otherwise).
        let reason = if p.min > 0 { Reason::Bounds } else { Reason::Steady };
        return Decision { desired: p.bound(0), reason, recommendation: Some(p.bound(0)), load: Some(0.0) };
    }
    if p.bound(o.current) != o.current {
        // `minReplicas`/`maxReplicas` changed under the current count: follow them first, load or not.
        return Decision { desired: p.bound(o.current), reason: Reason::Bounds, recommendation: None, load: None };
    }
    let Some(latest) = o.samples.last() else { return hold(Reason::StaleMetrics, None) };
    if now.saturating_duration_since(latest.at) > p.stale_after {
        return hold(Reason::StaleMetrics, None);
    }
    if latest.load.is_none() {
        return hold(Reason::ScrapeFailed, None);
    }
    let (stable, failed_in_window) = average(o.samples, now.checked_sub(p.stable_window).unwrap_or(now));
    let (panic, _) = average(o.samples, now.checked_sub(p.panic_window).unwrap_or(now));
    let (Some(stable), Some(panic)) = (stable, panic) else { return hold(Reason::StaleMetrics, None) };
    let load = Some(stable);

    // Panic: the short window says the ready replicas are swamped; scale up now, never down.
    let sized_for = p.target * f64::from(o.ready.max(1));
    if o.ready > 0 && panic >= PANIC_THRESHOLD * sized_for {
        let n = replicas_for(panic, p.target).max(o.current);
        let desired = p.bound(n);
        let reason = match desired {
            d if d > o.current => Reason::Panic,
            _ if n > desired => Reason::Bounds,
            _ => Reason::Steady,
        };
        return Decision { desired, reason, recommendation: Some(desired), load };
    }

    let mut raw = replicas_for(stable, p.target);
    if raw == 0 {
        let idle_for = now.saturating_duration_since(o.last_active);
        // Not on a window with a failed scrape: zero is a scale-down too.
        if p.min == 0 && idle_for >= p.scale_to_zero_after && !failed_in_window {
            // Idleness held for its own (longer) window: no scale-down stabilization on top.
            return Decision { desired: 0, reason: Reason::ToZero, recommendation: Some(0), load };
        }
        if p.min == 0 {
            raw = 1;
        }
    }
    let recommendation = p.bound(raw);
    let idle = stable == 0.0 && p.min == 0;
    let window = |length: Duration| {
        let from = now.checked_sub(length).unwrap_or(now);
        o.recommendations.iter().filter(move |(at, _)| *at >= from).map(|(_, n)| *n)
    };
    let decision =
        |desired: u32, reason: Reason| Decision { desired, reason, recommendation: Some(recommendation), load };
    if recommendation > o.current {
        let lowest = window(p.scale_up_stabilization).chain([recommendation]).min().unwrap_or(recommendation);
        let desired = lowest.max(o.current);
        return decision(desired, if desired > o.current { Reason::ScaleUp } else { Reason::Stabilizing });
    }
    if recommendation < o.current {
        if failed_in_window {
            return decision(o.current, Reason::ScrapeFailed);
        }
        let from = now.checked_sub(p.scale_down_stabilization);
        let covered = match (from, o.recommendations.first()) {
            (Some(from), Some((oldest, _))) => *oldest <= from,
            (None, _) | (_, None) => p.scale_down_stabilization.is_zero(),
        };
        if !covered {
            return decision(o.current, Reason::Stabilizing);
        }
        let highest = window(p.scale_down_stabilization).chain([recommendation]).max().unwrap_or(recommendation);
        let desired = highest.min(o.current);
        let reason = match desired {
            d if d == o.current => Reason::Stabilizing,
            1 if idle => Reason::KeepOne,
            _ => Reason::ScaleDown,
        };
        return decision(desired, reason);
    }
    let reason = match () {
        () if recommendation != raw => Reason::Bounds,
        () if idle => Reason::KeepOne,
        () => Reason::Steady,
    };
    decision(o.current, reason)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> ScalePolicy {
        ScalePolicy {
            min: 1,
            max: 5,
            target: 2.0,
            scale_up_stabilization: Duration::ZERO,
            scale_down_stabilization: 30 * S,
            scale_to_zero_after: 100 * S,
            stable_window: 20 * S,
            panic_window: 2 * S,
            stale_after: 3 * S,
        }
    }

    /// A world observed once a second for `loads.len()` seconds, ending at `now`.
    struct World {
        start: Instant,
        samples: Vec<Sample>,
        recommendations: Vec<(Instant, u32)>,
    }

    impl World {
        fn new() -> Self {
            Self { start: Instant::now(), samples: Vec::new(), recommendations: Vec::new() }
        }

        fn at(&self, secs: u64) -> Instant {
            self.start + S * u32::try_from(secs).unwrap()
        }

        fn now(&self) -> Instant {
            self.samples.last().map_or(self.start, |s| s.at)
        }

        /// Appends one sample a second after the last and decides, keeping the recommendation as the caller does.
        fn step(&mut self, load: Option<f64>, o: Observe, p: &ScalePolicy) -> Decision {
            let at = self.at(self.samples.len() as u64 + 1);
            self.samples.push(Sample { at, load });
            let d = self.look(o, p, at);
            if let Some(r) = d.recommendation {
                self.recommendations.push((at, r));
            }
            d
        }

        fn look(&self, o: Observe, p: &ScalePolicy, now: Instant) -> Decision {
            let observed = Observed {
                samples: &self.samples,
                recommendations: &self.recommendations,
                current: o.current,
                ready: o.ready,
                held: o.held,
                last_active: o.last_active.map_or(now, |secs| self.at(secs)),
            };
            decide(&observed, p, now)
        }

        /// Steps `n` seconds at a constant load and current count; returns the last decision.
        fn hold_load(&mut self, n: usize, load: f64, current: u32, p: &ScalePolicy) -> Decision {
            let mut last = None;
            for _ in 0..n {
                last = Some(self.step(Some(load), Observe::at(current), p));
            }
            last.unwrap()
        }
    }

    #[derive(Clone, Copy)]
    struct Observe {
        current: u32,
        ready: u32,
        held: usize,
        /// Seconds from the start of the last activity; `None`: active now.
        last_active: Option<u64>,
    }

    impl Observe {
        fn at(current: u32) -> Self {
            Self { current, ready: current, held: 0, last_active: None }
        }
    }

    #[test]
    fn desired_is_the_stable_load_over_the_target_rounded_up() {
        let p = policy();
        for (load, desired) in [(0.5, 1), (2.0, 1), (2.1, 2), (7.9, 4), (100.0, 5)] {
            let mut w = World::new();
            // Long enough at this load that the scale-down window is covered and the stable window is uniform.
            let d = w.hold_load(40, load, 3, &p);
            assert_eq!(d.desired, desired.max(1), "load {load}: {d:?}");
            let expected = match desired {
                3 => Reason::Steady,
                5 => Reason::Panic,
                d if d > 3 => Reason::ScaleUp,
                _ => Reason::ScaleDown,
            };
            assert_eq!(d.reason, expected, "load {load}: {d:?}");
        }
    }

    #[test]
    fn a_burst_panics_up_at_once_and_the_scale_down_waits_for_its_window() {
        let p = ScalePolicy { scale_up_stabilization: 10 * S, ..policy() };
        let mut w = World::new();
        w.hold_load(40, 1.0, 1, &p);
        // 1 replica sized for 2; a panic window of (1 + 1 + 13) / 3 = 5 is ≥ 2× → panic, no scale-up
        // stabilization: ceil(5 / 2) = 3.
        let d = w.step(Some(13.0), Observe::at(1), &p);
        assert_eq!((d.desired, d.reason), (3, Reason::Panic), "{d:?}");
        // More than the maximum asked for: the maximum.
        let d = w.step(Some(40.0), Observe::at(3), &p);
        assert_eq!((d.desired, d.reason), (5, Reason::Panic), "{d:?}");
        // The burst ends: the stable window's average falls, but the 30 s scale-down window (both ends
        // included) remembers 5.
        for i in 0..30 {
            let d = w.step(Some(0.5), Observe::at(5), &p);
            assert_eq!(d.desired, 5, "{i}: {d:?}");
        }
        // Then down to the highest recommendation of the last 30 s (the stable window still held the burst for
        // 20 s of them), and later to 1.
        let d = w.step(Some(0.5), Observe::at(5), &p);
        assert_eq!((d.desired, d.reason), (2, Reason::ScaleDown), "{d:?}");
        let d = w.hold_load(30, 0.5, 2, &p);
        assert_eq!((d.desired, d.reason), (1, Reason::ScaleDown), "{d:?}");
    }

    #[test]
    fn without_panic_a_scale_up_waits_for_the_scale_up_window() {
        let p = ScalePolicy { scale_up_stabilization: 5 * S, ..policy() };
        let mut w = World::new();
        w.hold_load(40, 2.0, 1, &p);
        // 3.0 is 1.5× what one replica is sized for: no panic; the stable average rises slowly.
        let mut first_up = None;
        for i in 0..30 {
            let d = w.step(Some(3.0), Observe::at(1), &p);
            if d.desired > 1 {
                first_up = Some((i, d));
                break;
            }
            assert!(matches!(d.reason, Reason::Steady | Reason::Stabilizing), "{d:?}");
        }
        let (i, d) = first_up.expect("scaled up");
        assert_eq!((d.desired, d.reason), (2, Reason::ScaleUp));
        // The stable average first exceeds 2 after 1 s; the recommendation must then hold 5 s more.
        assert!(i >= 5, "scaled up after {i} s: the scale-up window was not honoured");
    }

    #[test]
    fn flapping_load_does_not_flap_the_replicas() {
        let p = policy();
        let mut w = World::new();
        w.hold_load(40, 6.0, 3, &p);
        let mut current = 3;
        // Load alternating every 5 s between 1 and 6: the scale-down window always holds a high recommendation.
        for i in 0..120 {
            let load = if (i / 5) % 2 == 0 { 1.0 } else { 6.0 };
            let d = w.step(Some(load), Observe::at(current), &p);
            assert!(d.desired >= 2, "step {i}: {d:?}");
            current = d.desired;
        }
    }

    #[test]
    fn stale_missing_or_failed_metrics_hold_and_never_scale_down() {
        let p = policy();
        let mut w = World::new();
        w.hold_load(40, 0.0, 4, &p);
        // No samples at all.
        let empty = World::new();
        let d = empty.look(Observe::at(4), &p, empty.start);
        assert_eq!((d.desired, d.reason, d.recommendation), (4, Reason::StaleMetrics, None));
        // The newest sample is 10 s old.
        let d = w.look(Observe::at(4), &p, w.now() + 10 * S);
        assert_eq!((d.desired, d.reason), (4, Reason::StaleMetrics));
        // The newest scrape failed.
        let d = w.step(None, Observe::at(4), &p);
        assert_eq!((d.desired, d.reason, d.recommendation), (4, Reason::ScrapeFailed, None));
        // A failure in the stable window blocks a scale-down even once scrapes succeed again...
        let d = w.step(Some(0.0), Observe::at(4), &p);
        assert_eq!((d.desired, d.reason), (4, Reason::ScrapeFailed));
        // ...but not a scale-up.
        let d = w.step(Some(40.0), Observe::at(4), &p);
        assert_eq!((d.desired, d.reason), (5, Reason::Panic));
        // A lowered maximum applies even without metrics.
        let d = w.look(Observe::at(4), &ScalePolicy { max: 2, ..p.clone() }, w.now() + 10 * S);
        assert_eq!(d.desired, 2);
    }

    #[test]
    fn a_fresh_gateway_does_not_scale_down_before_its_history_covers_the_window() {
        let p = policy();
        let mut w = World::new();
        let d = w.hold_load(29, 0.0, 4, &p);
        assert_eq!((d.desired, d.reason), (4, Reason::Stabilizing));
        let d = w.hold_load(2, 0.0, 4, &p);
        assert_eq!(d.desired, 1, "{d:?}");
    }

    #[test]
    fn idle_replicas_go_to_zero_only_after_the_idle_time_and_come_back_on_a_request() {
        let p = ScalePolicy { min: 0, ..policy() };
        let mut w = World::new();
        // Busy until second 10, idle after.
        for _ in 0..10 {
            w.step(Some(1.0), Observe::at(1), &p);
        }
        let idle = Observe { last_active: Some(10), ..Observe::at(1) };
        for _ in 0..99 {
            let d = w.step(Some(0.0), idle, &p);
            assert!(d.desired == 1 && matches!(d.reason, Reason::KeepOne | Reason::Steady), "{d:?}");
            assert_eq!(d.recommendation, Some(1));
        }
        assert_eq!(w.step(Some(0.0), Observe { last_active: Some(11), ..idle }, &p).reason, Reason::KeepOne);
        let d = w.step(Some(0.0), idle, &p);
        assert_eq!((d.desired, d.reason), (0, Reason::ToZero), "idle 100 s at {:?}", w.now() - w.start);
        // Load without requests (a stream still running) keeps the replica.
        let d = w.step(Some(1.0), idle, &p);
        assert_eq!(d.desired, 1);
        // At zero nothing is measured and nothing changes...
        let zero = Observe { current: 0, ready: 0, held: 0, last_active: Some(10) };
        let d = w.step(Some(0.0), zero, &p);
        assert_eq!((d.desired, d.reason), (0, Reason::Steady));
        // ...until a request is held: up at once, however young the history.
        let d = World::new().look(Observe { held: 1, ..zero }, &p, w.now());
        assert_eq!((d.desired, d.reason), (1, Reason::FromZero));
        let d = World::new().look(Observe { held: 7, ..zero }, &p, w.now());
        assert_eq!(d.desired, 4, "seven held requests at target 2");
        // minReplicas > 0 brings a deployment at zero up with no request.
        let d = World::new().look(zero, &policy(), w.now());
        assert_eq!((d.desired, d.reason), (1, Reason::Bounds));
    }

    #[test]
    fn a_failed_scrape_in_the_window_keeps_an_idle_replica_from_going_to_zero() {
        let p = ScalePolicy { min: 0, ..policy() };
        let mut w = World::new();
        let idle = Observe { last_active: Some(0), ..Observe::at(1) };
        for _ in 0..99 {
            w.step(Some(0.0), idle, &p);
        }
        assert_eq!(w.step(None, idle, &p).reason, Reason::ScrapeFailed);
        // Idle long enough, but the stable window (20 s) holds the failure: the replica stays until it has passed.
        for _ in 0..20 {
            let d = w.step(Some(0.0), idle, &p);
            assert_eq!(d.desired, 1, "{d:?} at {:?}", w.now() - w.start);
        }
        let d = w.step(Some(0.0), idle, &p);
        assert_eq!((d.desired, d.reason), (0, Reason::ToZero));
    }

    #[test]
    fn bounds_win_over_everything() {
        let p = ScalePolicy { min: 2, max: 3, ..policy() };
        let mut w = World::new();
        let d = w.hold_load(40, 0.0, 2, &p);
        assert_eq!((d.desired, d.reason), (2, Reason::Bounds), "{d:?}");
        let d = w.step(Some(100.0), Observe::at(2), &p);
        assert_eq!((d.desired, d.reason), (3, Reason::Panic), "{d:?}");
        let d = w.hold_load(40, 100.0, 3, &p);
        assert_eq!((d.desired, d.reason), (3, Reason::Bounds), "held at the max: {d:?}");
        let d = w.step(Some(4.0), Observe::at(6), &p);
        assert_eq!((d.desired, d.reason), (3, Reason::Bounds), "above the max");
        let d = w.step(None, Observe::at(1), &p);
        assert_eq!((d.desired, d.reason), (2, Reason::Bounds), "below the min, even without metrics");
    }

    #[test]
    fn the_policy_comes_from_the_spec_with_documented_defaults() {
        let spec: AutoscalingSpec = serde_yaml::from_str("maxReplicas: 4\nminReplicas: 0\n").unwrap();
        let windows = Windows { stable: STABLE_WINDOW, panic: PANIC_WINDOW, stale_after: 3 * S };
        let p = ScalePolicy::from_spec(&spec, windows);
        assert_eq!((p.min, p.max, p.target), (0, 4, 2.0));
        assert_eq!(p.scale_down_stabilization, DEFAULT_SCALE_DOWN_STABILIZATION);
        assert_eq!(p.scale_to_zero_after, DEFAULT_SCALE_TO_ZERO_AFTER);
        assert_eq!(p.history(), DEFAULT_SCALE_DOWN_STABILIZATION);
    }
}
