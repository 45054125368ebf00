//! The `ModelDeployment` resource (group `baleen.dev`, version `v1alpha1`) as plain serde types.
//!
//! ```yaml
//! apiVersion: baleen.dev/v1alpha1
//! kind: ModelDeployment
//! metadata:
//!   name: tiny
//! spec:
//!   model:
//!     source: builtin:tiny-moe     # hf://org/name[@rev] | pvc://claim/path | file:///path | builtin:NAME
//!     servedName: tiny-moe         # default: derived from the source
//!     dtype: f32                   # f32 | bf16 | f16
//!   replicas: 1
//!   parallelism:
//!     expert: 1                    # ranks (pods) per replica; the routed experts are split across them
//!     dataParallelAttention: false
//!   runtime:
//!     maxNumSeqs: 64
//!     maxModelLen: 4096
//!     kvCacheMemory: "1GiB"        # a size, or a fraction of device memory such as "0.2"
//!     args: ["--max-num-batched-tokens", "4096"]
//!     env: [{name: BALEEN_RUNTIME_LOG, value: debug}]
//! ```
//!
//! Spec structs refuse unknown fields, so a misspelt field is an error that names it rather than a setting that
//! silently does nothing. Fields are camelCase; every field but `spec.model.source` is optional, and its default is
//! documented on it. The types are derive-only (no hand-written `Deserialize`) so the kube `CustomResource` derive
//! can be added to [`ModelDeploymentSpec`] behind a feature.
//!
//! [`ModelDeploymentManifest`] is one YAML document as a user writes it (`kubectl apply -f`, `baleen up FILE`).

mod command;
mod status;

use std::collections::BTreeMap;

pub use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use serde::{Deserialize, Serialize};

pub use crate::source::{ModelSource, SourceError};
pub use command::{Launcher, Peers, RESERVED_FLAGS};
pub use status::{ModelDeploymentStatus, ModelStatus};

use crate::names::{
    BUILTIN_SCHEME, BUILTIN_TINY_MOE, BUILTIN_TINY_MOE_ROUTED_EXPERTS, CRD_API_VERSION, CRD_KIND, FLAG_DTYPE,
    FLAG_KV_CACHE_MEMORY, FLAG_MAX_MODEL_LEN, FLAG_MAX_NUM_SEQS, FLAG_SERVED_MODEL_NAME,
};

/// Replicas when `spec.replicas` is absent.
pub const DEFAULT_REPLICAS: u32 = 1;
/// Ranks per replica when `spec.parallelism.expert` is absent.
pub const DEFAULT_EXPERT_PARALLELISM: u32 = 1;
/// Groups above `replicas` during a rollout when `spec.rollout.maxSurge` is absent.
pub const DEFAULT_MAX_SURGE: u32 = 1;
/// Longest `metadata.name`: the rank pods are named `NAME-<revision>-<group>-<rank>` and every name derived from
/// it must stay a 63-character DNS label.
pub const MAX_NAME_LEN: usize = 40;

