#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::names::{CRD_GROUP, CRD_VERSION};

const FULL: &str = r#"
apiVersion: baleen.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: whale
  namespace: models
  labels: {team: inference}
  uid: 0d6c6f2e-ignored
spec:
  model:
    source: hf://deepseek-ai/DeepSeek-V2-Lite@main
    servedName: deepseek-v2-lite
    dtype: bf16
  replicas: 3
  parallelism:
    expert: 4
    dataParallelAttention: true
  runtime:
    image: ghcr.io/baleen-dev/runtime:0.1.0
    maxNumSeqs: 32
    maxModelLen: 8192
    kvCacheMemory: 4GiB
    args: ["--max-num-batched-tokens", "4096"]
    env:
      - name: BALEEN_RUNTIME_LOG
        value: debug
      - name: EMPTY
"#;

fn manifest(spec: &str) -> String {
    format!("apiVersion: baleen.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: m\nspec:\n{spec}")
}

fn invalid_field(text: &str) -> &'static str {
    match ModelDeploymentManifest::from_yaml(text) {
        Err(ManifestError::Invalid { field, reason }) => {
            assert!(!reason.is_empty());
            field
        }
        other => panic!("expected a field error, got {other:?}"),
    }
}

fn yaml_error(text: &str) -> String {
    match ModelDeploymentManifest::from_yaml(text) {
        Err(e @ ManifestError::Yaml(_)) => e.to_string(),
        other => panic!("expected a YAML error, got {other:?}"),
    }
}

#[test]
fn api_version_is_group_slash_version() {
    assert_eq!(CRD_API_VERSION, format!("{CRD_GROUP}/{CRD_VERSION}"));
}

#[test]
fn a_full_manifest_parses_every_field() {
    let m = ModelDeploymentManifest::from_yaml(FULL).unwrap();
    assert_eq!(m.metadata.name, "whale");
    assert_eq!(m.metadata.namespace.as_deref(), Some("models"));
    assert_eq!(m.metadata.labels.get("team").map(String::as_str), Some("inference"));
    let spec = &m.spec;
    assert_eq!(
        spec.source().unwrap(),
        ModelSource::HuggingFace { repo: "deepseek-ai/DeepSeek-V2-Lite".into(), revision: Some("main".into()) }
    );
    assert_eq!(spec.model.served_name.as_deref(), Some("deepseek-v2-lite"));
    assert_eq!(spec.model.dtype, Some(Dtype::Bf16));
    assert_eq!((spec.replicas(), spec.expert_parallelism(), spec.data_parallel_attention()), (3, 4, true));
    let runtime = spec.runtime.as_ref().unwrap();
    assert_eq!(runtime.image.as_deref(), Some("ghcr.io/baleen-dev/runtime:0.1.0"));
    assert_eq!((runtime.max_num_seqs, runtime.max_model_len), (Some(32), Some(8192)));
    assert_eq!(runtime.kv_cache_memory.as_deref(), Some("4GiB"));
    assert_eq!(runtime.args, ["--max-num-batched-tokens", "4096"]);
    assert_eq!(
        runtime.env,
        [
            EnvVar { name: "BALEEN_RUNTIME_LOG".into(), value: Some("debug".into()), value_from: None },
            EnvVar { name: "EMPTY".into(), value: None, value_from: None }
        ]
    );
}

#[test]
fn a_minimal_manifest_gets_the_documented_defaults() {
    let m = ModelDeploymentManifest::from_yaml(&manifest("  model:\n    source: builtin:tiny-moe\n")).unwrap();
    assert_eq!(m.spec, ModelDeploymentSpec::new("builtin:tiny-moe"));
    assert_eq!(m.spec.replicas(), DEFAULT_REPLICAS);
    assert_eq!(m.spec.expert_parallelism(), DEFAULT_EXPERT_PARALLELISM);
    assert!(!m.spec.data_parallel_attention());
    assert_eq!(m.spec.model.dtype.unwrap_or_default(), Dtype::F32);
}

