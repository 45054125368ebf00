//! Names shared across Baleen components.
//!
//! Rules: environment variables are `BALEEN_<COMPONENT>_<NAME>`; metric names follow the rules above the metric
//! constants; model sources are URI-like strings whose scheme says where the weights come from.

/// Model source of the built-in random-weight demo model (DeepSeek-V3 architecture, byte-level tokenizer).
pub const BUILTIN_TINY_MOE: &str = "builtin:tiny-moe";
/// Routed experts of [`BUILTIN_TINY_MOE`] (so `parallelism.expert` can be checked before anything runs).
pub const BUILTIN_TINY_MOE_ROUTED_EXPERTS: u32 = 16;
/// `architectures[0]` of [`BUILTIN_TINY_MOE`]'s config.
pub const BUILTIN_TINY_MOE_ARCHITECTURE: &str = "DeepseekV3ForCausalLM";
/// Latent KV-cache values one token of [`BUILTIN_TINY_MOE`] takes over all layers
/// (`(kv_lora_rank + qk_rope_head_dim) * num_hidden_layers`); times the dtype's bytes, its KV bytes per token.
pub const BUILTIN_TINY_MOE_KV_VALUES_PER_TOKEN: u64 = 160;

/// Prefix of every built-in model source.
pub const BUILTIN_SCHEME: &str = "builtin:";

/// Runtime: the model to load (a Hugging Face directory or `builtin:NAME`).
pub const ENV_RUNTIME_MODEL: &str = "BALEEN_RUNTIME_MODEL";
/// Runtime: this process's rank in its expert-parallel group (0 = head).
pub const ENV_RUNTIME_RANK: &str = "BALEEN_RUNTIME_RANK";
/// Runtime: ranks in the expert-parallel group.
pub const ENV_RUNTIME_WORLD_SIZE: &str = "BALEEN_RUNTIME_WORLD_SIZE";
/// Runtime: every rank's expert gRPC address in rank order (`host:port,...`).
pub const ENV_RUNTIME_PEERS: &str = "BALEEN_RUNTIME_PEERS";
/// Runtime: port of this rank's expert gRPC service (design default 50051).
pub const ENV_RUNTIME_GRPC_PORT: &str = "BALEEN_RUNTIME_GRPC_PORT";
/// Runtime: redundant expert replicas (`EXPERT@RANK,...`).
pub const ENV_RUNTIME_REPLICATE: &str = "BALEEN_RUNTIME_REPLICATE";
/// Runtime: every rank of the group is a head and serves its experts to the others (`true`/`false`).
pub const ENV_RUNTIME_DATA_PARALLEL_ATTENTION: &str = "BALEEN_RUNTIME_DATA_PARALLEL_ATTENTION";
/// Runtime: take the rank from the StatefulSet ordinal in the host name (`true`/`false`).
pub const ENV_RUNTIME_RANK_FROM_HOSTNAME: &str = "BALEEN_RUNTIME_RANK_FROM_HOSTNAME";
/// Runtime: peer addresses as a pattern with `{rank}` (a headless service's DNS names).
pub const ENV_RUNTIME_PEER_PATTERN: &str = "BALEEN_RUNTIME_PEER_PATTERN";
/// The host name variable Kubernetes sets to the pod name (a StatefulSet pod ends in `-ORDINAL`).
pub const ENV_HOSTNAME: &str = "HOSTNAME";
/// Runtime: seconds to wait for expert peers and for each expert dispatch.
pub const ENV_RUNTIME_EXPERT_TIMEOUT: &str = "BALEEN_RUNTIME_EXPERT_TIMEOUT";
/// Runtime: compute device (`cpu`, `cuda`, `cuda:N`).
pub const ENV_RUNTIME_DEVICE: &str = "BALEEN_RUNTIME_DEVICE";
/// Runtime tests: the device the numeric (golden) tests run on (`cuda`, `cuda:N`; default the CPU).
pub const ENV_TEST_DEVICE: &str = "BALEEN_TEST_DEVICE";
/// Runtime: compute dtype (`f32`, `bf16`, `f16`).
pub const ENV_RUNTIME_DTYPE: &str = "BALEEN_RUNTIME_DTYPE";
/// Runtime: Baleen's CUDA kernels for routing, experts and decode attention (`true`/`false`; CUDA only).
pub const ENV_RUNTIME_CUDA_KERNELS: &str = "BALEEN_RUNTIME_CUDA_KERNELS";
/// Runtime: capture decode steps in CUDA graphs (`true`/`false`; CUDA only, with the kernels).
pub const ENV_RUNTIME_CUDA_GRAPHS: &str = "BALEEN_RUNTIME_CUDA_GRAPHS";
/// Runtime: CPU compute threads (0 = choose from the model size).
pub const ENV_RUNTIME_THREADS: &str = "BALEEN_RUNTIME_THREADS";
/// `baleen-runtime --quantize`: `none` or `int8` (the host kernels' weights, quantized at load).
pub const ENV_RUNTIME_QUANTIZE: &str = "BALEEN_RUNTIME_QUANTIZE";
/// Runtime: log filter (`tracing` env-filter syntax).
pub const ENV_RUNTIME_LOG: &str = "BALEEN_RUNTIME_LOG";

/// Thread-count variable read by rayon's global pool and by candle's CPU matmul (gemm). The runtime sets it
/// once at start-up, before any thread exists, from `--threads`.
pub const ENV_RAYON_NUM_THREADS: &str = "RAYON_NUM_THREADS";

// ---------------------------------------------------------------------------------------------------------------
// Runtime `serve` settings. Every flag of `baleen-runtime serve` can also be given through its variable.
// ---------------------------------------------------------------------------------------------------------------

