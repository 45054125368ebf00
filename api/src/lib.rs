//! Shared types and names of Baleen. No I/O lives here.
//!
//! - [`names`]: every environment variable, model-source scheme, metric and label name (and later field manager)
//!   that more than one component reads. Names are constants in one place so they never drift.
//! - [`openai`]: the OpenAI API wire types (chat completions, completions, models, errors) with the vLLM
//!   extensions the runtime and the gateway accept.
//! - [`crd`]: the `ModelDeployment` resource as plain serde types, its manifest and validation, and
//!   [`crd::ModelSource`] (where the weights come from).
//!
//! The kube `CustomResource` derive on the CRD types and the replica-group topology (`topology`) join this crate
//! with the operator and expert-parallel issues that need them.

pub mod crd;
pub mod names;
pub mod openai;
