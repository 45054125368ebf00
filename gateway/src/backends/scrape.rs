//! The probe and scrape loop: every interval, each backend's `/ready` (its readiness, and the half-open probe of
//! an ejected backend) and `/metrics` (the vLLM load gauges routing reads — the same samples the autoscaler
//! will read), all backends concurrently.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baleen_api::names::{
    METRIC_KV_CACHE_USAGE_PERC, METRIC_NUM_REQUESTS_RUNNING, METRIC_NUM_REQUESTS_WAITING, PATH_METRICS, PATH_READY,
};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use super::{Backend, LoadSample};
use crate::Client;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// The largest `/metrics` page read (a runtime's is a few KiB).
const MAX_METRICS_BYTES: usize = 4 * 1024 * 1024;

/// The values of the vLLM load gauges in a Prometheus text page, each summed over its series (one per
/// `model_name`). `None` unless both request gauges are present; a missing KV-cache gauge counts as 0.
pub fn parse_load(text: &str) -> Option<(f64, f64, f64)> {
    let (mut waiting, mut running, mut kv) = (None, None, None);
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = split_sample(line) else { continue };
        let slot = match name {
            METRIC_NUM_REQUESTS_WAITING => &mut waiting,
            METRIC_NUM_REQUESTS_RUNNING => &mut running,
            METRIC_KV_CACHE_USAGE_PERC => &mut kv,
            _ => continue,
        };
        if value.is_finite() {
            *slot = Some(slot.unwrap_or(0.0) + value);
        }
    }
    Some((waiting?, running?, kv.unwrap_or(0.0)))
}

/// `name{labels} value [timestamp]` → (name, value); label values may hold `}` and spaces inside quotes.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    let name_end = line.find(['{', ' ', '\t'])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[close? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    Some((name, value.parse().ok()?))
}

/// `GET url`: its status and body (at most `limit` bytes); the head and the body may each take `timeout`. The
/// error says what failed.
pub(crate) async fn get(
    client: &Client,
    url: String,
    timeout: Duration,
    limit: usize,
) -> Result<(StatusCode, Bytes), String> {
    let request = Request::get(&url).body(Full::new(Bytes::new())).map_err(|e| format!("{url}: {e}"))?;
    let response = tokio::time::timeout(timeout, client.request(request))
        .await
        .map_err(|_| format!("no answer from {url} within {timeout:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = tokio::time::timeout(timeout, Limited::new(response.into_body(), limit).collect())
        .await
        .map_err(|_| format!("reading the answer of {url}: not done within {timeout:?}"))?
        .map_err(|e| format!("reading the answer of {url}: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// Probes one backend and records what it found; returns whether it is routable afterwards.
pub async fn probe(client: &Client, model: &str, backend: &Backend, timeout: Duration, metrics: &Metrics) -> bool {
    let (ready, page) = tokio::join!(
        get(client, format!("{}{PATH_READY}", backend.url), timeout, MAX_METRICS_BYTES),
        get(client, format!("{}{PATH_METRICS}", backend.url), timeout, MAX_METRICS_BYTES)
    );
    let now = Instant::now();
    let ready = match ready {
        Ok((status, _)) => status == StatusCode::OK,
        Err(_) => {
            metrics.scrape_error(model, &backend.url);
            false
        }
    };
    let sample = match page {
        Ok((StatusCode::OK, body)) => std::str::from_utf8(&body).ok().and_then(parse_load),
        _ => None,
    };
    if sample.is_none() {
        metrics.scrape_error(model, &backend.url);
    }
    backend.set_sample(sample.map(|(waiting, running, kv_usage)| LoadSample { waiting, running, kv_usage, at: now }));
    let mut health = backend.health();
    health.probed(ready, now);
    health.routable(now)
}

/// Probes every backend of every model once, concurrently, and updates the health gauges.
pub async fn probe_all(client: &Client, registry: &Registry, timeout: Duration, metrics: &Metrics) {
    let mut probes = Vec::new();
    for pool in registry.pools() {
        for backend in pool.backends() {
            let pool = Arc::clone(&pool);
            probes.push(async move {
                let ok = probe(client, &pool.name, &backend, timeout, metrics).await;
                (pool, backend, ok)
            });
        }
    }
    for (pool, backend, ok) in futures_util::future::join_all(probes).await {
        metrics.set_healthy(&pool.name, &backend.url, ok);
    }
    for pool in registry.pools() {
        let routable = pool.routable(Instant::now()).len();
        metrics.set_ready_replicas(&pool.name, routable);
        if routable > 0 && pool.hold.held() > 0 {
            pool.hold.notify_ready();
        }
    }
}

/// How long one probe may take: the scrape interval, within 1 to 5 seconds.
pub fn probe_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Probes every `interval`, starting one interval from now, until the task is dropped.
pub async fn run(client: Client, registry: Arc<Registry>, interval: Duration, metrics: Arc<Metrics>) {
    let timeout = probe_timeout(interval);
    // The first probe is one interval away: whoever spawns this has just probed (`Gateway::probe_now`).
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        probe_all(&client, &registry, timeout, &metrics).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn load_gauges_are_summed_over_series_and_other_lines_ignored() {
        let page = "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{model_name=\"a\"} 2\n\
                    vllm:num_requests_waiting{model_name=\"we}ird \\\"b\\\"\"} 1 1700000000\n\
                    vllm:num_requests_running{model_name=\"a\"} 3\n\
                    vllm:num_requests_running_other 100\n\
                    vllm:kv_cache_usage_perc{model_name=\"a\"} 0.25\n\
                    vllm:prefix_cache_hits_total{model_name=\"a\"} 7\n";
        assert_eq!(parse_load(page), Some((3.0, 3.0, 0.25)));
        assert_eq!(parse_load("vllm:num_requests_waiting 1\nvllm:num_requests_running 0\n"), Some((1.0, 0.0, 0.0)));
        assert_eq!(parse_load("vllm:num_requests_waiting 1\n"), None, "running is required");
        assert_eq!(parse_load("<html>not metrics</html>"), None);
    }
}