#[test]
fn manifests_round_trip_through_yaml() {
    let m = ModelDeploymentManifest::from_yaml(FULL).unwrap();
    let again = ModelDeploymentManifest::from_yaml(&m.to_yaml().unwrap()).unwrap();
    assert_eq!(again, m);
    let minimal = ModelDeploymentManifest::new("tiny", ModelDeploymentSpec::new("builtin:tiny-moe"));
    let text = minimal.to_yaml().unwrap();
    assert!(!text.contains("replicas") && !text.contains("runtime"), "{text}");
    assert_eq!(ModelDeploymentManifest::from_yaml(&text).unwrap(), minimal);
}

#[test]
fn unquoted_kv_cache_fractions_and_numbers_read_as_strings() {
    let m = ModelDeploymentManifest::from_yaml(&manifest(
        "  model: {source: builtin:tiny-moe}\n  runtime: {kvCacheMemory: 0.2}\n",
    ))
    .unwrap();
    assert_eq!(m.spec.runtime.unwrap().kv_cache_memory.as_deref(), Some("0.2"));
}

#[test]
fn wrong_api_version_or_kind_is_refused_before_the_spec_is_read() {
    let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {template: {}}\n";
    assert_eq!(invalid_field(text), "apiVersion");
    let text = "apiVersion: baleen.dev/v1alpha1\nkind: Deployment\nmetadata: {name: x}\nspec: {template: {}}\n";
    assert_eq!(invalid_field(text), "kind");
    assert_eq!(invalid_field("kind: ModelDeployment\n"), "apiVersion");
    let err = ModelDeploymentManifest::from_yaml("apiVersion: baleen.dev/v1\nkind: ModelDeployment\n").unwrap_err();
    assert!(err.to_string().contains("baleen.dev/v1alpha1"), "{err}");
}

#[test]
fn misspelt_spec_fields_are_errors_that_name_them() {
    for (spec, path, word) in [
        ("  model: {sorce: builtin:tiny-moe}\n", "spec.model", "sorce"),
        ("  model: {source: builtin:tiny-moe}\n  replica: 2\n", "spec", "replica"),
        ("  model: {source: builtin:tiny-moe}\n  parallelism: {experts: 2}\n", "spec.parallelism", "experts"),
        ("  model: {source: builtin:tiny-moe}\n  runtime: {maxNumSeq: 2}\n", "spec.runtime", "maxNumSeq"),
    ] {
        let err = yaml_error(&manifest(spec));
        assert!(err.contains(path) && err.contains(word), "{spec}: {err}");
    }
}

#[test]
fn wrongly_typed_values_are_errors_that_name_the_field() {
    let err = yaml_error(&manifest("  model: {source: builtin:tiny-moe, dtype: fp16}\n"));
    assert!(err.contains("spec.model.dtype") && err.contains("fp16"), "{err}");
    let err = yaml_error(&manifest("  model: {source: builtin:tiny-moe}\n  replicas: -1\n"));
    assert!(err.contains("spec.replicas"), "{err}");
    let err = yaml_error(&manifest("  replicas: 1\n"));
    assert!(err.contains("model"), "{err}");
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    for (spec, field) in [
        ("  model: {source: ''}\n", "spec.model.source"),
        ("  model: {source: s3://bucket/m}\n", "spec.model.source"),
        ("  model: {source: 'file://relative'}\n", "spec.model.source"),
        ("  model: {source: builtin:tiny-moe, servedName: ''}\n", "spec.model.servedName"),
        ("  model: {source: builtin:tiny-moe}\n  parallelism: {expert: 0}\n", "spec.parallelism.expert"),
        ("  model: {source: builtin:tiny-moe}\n  runtime: {maxNumSeqs: 0}\n", "spec.runtime.maxNumSeqs"),
        ("  model: {source: builtin:tiny-moe}\n  runtime: {maxModelLen: 0}\n", "spec.runtime.maxModelLen"),
        ("  model: {source: builtin:tiny-moe}\n  runtime: {kvCacheMemory: ''}\n", "spec.runtime.kvCacheMemory"),
        ("  model: {source: builtin:tiny-moe}\n  runtime: {image: ''}\n", "spec.runtime.image"),
        ("  model: {source: builtin:tiny-moe}\n  runtime: {env: [{name: 'A=B'}]}\n", "spec.runtime.env"),
    ] {
        assert_eq!(invalid_field(&manifest(spec)), field, "{spec}");
    }
}

