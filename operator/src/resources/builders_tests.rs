//! Tests of the builders: one test per group of spec fields, asserting the objects produced.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use baleen_api::crd::{
    Affinity, Dtype, EnvVar, ModelDeployment, ModelDeploymentSpec, ParallelismSpec, RedundantExpert,
    ResourceRequirements, RuntimeSpec, SchedulingSpec, Toleration,
};
use baleen_api::names::{
    ANNOTATION_GROUP_INDEX, CONTAINER_MODEL_DOWNLOAD, CONTAINER_RUNTIME, ENV_RUNTIME_DTYPE, ENV_RUNTIME_LOG,
    HF_CACHE_DIR, HF_TOKEN_KEY, LABEL_GROUP, LABEL_MODEL_DEPLOYMENT, LABEL_POD_INDEX, LABEL_REVISION, PATH_HEALTH,
    PATH_METRICS, PATH_READY, PORT_NAME_GRPC, PORT_NAME_HTTP, RUNTIME_GRPC_PORT, RUNTIME_HTTP_PORT,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, NodeAffinity, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::error::Error;

const NS: &str = "models";

fn md(spec: ModelDeploymentSpec) -> ModelDeployment {
    let mut md = ModelDeployment::new("tiny", spec);
    md.metadata.namespace = Some(NS.into());
    md
}

fn tiny() -> ModelDeployment {
    md(ModelDeploymentSpec::new("builtin:tiny-moe"))
}

fn with_runtime(runtime: RuntimeSpec) -> ModelDeployment {
    let mut md = tiny();
    md.spec.runtime = Some(runtime);
    md
}

fn with_parallelism(expert: u32, dpa: bool, redundant: Vec<RedundantExpert>) -> ModelDeployment {
    let mut md = tiny();
    md.spec.parallelism = Some(ParallelismSpec {
        expert: Some(expert),
        data_parallel_attention: Some(dpa),
        redundant_experts: redundant,
    });
    md
}

fn group() -> GroupRef {
    GroupRef { revision: "0123abcd".into(), index: 1 }
}

fn sts(md: &ModelDeployment) -> StatefulSet {
    group_statefulset(md, &group(), &OperatorConfig::default()).unwrap()
}

fn pod(md: &ModelDeployment) -> PodSpec {
    sts(md).spec.unwrap().template.spec.unwrap()
}

fn runtime_container(md: &ModelDeployment) -> Container {
    let pod = pod(md);
    assert_eq!(pod.containers.len(), 1);
    let container = pod.containers.into_iter().next().unwrap();
    assert_eq!(container.name, CONTAINER_RUNTIME);
    container
}

fn args(md: &ModelDeployment) -> Vec<String> {
    runtime_container(md).args.unwrap()
}

/// The value after `flag` in `args`, if the flag is there.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).map(|i| args[i + 1].clone())
}

fn invalid_field(result: Result<StatefulSet>) -> &'static str {
    match result {
        Err(Error::InvalidSpec(e)) => e.field().expect("an error about one field"),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
}

#[test]
fn the_statefulset_is_one_group_of_parallel_ranks_named_and_labelled_for_it() {
    let md = with_parallelism(4, false, vec![]);
    let sts = sts(&md);
    assert_eq!(sts.metadata.name.as_deref(), Some("tiny-0123abcd-1"));
    assert_eq!(sts.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(sts.metadata.labels.as_ref(), Some(&group_labels(&md, &group())));
    assert_eq!(sts.metadata.annotations.as_ref().unwrap()[ANNOTATION_GROUP_INDEX], "1");
    // No uid (not read from a cluster): no owner reference.
    assert!(sts.metadata.owner_references.is_none());
    let spec = sts.spec.unwrap();
    assert_eq!(spec.replicas, Some(4));
    assert_eq!(spec.service_name.as_deref(), Some("tiny-0123abcd-1"));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let selector = spec.selector.match_labels.unwrap();
    assert_eq!(
        selector,
        BTreeMap::from([
            (LABEL_MODEL_DEPLOYMENT.to_string(), "tiny".to_string()),
            (LABEL_GROUP.to_string(), "tiny-0123abcd-1".to_string()),
        ])
    );
    let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(pod_labels, group_labels(&md, &group()));
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "the selector selects the pods");
    assert_eq!(pod_labels[LABEL_REVISION], "0123abcd");
}

