//! Routing policies: one trait, one file per policy, chosen per model in the static file.
//!
//! A policy picks among the *candidates* — the model's backends that are ready, not ejected and not yet tried
//! for this request — each with its load score (see `Backend::score`) and the gateway's in-flight count.

mod least_load;
mod prefix_affinity;
mod round_robin;
mod session_affinity;

use std::sync::Arc;

pub use least_load::LeastLoad;
pub use prefix_affinity::PrefixAffinity;
pub use round_robin::RoundRobin;
pub use session_affinity::SessionAffinity;

use crate::backends::Backend;

/// The routing policies a model can name (the ModelDeployment's `spec.routing.policy`, the static file's
/// `policy`).
pub use baleen_api::crd::RoutingPolicy as PolicyKind;

/// A backend the request may go to, with its load now.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub backend: Arc<Backend>,
    /// The least-load score (lower is better).
    pub score: f64,
    /// Requests the gateway has in flight on it.
    pub in_flight: usize,
}

/// What of a request the affinity policies key on (hashes, so no prompt text is kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteKey {
    /// Hash of the prompt's leading text.
    pub prefix: Option<u64>,
    /// Hash of the session (header or `user`).
    pub session: Option<u64>,
}

/// A routing policy.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// Which one it is.
    fn kind(&self) -> PolicyKind;
    /// The index of the chosen candidate; `None` only when there are none.
    fn pick(&self, candidates: &[Candidate], key: &RouteKey) -> Option<usize>;
}

/// The policy of `kind`.
pub fn new(kind: PolicyKind) -> Box<dyn Policy> {
    match kind {
        PolicyKind::LeastLoad => Box::new(LeastLoad::default()),
        PolicyKind::PrefixAffinity => Box::new(PrefixAffinity::default()),
        PolicyKind::SessionAffinity => Box::new(SessionAffinity::default()),
        PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
    }
}

/// The candidate with the lowest score; ties go to the first at or after `start` (callers rotate it, so equal
/// backends share the load).
fn lowest_score(candidates: &[Candidate], start: usize) -> Option<usize> {
    let n = candidates.len();
    (0..n).map(|i| (start + i) % n).min_by(|&a, &b| candidates[a].score.total_cmp(&candidates[b].score))
}

/// splitmix64's finalizer: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The candidates in rendezvous (highest-random-weight) order for `key`: consistent hashing — each key has a
/// fixed preference order over backends, and adding or removing one moves only the keys it wins or held.
fn rendezvous_order(candidates: &[Candidate], key: u64) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> =
        candidates.iter().enumerate().map(|(i, c)| (mix(key ^ mix(c.backend.id)), i)).collect();
    order.sort_unstable_by_key(|&(weight, _)| std::cmp::Reverse(weight));
    order.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Candidates named `http://b{i}:1` with the given scores (in-flight = score).
    pub(crate) fn candidates(scores: &[f64]) -> Vec<Candidate> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &score)| Candidate {
                backend: Arc::new(Backend::new(format!("http://b{i}:1"))),
                score,
                in_flight: score as usize,
            })
            .collect()
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_removed_backend() {
        let all = candidates(&[0.0; 5]);
        let fewer: Vec<Candidate> = all.iter().filter(|c| c.backend.url != "http://b2:1").cloned().collect();
        let mut moved = 0;
        for key in 0..1000u64 {
            let before = &all[rendezvous_order(&all, key)[0]].backend.url;
            let after = &fewer[rendezvous_order(&fewer, key)[0]].backend.url;
            if before != after {
                assert_eq!(before, "http://b2:1", "only keys of the removed backend move");
                moved += 1;
            }
        }
        assert!((120..=280).contains(&moved), "about a fifth of the keys were on b2: {moved}");
    }

    #[test]
    fn every_kind_builds_its_policy() {
        for kind in
            [PolicyKind::LeastLoad, PolicyKind::PrefixAffinity, PolicyKind::SessionAffinity, PolicyKind::RoundRobin]
        {
            assert_eq!(new(kind).kind(), kind);
            assert_eq!(new(kind).pick(&[], &RouteKey::default()), None);
        }
    }
}