#[test]
fn the_error_message_starts_with_the_field() {
    let err = ModelDeploymentManifest::from_yaml(&manifest("  model: {source: s3://b/m}\n")).unwrap_err();
    assert_eq!(err.field(), Some("spec.model.source"));
    let text = err.to_string();
    assert!(text.starts_with("`spec.model.source`:") && text.contains("s3://b/m") && text.contains("hf://"), "{text}");
}

#[test]
fn metadata_name_must_be_a_dns_label() {
    let text = "apiVersion: baleen.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: Whale_1}\n\
                spec: {model: {source: builtin:tiny-moe}}\n";
    assert_eq!(invalid_field(text), "metadata.name");
}

#[test]
fn manifests_built_in_code_are_validated_too() {
    let mut m = ModelDeploymentManifest::new("tiny", ModelDeploymentSpec::new("builtin:tiny-moe"));
    assert!(m.validate().is_ok());
    m.kind = "Other".into();
    assert_eq!(m.validate().unwrap_err().field(), Some("kind"));
}

#[test]
fn dtype_spellings_match_the_runtime_flag() {
    for (d, s) in [(Dtype::F32, "f32"), (Dtype::Bf16, "bf16"), (Dtype::F16, "f16")] {
        assert_eq!(d.as_str(), s);
        assert_eq!(serde_yaml::to_string(&d).unwrap().trim(), s);
    }
}

/// The CRD as the API server sees it: schema, subresources, columns, and the CEL rules evaluated client-side.
#[cfg(feature = "kube")]
mod schema {
    use kube::CustomResourceExt;
    use serde_json::{Value, json};

    use super::*;

    fn crd() -> Value {
        serde_json::to_value(ModelDeployment::crd()).unwrap()
    }

