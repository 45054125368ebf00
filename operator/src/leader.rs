//! Leader election: the operator runs its controller only while it holds the Lease
//! [`baleen_api::names::OPERATOR_LEASE_NAME`]; the elector lives in `baleen_api::lease`, shared with the gateway.

pub use baleen_api::lease::{
    Decision, LEASE_DURATION, LeaderElector, LeaseError, RENEW_DEADLINE, RENEW_INTERVAL, RETRY_INTERVAL, decide,
};

#[cfg(test)]
mod tests;
