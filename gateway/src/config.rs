//! The gateway's settings: its flags (each with an environment variable) and the static discovery file, both
//! validated at start-up with errors that name the field.
//!
//! The static file (YAML; unknown keys are refused):
//! ```yaml
//! models:
//!   - name: tiny-moe              # the OpenAI `model` clients send; /v1/models lists it
//!     policy: prefix-affinity     # least-load (default) | prefix-affinity | session-affinity | round-robin
//!     backends:                   # runtime heads: their OpenAI API and /metrics are on this URL
//!       - http://127.0.0.1:8001
//!       - http://127.0.0.1:8002
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baleen_api::names::{
    ADMIN_PORT, ENV_GATEWAY_ADMIN_PORT, ENV_GATEWAY_API_KEYS, ENV_GATEWAY_CONFIG, ENV_GATEWAY_HOST,
    ENV_GATEWAY_KUBERNETES, ENV_GATEWAY_MAX_REQUEST_BYTES, ENV_GATEWAY_NAMESPACE, ENV_GATEWAY_PORT,
    ENV_GATEWAY_PREFIX_BYTES, ENV_GATEWAY_RELIST_INTERVAL, ENV_GATEWAY_REQUEST_TIMEOUT, ENV_GATEWAY_RETRIES,
    ENV_GATEWAY_SCRAPE_INTERVAL, ENV_GATEWAY_SESSION_HEADER, GATEWAY_PORT, GATEWAY_SESSION_HEADER,
};
use baleen_api::names::{
    ENV_GATEWAY_AUTOSCALE_PANIC_WINDOW, ENV_GATEWAY_AUTOSCALE_STABLE_WINDOW, ENV_GATEWAY_HOLD_TIMEOUT,
    ENV_GATEWAY_MAX_HELD_REQUESTS, ENV_GATEWAY_PROMETHEUS_URL, ENV_GATEWAY_WORKERS,
};
use clap::{Args, Parser, Subcommand};
use http::HeaderName;
use serde::{Deserialize, Serialize};

use crate::auth::Keys;
use crate::autoscale::{Windows, decide, prometheus};
use crate::backends::pool::MAX_EVENT_LOOPS;
use crate::error::{Error, Result};

/// Default cap on a request body (10 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
/// Default `--hold-timeout`: long enough for a large model's first replica to load.
pub const DEFAULT_HOLD_TIMEOUT: f64 = 300.0;
/// Default `--max-held-requests`.
pub const DEFAULT_MAX_HELD_REQUESTS: usize = 1024;
/// A load sample older than this many scrape intervals is stale (routing counts the backend saturated, the
/// autoscaler holds).
pub const STALE_INTERVALS: u32 = 3;

/// `baleen-gateway`: the OpenAI front door of Baleen's model replicas.
#[derive(Debug, Parser)]
#[command(name = "baleen-gateway", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The gateway's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI API on `--port`, routing each request to a backend of its model.
    Serve(Box<ServeArgs>),
    /// Print the SHA-256 of the API key read from stdin (one line), as the `--api-keys` file stores it.
    HashKey,
}

/// `baleen-gateway serve` flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The static discovery file: models, their routing policy and backend URLs.
    #[arg(long, env = ENV_GATEWAY_CONFIG, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    pub config: Option<PathBuf>,
    /// Discover the cluster's ModelDeployments and the ready heads of each (in-cluster config or kubeconfig).
    #[arg(long, env = ENV_GATEWAY_KUBERNETES)]
    pub kubernetes: bool,
    /// The namespace discovery looks in [default: every namespace].
    #[arg(long, env = ENV_GATEWAY_NAMESPACE, requires = "kubernetes")]
    pub namespace: Option<String>,
    /// Seconds between full relists of ModelDeployments and EndpointSlices (watches trigger one sooner).
    #[arg(long, env = ENV_GATEWAY_RELIST_INTERVAL, default_value_t = 30.0)]
    pub relist_interval: f64,
    /// Listen address of both ports.
    #[arg(long, env = ENV_GATEWAY_HOST, default_value = "0.0.0.0")]
    pub host: String,
    /// OpenAI API, `/health` and `/ready`.
    #[arg(long, env = ENV_GATEWAY_PORT, default_value_t = GATEWAY_PORT)]
    pub port: u16,
    /// `/metrics`.
    #[arg(long, env = ENV_GATEWAY_ADMIN_PORT, default_value_t = ADMIN_PORT)]
    pub admin_port: u16,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