#[test]
fn every_object_is_owned_by_the_model_deployment_when_it_has_a_uid() {
    let mut md = tiny();
    md.metadata.uid = Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427".into());
    let config = OperatorConfig { pod_monitor: true, ..OperatorConfig::default() };
    let objects = desired_objects(&md, &[group()], &config).unwrap();
    assert_eq!(objects.len(), 5);
    for object in &objects {
        let owners = object.metadata.owner_references.as_ref().expect("owner reference");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "ModelDeployment");
        assert_eq!(owners[0].api_version, "baleen.dev/v1alpha1");
        assert_eq!(owners[0].name, "tiny");
        assert_eq!(owners[0].uid, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(object.metadata.namespace.as_deref(), Some(NS));
    }
}

#[test]
fn a_model_deployment_without_a_namespace_is_refused_by_every_builder() {
    let mut md = tiny();
    md.metadata.namespace = None;
    let config = OperatorConfig::default();
    let missing = |r: std::result::Result<(), Error>| assert!(matches!(r, Err(Error::MissingField(_))), "{r:?}");
    missing(group_statefulset(&md, &group(), &config).map(drop));
    missing(group_service(&md, &group()).map(drop));
    missing(heads_service(&md).map(drop));
    missing(pod_disruption_budget(&md).map(drop));
    missing(pod_monitor(&md).map(drop));
    missing(desired_objects(&md, &[], &config).map(drop));
}