/// Runtime: address the HTTP API binds to (`--host`).
pub const ENV_RUNTIME_HOST: &str = "BALEEN_RUNTIME_HOST";
/// Runtime: HTTP API port (`--port`; 0 picks a free port).
pub const ENV_RUNTIME_PORT: &str = "BALEEN_RUNTIME_PORT";
/// Runtime: the model name clients send in `model` (`--served-model-name`).
pub const ENV_RUNTIME_SERVED_MODEL_NAME: &str = "BALEEN_RUNTIME_SERVED_MODEL_NAME";
/// Runtime: sequences in the running batch at most (`--max-num-seqs`).
pub const ENV_RUNTIME_MAX_NUM_SEQS: &str = "BALEEN_RUNTIME_MAX_NUM_SEQS";
/// Runtime: tokens processed in one engine step at most (`--max-num-batched-tokens`).
pub const ENV_RUNTIME_MAX_NUM_BATCHED_TOKENS: &str = "BALEEN_RUNTIME_MAX_NUM_BATCHED_TOKENS";
/// Runtime: prompt plus generated tokens of one sequence at most (`--max-model-len`).
pub const ENV_RUNTIME_MAX_MODEL_LEN: &str = "BALEEN_RUNTIME_MAX_MODEL_LEN";
/// Runtime: memory for the latent KV cache, a fraction or a size such as `4GiB` (`--kv-cache-memory`).
pub const ENV_RUNTIME_KV_CACHE_MEMORY: &str = "BALEEN_RUNTIME_KV_CACHE_MEMORY";
/// Runtime: tokens per KV-cache block (`--block-size`).
pub const ENV_RUNTIME_BLOCK_SIZE: &str = "BALEEN_RUNTIME_BLOCK_SIZE";
/// Runtime: requests waiting for admission at most before HTTP 429 (`--max-waiting`).
pub const ENV_RUNTIME_MAX_WAITING: &str = "BALEEN_RUNTIME_MAX_WAITING";
/// Runtime: turn prefix caching off (`--no-prefix-caching`; `true`/`false`).
pub const ENV_RUNTIME_NO_PREFIX_CACHING: &str = "BALEEN_RUNTIME_NO_PREFIX_CACHING";
/// Runtime: request bodies larger than this many bytes are refused with HTTP 413 (`--max-request-bytes`).
pub const ENV_RUNTIME_MAX_REQUEST_BYTES: &str = "BALEEN_RUNTIME_MAX_REQUEST_BYTES";
/// Runtime: seconds to wait for in-flight requests after SIGTERM before aborting them (`--drain-timeout`).
pub const ENV_RUNTIME_DRAIN_TIMEOUT: &str = "BALEEN_RUNTIME_DRAIN_TIMEOUT";
/// Runtime: seconds a client may take to send a request's headers, and an idle keep-alive connection may wait
/// for its next request (`--header-read-timeout`).
pub const ENV_RUNTIME_HEADER_READ_TIMEOUT: &str = "BALEEN_RUNTIME_HEADER_READ_TIMEOUT";
/// Runtime: seconds a client may take to send a request's body before HTTP 408 (`--body-read-timeout`).
pub const ENV_RUNTIME_BODY_READ_TIMEOUT: &str = "BALEEN_RUNTIME_BODY_READ_TIMEOUT";
/// Runtime: open client connections at most; beyond it only the probes and `/metrics` are served
/// (`--max-connections`).
pub const ENV_RUNTIME_MAX_CONNECTIONS: &str = "BALEEN_RUNTIME_MAX_CONNECTIONS";
/// Runtime: API keys (comma-separated) that `/v1/*` requests must send as `Authorization: Bearer KEY`
/// (`--api-key`).
pub const ENV_RUNTIME_API_KEY: &str = "BALEEN_RUNTIME_API_KEY";
/// Runtime: browser origins (comma-separated, or `*`) allowed to call the API through CORS
/// (`--allowed-origins`).
pub const ENV_RUNTIME_ALLOWED_ORIGINS: &str = "BALEEN_RUNTIME_ALLOWED_ORIGINS";
/// Runtime: a Jinja chat template file used instead of the model's (`--chat-template`).
pub const ENV_RUNTIME_CHAT_TEMPLATE: &str = "BALEEN_RUNTIME_CHAT_TEMPLATE";

// ---------------------------------------------------------------------------------------------------------------
// Runtime HTTP contract: paths on the serving port (API, probes and metrics share it, as in vLLM).
// ---------------------------------------------------------------------------------------------------------------

/// OpenAI chat completions.
pub const PATH_CHAT_COMPLETIONS: &str = "/v1/chat/completions";
/// OpenAI (legacy) text completions.
pub const PATH_COMPLETIONS: &str = "/v1/completions";
/// OpenAI model list.
pub const PATH_MODELS: &str = "/v1/models";
/// OpenAI model retrieval, `GET /v1/models/{id}` (an id may hold `/`): the route template (also the `route`
/// label).
pub const PATH_MODEL: &str = "/v1/models/{*model}";
/// Liveness: 200 while the process is alive.
pub const PATH_HEALTH: &str = "/health";
/// Readiness: 200 while the model is loaded and the engine admits requests; 503 while draining.
pub const PATH_READY: &str = "/ready";
/// Prometheus text exposition.
pub const PATH_METRICS: &str = "/metrics";

// ---------------------------------------------------------------------------------------------------------------
// Metrics.
//
// Rules: the runtime exports vLLM's metric names verbatim (`vllm:*`, colon included — valid in Prometheus, though
// `promtool check metrics` warns about it) so endpoint pickers, KEDA recipes and dashboards built for vLLM work
// unchanged; every `vllm:*` series carries the label `model_name`. Our own metrics are
// `baleen_<component>_<name>_<unit>`, with `_total` only on counters and base units (seconds, bytes). Label
// values come from small closed sets (a route template, a status code, a finish reason), never from user input.
// ---------------------------------------------------------------------------------------------------------------