/// One model, served by `replicas` groups of `parallelism.expert` ranks (pods).
// With the `crd` feature this is also the kube `CustomResource` `ModelDeployment`: its schema, the CEL rules the
// API server checks, the `status` and `scale` subresources and the `kubectl get` columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, kube::KubeSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "baleen.dev",
        version = "v1alpha1",
        kind = "ModelDeployment",
        plural = "modeldeployments",
        shortname = "md",
        namespaced,
        status = "ModelDeploymentStatus",
        derive = "PartialEq",
        doc = "One Mixture-of-Experts model served by replica groups of expert-parallel runtime ranks.",
        scale(
            spec_replicas_path = ".spec.replicas",
            status_replicas_path = ".status.replicas",
            label_selector_path = ".status.selector"
        ),
        printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.source"),
        printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
        printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
        printcolumn(name = "EP", type_ = "integer", json_path = ".status.ranksPerReplica"),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
        validation = Rule::new("self.metadata.name.size() <= 40")
            .message("metadata.name must be at most 40 characters (the names of its pods derive from it)")
    )
)]
#[cfg_attr(all(feature = "kube", test), x_kube(cel))]
#[cfg_attr(
    feature = "kube",
    x_kube(validation = Rule::new(
        "!self.model.source.startsWith('builtin:tiny-moe') || !has(self.parallelism) || \
         !has(self.parallelism.expert) || 16 % self.parallelism.expert == 0"
    ).message("builtin:tiny-moe has 16 routed experts: parallelism.expert must divide 16")),
    x_kube(validation = Rule::new(
        "!has(self.model.routedExperts) || !has(self.parallelism) || !has(self.parallelism.expert) || \
         self.model.routedExperts % self.parallelism.expert == 0"
    ).message("parallelism.expert must divide model.routedExperts"))
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelDeploymentSpec {
    /// The model to serve (required).
    pub model: ModelSpec,
    /// Replica groups to run. Default 1; 0 stops every group (scale to zero) and keeps the resource. This is the
    /// field the `scale` subresource, `kubectl scale` and autoscalers change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(extend("default" = 1)))]
    pub replicas: Option<u32>,
    /// How one replica is split across ranks. Default: one rank holding every expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<ParallelismSpec>,
    /// Settings of the runtime processes. Default: the runtime's own defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeSpec>,
    /// Where the rank pods may run. Default: anywhere the scheduler likes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,
    /// Automatic scaling of `replicas` by the gateway. Default: none (`replicas` is left as set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// How a spec change is rolled out. Default: one extra group at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// How the gateway spreads requests over the replicas. Default: least load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingSpec>,
}

/// `spec.routing`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingSpec {
    /// The gateway's policy for this model. Default `least-load`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<RoutingPolicy>,
}

/// `spec.routing.policy`: how the gateway picks a replica (a head) for each request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RoutingPolicy {
    /// The replica with the least load: the gateway's requests in flight there and the replica's scraped queue,
    /// running batch and KV-cache use.
    #[default]
    LeastLoad,
    /// Requests whose prompts share their leading text go to the same replica (its prefix cache is warm), unless
    /// it is loaded well above the average: then the next replica in the prompt's hash order takes it.
    PrefixAffinity,
    /// Requests of one session (the gateway's session header, else the body's `user`) go to the same replica.
    SessionAffinity,
    /// Each replica in turn: the baseline.
    RoundRobin,
}

impl RoutingPolicy {
    /// The spelling of manifests and the gateway's static file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastLoad => "least-load",
            Self::PrefixAffinity => "prefix-affinity",
            Self::SessionAffinity => "session-affinity",
            Self::RoundRobin => "round-robin",
        }
    }
}

/// `spec.model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// Where the weights come from (required): `hf://org/name[@revision]`, `pvc://claim/path`, `file:///path` or
    /// `builtin:NAME` (`builtin:tiny-moe` is a random-weight demo model). See [`ModelSource`].
    #[cfg_attr(feature = "kube", schemars(length(min = 1)))]
    pub source: String,
    /// The name clients send as `model` in API requests. Default: the runtime's choice — `NAME` for
    /// `builtin:NAME`, otherwise the model path as the runtime sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    /// Compute and KV-cache dtype. Default `f32` (the runtime's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// Name of a Secret in the same namespace whose key `HF_TOKEN` is the Hugging Face token used to download an
    /// `hf://` model (gated or private repositories). Default: download anonymously.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_token_secret: Option<String>,
    /// The checkpoint's number of routed experts (`n_routed_experts` in its config.json), when you want the API
    /// server to check that `parallelism.expert` divides it. Optional; the runtime checks it again at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub routed_experts: Option<u32>,
}