#[test]
fn model_and_runtime_fields_become_serve_flags_in_order_with_user_args_last() {
    let mut md = with_runtime(RuntimeSpec {
        max_num_seqs: Some(16),
        max_model_len: Some(1024),
        kv_cache_memory: Some("64MiB".into()),
        args: vec!["--max-num-batched-tokens".into(), "512".into()],
        ..RuntimeSpec::default()
    });
    md.spec.model.dtype = Some(Dtype::Bf16);
    md.spec.model.served_name = Some("tiny-chat".into());
    let config = OperatorConfig { drain_timeout_seconds: 42, ..OperatorConfig::default() };
    let sts = group_statefulset(&md, &group(), &config).unwrap();
    let container = &sts.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(container.command.as_deref(), Some(&["baleen-runtime".to_string()][..]));
    let args = container.args.clone().unwrap();
    let expected: Vec<String> = [
        "serve",
        "--model",
        "builtin:tiny-moe",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--served-model-name",
        "tiny-chat",
        "--dtype",
        "bf16",
        "--max-num-seqs",
        "16",
        "--max-model-len",
        "1024",
        "--kv-cache-memory",
        "64MiB",
        "--drain-timeout",
        "42",
        "--max-num-batched-tokens",
        "512",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(args, expected);
}

#[test]
fn defaults_give_the_minimal_command_line() {
    let args = args(&tiny());
    assert_eq!(
        args,
        ["serve", "--model", "builtin:tiny-moe", "--host", "0.0.0.0", "--port", "8000", "--drain-timeout", "30"]
    );
}

#[test]
fn expert_parallelism_adds_statefulset_discovery_replicas_and_data_parallel_attention() {
    let one = args(&with_parallelism(1, true, vec![]));
    assert!(!one.iter().any(|a| a == "--world-size" || a == "--data-parallel-attention"), "{one:?}");

    let md = with_parallelism(
        4,
        false,
        vec![RedundantExpert { expert: 3, rank: 1 }, RedundantExpert { expert: 7, rank: 0 }],
    );
    let args = args(&md);
    assert_eq!(flag_value(&args, "--world-size").as_deref(), Some("4"));
    assert!(args.iter().any(|a| a == "--rank-from-hostname"));
    assert_eq!(flag_value(&args, "--peer-pattern").as_deref(), Some("tiny-0123abcd-1-{rank}.tiny-0123abcd-1:50051"));
    assert_eq!(flag_value(&args, "--grpc-port"), Some(RUNTIME_GRPC_PORT.to_string()));
    assert_eq!(flag_value(&args, "--replicate").as_deref(), Some("3@1,7@0"));
    assert!(!args.iter().any(|a| a == "--data-parallel-attention" || a == "--rank" || a == "--peers"));

    let dpa = self::args(&with_parallelism(2, true, vec![]));
    assert!(dpa.iter().any(|a| a == "--data-parallel-attention"));
    assert_eq!(flag_value(&dpa, "--replicate"), None);
}

#[test]
fn args_and_env_that_repeat_an_operator_setting_are_refused_naming_the_field() {
    for arg in ["--dtype", "--dtype=bf16", "--model", "--port=9000", "--peers", "--rank", "--world-size", "--replicate"]
    {
        let md = with_runtime(RuntimeSpec { args: vec![arg.into(), "x".into()], ..RuntimeSpec::default() });
        let result = group_statefulset(&md, &group(), &OperatorConfig::default());
        assert_eq!(invalid_field(result), "spec.runtime.args", "{arg}");
    }
    // Flags the operator leaves alone pass through.
    let md = with_runtime(RuntimeSpec { args: vec!["--rank-spread".into()], ..RuntimeSpec::default() });
    assert!(group_statefulset(&md, &group(), &OperatorConfig::default()).is_ok());

    let env = |name: &str| EnvVar { name: name.into(), value: Some("v".into()), ..EnvVar::default() };
    let md = with_runtime(RuntimeSpec { env: vec![env(ENV_RUNTIME_DTYPE)], ..RuntimeSpec::default() });
    assert_eq!(invalid_field(group_statefulset(&md, &group(), &OperatorConfig::default())), "spec.runtime.env");
}

#[test]
fn the_image_is_the_spec_s_or_the_operator_default_and_env_is_passed_through() {
    assert_eq!(runtime_container(&tiny()).image, Some(OperatorConfig::default().runtime_image));
    let log = EnvVar { name: ENV_RUNTIME_LOG.into(), value: Some("debug".into()), ..EnvVar::default() };
    let md = with_runtime(RuntimeSpec {
        image: Some("example.com/runtime:dev".into()),
        env: vec![log.clone()],
        ..RuntimeSpec::default()
    });
    let container = runtime_container(&md);
    assert_eq!(container.image.as_deref(), Some("example.com/runtime:dev"));
    assert_eq!(container.env, Some(vec![log]));
    assert_eq!(runtime_container(&tiny()).env, None);
}

#[test]
fn gpus_per_rank_is_merged_into_resources_and_selects_cuda() {
    let q = |s: &str| Quantity(s.into());
    let md = with_runtime(RuntimeSpec {
        gpus_per_rank: Some(2),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".to_string(), q("4"))])),
            limits: Some(BTreeMap::from([("memory".to_string(), q("8Gi"))])),
            ..ResourceRequirements::default()
        }),
        ..RuntimeSpec::default()
    });
    let container = runtime_container(&md);
    let resources = container.resources.unwrap();
    assert_eq!(
        resources.requests.unwrap(),
        BTreeMap::from([("cpu".to_string(), q("4")), (GPU_RESOURCE.to_string(), q("2"))])
    );
    assert_eq!(
        resources.limits.unwrap(),
        BTreeMap::from([("memory".to_string(), q("8Gi")), (GPU_RESOURCE.to_string(), q("2"))])
    );
    assert_eq!(flag_value(&container.args.unwrap(), "--device").as_deref(), Some("cuda"));

    // Without GPUs: resources as given, CPU (the runtime's default device).
    let cpu = with_runtime(RuntimeSpec { gpus_per_rank: Some(0), ..RuntimeSpec::default() });
    let container = runtime_container(&cpu);
    assert!(container.resources.is_none());
    assert_eq!(flag_value(&container.args.unwrap(), "--device"), None);

    // A different GPU count in resources contradicts gpusPerRank.
    let conflict = with_runtime(RuntimeSpec {
        gpus_per_rank: Some(1),
        resources: Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(GPU_RESOURCE.to_string(), q("8"))])),
            ..ResourceRequirements::default()
        }),
        ..RuntimeSpec::default()
    });
    assert_eq!(
        invalid_field(group_statefulset(&conflict, &group(), &OperatorConfig::default())),
        "spec.runtime.resources"
    );
}

