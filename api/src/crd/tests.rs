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