/// Flags that shape routing (shared with `baleen up`, which runs the gateway in-process).
#[derive(Debug, Clone, Args)]
pub struct RoutingArgs {
    /// Largest request body accepted, in bytes (413 above it, refused before it is read).
    #[arg(long, env = ENV_GATEWAY_MAX_REQUEST_BYTES, default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Seconds between scrapes of each backend's `/ready` and `/metrics`; samples older than three intervals
    /// count as saturated.
    #[arg(long, env = ENV_GATEWAY_SCRAPE_INTERVAL, default_value_t = 1.0)]
    pub scrape_interval: f64,
    /// Seconds to wait for a backend's response head (a non-streamed completion answers only when it is done).
    #[arg(long, env = ENV_GATEWAY_REQUEST_TIMEOUT, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Other backends tried when one fails before the first response byte (refused connection, 429, 502-504).
    #[arg(long, env = ENV_GATEWAY_RETRIES, default_value_t = 2)]
    pub retries: u32,
    /// Bytes of a prompt's leading text that `prefix-affinity` hashes (requests sharing them go together).
    #[arg(long, env = ENV_GATEWAY_PREFIX_BYTES, default_value_t = 256)]
    pub prefix_bytes: usize,
    /// The header `session-affinity` keys on (the body's `user` field when the header is absent).
    #[arg(long, env = ENV_GATEWAY_SESSION_HEADER, default_value = GATEWAY_SESSION_HEADER)]
    pub session_header: String,
    /// API keys file (names, SHA-256 hashes, per-key rate limits); without it no key is asked for.
    #[arg(long, env = ENV_GATEWAY_API_KEYS, value_name = "FILE")]
    pub api_keys: Option<PathBuf>,
    /// Seconds a request for an autoscaled model with no ready replica (at zero, or all starting) waits for one
    /// before a 503; a model's first replica must load within it.
    #[arg(long, env = ENV_GATEWAY_HOLD_TIMEOUT, default_value_t = DEFAULT_HOLD_TIMEOUT)]
    pub hold_timeout: f64,
    /// Requests held per model while it has no ready replica; more are refused at once with a 503.
    #[arg(long, env = ENV_GATEWAY_MAX_HELD_REQUESTS, default_value_t = DEFAULT_MAX_HELD_REQUESTS)]
    pub max_held_requests: usize,
    /// Seconds of load the autoscaler averages (its stable window).
    #[arg(long, env = ENV_GATEWAY_AUTOSCALE_STABLE_WINDOW, default_value_t = decide::STABLE_WINDOW.as_secs_f64())]
    pub autoscale_stable_window: f64,
    /// Seconds of its panic window: when the load over it is twice what the ready replicas are sized for, it
    /// scales up at once.
    #[arg(long, env = ENV_GATEWAY_AUTOSCALE_PANIC_WINDOW, default_value_t = decide::PANIC_WINDOW.as_secs_f64())]
    pub autoscale_panic_window: f64,
    /// A Prometheus server (http://host:port[/prefix]) the autoscaler queries for its metrics, and the only
    /// source of metric type PromQL; without it the autoscaler reads the heads' scrapes.
    #[arg(long, env = ENV_GATEWAY_PROMETHEUS_URL, value_name = "URL")]
    pub prometheus_url: Option<String>,
    /// Threads serving the gateway's API port (1-64), each with its own event loop, connections and idle upstream
    /// connections [default: one per CPU the process may use].
    #[arg(long, env = ENV_GATEWAY_WORKERS)]
    pub workers: Option<usize>,
}

impl Default for RoutingArgs {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            scrape_interval: 1.0,
            request_timeout: 600.0,
            retries: 2,
            prefix_bytes: 256,
            session_header: GATEWAY_SESSION_HEADER.to_string(),
            api_keys: None,
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            max_held_requests: DEFAULT_MAX_HELD_REQUESTS,
            autoscale_stable_window: decide::STABLE_WINDOW.as_secs_f64(),
            autoscale_panic_window: decide::PANIC_WINDOW.as_secs_f64(),
            prometheus_url: None,
            workers: None,
        }
    }
}