#[test]
fn probes_ports_pre_stop_and_grace_period_fit_the_runtime_s_drain() {
    let config = OperatorConfig { drain_timeout_seconds: 60, ..OperatorConfig::default() };
    let pod = group_statefulset(&tiny(), &group(), &config).unwrap().spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.termination_grace_period_seconds, Some(60 + PRE_STOP_SLEEP_SECONDS + TERMINATION_MARGIN_SECONDS));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = &pod.containers[0];
    let ports: Vec<(Option<&str>, i32)> =
        c.ports.as_ref().unwrap().iter().map(|p| (p.name.as_deref(), p.container_port)).collect();
    assert_eq!(
        ports,
        [(Some(PORT_NAME_HTTP), i32::from(RUNTIME_HTTP_PORT)), (Some(PORT_NAME_GRPC), i32::from(RUNTIME_GRPC_PORT))]
    );
    let get = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let action = probe.as_ref().unwrap().http_get.clone().unwrap();
        assert_eq!(action.port, IntOrString::String(PORT_NAME_HTTP.into()));
        action.path.unwrap()
    };
    assert_eq!(get(&c.readiness_probe), PATH_READY);
    assert_eq!(get(&c.liveness_probe), PATH_HEALTH);
    assert_eq!(get(&c.startup_probe), PATH_HEALTH);
    let startup = c.startup_probe.as_ref().unwrap();
    let startup_budget = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
    assert!(startup_budget >= 30 * 60, "model loads get at least 30 minutes, got {startup_budget}s");
    let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, PRE_STOP_SLEEP_SECONDS);
    assert!(pre_stop.exec.is_none(), "the native sleep action needs no shell in the image");
}

