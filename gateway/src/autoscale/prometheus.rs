//! The autoscaler's other metric source: a Prometheus server's HTTP API (`--prometheus-url`). Each autoscaled
//! model's load is one instant query (`GET /api/v1/query`) per look: for the built-in metric types the PromQL of
//! `baleen_api::names` (the metric averaged over the model's heads Prometheus scrapes), for type `PromQL` the
//! ModelDeployment's own expression; `$model` in either is replaced by the served model name.
//!
//! An answer must be a scalar or a vector of at most one element (aggregate a custom query with `sum`/`avg`); an
//! empty vector means no series (the model's heads are not scraped yet, or none runs); `NaN`, infinities, an
//! error status or a timeout make the sample missing, so the decision holds.

use std::time::Duration;

use baleen_api::crd::MetricKind;
use baleen_api::names::{
    PATH_PROMETHEUS_QUERY, PROMQL_KV_CACHE_UTILIZATION, PROMQL_MODEL, PROMQL_QUEUE_DEPTH, PROMQL_RUNNING_REQUESTS,
};
use serde::Deserialize;

use crate::Client;
use crate::backends::scrape;
use crate::error::{Error, Result};

/// The largest query answer read (one number, or a short vector that is refused anyway).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A Prometheus server the autoscaler queries.
#[derive(Debug, Clone)]
pub struct Prometheus {
    /// `http://host:port` with an optional path prefix, no trailing slash.
    base: String,
    client: Client,
    timeout: Duration,
}

/// The base of `--prometheus-url`: an `http://` URL (a path prefix such as `/prometheus` is kept).
pub fn base_url(url: &str) -> std::result::Result<String, String> {
    let base = url.trim().trim_end_matches('/');
    let Some(rest) = base.strip_prefix("http://") else {
        return Err(format!("`{url}` is not an http:// URL (put a plain-HTTP proxy in front of an HTTPS server)"));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || rest.contains(['?', '#']) || base.parse::<http::Uri>().is_err() {
        return Err(format!("`{url}` is not a URL of the form http://host:port[/path]"));
    }
    Ok(base.to_string())
}

/// The PromQL for a model's metric: the built-in expression of `kind`, or `custom` (type `PromQL`), with
/// `$model` replaced by `model` quoted as a PromQL string's content.
pub fn query_for(kind: MetricKind, custom: Option<&str>, model: &str) -> Option<String> {
    let template = match kind {
        MetricKind::QueueDepth => PROMQL_QUEUE_DEPTH,
        MetricKind::RunningRequests => PROMQL_RUNNING_REQUESTS,
        MetricKind::KvCacheUtilization => PROMQL_KV_CACHE_UTILIZATION,
        MetricKind::PromQl => custom?,
    };
    let quoted = model.replace('\\', "\\\\").replace('"', "\\\"");
    Some(template.replace(PROMQL_MODEL, &quoted))
}

#[derive(Debug, Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Data {
    result_type: String,
    result: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct Element {
    value: (f64, String),
}

/// The number in a `/api/v1/query` answer: `None` for an empty vector; an error for anything else than one
/// finite number.
pub fn parse(body: &[u8]) -> std::result::Result<Option<f64>, String> {
    let answer: Answer = serde_json::from_slice(body).map_err(|e| format!("not a Prometheus API answer: {e}"))?;
    if answer.status != "success" {
        return Err(answer.error.unwrap_or_else(|| format!("status {}", answer.status)));
    }
    let Some(data) = answer.data else { return Err("no data".into()) };
    let malformed = |e: serde_json::Error| format!("a malformed {} result: {e}", data.result_type);
    let value = match data.result_type.as_str() {
        "scalar" => serde_json::from_value::<(f64, String)>(data.result.clone()).map_err(malformed)?.1,
        "vector" => {
            let elements = serde_json::from_value::<Vec<Element>>(data.result.clone()).map_err(malformed)?;
            match <[Element; 1]>::try_from(elements) {
                Ok([element]) => element.value.1,
                Err(elements) if elements.is_empty() => return Ok(None),
                Err(elements) => {
                    return Err(format!("{} series answered; aggregate them to one (sum, avg, max)", elements.len()));
                }
            }
        }
        other => return Err(format!("a {other}, not a number: ask for an instant vector or a scalar")),
    };
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(Some(v)),
        _ => Err(format!("the value `{value}` is not a finite number")),
    }
}

impl Prometheus {
    /// A client of the server at `base` (see [`base_url`]); each query may take `timeout`.
    pub fn new(base: String, client: Client, timeout: Duration) -> Self {
        Self { base, client, timeout }
    }