/// Gauge: requests waiting for admission to the running batch.
pub const METRIC_NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
/// Gauge: requests in the running batch.
pub const METRIC_NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
/// Gauge: fraction of KV-cache blocks in use, 0..1.
pub const METRIC_KV_CACHE_USAGE_PERC: &str = "vllm:kv_cache_usage_perc";
/// Info gauge (always 1): the KV-cache configuration in its labels.
pub const METRIC_CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";
/// Histogram: seconds from arrival to the first generated token.
pub const METRIC_TIME_TO_FIRST_TOKEN_SECONDS: &str = "vllm:time_to_first_token_seconds";
/// Histogram: seconds between consecutive generated tokens of one request.
pub const METRIC_INTER_TOKEN_LATENCY_SECONDS: &str = "vllm:inter_token_latency_seconds";
/// Histogram: seconds from arrival to the end of a finished request.
pub const METRIC_E2E_REQUEST_LATENCY_SECONDS: &str = "vllm:e2e_request_latency_seconds";
/// Histogram: seconds a request waited before it was first scheduled.
pub const METRIC_REQUEST_QUEUE_TIME_SECONDS: &str = "vllm:request_queue_time_seconds";
/// Counter: prompt tokens of admitted requests.
pub const METRIC_PROMPT_TOKENS_TOTAL: &str = "vllm:prompt_tokens_total";
/// Counter: generated tokens.
pub const METRIC_GENERATION_TOKENS_TOTAL: &str = "vllm:generation_tokens_total";
/// Counter: finished requests, by [`LABEL_FINISHED_REASON`].
pub const METRIC_REQUEST_SUCCESS_TOTAL: &str = "vllm:request_success_total";
/// Counter: sequences preempted (their KV cache freed, to be recomputed later).
pub const METRIC_NUM_PREEMPTIONS_TOTAL: &str = "vllm:num_preemptions_total";
/// Counter: prompt tokens looked up in the prefix cache.
pub const METRIC_PREFIX_CACHE_QUERIES_TOTAL: &str = "vllm:prefix_cache_queries_total";
/// Counter: prompt tokens found in the prefix cache.
pub const METRIC_PREFIX_CACHE_HITS_TOTAL: &str = "vllm:prefix_cache_hits_total";

/// Counter: HTTP requests answered by the runtime, by [`LABEL_ROUTE`] and [`LABEL_CODE`].
pub const METRIC_RUNTIME_HTTP_REQUESTS_TOTAL: &str = "baleen_runtime_http_requests_total";
/// Histogram: seconds until the response head was ready (a stream's first byte), by [`LABEL_ROUTE`].
pub const METRIC_RUNTIME_HTTP_REQUEST_DURATION_SECONDS: &str = "baleen_runtime_http_request_duration_seconds";
/// Gauge: bytes of model weights this process holds as stored (after `--quantize`), by [`LABEL_WEIGHT_FORMAT`].
pub const METRIC_RUNTIME_MODEL_WEIGHT_BYTES: &str = "baleen_runtime_model_weight_bytes";
/// Label of [`METRIC_RUNTIME_MODEL_WEIGHT_BYTES`]: how the large matrices are stored (`f32`, `bf16`, `int8`, ...).
pub const LABEL_WEIGHT_FORMAT: &str = "weight_format";

/// The Prometheus HTTP API's instant query (the gateway's autoscaler with `--prometheus-url`).
pub const PATH_PROMETHEUS_QUERY: &str = "/api/v1/query";
/// In the autoscaler's PromQL (ours and a ModelDeployment's `spec.autoscaling.metric.query`): replaced by the
/// served model name, quoted for a PromQL string.
pub const PROMQL_MODEL: &str = "$model";
/// PromQL of metric type `QueueDepth`: waiting requests averaged over the model's heads that Prometheus
/// scrapes (the gateway multiplies by the ready heads it routes to).
pub const PROMQL_QUEUE_DEPTH: &str = "avg(vllm:num_requests_waiting{model_name=\"$model\"})";
/// PromQL of metric type `RunningRequests`, averaged like [`PROMQL_QUEUE_DEPTH`].
pub const PROMQL_RUNNING_REQUESTS: &str = "avg(vllm:num_requests_running{model_name=\"$model\"})";
/// PromQL of metric type `KVCacheUtilization`, averaged like [`PROMQL_QUEUE_DEPTH`].
pub const PROMQL_KV_CACHE_UTILIZATION: &str = "avg(vllm:kv_cache_usage_perc{model_name=\"$model\"})";

/// Label on every `vllm:*` metric: the served model name.
pub const LABEL_MODEL_NAME: &str = "model_name";
/// Label of [`METRIC_REQUEST_SUCCESS_TOTAL`]: `stop`, `length` or `abort`.
pub const LABEL_FINISHED_REASON: &str = "finished_reason";
/// Label of the HTTP metrics: the matched route template (`/v1/chat/completions`), or `unmatched`.
pub const LABEL_ROUTE: &str = "route";
/// Label: a decoder layer index.
pub const LABEL_LAYER: &str = "layer";
/// Label: a routed expert's global id.
pub const LABEL_EXPERT: &str = "expert";
/// Counter: token rows routed to each expert, by [`LABEL_LAYER`] and [`LABEL_EXPERT`].
pub const METRIC_RUNTIME_EXPERT_TOKENS_TOTAL: &str = "baleen_runtime_expert_tokens_total";
/// Value of [`LABEL_ROUTE`] for requests that matched no route (unknown paths never become label values).
pub const ROUTE_UNMATCHED: &str = "unmatched";
/// Label of the HTTP metrics: the response status code (`200`, `429`, ...).
pub const LABEL_CODE: &str = "code";
/// Labels of [`METRIC_CACHE_CONFIG_INFO`] (vLLM's spelling).
pub const LABEL_BLOCK_SIZE: &str = "block_size";
/// See [`LABEL_BLOCK_SIZE`].
pub const LABEL_NUM_GPU_BLOCKS: &str = "num_gpu_blocks";
/// See [`LABEL_BLOCK_SIZE`].
pub const LABEL_CACHE_DTYPE: &str = "cache_dtype";

