//! Autoscaling: each autoscaled model's load, sampled every scrape interval, turned into a replica count by the
//! pure [`decide`] and handed to an [`Actuator`] (`baleen up` starts and stops runtime groups).

pub mod decide;

pub use decide::{Decision, Reason, ScalePolicy, Windows, decide};
