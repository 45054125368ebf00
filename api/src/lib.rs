//! Shared types and names of Baleen. No I/O lives here.
//!
//! - [`names`]: every environment variable, model-source scheme and (later) label, field manager and metric
//!   name that more than one component reads. Names are constants in one place so they never drift.
//!
//! The OpenAI wire types (`openai`), the `ModelDeployment` CRD (`crd`) and the replica-group topology
//! (`topology`) join this crate with the serving, operator and expert-parallel issues that need them.

pub mod names;