// ---------------------------------------------------------------------------------------------------------------
// The `ModelDeployment` custom resource.
// ---------------------------------------------------------------------------------------------------------------

/// API group of Baleen's custom resources.
pub const CRD_GROUP: &str = "baleen.dev";
/// API version of the `ModelDeployment` resource.
pub const CRD_VERSION: &str = "v1alpha1";
/// `apiVersion` of a `ModelDeployment` manifest: [`CRD_GROUP`]`/`[`CRD_VERSION`].
pub const CRD_API_VERSION: &str = "baleen.dev/v1alpha1";
/// Kind of the resource that deploys one model.
pub const CRD_KIND: &str = "ModelDeployment";
/// Plural resource name (`kubectl get modeldeployments`).
pub const CRD_PLURAL: &str = "modeldeployments";
/// Short name (`kubectl get md`).
pub const CRD_SHORT_NAME: &str = "md";

// ---------------------------------------------------------------------------------------------------------------
// Model sources (`spec.model.source`): `hf://org/name[@revision]`, `pvc://claim/path`, `file:///path`,
// `builtin:NAME` ([`BUILTIN_SCHEME`]).
// ---------------------------------------------------------------------------------------------------------------

/// A Hugging Face Hub repository, optionally at a revision: `hf://deepseek-ai/DeepSeek-V3@main`.
pub const HF_SCHEME: &str = "hf://";
/// A directory inside a PersistentVolumeClaim: `pvc://models/deepseek-v3`.
pub const PVC_SCHEME: &str = "pvc://";
/// A model directory on the local filesystem, absolute: `file:///models/deepseek-v3`.
pub const FILE_SCHEME: &str = "file://";

// ---------------------------------------------------------------------------------------------------------------
// `baleen-runtime serve` as a child process.
// ---------------------------------------------------------------------------------------------------------------

/// File name of the runtime binary.
pub const RUNTIME_BIN_NAME: &str = "baleen-runtime";
/// `baleen-runtime serve`: the OpenAI API of one rank.
pub const RUNTIME_SERVE_COMMAND: &str = "serve";
/// `baleen-runtime download`: a Hub model into the Hub cache (the `model-download` init container, `baleen up`).
pub const RUNTIME_DOWNLOAD_COMMAND: &str = "download";
/// The line an expert-only rank prints on stdout once its gRPC service is bound, followed by `host:port`.
pub const RUNTIME_EXPERTS_LISTENING_PREFIX: &str = "baleen-runtime experts listening on grpc://";
/// The first words of the one line `baleen-runtime serve` prints on stdout once bound; `HOST:PORT` follows.
pub const RUNTIME_LISTENING_PREFIX: &str = "baleen-runtime listening on http://";

// ---------------------------------------------------------------------------------------------------------------
// `baleen up` settings. Every flag of `baleen up` can also be given through its variable.
// ---------------------------------------------------------------------------------------------------------------

/// `baleen up`: path of the `baleen-runtime` binary to run (`--runtime-bin`).
pub const ENV_RUNTIME_BIN: &str = "BALEEN_RUNTIME_BIN";
/// `baleen up`: address the API binds to (`--host`).
pub const ENV_UP_HOST: &str = "BALEEN_UP_HOST";
/// `baleen up`: API port (`--port`; 0 picks a free port).
pub const ENV_UP_PORT: &str = "BALEEN_UP_PORT";
/// `baleen up --admin-port`: the in-process gateway's `/metrics` port.
pub const ENV_UP_ADMIN_PORT: &str = "BALEEN_UP_ADMIN_PORT";
/// `baleen up`: seconds to wait for the model to load and `/ready` to answer 200 (`--ready-timeout`).
pub const ENV_UP_READY_TIMEOUT: &str = "BALEEN_UP_READY_TIMEOUT";
/// `baleen up`: seconds to wait for the runtime to drain and exit after SIGTERM before killing it
/// (`--stop-timeout`).
pub const ENV_UP_STOP_TIMEOUT: &str = "BALEEN_UP_STOP_TIMEOUT";
/// The informal standard variable that turns colour codes off (<https://no-color.org>); `baleen up` sets it for
/// the runtime when its own stderr is not a terminal, so forwarded logs stay plain text.
pub const ENV_NO_COLOR: &str = "NO_COLOR";
/// `baleen up`: log filter of `baleen` itself (`tracing` env-filter syntax).
pub const ENV_UP_LOG: &str = "BALEEN_UP_LOG";

// ---------------------------------------------------------------------------------------------------------------
// Expert-parallel transport (runtime `expert` module): metrics of the client side of the expert gRPC service.
// ---------------------------------------------------------------------------------------------------------------

