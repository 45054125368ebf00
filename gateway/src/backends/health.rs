//! Passive and active health of one backend: ready by its last `/ready` probe; ejected after
//! [`EJECT_AFTER_FAILURES`] consecutive failed requests for a backoff that doubles with each ejection in a row
//! (up to [`MAX_BACKOFF`]); after the backoff a successful probe readmits it half-open — the first failure then
//! ejects it again at once — and a successful request closes the circuit.

use std::time::{Duration, Instant};

/// Consecutive failed requests that eject a backend.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// The first ejection's length.
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);
/// The longest ejection.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One backend's health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The last `/ready` probe's answer (`None` before the first).
    pub ready: Option<bool>,
    /// Failed requests in a row.
    pub failures: u32,
    /// Ejected until then.
    pub ejected_until: Option<Instant>,
    /// Ejections in a row (the backoff's exponent).
    pub ejections: u32,
}

impl Health {
    /// Ready by its last probe and not ejected now.
    pub fn routable(&self, now: Instant) -> bool {
        self.ready == Some(true) && self.ejected_until.is_none_or(|until| now >= until)
    }

    /// A probe answered: readiness is its answer. A probe that finds an ejected backend ready after its backoff
    /// readmits it half-open (one more failure ejects it).
    pub fn probed(&mut self, ready: bool, now: Instant) {
        self.ready = Some(ready);
        if ready && self.ejected_until.is_some_and(|until| now >= until) {
            self.ejected_until = None;
            self.failures = EJECT_AFTER_FAILURES - 1;
        }
    }

    /// A request succeeded (its response head came back without a server error).
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.ejections = 0;
        self.ejected_until = None;
    }

    /// A request failed (no answer, or a 5xx). Returns true when this failure ejects the backend.
    pub fn failed(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.failures < EJECT_AFTER_FAILURES || self.ejected_until.is_some_and(|until| now < until) {
            return false;
        }
        let backoff = BASE_BACKOFF.saturating_mul(1u32 << self.ejections.min(5)).min(MAX_BACKOFF);
        self.ejected_until = Some(now + backoff);
        self.ejections = self.ejections.saturating_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_backend_is_routable_only_once_a_probe_found_it_ready() {
        let now = Instant::now();
        let mut h = Health::default();
        assert!(!h.routable(now));
        h.probed(true, now);
        assert!(h.routable(now));
        h.probed(false, now);
        assert!(!h.routable(now));
    }

    #[test]
    fn failures_eject_with_doubling_backoff_and_a_probe_readmits_half_open() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.probed(true, t0);
        assert!(!h.failed(t0));
        assert!(!h.failed(t0));
        assert!(h.failed(t0), "the third failure in a row ejects");
        assert!(!h.routable(t0));
        assert!(!h.routable(t0 + Duration::from_millis(999)));
        // After the backoff a ready probe readmits it; one failure ejects again, for twice as long.
        let t1 = t0 + BASE_BACKOFF;
        h.probed(true, t1);
        assert!(h.routable(t1));
        assert!(h.failed(t1));
        assert_eq!(h.ejected_until, Some(t1 + 2 * BASE_BACKOFF));
        // A success closes the circuit.
        let t2 = t1 + 2 * BASE_BACKOFF;
        h.probed(true, t2);
        h.succeeded();
        assert!(!h.failed(t2) && !h.failed(t2) && h.failed(t2));
        assert_eq!(h.ejected_until, Some(t2 + BASE_BACKOFF), "the backoff starts over after a success");
    }

    #[test]
    fn the_backoff_is_capped() {
        let mut now = Instant::now();
        let mut h = Health { ready: Some(true), failures: EJECT_AFTER_FAILURES, ..Health::default() };
        for _ in 0..10 {
            h.failed(now);
            now = h.ejected_until.unwrap();
            h.probed(true, now);
        }
        h.failed(now);
        assert_eq!(h.ejected_until, Some(now + MAX_BACKOFF));
    }
}
