//! The StatefulSet of one replica group: `parallelism.expert` rank pods, ordinal = rank.

use std::collections::BTreeMap;

use baleen_api::crd::{Launcher, ManifestError, ModelDeployment, ModelSource, Peers};
use baleen_api::names::{
    ANNOTATION_GROUP_INDEX, CONTAINER_MODEL_DOWNLOAD, CONTAINER_RUNTIME, ENV_HF_HUB_CACHE, ENV_HF_HUB_OFFLINE,
    FLAG_MODEL, HF_CACHE_DIR, HF_TOKEN_KEY, LABEL_GROUP, LABEL_MODEL_DEPLOYMENT, MODELS_DIR, PATH_HEALTH, PATH_READY,
    PORT_NAME_GRPC, PORT_NAME_HTTP, RUNTIME_BIN_NAME, RUNTIME_DOWNLOAD_COMMAND, RUNTIME_GRPC_PORT, RUNTIME_HTTP_PORT,
    RUNTIME_SERVE_COMMAND,
};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecurityContext, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::meta::object_meta;
use super::{GroupRef, group_labels};
use crate::config::OperatorConfig;
use crate::error::{Error, Result};

/// Extended resource name of NVIDIA GPUs (the NVIDIA device plugin's).
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Volume holding the weights: the `pvc://` claim, or the `hf://` download cache.
pub const MODEL_VOLUME: &str = "model";
/// Seconds the `preStop` hook sleeps before the runtime gets SIGTERM: long enough for the endpoints controller
/// and kube-proxy/gateways to drop the pod, so no new request arrives once draining has started.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Seconds added to the drain timeout (after the `preStop` sleep) before the kubelet kills the container: the
/// runtime's own shutdown (closing HTTP, joining the engine) after the drain.
pub const TERMINATION_MARGIN_SECONDS: i64 = 10;

/// Startup probe period, seconds.
pub const STARTUP_PERIOD_SECONDS: i32 = 10;
/// Startup probe failures allowed: 360 × 10 s = one hour for the runtime to load its weights (a DeepSeek-V3 rank
/// reads and converts ~100 GB) and, in an expert-parallel group, for its peers to come up. The HTTP server only
/// starts after that, so `/health` stays unanswered meanwhile. A process that *exits* is restarted at once
/// anyway; this bound only catches a start that hangs.
pub const STARTUP_FAILURE_THRESHOLD: i32 = 360;
/// Liveness probe: a period of 10 s and 6 failures — a minute without `/health` answering restarts the rank.
pub const LIVENESS_PERIOD_SECONDS: i32 = 10;
/// See [`LIVENESS_PERIOD_SECONDS`].
pub const LIVENESS_FAILURE_THRESHOLD: i32 = 6;
/// Readiness probe: every 5 s; 2 failures (10 s) take the rank out of its Services.
pub const READINESS_PERIOD_SECONDS: i32 = 5;
/// See [`READINESS_PERIOD_SECONDS`].
pub const READINESS_FAILURE_THRESHOLD: i32 = 2;
/// Timeout of each probe request, seconds (the engine never serves probes: they answer from the HTTP threads).
pub const PROBE_TIMEOUT_SECONDS: i32 = 5;

fn invalid(field: &'static str, reason: String) -> Error {
    Error::InvalidSpec(ManifestError::Invalid { field, reason })
}

