//! `least-load` (the default): the candidate with the lowest load score — the gateway's in-flight requests and
//! the backend's scraped queue, running batch and KV-cache use; stale metrics count as saturated. Ties rotate.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::PolicyKind;
use super::{Candidate, Policy, RouteKey, lowest_score};

/// See the module docs.
#[derive(Debug, Default)]
pub struct LeastLoad {
    ties: AtomicUsize,
}

impl LeastLoad {
    /// The pick, usable by the affinity policies as their fallback.
    pub fn choose(&self, candidates: &[Candidate]) -> Option<usize> {
        lowest_score(candidates, self.ties.fetch_add(1, Ordering::Relaxed))
    }
}

impl Policy for LeastLoad {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LeastLoad
    }

    fn pick(&self, candidates: &[Candidate], _: &RouteKey) -> Option<usize> {
        self.choose(candidates)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::backends::SATURATED;
    use crate::policy::tests::candidates;

    #[test]
    fn the_least_loaded_backend_wins_and_ties_rotate() {
        let p = LeastLoad::default();
        assert_eq!(p.pick(&candidates(&[3.0, 1.0, 2.0]), &RouteKey::default()), Some(1));
        let tied = candidates(&[1.0, 1.0, 5.0]);
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&tied, &RouteKey::default()).unwrap()).collect();
        assert!(picks.contains(&0) && picks.contains(&1) && !picks.contains(&2), "{picks:?}");
    }

    #[test]
    fn a_saturated_backend_is_chosen_only_when_all_are() {
        let p = LeastLoad::default();
        assert_eq!(p.pick(&candidates(&[SATURATED, 50.0]), &RouteKey::default()), Some(1));
        assert!(p.pick(&candidates(&[SATURATED, SATURATED + 1.0]), &RouteKey::default()).is_some());
    }
}