/// Validated routing settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_request_bytes: usize,
    pub scrape_interval: Duration,
    pub request_timeout: Duration,
    pub retries: u32,
    pub prefix_bytes: usize,
    pub session_header: HeaderName,
    /// API keys, when `--api-keys` is given.
    pub api_keys: Option<Arc<Keys>>,
    pub hold_timeout: Duration,
    pub max_held_requests: usize,
    /// The autoscaler's windows.
    pub windows: Windows,
    /// The Prometheus server the autoscaler queries (`--prometheus-url`, validated).
    pub prometheus_url: Option<String>,
    /// Event loops serving the API port (`--workers`, 1..=[`MAX_EVENT_LOOPS`]).
    pub workers: usize,
}

pub(crate) fn seconds(field: &str, value: f64) -> Result<Duration> {
    if value.is_finite() && value > 0.0 && value <= 86_400.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(Error::Invalid { field: field.into(), reason: format!("{value} is not a number of seconds in (0, 86400]") })
    }
}

impl RoutingArgs {
    /// The typed settings; the error names the flag.
    pub fn settings(&self) -> Result<Settings> {
        if self.max_request_bytes == 0 {
            return Err(Error::Invalid { field: "--max-request-bytes".into(), reason: "must be at least 1".into() });
        }
        if self.prefix_bytes == 0 {
            return Err(Error::Invalid { field: "--prefix-bytes".into(), reason: "must be at least 1".into() });
        }
        let session_header = HeaderName::try_from(self.session_header.to_ascii_lowercase()).map_err(|e| {
            Error::Invalid { field: "--session-header".into(), reason: format!("`{}`: {e}", self.session_header) }
        })?;
        let scrape_interval = seconds("--scrape-interval", self.scrape_interval)?;
        let windows = Windows {
            stable: seconds("--autoscale-stable-window", self.autoscale_stable_window)?,
            panic: seconds("--autoscale-panic-window", self.autoscale_panic_window)?,
            stale_after: scrape_interval * STALE_INTERVALS,
        };
        if windows.panic > windows.stable {
            return Err(Error::Invalid {
                field: "--autoscale-panic-window".into(),
                reason: format!("{:?} is longer than the stable window ({:?})", windows.panic, windows.stable),
            });
        }
        let workers = match self.workers {
            Some(n) if (1..=MAX_EVENT_LOOPS).contains(&n) => n,
            Some(n) => {
                return Err(Error::Invalid {
                    field: "--workers".into(),
                    reason: format!("{n} is not in 1..={MAX_EVENT_LOOPS}"),
                });
            }
            None => match std::thread::available_parallelism() {
                Ok(cpus) => usize::from(cpus).min(MAX_EVENT_LOOPS),
                Err(e) => {
                    tracing::warn!("cannot count the CPUs this process may use ({e}): one event loop (see --workers)");
                    1
                }
            },
        };
        Ok(Settings {
            workers,
            max_request_bytes: self.max_request_bytes,
            scrape_interval,
            request_timeout: seconds("--request-timeout", self.request_timeout)?,
            retries: self.retries,
            prefix_bytes: self.prefix_bytes,
            session_header,
            api_keys: self.api_keys.as_deref().map(Keys::load).transpose()?.map(Arc::new),
            hold_timeout: seconds("--hold-timeout", self.hold_timeout)?,
            max_held_requests: self.max_held_requests,
            windows,
            prometheus_url: self
                .prometheus_url
                .as_deref()
                .map(prometheus::base_url)
                .transpose()
                .map_err(|reason| Error::Invalid { field: "--prometheus-url".into(), reason })?,
        })
    }
}

/// How a model's requests are spread over its backends: `spec.routing.policy` of a ModelDeployment.
pub use crate::policy::PolicyKind;

/// The static discovery file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    pub models: Vec<ModelConfig>,
}

/// One model of the static file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The OpenAI `model` clients send.
    pub name: String,
    #[serde(default)]
    pub policy: PolicyKind,
    /// Base URLs (`http://host:port`) of the runtime heads serving it.
    #[serde(default)]
    pub backends: Vec<String>,
}