#[test]
fn scheduling_fields_go_to_the_pod_spec() {
    let mut md = tiny();
    let toleration = Toleration {
        key: Some("nvidia.com/gpu".into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    };
    let affinity = Affinity { node_affinity: Some(NodeAffinity::default()), ..Affinity::default() };
    md.spec.scheduling = Some(SchedulingSpec {
        node_selector: BTreeMap::from([("gpu".to_string(), "h200".to_string())]),
        tolerations: vec![toleration.clone()],
        affinity: Some(affinity.clone()),
        priority_class_name: Some("inference".into()),
    });
    let pod = pod(&md);
    assert_eq!(pod.node_selector, Some(BTreeMap::from([("gpu".to_string(), "h200".to_string())])));
    assert_eq!(pod.tolerations, Some(vec![toleration]));
    assert_eq!(pod.affinity, Some(affinity));
    assert_eq!(pod.priority_class_name.as_deref(), Some("inference"));

    let plain = self::pod(&tiny());
    assert!(plain.node_selector.is_none() && plain.tolerations.is_none() && plain.affinity.is_none());
    assert!(plain.priority_class_name.is_none());
}

#[test]
fn builtin_and_file_sources_mount_nothing() {
    let builtin = pod(&tiny());
    assert!(builtin.volumes.is_none() && builtin.init_containers.is_none());
    let file = md(ModelDeploymentSpec::new("file:///opt/models/tiny"));
    let pod = pod(&file);
    assert!(pod.volumes.is_none() && pod.init_containers.is_none());
    assert!(pod.containers[0].volume_mounts.is_none());
    assert_eq!(flag_value(&pod.containers[0].args.clone().unwrap(), "--model").as_deref(), Some("/opt/models/tiny"));
}

#[test]
fn a_pvc_source_is_mounted_read_only_under_models() {
    let pod = pod(&md(ModelDeploymentSpec::new("pvc://weights/deepseek/v3")));
    let volumes = pod.volumes.unwrap();
    assert_eq!(volumes.len(), 1);
    let claim = volumes[0].persistent_volume_claim.as_ref().unwrap();
    assert_eq!(claim.claim_name, "weights");
    assert_eq!(claim.read_only, Some(true));
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].name, volumes[0].name);
    assert_eq!(mounts[0].mount_path, "/models/weights");
    assert_eq!(mounts[0].read_only, Some(true));
    assert!(pod.init_containers.is_none());
    let args = pod.containers[0].args.clone().unwrap();
    assert_eq!(flag_value(&args, "--model").as_deref(), Some("/models/weights/deepseek/v3"));

    let root = self::pod(&md(ModelDeploymentSpec::new("pvc://weights")));
    assert_eq!(flag_value(&root.containers[0].args.clone().unwrap(), "--model").as_deref(), Some("/models/weights"));
}