/// Histogram: seconds from sending one expert dispatch to a peer until its response arrived, by [`LABEL_PEER`].
pub const METRIC_RUNTIME_EXPERT_DISPATCH_SECONDS: &str = "baleen_runtime_expert_dispatch_seconds";
/// Counter: encoded bytes of expert dispatches sent to peers, by [`LABEL_PEER`].
pub const METRIC_RUNTIME_EXPERT_BYTES_SENT_TOTAL: &str = "baleen_runtime_expert_bytes_sent_total";
/// Counter: expert dispatches that failed (peer down, stream broken, timeout, remote error), by [`LABEL_PEER`].
pub const METRIC_RUNTIME_EXPERT_DISPATCH_ERRORS_TOTAL: &str = "baleen_runtime_expert_dispatch_errors_total";
/// Gauge: 1 while the peer has passed the handshake and its dispatch stream is open, else 0; by [`LABEL_PEER`].
pub const METRIC_RUNTIME_EXPERT_PEER_UP: &str = "baleen_runtime_expert_peer_up";
/// Counter (expert-only ranks): token rows this rank computed for heads, by [`LABEL_LAYER`].
pub const METRIC_RUNTIME_EXPERT_ROWS_SERVED_TOTAL: &str = "baleen_runtime_expert_rows_served_total";
/// Histogram (expert-only ranks): seconds computing one dispatch's rows (queueing on the compute thread included).
pub const METRIC_RUNTIME_EXPERT_COMPUTE_SECONDS: &str = "baleen_runtime_expert_compute_seconds";
/// Label of the expert transport metrics: the peer's rank (`1`, `2`, ...).
pub const LABEL_PEER: &str = "peer";

// ---------------------------------------------------------------------------------------------------------------
// `status.conditions` of a `ModelDeployment`: types and reasons (the operator sets them; the gateway and users
// read them).
// ---------------------------------------------------------------------------------------------------------------

/// Condition: at least `replicas` groups (or all there are, when scaling) are ready and serving.
pub const CONDITION_AVAILABLE: &str = "Available";
/// Condition: groups are being created, removed or rolled to a new revision.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition: something needs attention; the reason says what.
pub const CONDITION_DEGRADED: &str = "Degraded";
/// Reason: the spec fails validation; nothing is created until it is fixed.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason: a rank's runtime container keeps exiting (weights missing, out of memory, bad flags).
pub const REASON_MODEL_LOAD_FAILED: &str = "ModelLoadFailed";
/// Reason: a rank pod cannot be scheduled (no node with the GPUs, selectors or tolerations asked for).
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";
/// Reason: a group has fewer rank pods than `parallelism.expert`.
pub const REASON_RANK_MISSING: &str = "RankMissing";
/// Reason: every group is ready at the current revision.
pub const REASON_ALL_READY: &str = "AllReplicasReady";
/// Reason: fewer groups are ready than asked for.
pub const REASON_REPLICAS_NOT_READY: &str = "ReplicasNotReady";
/// Reason: groups of an older revision are being replaced.
pub const REASON_ROLLING_OUT: &str = "RollingOut";
/// Reason: groups are being added or removed to reach `replicas`.
pub const REASON_SCALING: &str = "Scaling";
/// Reason: `replicas` is 0; nothing runs.
pub const REASON_SCALED_TO_ZERO: &str = "ScaledToZero";
/// Reason: nothing to report.
pub const REASON_AS_EXPECTED: &str = "AsExpected";

// ---------------------------------------------------------------------------------------------------------------
// Operator: labels, annotations and names of the objects it creates, its field manager and its own metrics.
// ---------------------------------------------------------------------------------------------------------------

/// Field manager of every server-side apply the operator makes (objects and status).
pub const OPERATOR_FIELD_MANAGER: &str = "baleen-operator";
/// `reportingController` of the operator's Events and the holder prefix of its leader Lease.
pub const OPERATOR_CONTROLLER_NAME: &str = "baleen.dev/operator";
/// Name of the `coordination.k8s.io` Lease the operator replicas elect a leader through.
pub const OPERATOR_LEASE_NAME: &str = "baleen-operator";
/// Standard label: the application (`baleen-runtime` on rank pods).
pub const LABEL_APP_NAME: &str = "app.kubernetes.io/name";
/// Standard label: the instance (the ModelDeployment's name).
pub const LABEL_APP_INSTANCE: &str = "app.kubernetes.io/instance";
/// Standard label: the component (`runtime`).
pub const LABEL_APP_COMPONENT: &str = "app.kubernetes.io/component";
/// Standard label: the manager ([`OPERATOR_FIELD_MANAGER`]).
pub const LABEL_APP_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label on every object made for a ModelDeployment: its name.
pub const LABEL_MODEL_DEPLOYMENT: &str = "baleen.dev/model-deployment";
/// Label on a group's objects and pods: the group's name (its StatefulSet's).
pub const LABEL_GROUP: &str = "baleen.dev/group";
/// Label on a group's objects and pods: the spec revision the group runs.
pub const LABEL_REVISION: &str = "baleen.dev/revision";
/// Label the StatefulSet controller puts on each pod: its ordinal (our rank).
pub const LABEL_POD_INDEX: &str = "apps.kubernetes.io/pod-index";
/// Annotation on a group's StatefulSet: the group index within its revision.
pub const ANNOTATION_GROUP_INDEX: &str = "baleen.dev/group-index";
/// Value of [`LABEL_APP_NAME`] on rank pods.
pub const APP_RUNTIME: &str = "baleen-runtime";
/// Value of [`LABEL_APP_COMPONENT`] on rank pods.
pub const COMPONENT_RUNTIME: &str = "runtime";
/// Name of the runtime container in a rank pod.
pub const CONTAINER_RUNTIME: &str = "runtime";
/// Name of the init container that downloads an `hf://` model.
pub const CONTAINER_MODEL_DOWNLOAD: &str = "model-download";
/// Key of the Hugging Face token in the Secret `spec.model.hfTokenSecret` names, and the variable it is given as.
pub const HF_TOKEN_KEY: &str = "HF_TOKEN";
/// Where model weights are mounted in a rank pod: `/models/<claim>` for `pvc://`.
pub const MODELS_DIR: &str = "/models";
/// The Hugging Face cache of a rank pod that serves an `hf://` model: the `model-download` init container fills it
/// (`baleen-runtime download`), the runtime reads it offline (`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`).
pub const HF_CACHE_DIR: &str = "/models/hf";