    /// The server's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Evaluates `query` now: its one number, or `None` when it selects no series.
    pub async fn query(&self, query: &str) -> Result<Option<f64>> {
        let failed = |reason: String| Error::Prometheus { query: query.to_string(), reason };
        let encoded: String = form_urlencoded::Serializer::new(String::new()).append_pair("query", query).finish();
        let url = format!("{}{PATH_PROMETHEUS_QUERY}?{encoded}", self.base);
        let answer = scrape::get(&self.client, url, self.timeout, MAX_ANSWER_BYTES);
        // One bound on the whole query (the head and the body each have it too).
        let (status, body) = tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| failed(format!("no answer from {} within {:?}", self.base, self.timeout)))?
            .map_err(failed)?;
        // Prometheus answers 400/422/503 with a JSON error; anything else unparsable names the status.
        parse(&body).map_err(|reason| match status.is_success() {
            true => failed(reason),
            false => failed(format!("HTTP {status}: {reason}")),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn answers_are_one_finite_number_or_no_series() {
        let vector =
            |result: &str| format!(r#"{{"status":"success","data":{{"resultType":"vector","result":{result}}}}}"#);
        let one = vector(r#"[{"metric":{},"value":[1733400000.5,"2.5"]}]"#);
        assert_eq!(parse(one.as_bytes()), Ok(Some(2.5)));
        assert_eq!(parse(vector("[]").as_bytes()), Ok(None));
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1733400000,"3"]}}"#;
        assert_eq!(parse(scalar.as_bytes()), Ok(Some(3.0)));

        let two = vector(r#"[{"metric":{"a":"1"},"value":[1,"1"]},{"metric":{"a":"2"},"value":[1,"2"]}]"#);
        assert!(parse(two.as_bytes()).unwrap_err().contains("2 series answered"));
        let nan = vector(r#"[{"metric":{},"value":[1,"NaN"]}]"#);
        assert!(parse(nan.as_bytes()).unwrap_err().contains("`NaN` is not a finite number"));
        let inf = vector(r#"[{"metric":{},"value":[1,"+Inf"]}]"#);
        assert!(parse(inf.as_bytes()).is_err());
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse(matrix.as_bytes()).unwrap_err().contains("instant vector or a scalar"));
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        assert_eq!(parse(error.as_bytes()), Err("parse error at char 5".into()));
        assert!(parse(b"<html>").unwrap_err().contains("not a Prometheus API answer"));
    }

    #[test]
    fn queries_name_the_model_quoted_and_custom_ones_are_used_as_written() {
        assert_eq!(
            query_for(MetricKind::QueueDepth, None, "deepseek-ai/DeepSeek-V2-Lite").as_deref(),
            Some(r#"avg(vllm:num_requests_waiting{model_name="deepseek-ai/DeepSeek-V2-Lite"})"#)
        );
        assert_eq!(
            query_for(MetricKind::KvCacheUtilization, None, r#"a"b\c"#).as_deref(),
            Some(r#"avg(vllm:kv_cache_usage_perc{model_name="a\"b\\c"})"#)
        );
        let custom = r#"sum(rate(vllm:generation_tokens_total{model_name="$model"}[1m])) / 100"#;
        assert_eq!(
            query_for(MetricKind::PromQl, Some(custom), "m").as_deref(),
            Some(r#"sum(rate(vllm:generation_tokens_total{model_name="m"}[1m])) / 100"#)
        );
        assert_eq!(query_for(MetricKind::PromQl, None, "m"), None);
        for (kind, metric) in [
            (MetricKind::QueueDepth, baleen_api::names::METRIC_NUM_REQUESTS_WAITING),
            (MetricKind::RunningRequests, baleen_api::names::METRIC_NUM_REQUESTS_RUNNING),
            (MetricKind::KvCacheUtilization, baleen_api::names::METRIC_KV_CACHE_USAGE_PERC),
        ] {
            let query = query_for(kind, None, "m").unwrap();
            assert!(query.contains(&format!("{metric}{{{}=\"m\"}}", baleen_api::names::LABEL_MODEL_NAME)), "{query}");
        }
    }

    #[test]
    fn the_url_must_be_plain_http_with_an_optional_prefix() {
        assert_eq!(base_url("http://prometheus:9090/").as_deref(), Ok("http://prometheus:9090"));
        assert_eq!(base_url("http://h:9090/prom").as_deref(), Ok("http://h:9090/prom"));
        assert!(base_url("https://h:9090").unwrap_err().contains("not an http:// URL"));
        assert!(base_url("h:9090").is_err());
        assert!(base_url("http://").is_err());
        assert!(base_url("http://h:9090/?q=1").is_err());
    }
}