/// The StatefulSet of `group`: `parallelism.expert` rank pods created in parallel (ranks wait for each other at
/// start-up, so `OrderedReady` would deadlock: rank 0 never turns ready before rank 1 exists), governed by the
/// group's headless Service (same name) so each rank has the DNS name `<group>-<rank>.<group>`.
///
/// Errors: [`Error::MissingField`] without a namespace; [`Error::InvalidSpec`] for a source that does not parse
/// or `spec.runtime.args`/`env` that repeat a setting the operator makes.
pub fn group_statefulset(md: &ModelDeployment, group: &GroupRef, config: &OperatorConfig) -> Result<StatefulSet> {
    let name = group.name(&md.name_any());
    let labels = group_labels(md, group);
    let mut meta = object_meta(md, name.clone(), labels.clone())?;
    meta.annotations = Some(BTreeMap::from([(ANNOTATION_GROUP_INDEX.to_string(), group.index.to_string())]));
    let selector =
        BTreeMap::from([(LABEL_MODEL_DEPLOYMENT.to_string(), md.name_any()), (LABEL_GROUP.to_string(), name.clone())]);
    let ranks = i32::try_from(md.spec.expert_parallelism())
        .map_err(|_| invalid("spec.parallelism.expert", "is too large".into()))?;
    Ok(StatefulSet {
        metadata: meta,
        spec: Some(StatefulSetSpec {
            replicas: Some(ranks),
            service_name: Some(name.clone()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector { match_labels: Some(selector), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                spec: Some(pod_spec(md, &name, config)?),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    })
}

/// Where the runtime finds the weights, and what the pod needs for that.
#[derive(Debug, Default)]
struct ModelPlacement {
    /// `--model`.
    model_arg: String,
    volumes: Vec<Volume>,
    runtime_mounts: Vec<VolumeMount>,
    /// Variables the runtime container gets besides `spec.runtime.env`.
    runtime_env: Vec<EnvVar>,
    init_containers: Vec<Container>,
}

/// - `builtin:NAME`: passed as is; nothing to mount.
/// - `file:///path`: `--model /path`; the directory must exist inside the runtime container (baked into the
///   image): the operator mounts nothing for it.
/// - `pvc://claim/path`: the claim mounted read-only at `/models/<claim>`, `--model /models/<claim>/<path>`.
/// - `hf://org/name[@rev]`: an emptyDir at `/models/hf`, a Hugging Face cache (`HF_HUB_CACHE`) that the
///   `model-download` init container fills with `baleen-runtime download` (same image as the runtime; resumes
///   after a restart, verifies sizes and SHA-256). The runtime gets `--model hf://org/name[@rev]` and
///   `HF_HUB_OFFLINE=1`: it loads the snapshot from the cache and never reaches the Hub itself. `spec.runtime.env`
///   reaches the download too (`HF_ENDPOINT` for a mirror, proxies). Each rank pod downloads its own copy; for
///   very large models a pre-filled ReadOnlyMany claim (`pvc://`) saves the downloads.
fn model_placement(md: &ModelDeployment, image: &str) -> Result<ModelPlacement> {
    let source = md.spec.source()?;
    let model_arg = source.pod_model_arg();
    match source {
        ModelSource::Builtin { .. } | ModelSource::File { .. } => {
            Ok(ModelPlacement { model_arg, ..Default::default() })
        }
        ModelSource::Pvc { claim, .. } => {
            let mount_path = format!("{MODELS_DIR}/{claim}");
            Ok(ModelPlacement {
                model_arg,
                volumes: vec![Volume {
                    name: MODEL_VOLUME.into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim,
                        read_only: Some(true),
                    }),
                    ..Volume::default()
                }],
                runtime_mounts: vec![VolumeMount {
                    name: MODEL_VOLUME.into(),
                    mount_path,
                    read_only: Some(true),
                    ..VolumeMount::default()
                }],
                ..Default::default()
            })
        }
        ModelSource::HuggingFace { .. } => {
            let user_env = md.spec.runtime.as_ref().map(|r| r.env.as_slice()).unwrap_or_default();
            if let Some(var) = user_env.iter().find(|v| HF_MANAGED_ENV.contains(&v.name.as_str())) {
                return Err(invalid(
                    "spec.runtime.env",
                    format!("{} is set by the operator for hf:// sources; remove it from env", var.name),
                ));
            }
            let cache = env_value(ENV_HF_HUB_CACHE, HF_CACHE_DIR);
            let mut download_env = vec![cache.clone()];
            if let Some(secret) = &md.spec.model.hf_token_secret {
                download_env.push(EnvVar {
                    name: HF_TOKEN_KEY.into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret.clone(),
                            key: HF_TOKEN_KEY.into(),
                            optional: Some(false),
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                });
            }
            download_env.extend(user_env.iter().cloned());
            let download = Container {
                name: CONTAINER_MODEL_DOWNLOAD.into(),
                image: Some(image.to_string()),
                command: Some(vec![RUNTIME_BIN_NAME.into()]),
                args: Some(vec![RUNTIME_DOWNLOAD_COMMAND.into(), FLAG_MODEL.into(), model_arg.clone()]),
                env: Some(download_env),
                volume_mounts: Some(vec![VolumeMount {
                    name: MODEL_VOLUME.into(),
                    mount_path: HF_CACHE_DIR.into(),
                    ..VolumeMount::default()
                }]),
                security_context: Some(container_security_context()),
                ..Container::default()
            };
            Ok(ModelPlacement {
                model_arg,
                volumes: vec![Volume {
                    name: MODEL_VOLUME.into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                }],
                runtime_mounts: vec![VolumeMount {
                    name: MODEL_VOLUME.into(),
                    mount_path: HF_CACHE_DIR.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                }],
                runtime_env: vec![cache, env_value(ENV_HF_HUB_OFFLINE, "1")],
                init_containers: vec![download],
            })
        }
    }
}

/// Variables the operator sets in the pods of an `hf://` source, refused in `spec.runtime.env`.
const HF_MANAGED_ENV: [&str; 3] = [ENV_HF_HUB_CACHE, ENV_HF_HUB_OFFLINE, HF_TOKEN_KEY];

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

/// The `baleen-runtime serve` arguments of every rank of a group named `group` (the rank comes from the host
/// name, so one pod template serves all ranks): the shared builder ([`ModelDeploymentSpec::serve_args`]) with the
/// operator's choices — all interfaces, port 8000, CUDA when the spec asks for GPUs, the drain timeout, peers by
/// the group's headless Service.
pub fn runtime_args(
    md: &ModelDeployment,
    group: &str,
    model_arg: &str,
    config: &OperatorConfig,
) -> Result<Vec<String>> {
    let launcher = Launcher {
        model: model_arg.to_string(),
        host: "0.0.0.0".to_string(),
        port: RUNTIME_HTTP_PORT,
        device: (md.spec.gpus_per_rank() > 0).then(|| "cuda".to_string()),
        drain_timeout: Some(u64::from(config.drain_timeout_seconds)),
        peers: Some(Peers::Pattern {
            pattern: format!("{group}-{{rank}}.{group}:{RUNTIME_GRPC_PORT}"),
            grpc_port: RUNTIME_GRPC_PORT,
        }),
    };
    let mut args = vec![RUNTIME_SERVE_COMMAND.to_string()];
    args.extend(md.spec.serve_args(&launcher).map_err(Error::InvalidSpec)?);
    Ok(args)
}

fn http_get(path: &str) -> Option<HTTPGetAction> {
    Some(HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::String(PORT_NAME_HTTP.into()),
        ..HTTPGetAction::default()
    })
}

fn container_security_context() -> SecurityContext {
    SecurityContext { allow_privilege_escalation: Some(false), ..SecurityContext::default() }
}

/// `spec.runtime.resources` plus `nvidia.com/gpu: gpusPerRank` in requests and limits (when above 0; extended
/// resources must have equal requests and limits). A different GPU count in `resources` is refused.
fn resources(md: &ModelDeployment) -> Result<Option<ResourceRequirements>> {
    let mut resources = md.spec.runtime.as_ref().and_then(|r| r.resources.clone());
    let gpus = md.spec.gpus_per_rank();
    if gpus == 0 {
        return Ok(resources);
    }
    let quantity = Quantity(gpus.to_string());
    let set = resources.get_or_insert_with(ResourceRequirements::default);
    for (map, field) in [(&mut set.requests, "requests"), (&mut set.limits, "limits")] {
        let map = map.get_or_insert_with(BTreeMap::new);
        match map.get(GPU_RESOURCE) {
            Some(given) if *given != quantity => {
                return Err(invalid(
                    "spec.runtime.resources",
                    format!("{field} has {GPU_RESOURCE}: {} but gpusPerRank is {gpus}; set only gpusPerRank", given.0),
                ));
            }
            _ => {
                map.insert(GPU_RESOURCE.into(), quantity.clone());
            }
        }
    }
    Ok(resources)
}

fn pod_spec(md: &ModelDeployment, group: &str, config: &OperatorConfig) -> Result<PodSpec> {
    let runtime_spec = md.spec.runtime.as_ref();
    let image = runtime_spec.and_then(|r| r.image.clone()).unwrap_or_else(|| config.runtime_image.clone());
    let placement = model_placement(md, &image)?;
    let args = runtime_args(md, group, &placement.model_arg, config)?;
    let mut env = placement.runtime_env;
    env.extend(runtime_spec.map(|r| r.env.clone()).unwrap_or_default());
    let env = Some(env).filter(|env| !env.is_empty());
    let runtime = Container {
        name: CONTAINER_RUNTIME.into(),
        image: Some(image),
        command: Some(vec![RUNTIME_BIN_NAME.into()]),
        args: Some(args),
        env,
        ports: Some(vec![
            ContainerPort {
                name: Some(PORT_NAME_HTTP.into()),
                container_port: i32::from(RUNTIME_HTTP_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(PORT_NAME_GRPC.into()),
                container_port: i32::from(RUNTIME_GRPC_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        resources: resources(md)?,
        volume_mounts: Some(placement.runtime_mounts).filter(|m| !m.is_empty()),
        startup_probe: Some(Probe {
            http_get: http_get(PATH_HEALTH),
            period_seconds: Some(STARTUP_PERIOD_SECONDS),
            failure_threshold: Some(STARTUP_FAILURE_THRESHOLD),
            timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: http_get(PATH_HEALTH),
            period_seconds: Some(LIVENESS_PERIOD_SECONDS),
            failure_threshold: Some(LIVENESS_FAILURE_THRESHOLD),
            timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
            ..Probe::default()
        }),
        readiness_probe: Some(Probe {
            http_get: http_get(PATH_READY),
            period_seconds: Some(READINESS_PERIOD_SECONDS),
            failure_threshold: Some(READINESS_FAILURE_THRESHOLD),
            timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
            ..Probe::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: PRE_STOP_SLEEP_SECONDS }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(container_security_context()),
        ..Container::default()
    };
    let scheduling = md.spec.scheduling.clone().unwrap_or_default();
    Ok(PodSpec {
        init_containers: Some(placement.init_containers).filter(|c| !c.is_empty()),
        containers: vec![runtime],
        volumes: Some(placement.volumes).filter(|v| !v.is_empty()),
        termination_grace_period_seconds: Some(
            PRE_STOP_SLEEP_SECONDS + i64::from(config.drain_timeout_seconds) + TERMINATION_MARGIN_SECONDS,
        ),
        // The runtime never talks to the API server, and thousands of service variables help nobody.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..PodSecurityContext::default()
        }),
        node_selector: Some(scheduling.node_selector).filter(|n| !n.is_empty()),
        tolerations: Some(scheduling.tolerations).filter(|t| !t.is_empty()),
        affinity: scheduling.affinity,
        priority_class_name: scheduling.priority_class_name,
        ..PodSpec::default()
    })
}