/// `spec.model.dtype`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl Dtype {
    /// The spelling the manifest and the runtime's `--dtype` flag use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// `spec.parallelism`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParallelismSpec {
    /// Ranks (pods) per replica; each owns a shard of the routed experts. Default 1. Must be at least 1 and
    /// divide the model's number of routed experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1, max = 1024)))]
    pub expert: Option<u32>,
    /// Every rank runs attention and the HTTP API for its own requests (data-parallel attention), instead of
    /// rank 0 alone. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel_attention: Option<bool>,
    /// Extra copies of hot experts: each entry places one more copy of `expert` on `rank` of every group
    /// (`--replicate EXPERT@RANK`). Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redundant_experts: Vec<RedundantExpert>,
}

/// One entry of `spec.parallelism.redundantExperts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedundantExpert {
    /// Routed expert index (0-based).
    pub expert: u32,
    /// Rank that holds the extra copy (0-based, below `parallelism.expert`).
    pub rank: u32,
}

/// `spec.runtime`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeSpec {
    /// Container image of the runtime. Default: the image the operator was installed with. Ignored by
    /// `baleen up`, which runs the local `baleen-runtime` binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// GPUs (`nvidia.com/gpu`) each rank pod requests. Default 0: the rank computes on CPU. Ignored by `baleen up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_rank: Option<u32>,
    /// CPU and memory requests and limits of each rank's runtime container, as in a Pod. Default none.
    /// Ignored by `baleen up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Sequences in the running batch at most (`--max-num-seqs`). Default: the runtime's (64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub max_num_seqs: Option<u32>,
    /// Prompt plus generated tokens of one request at most (`--max-model-len`). Default: the model's
    /// `max_position_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub max_model_len: Option<u32>,
    /// Memory for the latent KV cache (`--kv-cache-memory`): a size such as `"4GiB"` or `"512MiB"`, or a fraction
    /// of device memory such as `"0.2"` (quote it). Default: the runtime's (1GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_memory: Option<String>,
    /// Extra `baleen-runtime serve` flags, appended after the ones the fields above produce. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables of the runtime processes, as in a Pod (`value` or `valueFrom`). Default none.
    /// `baleen up` takes only `value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

/// `spec.scheduling`: placed on every rank pod as in a Pod spec. Ignored by `baleen up`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SchedulingSpec {
    /// Node labels a rank's node must have. Default none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the rank pods tolerate. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the rank pods. Default: the cluster's default priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// `spec.autoscaling`: the gateway changes `spec.replicas` between `minReplicas` and `maxReplicas` so that
