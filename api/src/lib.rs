//! Shared types and names of Baleen. No I/O lives here, but for the opt-in `lease` feature.
//!
//! - [`names`]: every environment variable, model-source scheme, metric and label name (and later field manager)
//!   that more than one component reads. Names are constants in one place so they never drift.
//! - [`openai`]: the OpenAI API wire types (chat completions, completions, models, errors) with the vLLM
//!   extensions the runtime and the gateway accept.
//! - `crd` (feature `crd`): the `ModelDeployment` resource as plain serde types, its manifest and validation,
//!   `ModelSource` (where the weights come from) and the runtime command line both launchers build; with feature
//!   `kube` also the kube `CustomResource` (the CRD).
//!
//! - `http` (feature `http`): the OpenAI HTTP edge shared by the runtime and the gateway — `ApiError` rendered
//!   as OpenAI JSON, body limits, JSON parsing, SSE framing.
//! - `lease` (feature `lease`): leader election through a Lease (the operator's controller, the gateway's
//!   autoscaler writes) — the one module here that does I/O, against the Kubernetes API.
//! - [`source`]: `ModelSource`, where a model's weights come from (`hf://`, `pvc://`, `file://`, `builtin:`), parsed
//!   once for the runtime, `baleen up` and the operator.
//! - [`topology`]: replica-group topology — which rank holds which routed experts, redundant replicas.
//!

#[cfg(feature = "crd")]
pub mod crd;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "lease")]
pub mod lease;
pub mod names;
pub mod openai;
pub mod source;
pub mod topology;