#[test]
fn an_hf_source_is_downloaded_by_the_runtime_image_into_a_hub_cache_the_runtime_reads_offline() {
    let mut md = md(ModelDeploymentSpec::new("hf://deepseek-ai/DeepSeek-V2-Lite@a1b2c3"));
    md.spec.model.hf_token_secret = Some("hf-token".into());
    md.spec.runtime = Some(RuntimeSpec {
        image: Some("registry.example.com/baleen-runtime:dev".into()),
        env: vec![EnvVar {
            name: "HF_ENDPOINT".into(),
            value: Some("https://hf-mirror.example".into()),
            ..EnvVar::default()
        }],
        ..RuntimeSpec::default()
    });
    let pod =
        group_statefulset(&md, &group(), &OperatorConfig::default()).unwrap().spec.unwrap().template.spec.unwrap();
    let volumes = pod.volumes.unwrap();
    assert_eq!(volumes.len(), 1);
    assert!(volumes[0].empty_dir.is_some());
    let runtime = &pod.containers[0];
    let runtime_mount = &runtime.volume_mounts.as_ref().unwrap()[0];
    assert_eq!((runtime_mount.mount_path.as_str(), runtime_mount.read_only), (HF_CACHE_DIR, Some(true)));
    let args = runtime.args.clone().unwrap();
    assert_eq!(flag_value(&args, "--model").as_deref(), Some("hf://deepseek-ai/DeepSeek-V2-Lite@a1b2c3"));
    let values = |env: &[EnvVar]| -> Vec<(String, Option<String>)> {
        env.iter().map(|v| (v.name.clone(), v.value.clone())).collect()
    };
    let runtime_env = runtime.env.clone().unwrap();
    assert_eq!(
        values(&runtime_env),
        [
            ("HF_HUB_CACHE".to_string(), Some(HF_CACHE_DIR.to_string())),
            ("HF_HUB_OFFLINE".to_string(), Some("1".to_string())),
            ("HF_ENDPOINT".to_string(), Some("https://hf-mirror.example".to_string())),
        ],
        "the runtime never reaches the Hub and never sees the token"
    );

    let init = pod.init_containers.unwrap();
    assert_eq!(init.len(), 1);
    let download = &init[0];
    assert_eq!(download.name, CONTAINER_MODEL_DOWNLOAD);
    assert_eq!(download.image, runtime.image, "the runtime's own image downloads");
    assert_eq!(download.image.as_deref(), Some("registry.example.com/baleen-runtime:dev"));
    assert_eq!(download.command.clone().unwrap(), ["baleen-runtime"]);
    assert_eq!(download.args.clone().unwrap(), ["download", "--model", "hf://deepseek-ai/DeepSeek-V2-Lite@a1b2c3"]);
    let download_mount = &download.volume_mounts.as_ref().unwrap()[0];
    assert_eq!((download_mount.mount_path.as_str(), download_mount.read_only), (HF_CACHE_DIR, None));
    let env = download.env.clone().unwrap();
    assert_eq!(
        env.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["HF_HUB_CACHE", HF_TOKEN_KEY, "HF_ENDPOINT"],
        "the cache, the token, then the user's variables (a mirror reaches the download)"
    );
    assert_eq!(env[0].value.as_deref(), Some(HF_CACHE_DIR));
    let secret = env[1].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!((secret.name.as_str(), secret.key.as_str()), ("hf-token", HF_TOKEN_KEY));

    // Anonymous download at the default branch, in the operator's default image.
    let anonymous = self::md(ModelDeploymentSpec::new("hf://org/model"));
    let pod = self::pod(&anonymous);
    let download = pod.init_containers.unwrap().into_iter().next().unwrap();
    assert_eq!(download.image.as_deref(), Some(OperatorConfig::default().runtime_image.as_str()));
    assert_eq!(download.env.unwrap().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["HF_HUB_CACHE"]);
    assert_eq!(download.args.unwrap()[2], "hf://org/model");
    assert_eq!(anonymous.spec.cluster_served_name().unwrap(), "org/model", "served under the repository's name");

    // The operator's own variables cannot be overridden: the pod would say one thing and do another.
    for name in ["HF_HUB_CACHE", "HF_HUB_OFFLINE", HF_TOKEN_KEY] {
        let mut md = self::md(ModelDeploymentSpec::new("hf://org/model"));
        md.spec.runtime = Some(RuntimeSpec {
            env: vec![EnvVar { name: name.into(), value: Some("x".into()), ..EnvVar::default() }],
            ..RuntimeSpec::default()
        });
        let err = group_statefulset(&md, &group(), &OperatorConfig::default()).unwrap_err().to_string();
        assert!(err.contains("spec.runtime.env") && err.contains(name) && err.contains("hf://"), "{err}");
    }
}

#[test]
fn the_group_service_is_headless_and_publishes_ranks_before_they_are_ready() {
    let md = with_parallelism(2, false, vec![]);
    let svc = group_service(&md, &group()).unwrap();
    assert_eq!(svc.metadata.name.as_deref(), Some("tiny-0123abcd-1"));
    assert_eq!(svc.metadata.labels.as_ref(), Some(&group_labels(&md, &group())));
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    let sts_selector = sts(&md).spec.unwrap().selector.match_labels.unwrap();
    assert_eq!(spec.selector.unwrap(), sts_selector);
    let ports: Vec<(String, i32)> = spec.ports.unwrap().into_iter().map(|p| (p.name.unwrap(), p.port)).collect();
    assert!(ports.contains(&(PORT_NAME_GRPC.to_string(), i32::from(RUNTIME_GRPC_PORT))));
    assert!(ports.contains(&(PORT_NAME_HTTP.to_string(), i32::from(RUNTIME_HTTP_PORT))));
}