/// `metric` per ready replica stays near `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(kube::KubeSchema))]
#[cfg_attr(
    feature = "kube",
    x_kube(
        validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas")
            .message("minReplicas must not exceed maxReplicas"),
        validation = Rule::new("!has(self.target) || self.target > 0.0").message("target must be above 0")
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalingSpec {
    /// Fewest replicas. Default 1; 0 lets the deployment scale to zero when idle (the gateway holds the first
    /// request while a replica starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u32>,
    /// Most replicas (required, at least 1).
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub max_replicas: u32,
    /// What is measured. Default `QueueDepth` (waiting requests per ready replica).
    #[serde(default)]
    pub metric: AutoscalingMetric,
    /// Desired value of `metric` per ready replica (above 0): e.g. 2 waiting requests, 8 running requests, or 0.7
    /// KV-cache use. Default 2 (the default metric's target).
    #[serde(default = "default_target")]
    pub target: f64,
    /// Seconds a higher recommendation must hold before scaling up. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up_stabilization_seconds: Option<u32>,
    /// Seconds a lower recommendation must hold before scaling down. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_stabilization_seconds: Option<u32>,
    /// Seconds without any request before scaling from 1 to 0 when `minReplicas` is 0. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after_seconds: Option<u32>,
}

/// The default `spec.autoscaling.target`: 2 waiting requests per ready replica.
pub const DEFAULT_AUTOSCALING_TARGET: f64 = 2.0;

fn default_target() -> f64 {
    DEFAULT_AUTOSCALING_TARGET
}

/// `spec.autoscaling.metric`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(kube::KubeSchema))]
#[cfg_attr(
    feature = "kube",
    x_kube(validation = Rule::new("(self.type == 'PromQL') == has(self.query)")
        .message("query is required with type PromQL and only allowed with it"))
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalingMetric {
    /// `QueueDepth` (`vllm:num_requests_waiting`), `KVCacheUtilization` (`vllm:kv_cache_usage_perc`),
    /// `RunningRequests` (`vllm:num_requests_running`), each averaged over ready replicas, or `PromQL`.
    #[serde(rename = "type")]
    pub kind: MetricKind,
    /// With `PromQL`: an expression whose value (one number) is the per-replica load; `$model` in it stands for
    /// the served model name. Required then, refused otherwise; needs the gateway's `--prometheus-url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

impl Default for AutoscalingMetric {
    /// `QueueDepth`.
    fn default() -> Self {
        Self { kind: MetricKind::QueueDepth, query: None }
    }
}

/// `spec.autoscaling.metric.type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum MetricKind {
    /// Waiting requests per replica (the default).
    #[default]
    QueueDepth,
    /// KV-cache usage (0..1) per replica.
    #[serde(rename = "KVCacheUtilization")]
    KvCacheUtilization,
    /// Running requests per replica.
    RunningRequests,
    /// A PromQL expression (`query`).
    #[serde(rename = "PromQL")]
    PromQl,
}

impl MetricKind {
    /// The name as the manifest spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueDepth => "QueueDepth",
            Self::KvCacheUtilization => "KVCacheUtilization",
            Self::RunningRequests => "RunningRequests",
            Self::PromQl => "PromQL",
        }
    }
}

/// `spec.rollout`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// Groups of the new version that may run above `replicas` during a rollout; an old group is removed only
    /// after a new one is ready. Default 1. 0 replaces in place: an old group is removed first (capacity dips).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<u32>,
}

