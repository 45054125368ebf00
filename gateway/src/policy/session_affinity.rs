//! `session-affinity`: every request of a session — the `--session-header` value, else the body's `user` — goes
//! to the same backend while it is routable (rendezvous hashing, so a backend that leaves moves only its own
//! sessions). Requests without a session go by least load.

use super::PolicyKind;
use super::{Candidate, LeastLoad, Policy, RouteKey, rendezvous_order};

/// See the module docs.
#[derive(Debug, Default)]
pub struct SessionAffinity {
    fallback: LeastLoad,
}

impl Policy for SessionAffinity {
    fn kind(&self) -> PolicyKind {
        PolicyKind::SessionAffinity
    }

    fn pick(&self, candidates: &[Candidate], key: &RouteKey) -> Option<usize> {
        match key.session {
            Some(session) => rendezvous_order(candidates, session).first().copied(),
            None => self.fallback.choose(candidates),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::policy::tests::candidates;

    #[test]
    fn a_session_sticks_to_its_backend_even_under_load() {
        let p = SessionAffinity::default();
        let mut c = candidates(&[0.0, 0.0, 0.0]);
        let key = RouteKey { prefix: None, session: Some(7) };
        let home = p.pick(&c, &key).unwrap();
        c[home].score = 50.0;
        c[home].in_flight = 50;
        assert_eq!(p.pick(&c, &key), Some(home));
        let none = RouteKey::default();
        assert_ne!(p.pick(&c, &none), Some(home), "without a session, least load");
    }
}