// The Hugging Face Hub client's variables, with the meanings `huggingface_hub` (and vLLM) give them.

/// Hub: the Hub's base URL (a mirror, or a local Hub-compatible server) [default: https://huggingface.co].
pub const ENV_HF_ENDPOINT: &str = "HF_ENDPOINT";
/// Hub: the Hugging Face home; the cache is `$HF_HOME/hub` and the token file `$HF_HOME/token`.
pub const ENV_HF_HOME: &str = "HF_HOME";
/// Hub: the cache directory itself (before `$HF_HOME/hub`).
pub const ENV_HF_HUB_CACHE: &str = "HF_HUB_CACHE";
/// Hub: `1`/`true`/`yes`/`on` = never reach the Hub; models must be in the cache.
pub const ENV_HF_HUB_OFFLINE: &str = "HF_HUB_OFFLINE";
/// Base directory of the default cache when `HF_HOME` is unset (`$XDG_CACHE_HOME/huggingface`).
pub const ENV_XDG_CACHE_HOME: &str = "XDG_CACHE_HOME";
/// The user's home directory (the cache defaults to `~/.cache/huggingface/hub`).
pub const ENV_HOME: &str = "HOME";
/// Runtime HTTP port (OpenAI API, `/health`, `/ready`, `/metrics`).
pub const RUNTIME_HTTP_PORT: u16 = 8000;
/// Runtime expert gRPC port.
pub const RUNTIME_GRPC_PORT: u16 = 50051;
/// Name of the HTTP port on rank pods and Services.
pub const PORT_NAME_HTTP: &str = "http";
/// Name of the expert gRPC port on rank pods and Services.
pub const PORT_NAME_GRPC: &str = "grpc";
/// Operator and gateway admin port (`/metrics`, `/healthz`).
pub const ADMIN_PORT: u16 = 9090;
/// Operator: default runtime image (`--runtime-image`), used when `spec.runtime.image` is absent.
pub const ENV_OPERATOR_RUNTIME_IMAGE: &str = "BALEEN_OPERATOR_RUNTIME_IMAGE";
/// Operator: namespace to watch (`--namespace`; empty = all).
pub const ENV_OPERATOR_NAMESPACE: &str = "BALEEN_OPERATOR_NAMESPACE";
/// Operator: namespace of its leader Lease (`--lease-namespace`; default: its own pod's namespace).
pub const ENV_OPERATOR_LEASE_NAMESPACE: &str = "BALEEN_OPERATOR_LEASE_NAMESPACE";
/// Operator: this replica's identity in the Lease (`--identity`; default: the pod name).
pub const ENV_OPERATOR_IDENTITY: &str = "BALEEN_OPERATOR_IDENTITY";
/// Operator: admin listen address (`--admin-addr`, default `0.0.0.0:9090`).
pub const ENV_OPERATOR_ADMIN_ADDR: &str = "BALEEN_OPERATOR_ADMIN_ADDR";
/// Operator: log filter (`tracing` env-filter syntax).
pub const ENV_OPERATOR_LOG: &str = "BALEEN_OPERATOR_LOG";
/// Path of the operator's liveness endpoint.
pub const PATH_HEALTHZ: &str = "/healthz";
/// Counter: reconciles by [`LABEL_RESULT`] (`ok` or `error`).
pub const METRIC_OPERATOR_RECONCILES_TOTAL: &str = "baleen_operator_reconciles_total";
/// Histogram: seconds per reconcile.
pub const METRIC_OPERATOR_RECONCILE_DURATION_SECONDS: &str = "baleen_operator_reconcile_duration_seconds";
/// Counter: failed reconciles by [`LABEL_ERROR_CLASS`].
pub const METRIC_OPERATOR_RECONCILE_ERRORS_TOTAL: &str = "baleen_operator_reconcile_errors_total";
/// Gauge: 1 while this replica holds the leader Lease.
pub const METRIC_OPERATOR_LEADER: &str = "baleen_operator_leader";
/// Label: outcome of a reconcile.
pub const LABEL_RESULT: &str = "result";
/// Label: class of a reconcile error (`kube`, `invalid_spec`, `serialize`, ...).
pub const LABEL_ERROR_CLASS: &str = "class";
/// Event reason (`Normal`) on a ModelDeployment: the operator created a replica group (StatefulSet and headless
/// Service). Warning Events use the `Degraded` reasons above (`InvalidSpec`, `ModelLoadFailed`, ...).
pub const EVENT_GROUP_CREATED: &str = "GroupCreated";
/// Event reason (`Normal`): the operator deleted a replica group (scale-down or rollout).
pub const EVENT_GROUP_DELETED: &str = "GroupDeleted";
/// Event reason (`Normal`): no group of an older revision is left.
pub const EVENT_ROLLOUT_COMPLETE: &str = "RolloutComplete";
/// Event reason (`Normal`) on a ModelDeployment: the gateway's autoscaler changed its replica count (the note
/// says from, to, why and the load).
pub const EVENT_AUTOSCALED: &str = "Autoscaled";
/// Event action of [`EVENT_AUTOSCALED`].
pub const EVENT_ACTION_SCALE: &str = "Scale";

// ---------------------------------------------------------------------------------------------------------------
// Gateway (`baleen-gateway`): its flags' environment variables, metrics and labels.
// ---------------------------------------------------------------------------------------------------------------