#[test]
fn the_heads_service_selects_rank_zero_or_every_rank_with_data_parallel_attention() {
    let md = tiny();
    let svc = heads_service(&md).unwrap();
    assert_eq!(svc.metadata.name.as_deref(), Some("tiny"));
    assert_eq!(svc.metadata.labels.as_ref(), Some(&common_labels(&md)));
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.publish_not_ready_addresses, None, "only ready heads get traffic");
    let selector = spec.selector.unwrap();
    assert_eq!(
        selector,
        BTreeMap::from([
            (LABEL_POD_INDEX.to_string(), "0".to_string()),
            (LABEL_MODEL_DEPLOYMENT.to_string(), "tiny".to_string()),
        ])
    );
    let port = &spec.ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some(PORT_NAME_HTTP), i32::from(RUNTIME_HTTP_PORT)));
    assert_eq!(port.target_port, Some(IntOrString::String(PORT_NAME_HTTP.into())));
    assert_eq!(heads_selector(&md), "apps.kubernetes.io/pod-index=0,baleen.dev/model-deployment=tiny");

    let dpa = with_parallelism(2, true, vec![]);
    assert_eq!(
        heads_service(&dpa).unwrap().spec.unwrap().selector.unwrap(),
        BTreeMap::from([(LABEL_MODEL_DEPLOYMENT.to_string(), "tiny".to_string())])
    );
    assert_eq!(heads_selector(&dpa), "baleen.dev/model-deployment=tiny");
}

#[test]
fn the_budget_allows_one_disrupted_rank_and_evicting_unhealthy_pods() {
    let pdb = pod_disruption_budget(&tiny()).unwrap();
    assert_eq!(pdb.metadata.name.as_deref(), Some("tiny"));
    let spec = pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(spec.min_available, None);
    assert_eq!(spec.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
    assert_eq!(spec.selector.unwrap().match_labels.unwrap(), deployment_selector(&tiny()));
}

#[test]
fn the_pod_monitor_scrapes_metrics_on_the_http_port_of_every_rank() {
    let monitor = pod_monitor(&tiny()).unwrap();
    let types = monitor.types.clone().unwrap();
    assert_eq!((types.api_version.as_str(), types.kind.as_str()), ("monitoring.coreos.com/v1", "PodMonitor"));
    assert_eq!(monitor.metadata.name.as_deref(), Some("tiny"));
    assert_eq!(monitor.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(monitor.data["spec"]["selector"]["matchLabels"][LABEL_MODEL_DEPLOYMENT], "tiny");
    let endpoints = monitor.data["spec"]["podMetricsEndpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], PORT_NAME_HTTP);
    assert_eq!(endpoints[0]["path"], PATH_METRICS);
}

#[test]
fn desired_objects_come_in_a_stable_order_services_before_statefulsets() {
    let md = with_parallelism(2, false, vec![]);
    let groups = [GroupRef { revision: "0123abcd".into(), index: 0 }, group()];
    let kinds = |config: &OperatorConfig| -> Vec<(String, String)> {
        desired_objects(&md, &groups, config)
            .unwrap()
            .into_iter()
            .map(|o| (o.types.unwrap().kind, o.metadata.name.unwrap()))
            .collect()
    };
    let pair = |k: &str, n: &str| (k.to_string(), n.to_string());
    assert_eq!(
        kinds(&OperatorConfig::default()),
        [
            pair("Service", "tiny"),
            pair("PodDisruptionBudget", "tiny"),
            pair("Service", "tiny-0123abcd-0"),
            pair("StatefulSet", "tiny-0123abcd-0"),
            pair("Service", "tiny-0123abcd-1"),
            pair("StatefulSet", "tiny-0123abcd-1"),
        ]
    );
    let with_monitor = kinds(&OperatorConfig { pod_monitor: true, ..OperatorConfig::default() });
    assert_eq!(with_monitor[2], pair("PodMonitor", "tiny"));
    assert_eq!(with_monitor.len(), 7);
    // The dynamic objects keep the typed objects' content.
    let objects = desired_objects(&md, &groups, &OperatorConfig::default()).unwrap();
    let typed: StatefulSet = serde_json::from_value(serde_json::to_value(&objects[5]).unwrap()).unwrap();
    assert_eq!(typed, sts(&md));
}
