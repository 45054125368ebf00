//! Every model the gateway serves ([`Registry`]): per model a [`Pool`] of backends and the routing policy that
//! picks among them.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::autoscale::hold::Hold;
use crate::backends::Backend;
use crate::policy::{self, Candidate, Policy, PolicyKind};

/// A request's candidate backends: a model's few replicas are kept on the stack (more spill to the heap).
pub type Candidates = smallvec::SmallVec<[Candidate; 8]>;

/// A model's backends and its routing policy.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub policy: Box<dyn Policy>,
    backends: RwLock<Vec<Arc<Backend>>>,
    /// Requests waiting for a ready backend (autoscaled models), and the time of the last request.
    pub hold: Arc<Hold>,
}

impl Pool {
    fn new(name: String, kind: PolicyKind, backends: Vec<Arc<Backend>>, hold: Arc<Hold>) -> Self {
        Self { name, policy: policy::new(kind), backends: RwLock::new(backends), hold }
    }

    /// Every backend, routable or not.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Backends ready and not ejected now.
    pub fn routable(&self, now: Instant) -> Vec<Arc<Backend>> {
        self.backends().into_iter().filter(|b| b.routable(now)).collect()
    }

    /// The backends a request may go to now — ready, not ejected, not in `tried` — scored for the policy (stale
    /// samples after `stale_after`).
    pub fn candidates(&self, now: Instant, stale_after: Duration, tried: &[u64]) -> Candidates {
        let backends = self.backends.read().unwrap_or_else(PoisonError::into_inner);
        backends
            .iter()
            .filter(|b| !tried.contains(&b.id) && b.routable(now))
            .map(|b| Candidate { score: b.score(now, stale_after), in_flight: b.in_flight(), backend: Arc::clone(b) })
            .collect()
    }

    /// Replaces the backend list; backends that stay keep their state. Returns the removed ones.
    fn set_backends(&self, urls: &[String]) -> Vec<Arc<Backend>> {
        let mut backends = self.backends.write().unwrap_or_else(PoisonError::into_inner);
        let mut old: BTreeMap<String, Arc<Backend>> = backends.drain(..).map(|b| (b.url.clone(), b)).collect();
        for url in urls {
            let backend = old.remove(url).unwrap_or_else(|| Arc::new(Backend::new(url.clone())));
            backends.push(backend);
        }
        old.into_values().collect()
    }
}

/// Every model the gateway serves.
#[derive(Debug, Default)]
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<Pool>>>,
}

impl Registry {
    /// Adds `name` or updates it: its policy (a change starts the policy afresh) and its backend URLs (normalized
    /// `http://host:port`). Returns the backends that left, so callers can drop their metric series.
    pub fn set_model(&self, name: &str, kind: PolicyKind, urls: &[String]) -> Vec<Arc<Backend>> {
        let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
        let pool = match models.get(name).cloned() {
            Some(pool) if pool.policy.kind() == kind => pool,
            existing => {
                let (backends, hold) = existing.map(|old| (old.backends(), Arc::clone(&old.hold))).unwrap_or_default();
                let pool = Arc::new(Pool::new(name.to_string(), kind, backends, hold));
                models.insert(name.to_string(), pool.clone());
                pool
            }
        };
        pool.set_backends(urls)
    }

    /// Removes a model; returns its backends.
    pub fn remove_model(&self, name: &str) -> Vec<Arc<Backend>> {
        let removed = self.models.write().unwrap_or_else(PoisonError::into_inner).remove(name);
        removed.map(|pool| pool.backends()).unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pool>> {
        self.models.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    /// Every model, in name order.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.models.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// The configured model names, in order, for messages.
    pub fn names(&self) -> Vec<String> {
        self.models.read().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn updating_a_model_keeps_the_state_of_backends_that_stay() {
        let registry = Registry::default();
        let urls = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        registry.set_model("m", PolicyKind::LeastLoad, &urls(&["http://a:1", "http://b:1"]));
        let pool = registry.get("m").unwrap();
        pool.backends()[0].begin();
        let removed = registry.set_model("m", PolicyKind::LeastLoad, &urls(&["http://a:1", "http://c:1"]));
        assert_eq!(removed.iter().map(|b| b.url.as_str()).collect::<Vec<_>>(), ["http://b:1"]);
        let pool = registry.get("m").unwrap();
        assert_eq!(pool.backends()[0].in_flight(), 1, "a stays with its in-flight count");
        registry.set_model("m", PolicyKind::RoundRobin, &urls(&["http://a:1"]));
        let pool = registry.get("m").unwrap();
        assert_eq!(pool.policy.kind(), PolicyKind::RoundRobin);
        assert_eq!(pool.backends()[0].in_flight(), 1, "a policy change keeps backends too");
        assert_eq!(registry.remove_model("m").len(), 1);
        assert!(registry.get("m").is_none());
    }
}