impl ModelDeploymentSpec {
    /// A spec that serves `source` with every other field at its default.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            model: ModelSpec {
                source: source.into(),
                served_name: None,
                dtype: None,
                hf_token_secret: None,
                routed_experts: None,
            },
            replicas: None,
            parallelism: None,
            runtime: None,
            scheduling: None,
            autoscaling: None,
            rollout: None,
            routing: None,
        }
    }

    /// The name a rank pod serves the model under (the runtime's rule on the operator's `--model`):
    /// `model.servedName`, else `NAME` for `builtin:NAME`, `org/name` for `hf://org/name[@revision]`, else
    /// [`ModelSource::pod_model_arg`]. The gateway routes requests for this name to the deployment's heads.
    pub fn cluster_served_name(&self) -> Result<String, ManifestError> {
        if let Some(name) = &self.model.served_name {
            return Ok(name.clone());
        }
        Ok(match self.source()? {
            ModelSource::Builtin { name } => name,
            ModelSource::HuggingFace { repo, .. } => repo,
            other => other.pod_model_arg(),
        })
    }

    /// `routing.policy`, or least load.
    pub fn routing_policy(&self) -> RoutingPolicy {
        self.routing.as_ref().and_then(|r| r.policy).unwrap_or_default()
    }

    /// `replicas`, or [`DEFAULT_REPLICAS`].
    pub fn replicas(&self) -> u32 {
        self.replicas.unwrap_or(DEFAULT_REPLICAS)
    }

    /// `parallelism.expert`, or [`DEFAULT_EXPERT_PARALLELISM`].
    pub fn expert_parallelism(&self) -> u32 {
        self.parallelism.as_ref().and_then(|p| p.expert).unwrap_or(DEFAULT_EXPERT_PARALLELISM)
    }

    /// `parallelism.dataParallelAttention`, or false.
    pub fn data_parallel_attention(&self) -> bool {
        self.parallelism.as_ref().and_then(|p| p.data_parallel_attention).unwrap_or(false)
    }

    /// API heads per replica group: every rank with data-parallel attention, else the group's head alone. The
    /// gateway counts ready replicas as ready heads / this.
    pub fn heads_per_group(&self) -> u32 {
        if self.expert_parallelism() > 1 && self.data_parallel_attention() { self.expert_parallelism() } else { 1 }
    }

    /// `parallelism.redundantExperts`, or none.
    pub fn redundant_experts(&self) -> &[RedundantExpert] {
        self.parallelism.as_ref().map_or(&[], |p| p.redundant_experts.as_slice())
    }

    /// `rollout.maxSurge`, or [`DEFAULT_MAX_SURGE`].
    pub fn max_surge(&self) -> u32 {
        self.rollout.as_ref().and_then(|r| r.max_surge).unwrap_or(DEFAULT_MAX_SURGE)
    }

    /// `runtime.gpusPerRank`, or 0.
    pub fn gpus_per_rank(&self) -> u32 {
        self.runtime.as_ref().and_then(|r| r.gpus_per_rank).unwrap_or(0)
    }

    /// The `baleen-runtime serve` flags the model and runtime fields set, in a fixed order (`--served-model-name`,
    /// `--dtype`, `--max-num-seqs`, `--max-model-len`, `--kv-cache-memory`); unset fields add nothing. The operator
    /// and `baleen up` both build their command lines from this.
    pub fn serve_flags(&self) -> Vec<(&'static str, String)> {
        let mut flags = Vec::new();
        if let Some(name) = &self.model.served_name {
            flags.push((FLAG_SERVED_MODEL_NAME, name.clone()));
        }
        if let Some(dtype) = self.model.dtype {
            flags.push((FLAG_DTYPE, dtype.as_str().to_string()));
        }
        if let Some(runtime) = &self.runtime {
            if let Some(n) = runtime.max_num_seqs {
                flags.push((FLAG_MAX_NUM_SEQS, n.to_string()));
            }
            if let Some(n) = runtime.max_model_len {
                flags.push((FLAG_MAX_MODEL_LEN, n.to_string()));
            }
            if let Some(memory) = &runtime.kv_cache_memory {
                flags.push((FLAG_KV_CACHE_MEMORY, memory.trim().to_string()));
            }
        }
        flags
    }

    /// `model.source` parsed; the error names the field.
    pub fn source(&self) -> Result<ModelSource, ManifestError> {
        self.model.source.parse().map_err(|e: SourceError| ManifestError::invalid("spec.model.source", e.to_string()))
    }

    /// The number of routed experts, when known: `model.routedExperts`, or the built-in model's.
    pub fn routed_experts(&self) -> Option<u32> {
        self.model.routed_experts.or_else(|| match self.source() {
            Ok(ModelSource::Builtin { name }) if format!("{BUILTIN_SCHEME}{name}") == BUILTIN_TINY_MOE => {
                Some(BUILTIN_TINY_MOE_ROUTED_EXPERTS)
            }
            _ => None,
        })
    }

    /// Checks what the types cannot: the source's form, counts of at least 1, non-empty names, that the expert
    /// ranks divide the routed experts when their number is known, consistent autoscaling bounds. The error names
    /// the first offending field by its path in the manifest (`spec.parallelism.expert`). The CRD's schema and
    /// CEL rules check a subset of these in the API server; this is the full check the operator and `baleen up`
    /// run.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.source()?;
        let non_empty = |value: &Option<String>, field: &'static str| {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(ManifestError::invalid(field, "must not be empty when given"));
            }
            Ok(())
        };
        non_empty(&self.model.served_name, "spec.model.servedName")?;
        non_empty(&self.model.hf_token_secret, "spec.model.hfTokenSecret")?;
        if self.model.routed_experts == Some(0) {
            return Err(ManifestError::invalid("spec.model.routedExperts", "must be at least 1"));
        }
        let ranks = self.expert_parallelism();
        if ranks == 0 {
            return Err(ManifestError::invalid("spec.parallelism.expert", "must be at least 1"));
        }
        if let Some(experts) = self.routed_experts()
            && !experts.is_multiple_of(ranks)
        {
            return Err(ManifestError::invalid(
                "spec.parallelism.expert",
                format!("{ranks} ranks do not divide the model's {experts} routed experts evenly"),
            ));
        }
        for replica in self.redundant_experts() {
            if replica.rank >= ranks {
                return Err(ManifestError::invalid(
                    "spec.parallelism.redundantExperts",
                    format!("rank {} is outside a group of {ranks} ranks", replica.rank),
                ));
            }
            if let Some(experts) = self.routed_experts()
                && replica.expert >= experts
            {
                return Err(ManifestError::invalid(
                    "spec.parallelism.redundantExperts",
                    format!("expert {} is outside the model's {experts} routed experts", replica.expert),
                ));
            }
        }
        if let Some(runtime) = &self.runtime {
            runtime.validate()?;
        }
        if let Some(scheduling) = &self.scheduling {
            non_empty(&scheduling.priority_class_name, "spec.scheduling.priorityClassName")?;
        }
        if let Some(autoscaling) = &self.autoscaling {
            autoscaling.validate()?;
        }
        Ok(())
    }
}

