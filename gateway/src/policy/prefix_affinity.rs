//! `prefix-affinity`: requests whose prompts share their leading text (the first `--prefix-bytes` of the
//! messages' roles and text, chat-template-agnostic) go to the same backend, whose prefix cache then holds it —
//! consistent (rendezvous) hashing with bounded load: the preferred backend takes the request unless that would
//! put it above [`LOAD_FACTOR`] × the average in-flight load plus [`SLACK`] requests, and then the next in the key's order does, so a hot
//! prefix spills over instead of piling onto one replica. Requests without a prompt key go by least load.

use super::PolicyKind;
use super::{Candidate, LeastLoad, Policy, RouteKey, rendezvous_order};

/// How far above the average in-flight load a backend may go to keep its prefixes (1.25: 25 %).
pub const LOAD_FACTOR: f64 = 1.25;
/// Requests a backend may take above the bound of [`LOAD_FACTOR`] (at low load the average is tiny, and the
/// bound alone would split two concurrent requests of one prefix).
pub const SLACK: f64 = 2.0;

/// See the module docs.
#[derive(Debug, Default)]
pub struct PrefixAffinity {
    fallback: LeastLoad,
}

/// Bounded-load choice along `key`'s preference order: the first candidate whose in-flight count stays within
/// `factor` × the average (this request included) plus [`SLACK`]; the first in order when none does (cannot
/// happen: the least loaded is at most the average).
pub(super) fn bounded(candidates: &[Candidate], key: u64, factor: f64) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    let total: usize = candidates.iter().map(|c| c.in_flight).sum();
    let bound = ((total + 1) as f64 / candidates.len() as f64 * factor).ceil() + SLACK;
    let order = rendezvous_order(candidates, key);
    order.iter().copied().find(|&i| (candidates[i].in_flight + 1) as f64 <= bound).or(order.first().copied())
}

impl Policy for PrefixAffinity {
    fn kind(&self) -> PolicyKind {
        PolicyKind::PrefixAffinity
    }

    fn pick(&self, candidates: &[Candidate], key: &RouteKey) -> Option<usize> {
        match key.prefix {
            Some(prefix) => bounded(candidates, prefix, LOAD_FACTOR),
            None => self.fallback.choose(candidates),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::policy::tests::candidates;

    fn key(prefix: u64) -> RouteKey {
        RouteKey { prefix: Some(prefix), session: None }
    }

    #[test]
    fn one_prefix_always_goes_to_one_backend_and_prefixes_spread() {
        let p = PrefixAffinity::default();
        let idle = candidates(&[0.0, 0.0, 0.0, 0.0]);
        let mut used = [0usize; 4];
        for prefix in 0..400u64 {
            let first = p.pick(&idle, &key(prefix)).unwrap();
            assert_eq!(p.pick(&idle, &key(prefix)), Some(first));
            used[first] += 1;
        }
        assert!(used.iter().all(|&n| n > 60), "keys spread over every backend: {used:?}");
    }

    #[test]
    fn a_hot_prefix_spills_over_when_its_backend_is_loaded() {
        let p = PrefixAffinity::default();
        let idle = candidates(&[0.0, 0.0, 0.0]);
        let home = p.pick(&idle, &key(42)).unwrap();
        let mut loaded = idle.clone();
        loaded[home].in_flight = 8;
        let other = p.pick(&loaded, &key(42)).unwrap();
        assert_ne!(other, home, "8 in flight against an average of 3 is over the bound of 4 + 2");
        loaded[home].in_flight = 1;
        assert_eq!(p.pick(&loaded, &key(42)), Some(home), "a little load keeps the affinity");
    }
}
