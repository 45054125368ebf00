//! `status` of a `ModelDeployment`, written by the operator through the status subresource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde::{Deserialize, Serialize};

/// What the operator observed. `replicas` and `selector` back the `scale` subresource, so `kubectl scale`, HPA,
/// KEDA and the gateway read the same numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replica groups that exist, of any revision.
    #[serde(default)]
    pub replicas: u32,
    /// Groups whose every rank is ready.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Groups at the current revision of the spec.
    #[serde(default)]
    pub updated_replicas: u32,
    /// Ranks (pods) per group: `spec.parallelism.expert`.
    #[serde(default)]
    pub ranks_per_replica: u32,
    /// Label selector (string form) of the head pods, for the `scale` subresource and autoscalers.
    #[serde(default)]
    pub selector: String,
    /// Hash of the spec fields that shape a group's pods; groups of another revision are rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// `Available`, `Progressing` and `Degraded`, with reasons such as `InvalidSpec`, `ModelLoadFailed`,
    /// `Unschedulable` and `RankMissing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// `host:port` of every ready head (the OpenAI API of each ready group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Facts about the model, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
}

/// `status.model`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// `architectures[0]` of the checkpoint's config, e.g. `DeepseekV3ForCausalLM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Routed experts of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_experts: Option<u32>,
    /// Routed experts each rank holds (before redundant copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts_per_rank: Option<u32>,
    /// Bytes of latent KV cache one token takes, summed over layers, at the deployment's dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_bytes_per_token: Option<u64>,
}