/// Gateway: the static discovery file (`--config`).
pub const ENV_GATEWAY_CONFIG: &str = "BALEEN_GATEWAY_CONFIG";
/// Gateway: listen address (`--host`, default `0.0.0.0`).
pub const ENV_GATEWAY_HOST: &str = "BALEEN_GATEWAY_HOST";
/// Gateway: OpenAI API port (`--port`, default 8080).
pub const ENV_GATEWAY_PORT: &str = "BALEEN_GATEWAY_PORT";
/// Gateway: `/metrics` port (`--admin-port`, default 9090).
pub const ENV_GATEWAY_ADMIN_PORT: &str = "BALEEN_GATEWAY_ADMIN_PORT";
/// Gateway: request body cap in bytes (`--max-request-bytes`).
pub const ENV_GATEWAY_MAX_REQUEST_BYTES: &str = "BALEEN_GATEWAY_MAX_REQUEST_BYTES";
/// Gateway: seconds between scrapes of each backend's `/metrics` and `/ready` (`--scrape-interval`).
pub const ENV_GATEWAY_SCRAPE_INTERVAL: &str = "BALEEN_GATEWAY_SCRAPE_INTERVAL";
/// Gateway: seconds to wait for an upstream's response head (`--request-timeout`).
pub const ENV_GATEWAY_REQUEST_TIMEOUT: &str = "BALEEN_GATEWAY_REQUEST_TIMEOUT";
/// Gateway: other backends tried after a failure before the first response byte (`--retries`).
pub const ENV_GATEWAY_RETRIES: &str = "BALEEN_GATEWAY_RETRIES";
/// Gateway: bytes of a prompt's leading text hashed by `prefix-affinity` (`--prefix-bytes`).
pub const ENV_GATEWAY_PREFIX_BYTES: &str = "BALEEN_GATEWAY_PREFIX_BYTES";
/// Gateway: the header `session-affinity` keys on (`--session-header`).
pub const ENV_GATEWAY_SESSION_HEADER: &str = "BALEEN_GATEWAY_SESSION_HEADER";
/// Gateway: the API keys file (`--api-keys`): names, SHA-256 hashes and rate limits.
pub const ENV_GATEWAY_API_KEYS: &str = "BALEEN_GATEWAY_API_KEYS";
/// Gateway: discover ModelDeployments and their heads in the cluster (`--kubernetes`).
pub const ENV_GATEWAY_KUBERNETES: &str = "BALEEN_GATEWAY_KUBERNETES";
/// Gateway: the namespace discovery watches (`--namespace`; all when unset).
pub const ENV_GATEWAY_NAMESPACE: &str = "BALEEN_GATEWAY_NAMESPACE";
/// Gateway: seconds between full relists of the cluster's ModelDeployments and EndpointSlices.
pub const ENV_GATEWAY_RELIST_INTERVAL: &str = "BALEEN_GATEWAY_RELIST_INTERVAL";
/// Gateway: seconds a request for a model with no ready replica waits for one (`--hold-timeout`).
pub const ENV_GATEWAY_HOLD_TIMEOUT: &str = "BALEEN_GATEWAY_HOLD_TIMEOUT";
/// Gateway: requests held per model while it has no ready replica (`--max-held-requests`).
pub const ENV_GATEWAY_MAX_HELD_REQUESTS: &str = "BALEEN_GATEWAY_MAX_HELD_REQUESTS";
/// Gateway: seconds of the autoscaler's stable window (`--autoscale-stable-window`).
pub const ENV_GATEWAY_AUTOSCALE_STABLE_WINDOW: &str = "BALEEN_GATEWAY_AUTOSCALE_STABLE_WINDOW";
/// Gateway: seconds of the autoscaler's panic window (`--autoscale-panic-window`).
pub const ENV_GATEWAY_AUTOSCALE_PANIC_WINDOW: &str = "BALEEN_GATEWAY_AUTOSCALE_PANIC_WINDOW";
/// Gateway: threads serving the API port, each its own event loop (`--workers`; default one per CPU).
pub const ENV_GATEWAY_WORKERS: &str = "BALEEN_GATEWAY_WORKERS";
/// Gateway: log filter (`tracing` env-filter syntax).
pub const ENV_GATEWAY_LOG: &str = "BALEEN_GATEWAY_LOG";
/// `--prometheus-url`: the autoscaler reads its metrics from this Prometheus server's HTTP API.
pub const ENV_GATEWAY_PROMETHEUS_URL: &str = "BALEEN_GATEWAY_PROMETHEUS_URL";
/// The gateway's admin-port path listing its backends as Prometheus HTTP service discovery (`http_sd_configs`).
pub const PATH_GATEWAY_TARGETS: &str = "/targets";
/// Gateway: the field manager of the autoscaler's writes (`modeldeployments/scale` patches).
pub const GATEWAY_AUTOSCALER_FIELD_MANAGER: &str = "baleen-gateway-autoscaler";
/// Gateway: the `coordination.k8s.io` Lease its replicas elect the one that writes scale changes through.
pub const GATEWAY_AUTOSCALER_LEASE_NAME: &str = "baleen-gateway-autoscaler";
/// Gateway: default OpenAI API port.
pub const GATEWAY_PORT: u16 = 8080;
/// Gateway: default header of `session-affinity` (its value names the session; the body's `user` otherwise).
pub const GATEWAY_SESSION_HEADER: &str = "x-session-id";
/// Response header naming the backend that served a request (for debugging and tests).
pub const HEADER_GATEWAY_BACKEND: &str = "x-baleen-backend";