    #[test]
    fn names_scope_and_subresources_follow_the_design() {
        let crd = crd();
        assert_eq!(crd["metadata"]["name"], format!("{}.{}", crate::names::CRD_PLURAL, CRD_GROUP));
        let spec = &crd["spec"];
        assert_eq!(spec["group"], CRD_GROUP);
        assert_eq!(spec["scope"], "Namespaced");
        assert_eq!(spec["names"]["kind"], CRD_KIND);
        assert_eq!(spec["names"]["shortNames"], json!([crate::names::CRD_SHORT_NAME]));
        let version = &spec["versions"][0];
        assert_eq!(version["name"], CRD_VERSION);
        assert_eq!(
            version["subresources"]["scale"],
            json!({"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                   "labelSelectorPath": ".status.selector"})
        );
        assert_eq!(version["subresources"]["status"], json!({}));
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Model", "Replicas", "Ready", "EP", "Age"]);
    }

    #[test]
    fn the_schema_is_structural_defaults_replicas_and_bounds_counts() {
        let schema = &crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["required"], json!(["model"]));
        assert_eq!(spec["properties"]["replicas"]["default"], 1);
        assert_eq!(spec["properties"]["parallelism"]["properties"]["expert"]["minimum"], 1.0);
        let text = schema.to_string();
        assert!(!text.contains("additionalProperties\":false"), "structural schemas may not close objects");
        assert!(!text.contains("\"anyOf\"") && !text.contains("\"oneOf\""), "kube must hoist Option/enum schemas");
        // Kubernetes types are embedded with their full schemas (tolerations, resources, env).
        let scheduling = &spec["properties"]["scheduling"]["properties"];
        assert_eq!(scheduling["tolerations"]["type"], "array");
        assert!(spec["properties"]["runtime"]["properties"]["env"]["items"]["properties"]["valueFrom"].is_object());
    }

    fn cel(spec: Value) -> Result<(), String> {
        ModelDeploymentSpec::validate_cel(&spec, None).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn cel_rules_check_expert_ranks_against_known_expert_counts() {
        let tiny = |expert: u32| json!({"model": {"source": "builtin:tiny-moe"}, "parallelism": {"expert": expert}});
        assert!(cel(tiny(4)).is_ok());
        assert!(cel(tiny(16)).is_ok());
        let err = cel(tiny(3)).unwrap_err();
        assert!(err.contains("must divide 16"), "{err}");
        let hf = |experts: u32, expert: u32| {
            json!({"model": {"source": "hf://deepseek-ai/DeepSeek-V3", "routedExperts": experts},
                   "parallelism": {"expert": expert}})
        };
        assert!(cel(hf(256, 8)).is_ok());
        assert!(cel(hf(256, 7)).unwrap_err().contains("model.routedExperts"));
        assert!(
            cel(json!({"model": {"source": "hf://deepseek-ai/DeepSeek-V3"}, "parallelism": {"expert": 7}})).is_ok()
        );
    }

    #[test]
    fn cel_rules_check_autoscaling_bounds_and_promql() {
        let scaling = |autoscaling: Value| json!({"model": {"source": "builtin:tiny-moe"}, "autoscaling": autoscaling});
        let ok = json!({"minReplicas": 0, "maxReplicas": 3, "metric": {"type": "QueueDepth"}, "target": 4.0});
        assert!(cel(scaling(ok)).is_ok());
        let inverted = json!({"minReplicas": 4, "maxReplicas": 3, "metric": {"type": "QueueDepth"}, "target": 4.0});
        assert!(cel(scaling(inverted)).unwrap_err().contains("minReplicas must not exceed maxReplicas"));
        let promql = json!({"maxReplicas": 3, "metric": {"type": "PromQL"}, "target": 1.0});
        assert!(cel(scaling(promql)).unwrap_err().contains("query is required"));
        let query = json!({"maxReplicas": 3, "metric": {"type": "PromQL", "query": "sum(x)"}, "target": 1.0});
        assert!(cel(scaling(query)).is_ok());
        assert!(cel(scaling(json!({"minReplicas": 1, "maxReplicas": 6}))).is_ok(), "metric and target default");
        let zero = json!({"maxReplicas": 3, "target": 0.0});
        assert!(cel(scaling(zero)).unwrap_err().contains("target must be above 0"));
    }

    #[test]
    fn autoscaling_bounds_alone_scale_on_queue_depth_with_the_documented_target() {
        let text = manifest("  model: {source: builtin:tiny-moe}\n  autoscaling: {minReplicas: 1, maxReplicas: 6}\n");
        let spec = ModelDeploymentManifest::from_yaml(&text).unwrap().spec;
        let autoscaling = spec.autoscaling.unwrap();
        assert_eq!(autoscaling.metric, crate::crd::AutoscalingMetric::default());
        assert_eq!(autoscaling.metric.kind, crate::crd::MetricKind::QueueDepth);
        assert_eq!(autoscaling.target, crate::crd::DEFAULT_AUTOSCALING_TARGET);
    }

    #[test]
    fn the_rust_validation_agrees_with_the_cel_rules() {
        for (yaml, valid) in [
            ("  model: {source: builtin:tiny-moe}\n  parallelism: {expert: 3}\n", false),
            ("  model: {source: builtin:tiny-moe}\n  parallelism: {expert: 8}\n", true),
            ("  model: {source: 'hf://a/b', routedExperts: 64}\n  parallelism: {expert: 6}\n", false),
            (
                "  model: {source: builtin:tiny-moe}\n  autoscaling: {minReplicas: 2, maxReplicas: 1, metric: {type: \
                 QueueDepth}, target: 1}\n",
                false,
            ),
        ] {
            let text = manifest(yaml);
            let rust = ModelDeploymentManifest::from_yaml(&text).is_ok();
            let spec: Value =
                serde_json::to_value(serde_yaml::from_str::<Value>(&text).unwrap()["spec"].clone()).unwrap();
            assert_eq!(rust, valid, "{yaml}");
            assert_eq!(cel(spec).is_ok(), valid, "{yaml}");
        }
    }
}

#[test]
fn metric_kind_names_are_the_manifest_spelling() {
    use MetricKind::{KvCacheUtilization, PromQl, QueueDepth, RunningRequests};
    for kind in [QueueDepth, KvCacheUtilization, RunningRequests, PromQl] {
        assert_eq!(serde_json::to_value(kind).unwrap(), serde_json::json!(kind.as_str()));
    }
}
