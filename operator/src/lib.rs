//! The Baleen operator: reconciles `ModelDeployment` resources (`baleen.dev/v1alpha1`) into replica groups of
//! expert-parallel runtime ranks.
//!
//! - [`resources`]: pure builders — every object the operator creates for one ModelDeployment, with no I/O
//!   (`baleen-operator render` prints them).
//! - [`plan`]: pure decisions — which groups to create and delete for scaling and group-by-group rollouts.
//! - [`status`]: pure status — conditions, ready groups and endpoints from the observed StatefulSets and pods.
//! - [`controller`]: the kube-rs controller that applies the above with server-side apply, records Events and
//!   writes status; [`leader`] elects one active replica through a Lease; [`metrics`] serves `/metrics` and
//!   `/healthz`.

pub mod config;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod render;
pub mod resources;
pub mod status;

pub use config::OperatorConfig;
pub use error::{Error, Result};
