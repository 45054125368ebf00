//! `round-robin`: each candidate in turn, regardless of load — the baseline the others are measured against.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::PolicyKind;
use super::{Candidate, Policy, RouteKey};

/// See the module docs.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn kind(&self) -> PolicyKind {
        PolicyKind::RoundRobin
    }

    fn pick(&self, candidates: &[Candidate], _: &RouteKey) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % candidates.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::policy::tests::candidates;

    #[test]
    fn each_backend_in_turn_whatever_its_load() {
        let c = candidates(&[0.0, 100.0, 5.0]);
        let p = RoundRobin::default();
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&c, &RouteKey::default()).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