impl AutoscalingSpec {
    /// `minReplicas`, or 1.
    pub fn min_replicas(&self) -> u32 {
        self.min_replicas.unwrap_or(1)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if self.max_replicas == 0 {
            return Err(ManifestError::invalid("spec.autoscaling.maxReplicas", "must be at least 1"));
        }
        if self.min_replicas() > self.max_replicas {
            return Err(ManifestError::invalid(
                "spec.autoscaling.minReplicas",
                format!("{} is above maxReplicas ({})", self.min_replicas(), self.max_replicas),
            ));
        }
        if !(self.target.is_finite() && self.target > 0.0) {
            return Err(ManifestError::invalid("spec.autoscaling.target", "must be a number above 0"));
        }
        let query = self.metric.query.as_deref().map(str::trim);
        match (self.metric.kind, query) {
            (MetricKind::PromQl, None | Some("")) => {
                Err(ManifestError::invalid("spec.autoscaling.metric.query", "is required with type PromQL"))
            }
            (MetricKind::PromQl, Some(_)) | (_, None) => Ok(()),
            (_, Some(_)) => {
                Err(ManifestError::invalid("spec.autoscaling.metric.query", "is only allowed with type PromQL"))
            }
        }
    }
}

impl RuntimeSpec {
    fn validate(&self) -> Result<(), ManifestError> {
        if self.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
            return Err(ManifestError::invalid("spec.runtime.image", "must not be empty when given"));
        }
        if self.max_num_seqs == Some(0) {
            return Err(ManifestError::invalid("spec.runtime.maxNumSeqs", "must be at least 1"));
        }
        if self.max_model_len == Some(0) {
            return Err(ManifestError::invalid("spec.runtime.maxModelLen", "must be at least 1"));
        }
        if self.kv_cache_memory.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(ManifestError::invalid(
                "spec.runtime.kvCacheMemory",
                "must be a size such as \"4GiB\" or a fraction such as \"0.2\"",
            ));
        }
        for var in &self.env {
            if var.name.is_empty() || var.name.contains('=') || var.name.contains('\0') {
                return Err(ManifestError::invalid(
                    "spec.runtime.env",
                    format!("`{}` is not a variable name (non-empty, no `=`)", var.name),
                ));
            }
        }
        Ok(())
    }
}

