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

mod source;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use source::{ModelSource, SourceError};

use crate::names::{CRD_API_VERSION, CRD_KIND};

/// Replicas when `spec.replicas` is absent.
pub const DEFAULT_REPLICAS: u32 = 1;
/// Ranks per replica when `spec.parallelism.expert` is absent.
pub const DEFAULT_EXPERT_PARALLELISM: u32 = 1;

/// `spec` of a `ModelDeployment`: one model, served by `replicas` groups of `parallelism.expert` ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelDeploymentSpec {
    /// The model to serve (required).
    pub model: ModelSpec,
    /// Replica groups to run. Default 1. Must be at least 1 (scale-to-zero arrives later). This is the field the
    /// `scale` subresource, `kubectl scale` and autoscalers change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// How one replica is split across ranks. Default: one rank holding every expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<ParallelismSpec>,
    /// Settings of the runtime processes. Default: the runtime's own defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeSpec>,
}

/// `spec.model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// Where the weights come from (required): `hf://org/name[@revision]`, `pvc://claim/path`, `file:///path` or
    /// `builtin:NAME` (`builtin:tiny-moe` is a random-weight demo model). See [`ModelSource`].
    pub source: String,
    /// The name clients send as `model` in API requests. Default: the runtime's choice — `NAME` for
    /// `builtin:NAME`, otherwise the model path as the runtime sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    /// Compute and KV-cache dtype. Default `f32` (the runtime's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
}

/// `spec.model.dtype`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParallelismSpec {
    /// Ranks (pods) per replica; each owns a shard of the routed experts. Default 1. Must be at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert: Option<u32>,
    /// Every rank runs attention and the HTTP API for its own requests (data-parallel attention), instead of
    /// rank 0 alone. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel_attention: Option<bool>,
}

/// `spec.runtime`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeSpec {
    /// Container image of the runtime. Default: the image the operator was installed with. Ignored by
    /// `baleen up`, which runs the local `baleen-runtime` binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Sequences in the running batch at most (`--max-num-seqs`). Default: the runtime's (64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_seqs: Option<u32>,
    /// Prompt plus generated tokens of one request at most (`--max-model-len`). Default: the model's
    /// `max_position_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
    /// Memory for the latent KV cache (`--kv-cache-memory`): a size such as `"4GiB"` or `"512MiB"`, or a fraction
    /// of device memory such as `"0.2"` (quote it). Default: the runtime's (1GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_memory: Option<String>,
    /// Extra `baleen-runtime serve` flags, appended after the ones the fields above produce. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables of the runtime processes. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

/// One environment variable, as in a Kubernetes container (`valueFrom` is not supported yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    /// Variable name (required; no `=`).
    pub name: String,
    /// Value. Default empty.
    #[serde(default)]
    pub value: String,
}

impl ModelDeploymentSpec {
    /// A spec that serves `source` with every other field at its default.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            model: ModelSpec { source: source.into(), served_name: None, dtype: None },
            replicas: None,
            parallelism: None,
            runtime: None,
        }
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

    /// `model.source` parsed; the error names the field.
    pub fn source(&self) -> Result<ModelSource, ManifestError> {
        self.model.source.parse().map_err(|e: SourceError| ManifestError::invalid("spec.model.source", e.to_string()))
    }

    /// Checks what the types cannot: the source's form, counts of at least 1, non-empty names. The error names the
    /// first offending field by its path in the manifest (`spec.parallelism.expert`).
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.source()?;
        if self.model.served_name.as_deref().is_some_and(|name| name.trim().is_empty()) {
            return Err(ManifestError::invalid("spec.model.servedName", "must not be empty when given"));
        }
        if self.replicas == Some(0) {
            return Err(ManifestError::invalid("spec.replicas", "must be at least 1 (scale-to-zero arrives later)"));
        }
        if self.parallelism.as_ref().and_then(|p| p.expert) == Some(0) {
            return Err(ManifestError::invalid("spec.parallelism.expert", "must be at least 1"));
        }
        if let Some(runtime) = &self.runtime {
            runtime.validate()?;
        }
        Ok(())
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
        if !source::is_dns_label(&self.metadata.name) {
            return Err(ManifestError::invalid(
                "metadata.name",
                format!(
                    "`{}` is not a valid name: 1-63 lowercase letters, digits and `-`, starting and ending with a \
                     letter or digit",
                    self.metadata.name
                ),
            ));
        }
        self.spec.validate()
    }
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
