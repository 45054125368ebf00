//! Prometheus metrics of the runtime: vLLM's names verbatim (so endpoint pickers, KEDA recipes and dashboards
//! built for vLLM work unchanged) plus our own `baleen_runtime_*` HTTP metrics.
//!
//! The engine thread updates the metrics directly (prometheus types are atomics), and `/metrics` renders the
//! registry without ever talking to the engine, so a scrape never blocks the scheduler.

use baleen_api::names::{
    LABEL_BLOCK_SIZE, LABEL_CACHE_DTYPE, LABEL_CODE, LABEL_EXPERT, LABEL_FINISHED_REASON, LABEL_LAYER,
    LABEL_MODEL_NAME, LABEL_NUM_GPU_BLOCKS, LABEL_ROUTE, LABEL_WEIGHT_FORMAT, METRIC_CACHE_CONFIG_INFO,
    METRIC_E2E_REQUEST_LATENCY_SECONDS, METRIC_GENERATION_TOKENS_TOTAL, METRIC_INTER_TOKEN_LATENCY_SECONDS,
    METRIC_KV_CACHE_USAGE_PERC, METRIC_NUM_PREEMPTIONS_TOTAL, METRIC_NUM_REQUESTS_RUNNING, METRIC_NUM_REQUESTS_WAITING,
    METRIC_PREFIX_CACHE_HITS_TOTAL, METRIC_PREFIX_CACHE_QUERIES_TOTAL, METRIC_PROMPT_TOKENS_TOTAL,
    METRIC_REQUEST_QUEUE_TIME_SECONDS, METRIC_REQUEST_SUCCESS_TOTAL, METRIC_RUNTIME_EXPERT_TOKENS_TOTAL,
    METRIC_RUNTIME_HTTP_REQUEST_DURATION_SECONDS, METRIC_RUNTIME_HTTP_REQUESTS_TOTAL,
    METRIC_RUNTIME_MODEL_WEIGHT_BYTES, METRIC_TIME_TO_FIRST_TOKEN_SECONDS,
};
use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::engine::FinishReason;
use crate::error::Result;

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// vLLM's time-to-first-token buckets, with finer steps at the bottom for small models.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's inter-token buckets, extended below 10 ms (a tiny model decodes in about a millisecond).
const ITL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
];
/// vLLM's request-latency buckets (end-to-end and queue time), extended below 300 ms.
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
];
/// HTTP handler latency (to the response head).
const HTTP_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Every metric the runtime exports, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// `vllm:num_requests_running`.
    pub num_requests_running: IntGauge,
    /// `vllm:num_requests_waiting`.
    pub num_requests_waiting: IntGauge,
    /// `vllm:kv_cache_usage_perc`, 0..1.
    pub kv_cache_usage_perc: Gauge,
    /// `vllm:num_preemptions_total`.
    pub num_preemptions_total: IntCounter,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens_total: IntCounter,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens_total: IntCounter,
    /// `vllm:request_success_total{finished_reason}`; see [`Metrics::request_finished`].
    pub request_success_total: IntCounterVec,
    /// `vllm:time_to_first_token_seconds`.
    pub time_to_first_token_seconds: Histogram,
    /// `vllm:inter_token_latency_seconds`.
    pub inter_token_latency_seconds: Histogram,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e_request_latency_seconds: Histogram,
    /// `vllm:request_queue_time_seconds`.
    pub request_queue_time_seconds: Histogram,
    /// `vllm:prefix_cache_queries_total` (prompt tokens looked up).
    pub prefix_cache_queries_total: IntCounter,
    /// `vllm:prefix_cache_hits_total` (prompt tokens found).
    pub prefix_cache_hits_total: IntCounter,
    /// `baleen_runtime_http_requests_total{route, code}`.
    pub http_requests_total: IntCounterVec,
    /// `baleen_runtime_expert_tokens_total{layer, expert}`: token rows routed to each expert of each MoE layer.
    pub expert_tokens_total: IntCounterVec,
    /// `baleen_runtime_http_request_duration_seconds{route}`.
    pub http_request_duration_seconds: HistogramVec,
    cache_config_info: GaugeVec,
    model_weight_bytes: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric; each `vllm:*` metric carries the constant label
    /// `model_name=<model_name>`.
    pub fn new(model_name: &str) -> Result<Self> {
        let registry = Registry::new();
        let r = Registrar { registry: &registry, model_name };
        let metrics = Self {
            num_requests_running: r
                .int_gauge(METRIC_NUM_REQUESTS_RUNNING, "Number of requests in the running batch.")?,
            num_requests_waiting: r
                .int_gauge(METRIC_NUM_REQUESTS_WAITING, "Number of requests waiting to be admitted.")?,
            kv_cache_usage_perc: r.register(Gauge::with_opts(r.opts(
                METRIC_KV_CACHE_USAGE_PERC,
                "KV-cache usage: fraction of cache blocks in use, 0 to 1.",
            ))?)?,
            num_preemptions_total: r.int_counter(METRIC_NUM_PREEMPTIONS_TOTAL, "Cumulative number of preemptions.")?,
            prompt_tokens_total: r.int_counter(METRIC_PROMPT_TOKENS_TOTAL, "Number of prefill tokens processed.")?,
            generation_tokens_total: r
                .int_counter(METRIC_GENERATION_TOKENS_TOTAL, "Number of generation tokens processed.")?,
            request_success_total: r.register(IntCounterVec::new(
                r.opts(METRIC_REQUEST_SUCCESS_TOTAL, "Count of finished requests, by finish reason."),
                &[LABEL_FINISHED_REASON],
            )?)?,
            time_to_first_token_seconds: r.histogram(
                METRIC_TIME_TO_FIRST_TOKEN_SECONDS,
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS,
            )?,
            inter_token_latency_seconds: r.histogram(
                METRIC_INTER_TOKEN_LATENCY_SECONDS,
                "Histogram of inter-token latency in seconds.",
                ITL_BUCKETS,
            )?,
            e2e_request_latency_seconds: r.histogram(
                METRIC_E2E_REQUEST_LATENCY_SECONDS,
                "Histogram of end-to-end request latency in seconds.",
                REQUEST_BUCKETS,
            )?,
            request_queue_time_seconds: r.histogram(
                METRIC_REQUEST_QUEUE_TIME_SECONDS,
                "Histogram of time spent waiting before first scheduled, in seconds.",
                REQUEST_BUCKETS,
            )?,
            prefix_cache_queries_total: r
                .int_counter(METRIC_PREFIX_CACHE_QUERIES_TOTAL, "Prefix-cache queries, in prompt tokens looked up.")?,
            prefix_cache_hits_total: r.int_counter(
                METRIC_PREFIX_CACHE_HITS_TOTAL,
                "Prefix-cache hits, in prompt tokens found in the cache.",
            )?,
            http_requests_total: r.register(IntCounterVec::new(
                Opts::new(METRIC_RUNTIME_HTTP_REQUESTS_TOTAL, "HTTP requests answered, by route and status code."),
                &[LABEL_ROUTE, LABEL_CODE],
            )?)?,
            expert_tokens_total: r.register(IntCounterVec::new(
                Opts::new(
                    METRIC_RUNTIME_EXPERT_TOKENS_TOTAL,
                    "Token rows routed to each routed expert, by MoE layer and expert (the load expert placement balances).",
                ),
                &[LABEL_LAYER, LABEL_EXPERT],
            )?)?,
            http_request_duration_seconds: r.register(HistogramVec::new(
                HistogramOpts::new(
                    METRIC_RUNTIME_HTTP_REQUEST_DURATION_SECONDS,
                    "Seconds until the response head was ready (a stream's first byte), by route.",
                )
                .buckets(HTTP_BUCKETS.to_vec()),
                &[LABEL_ROUTE],
            )?)?,
            cache_config_info: r.register(GaugeVec::new(
                r.opts(METRIC_CACHE_CONFIG_INFO, "Information of the KV-cache configuration (always 1)."),
                &[LABEL_BLOCK_SIZE, LABEL_NUM_GPU_BLOCKS, LABEL_CACHE_DTYPE],
            )?)?,
            model_weight_bytes: r.register(IntGaugeVec::new(
                Opts::new(
                    METRIC_RUNTIME_MODEL_WEIGHT_BYTES,
                    "Bytes of model weights held in memory as stored (after --quantize), by weight format.",
                ),
                &[LABEL_WEIGHT_FORMAT],
            )?)?,
            registry,
        };
        // Create every finish-reason series up front so dashboards see zeros rather than gaps.
        for reason in [FinishReason::Stop, FinishReason::Length, FinishReason::Abort] {
            metrics.request_success_total.with_label_values(&[reason.as_str()]);
        }
        Ok(metrics)
    }

    /// Sets `vllm:cache_config_info{block_size, num_gpu_blocks, cache_dtype} = 1` (replacing any earlier value).
    pub fn set_cache_config(&self, block_size: usize, num_blocks: usize, cache_dtype: &str) {
        self.cache_config_info.reset();
        let (block_size, num_blocks) = (block_size.to_string(), num_blocks.to_string());
        self.cache_config_info.with_label_values(&[block_size.as_str(), num_blocks.as_str(), cache_dtype]).set(1.0);
    }

    /// Sets `baleen_runtime_model_weight_bytes{weight_format}` (replacing any earlier value).
    pub fn set_model_weights(&self, bytes: usize, format: &str) {
        self.model_weight_bytes.reset();
        self.model_weight_bytes.with_label_values(&[format]).set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts one finished request in `vllm:request_success_total{finished_reason}`.
    pub fn request_finished(&self, reason: FinishReason) {
        self.request_success_total.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts one answered HTTP request.
    pub fn observe_http(&self, route: &str, code: u16, seconds: f64) {
        let code = code.to_string();
        self.http_requests_total.with_label_values(&[route, code.as_str()]).inc();
        self.http_request_duration_seconds.with_label_values(&[route]).observe(seconds);
    }

    /// Every metric in the Prometheus text exposition format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        render_registry(&self.registry)
    }
}