/// `metadata` of a manifest: the fields Baleen reads. Others (`uid`, `resourceVersion`, ...) are accepted and
/// dropped, so the output of `kubectl get -o yaml` parses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Resource name (required): a DNS-1123 label, since the names of the pods and services derive from it.
    pub name: String,
    /// Namespace. Default: the client's current namespace (`baleen up` ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels. Default none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations. Default none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One `ModelDeployment` document as written in a YAML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentManifest {
    /// Must be [`CRD_API_VERSION`] (`baleen.dev/v1alpha1`).
    pub api_version: String,
    /// Must be [`CRD_KIND`] (`ModelDeployment`).
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ModelDeploymentSpec,
}

/// Only the type fields, read before the rest so a manifest of another kind is refused for its kind and not for
/// whichever of its fields the spec types do not know.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

impl ModelDeploymentManifest {
    /// A manifest named `name` for `spec`, with the current `apiVersion` and `kind`.
    pub fn new(name: impl Into<String>, spec: ModelDeploymentSpec) -> Self {
        Self {
            api_version: CRD_API_VERSION.to_string(),
            kind: CRD_KIND.to_string(),
            metadata: ObjectMeta { name: name.into(), ..ObjectMeta::default() },
            spec,
        }
    }

    /// Parses one YAML document and [validates](Self::validate) it.
    pub fn from_yaml(text: &str) -> Result<Self, ManifestError> {
        let meta: TypeMeta = serde_yaml::from_str(text).map_err(ManifestError::Yaml)?;
        check_type(meta.api_version.as_deref(), meta.kind.as_deref())?;
        let manifest: Self = serde_yaml::from_str(text).map_err(ManifestError::Yaml)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The manifest as YAML.
    pub fn to_yaml(&self) -> Result<String, ManifestError> {
        serde_yaml::to_string(self).map_err(ManifestError::Yaml)
    }

    /// Checks `apiVersion`, `kind`, `metadata.name` and the [spec](ModelDeploymentSpec::validate).
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_type(Some(&self.api_version), Some(&self.kind))?;
        validate_name(&self.metadata.name)?;
        self.spec.validate()
    }
}

/// Checks a `ModelDeployment`'s `metadata.name`: a DNS label of at most [`MAX_NAME_LEN`] characters, since the
/// names of its StatefulSets, Services and pods derive from it.
pub fn validate_name(name: &str) -> Result<(), ManifestError> {
    if !crate::source::is_dns_label(name) || name.len() > MAX_NAME_LEN {
        return Err(ManifestError::invalid(
            "metadata.name",
            format!(
                "`{name}` is not a valid name: 1-{MAX_NAME_LEN} lowercase letters, digits and `-`, starting and \
                 ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

fn check_type(api_version: Option<&str>, kind: Option<&str>) -> Result<(), ManifestError> {
    if api_version != Some(CRD_API_VERSION) {
        return Err(ManifestError::invalid(
            "apiVersion",
            format!("expected `{CRD_API_VERSION}`, found {}", shown(api_version)),
        ));
    }
    if kind != Some(CRD_KIND) {
        return Err(ManifestError::invalid("kind", format!("expected `{CRD_KIND}`, found {}", shown(kind))));
    }
    Ok(())
}

fn shown(value: Option<&str>) -> String {
    value.map_or_else(|| "nothing".to_string(), |v| format!("`{v}`"))
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML of the right shape: a syntax error, a misspelt or unknown field, a wrong type. serde_yaml's message
    /// names the field's path and the line.
    #[error(transparent)]
    Yaml(serde_yaml::Error),
    /// Well-formed, but a field's value is not acceptable.
    #[error("`{field}`: {reason}")]
    Invalid {
        /// Path of the field in the manifest, e.g. `spec.model.source`.
        field: &'static str,
        /// What is wrong and what is expected.
        reason: String,
    },
}

impl ManifestError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }

    /// The path of the offending field, when the error is about one field's value.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            Self::Yaml(_) => None,
        }
    }
}

#[cfg(test)]
mod tests;