/// Counter: answers by [`LABEL_MODEL`], [`LABEL_BACKEND`] (empty when none was chosen) and [`LABEL_CODE`].
pub const METRIC_GATEWAY_REQUESTS_TOTAL: &str = "baleen_gateway_requests_total";
/// Histogram: seconds from a request's arrival to its upstream request being sent (the gateway's own cost).
pub const METRIC_GATEWAY_ADDED_LATENCY_SECONDS: &str = "baleen_gateway_added_latency_seconds";
/// Histogram: seconds from a request's arrival to the first body byte of its answer, by [`LABEL_MODEL`] (a
/// stream's time to first token as the client sees it, minus the network).
pub const METRIC_GATEWAY_TIME_TO_FIRST_BYTE_SECONDS: &str = "baleen_gateway_time_to_first_byte_seconds";
/// Gauge: requests in flight through the gateway, by [`LABEL_MODEL`] and [`LABEL_BACKEND`].
pub const METRIC_GATEWAY_IN_FLIGHT: &str = "baleen_gateway_in_flight";
/// Gauge: 1 while a backend is ready and not ejected, by [`LABEL_MODEL`] and [`LABEL_BACKEND`].
pub const METRIC_GATEWAY_BACKEND_HEALTHY: &str = "baleen_gateway_backend_healthy";
/// Counter: upstream attempts retried on another backend, by [`LABEL_MODEL`].
pub const METRIC_GATEWAY_RETRIES_TOTAL: &str = "baleen_gateway_retries_total";
/// Counter: backends ejected after consecutive failures, by [`LABEL_MODEL`] and [`LABEL_BACKEND`].
pub const METRIC_GATEWAY_EJECTIONS_TOTAL: &str = "baleen_gateway_ejections_total";
/// Counter: failed scrapes of a backend's `/metrics` or `/ready`, by [`LABEL_MODEL`] and [`LABEL_BACKEND`].
pub const METRIC_GATEWAY_SCRAPE_ERRORS_TOTAL: &str = "baleen_gateway_scrape_errors_total";
/// Gauge: the autoscaler's desired replicas, by [`LABEL_MODEL`].
pub const METRIC_GATEWAY_DESIRED_REPLICAS: &str = "baleen_gateway_desired_replicas";
/// Gauge: ready replicas (backends) serving a model, by [`LABEL_MODEL`].
pub const METRIC_GATEWAY_READY_REPLICAS: &str = "baleen_gateway_ready_replicas";
/// Gauge: requests the gateway holds for want of a ready replica (scale from zero), by [`LABEL_MODEL`].
pub const METRIC_GATEWAY_HELD_REQUESTS: &str = "baleen_gateway_held_requests";
/// Counter: replica-count changes the autoscaler asked for, by [`LABEL_MODEL`] and [`LABEL_REASON`].
pub const METRIC_GATEWAY_SCALINGS_TOTAL: &str = "baleen_gateway_scalings_total";
/// Label: why the autoscaler changed a replica count (`Panic`, `ScaleUp`, `ScaleDown`, `ToZero`, `FromZero`, ...).
pub const LABEL_REASON: &str = "reason";
/// Counter: requests refused by an API key's rate limit, by [`LABEL_KEY`] and [`LABEL_LIMIT`].
pub const METRIC_GATEWAY_RATE_LIMITED_TOTAL: &str = "baleen_gateway_rate_limited_total";
/// Counter: failed lists of the cluster's ModelDeployments and EndpointSlices (discovery keeps its last state).
pub const METRIC_GATEWAY_DISCOVERY_ERRORS_TOTAL: &str = "baleen_gateway_discovery_errors_total";
/// Label: an API key's name (never the key).
pub const LABEL_KEY: &str = "key";
/// Label: which limit refused a request: `requests` or `tokens`.
pub const LABEL_LIMIT: &str = "limit";
/// Label: the served model name (a configured one; unknown models are counted under [`MODEL_UNKNOWN`]).
pub const LABEL_MODEL: &str = "model";
/// Label: a backend's base URL.
pub const LABEL_BACKEND: &str = "backend";
/// Value of [`LABEL_MODEL`] for requests whose model is missing or not configured.
pub const MODEL_UNKNOWN: &str = "";
/// The first words of the line `baleen-gateway serve` prints on stdout once bound: `HOST:PORT` of the API port,
/// then ` admin http://HOST:PORT`.
pub const GATEWAY_LISTENING_PREFIX: &str = "baleen-gateway listening on http://";

// ---------------------------------------------------------------------------------------------------------------
// `baleen-runtime serve` flags that the launchers (`baleen up`, the operator) set from a ModelDeployment
// (crd::command builds the command line from them).
// ---------------------------------------------------------------------------------------------------------------

pub const FLAG_MODEL: &str = "--model";
pub const FLAG_HOST: &str = "--host";
pub const FLAG_PORT: &str = "--port";
pub const FLAG_DEVICE: &str = "--device";
pub const FLAG_DTYPE: &str = "--dtype";
pub const FLAG_SERVED_MODEL_NAME: &str = "--served-model-name";
pub const FLAG_MAX_NUM_SEQS: &str = "--max-num-seqs";
pub const FLAG_MAX_MODEL_LEN: &str = "--max-model-len";
pub const FLAG_KV_CACHE_MEMORY: &str = "--kv-cache-memory";
pub const FLAG_DRAIN_TIMEOUT: &str = "--drain-timeout";
pub const FLAG_RANK: &str = "--rank";
pub const FLAG_WORLD_SIZE: &str = "--world-size";
pub const FLAG_PEERS: &str = "--peers";
pub const FLAG_PEER_PATTERN: &str = "--peer-pattern";
pub const FLAG_RANK_FROM_HOSTNAME: &str = "--rank-from-hostname";
pub const FLAG_GRPC_PORT: &str = "--grpc-port";
pub const FLAG_REPLICATE: &str = "--replicate";
pub const FLAG_DATA_PARALLEL_ATTENTION: &str = "--data-parallel-attention";