/// Creates metrics and registers them in one step; `vllm:*` metrics carry the constant `model_name` label.
struct Registrar<'a> {
    registry: &'a Registry,
    model_name: &'a str,
}

impl Registrar<'_> {
    /// Registers `metric` and hands it back (its clone shares the same series).
    fn register<C: Collector + Clone + 'static>(&self, metric: C) -> Result<C> {
        self.registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    /// A vLLM metric's options: `name`, `help` and the `model_name` label.
    fn opts(&self, name: &str, help: &str) -> Opts {
        Opts::new(name, help).const_label(LABEL_MODEL_NAME, self.model_name)
    }

    fn int_gauge(&self, name: &str, help: &str) -> Result<IntGauge> {
        self.register(IntGauge::with_opts(self.opts(name, help))?)
    }

    fn int_counter(&self, name: &str, help: &str) -> Result<IntCounter> {
        self.register(IntCounter::with_opts(self.opts(name, help))?)
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram> {
        let opts =
            HistogramOpts::new(name, help).const_label(LABEL_MODEL_NAME, self.model_name).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts)?)
    }
}

/// Every metric of `registry` in the Prometheus text format (a failure is logged and yields what was encoded).
pub fn render_registry(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use baleen_api::names::*;

    use super::*;

    #[test]
    fn render_contains_every_vllm_name_with_the_model_name_label() {
        let m = Metrics::new("tiny-moe").unwrap();
        m.set_cache_config(16, 128, "float32");
        m.observe_http("/v1/models", 200, 0.001);
        let text = m.render();
        for name in [
            METRIC_NUM_REQUESTS_WAITING,
            METRIC_NUM_REQUESTS_RUNNING,
            METRIC_KV_CACHE_USAGE_PERC,
            METRIC_CACHE_CONFIG_INFO,
            METRIC_TIME_TO_FIRST_TOKEN_SECONDS,
            METRIC_INTER_TOKEN_LATENCY_SECONDS,
            METRIC_E2E_REQUEST_LATENCY_SECONDS,
            METRIC_REQUEST_QUEUE_TIME_SECONDS,
            METRIC_PROMPT_TOKENS_TOTAL,
            METRIC_GENERATION_TOKENS_TOTAL,
            METRIC_REQUEST_SUCCESS_TOTAL,
            METRIC_NUM_PREEMPTIONS_TOTAL,
            METRIC_PREFIX_CACHE_QUERIES_TOTAL,
            METRIC_PREFIX_CACHE_HITS_TOTAL,
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing:\n{text}");
            let sample = text.lines().find(|l| l.starts_with(name) && !l.starts_with('#')).unwrap();
            assert!(sample.contains("model_name=\"tiny-moe\""), "{sample}");
        }
        assert!(text.contains(METRIC_RUNTIME_HTTP_REQUESTS_TOTAL));
        assert!(text.contains(METRIC_RUNTIME_HTTP_REQUEST_DURATION_SECONDS));
    }

    #[test]
    fn cache_config_info_is_one_with_the_config_in_labels() {
        let m = Metrics::new("m").unwrap();
        m.set_cache_config(16, 100, "bfloat16");
        m.set_cache_config(32, 50, "float32");
        let text = m.render();
        let lines: Vec<_> = text.lines().filter(|l| l.starts_with("vllm:cache_config_info{")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("block_size=\"32\"") && lines[0].contains("num_gpu_blocks=\"50\""));
        assert!(lines[0].contains("cache_dtype=\"float32\"") && lines[0].ends_with(" 1"), "{}", lines[0]);
    }

    #[test]
    fn finish_reasons_start_at_zero_and_count() {
        let m = Metrics::new("m").unwrap();
        m.request_finished(FinishReason::Length);
        let text = m.render();
        assert!(text.contains("vllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 0"), "{text}");
        assert!(text.contains("vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 1"));
    }
}