impl StaticConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::ReadConfig { path: path.to_path_buf(), source })?;
        let config: Self =
            serde_yaml::from_str(&text).map_err(|source| Error::ParseConfig { path: path.to_path_buf(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Non-empty unique model names; backends that are `http://host:port` URLs, none twice in a model.
    pub fn validate(&self) -> Result<()> {
        let mut names = BTreeSet::new();
        for (i, model) in self.models.iter().enumerate() {
            if model.name.trim().is_empty() {
                return Err(Error::Invalid { field: format!("models[{i}].name"), reason: "is empty".into() });
            }
            if !names.insert(model.name.as_str()) {
                return Err(Error::Invalid {
                    field: format!("models[{i}].name"),
                    reason: format!("`{}` is listed twice", model.name),
                });
            }
            let mut seen = BTreeSet::new();
            for (j, url) in model.backends.iter().enumerate() {
                let base = backend_base(url)
                    .map_err(|reason| Error::Invalid { field: format!("models[{i}].backends[{j}]"), reason })?;
                if !seen.insert(base) {
                    return Err(Error::Invalid {
                        field: format!("models[{i}].backends[{j}]"),
                        reason: format!("`{url}` is listed twice"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The normalized base URL of a backend (`http://host:port`, no trailing slash), or why it is not one.
pub fn backend_base(url: &str) -> std::result::Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("`{url}`: only http:// backends are supported"));
    }
    let Some(authority) = uri.authority() else { return Err(format!("`{url}` has no host")) };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("`{url}`: give the base URL only (http://host:port), without a path"));
    }
    Ok(format!("http://{authority}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn parse(text: &str) -> Result<StaticConfig> {
        let config: StaticConfig = serde_yaml::from_str(text)
            .map_err(|source| Error::ParseConfig { path: PathBuf::from("test.yaml"), source })?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn the_documented_file_parses_with_least_load_by_default() {
        let config = parse(
            "models:\n  - name: tiny-moe\n    policy: prefix-affinity\n    backends: [http://127.0.0.1:8001, \
             http://127.0.0.1:8002/]\n  - name: other\n    backends: [http://10.0.0.1:8000]\n",
        )
        .unwrap();
        assert_eq!(config.models[0].policy, PolicyKind::PrefixAffinity);
        assert_eq!(config.models[1].policy, PolicyKind::LeastLoad);
        assert_eq!(backend_base(&config.models[0].backends[1]).unwrap(), "http://127.0.0.1:8002");
    }

    #[test]
    fn unknown_keys_and_policies_are_refused_with_their_name() {
        let e = parse("models:\n  - name: a\n    backend: [http://x:1]\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `backend`"), "{e}");
        let e = parse("models:\n  - name: a\n    policy: fastest\n").unwrap_err().to_string();
        assert!(e.contains("fastest"), "{e}");
        let e = parse("modls: []\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `modls`"), "{e}");
    }

    #[test]
    fn bad_backends_and_duplicate_names_name_the_field() {
        for (text, field) in [
            ("models:\n  - name: a\n    backends: [https://x:1]\n", "models[0].backends[0]"),
            ("models:\n  - name: a\n    backends: [http://x:1/v1]\n", "models[0].backends[0]"),
            ("models:\n  - name: a\n    backends: [http://x:1, 'http://x:1/']\n", "models[0].backends[1]"),
            ("models:\n  - name: a\n  - name: a\n", "models[1].name"),
            ("models:\n  - name: ' '\n", "models[0].name"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn routing_flags_are_checked() {
        let ok = RoutingArgs::default().settings().unwrap();
        assert_eq!(ok.session_header.as_str(), GATEWAY_SESSION_HEADER);
        let e = RoutingArgs { scrape_interval: 0.0, ..RoutingArgs::default() }.settings().unwrap_err();
        assert!(e.to_string().contains("--scrape-interval"), "{e}");
        let e = RoutingArgs { session_header: "bad header".into(), ..RoutingArgs::default() }.settings().unwrap_err();
        assert!(e.to_string().contains("--session-header"), "{e}");
        for workers in [0, MAX_EVENT_LOOPS + 1] {
            let e = RoutingArgs { workers: Some(workers), ..RoutingArgs::default() }.settings().unwrap_err();
            assert!(e.to_string().contains("--workers"), "{e}");
        }
        assert_eq!(RoutingArgs { workers: Some(3), ..RoutingArgs::default() }.settings().unwrap().workers, 3);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(ok.workers, cpus.min(MAX_EVENT_LOOPS), "one event loop per CPU by default");
    }
}
