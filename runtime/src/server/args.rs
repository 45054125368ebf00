//! The flags of `baleen-runtime serve` (each also from its `BALEEN_RUNTIME_*` variable) and the engine and HTTP
//! settings they make.

use std::time::Duration;

use baleen_api::names::{
    BUILTIN_SCHEME, ENV_RUNTIME_ALLOWED_ORIGINS, ENV_RUNTIME_API_KEY, ENV_RUNTIME_BLOCK_SIZE,
    ENV_RUNTIME_BODY_READ_TIMEOUT, ENV_RUNTIME_CHAT_TEMPLATE, ENV_RUNTIME_DRAIN_TIMEOUT,
    ENV_RUNTIME_HEADER_READ_TIMEOUT, ENV_RUNTIME_HOST, ENV_RUNTIME_KV_CACHE_MEMORY, ENV_RUNTIME_MAX_CONNECTIONS,
    ENV_RUNTIME_MAX_MODEL_LEN, ENV_RUNTIME_MAX_NUM_BATCHED_TOKENS, ENV_RUNTIME_MAX_NUM_SEQS,
    ENV_RUNTIME_MAX_REQUEST_BYTES, ENV_RUNTIME_MAX_WAITING, ENV_RUNTIME_NO_PREFIX_CACHING, ENV_RUNTIME_PORT,
    ENV_RUNTIME_SERVED_MODEL_NAME,
};

use super::HttpLimits;
use crate::engine::{EngineConfig, KvCacheMemory};
use crate::error::{Error, Result};
use crate::settings::ModelArgs;

/// The flags of `baleen-runtime serve`; each can also come from its `BALEEN_RUNTIME_*` variable.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind: 0.0.0.0 (every interface) suits a pod; use 127.0.0.1 to serve this machine only.
    #[arg(long, default_value = "0.0.0.0", env = ENV_RUNTIME_HOST)]
    pub host: String,
    /// Port to bind; 0 picks a free one (the listening line says which).
    #[arg(long, default_value_t = 8000, env = ENV_RUNTIME_PORT)]
    pub port: u16,
    /// Name clients send as `model` [default: the --model string; `builtin:NAME` → NAME; a Hub model → org/name].
    #[arg(long, env = ENV_RUNTIME_SERVED_MODEL_NAME)]
    pub served_model_name: Option<String>,
    /// Sequences in the running batch at most.
    #[arg(long, default_value_t = 64, env = ENV_RUNTIME_MAX_NUM_SEQS)]
    pub max_num_seqs: usize,
    /// Tokens processed in one engine step at most (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 2048, env = ENV_RUNTIME_MAX_NUM_BATCHED_TOKENS)]
    pub max_num_batched_tokens: usize,
    /// Prompt plus generated tokens of one request at most [default: the model's max_position_embeddings].
    #[arg(long, env = ENV_RUNTIME_MAX_MODEL_LEN)]
    pub max_model_len: Option<usize>,
    /// Memory for the latent KV cache: a fraction of device memory (0.2) or a size (512MiB, 4GiB).
    #[arg(long, default_value = "1GiB", env = ENV_RUNTIME_KV_CACHE_MEMORY)]
    pub kv_cache_memory: KvCacheMemory,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, env = ENV_RUNTIME_BLOCK_SIZE)]
    pub block_size: usize,
    /// Requests waiting for admission at most; beyond it requests are refused with 429.
    #[arg(long, default_value_t = 256, env = ENV_RUNTIME_MAX_WAITING)]
    pub max_waiting: usize,
    /// Turn prefix caching off.
    #[arg(long, env = ENV_RUNTIME_NO_PREFIX_CACHING)]
    pub no_prefix_caching: bool,
    /// Request bodies larger than this many bytes are refused with 413 before they are read.
    #[arg(long, default_value_t = 1 << 20, env = ENV_RUNTIME_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Seconds to let in-flight requests finish after SIGTERM before aborting them.
    #[arg(long, default_value_t = 30, env = ENV_RUNTIME_DRAIN_TIMEOUT)]
    pub drain_timeout: u64,
    /// Seconds a client may take to send a request's headers; idle keep-alive connections close after it too.
    #[arg(long, default_value_t = 60, env = ENV_RUNTIME_HEADER_READ_TIMEOUT)]
    pub header_read_timeout: u64,
    /// Seconds a client may take to send a request's body (else 408).
    #[arg(long, default_value_t = 60, env = ENV_RUNTIME_BODY_READ_TIMEOUT)]
    pub body_read_timeout: u64,
    /// Open client connections at most; beyond it a connection is served only /health, /ready and /metrics
    /// (others get 503) and closed after one answer.
    #[arg(long, default_value_t = 4096, env = ENV_RUNTIME_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// API keys, comma-separated: /v1/* then needs `Authorization: Bearer KEY` (the probes and /metrics stay
    /// open). Prefer the variable to the flag, which other users of the machine can read.
    #[arg(long, env = ENV_RUNTIME_API_KEY, value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<String>,
    /// Browser origins allowed to call the API (CORS), comma-separated, or `*`; none by default.
    #[arg(long, env = ENV_RUNTIME_ALLOWED_ORIGINS, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// A Jinja chat template file to use instead of the model's (transformers' conventions: `messages`,
    /// `tools`, `add_generation_prompt`, the special tokens); it must compile, or the server does not start.
    #[arg(long, env = ENV_RUNTIME_CHAT_TEMPLATE)]
    pub chat_template: Option<std::path::PathBuf>,
}

impl ServeArgs {
    /// The engine limits these flags set; zero sizes are refused with the flag's name.
    pub fn engine_config(&self) -> Result<EngineConfig> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::Setting { name: name.to_string(), reason: "must be at least 1".to_string() })
            } else {
                Ok(v)
            }
        };
        positive("max-request-bytes", self.max_request_bytes)?;
        self.http_limits()?;
        if !self.api_key.is_empty() && self.api_key.iter().all(|k| k.trim().is_empty()) {
            return Err(Error::Setting {
                name: "api-key".into(),
                reason: "is set but holds no key (refusing to serve without the authentication it asks for)".into(),
            });
        }
        if let Some(len) = self.max_model_len {
            positive("max-model-len", len)?;
        }
        Ok(EngineConfig {
            max_num_seqs: positive("max-num-seqs", self.max_num_seqs)?,
            max_num_batched_tokens: positive("max-num-batched-tokens", self.max_num_batched_tokens)?,
            max_model_len: self.max_model_len,
            kv_cache_memory: self.kv_cache_memory,
            block_size: positive("block-size", self.block_size)?,
            max_waiting: positive("max-waiting", self.max_waiting)?,
            enable_prefix_caching: !self.no_prefix_caching,
        })
    }

    /// The connection timeouts and cap; zero is refused with the flag's name.
    pub fn http_limits(&self) -> Result<HttpLimits> {
        let seconds = |name: &str, v: u64| {
            if v == 0 {
                Err(Error::Setting { name: name.to_string(), reason: "must be at least 1 second".to_string() })
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        if self.max_connections == 0 {
            return Err(Error::Setting { name: "max-connections".into(), reason: "must be at least 1".into() });
        }
        Ok(HttpLimits {
            header_read_timeout: seconds("header-read-timeout", self.header_read_timeout)?,
            body_read_timeout: seconds("body-read-timeout", self.body_read_timeout)?,
            max_connections: self.max_connections,
        })
    }

    /// `--served-model-name`, or the model source: `builtin:NAME` → `NAME`, a Hub model → `org/name` (as vLLM
    /// names it), a directory as given.
    pub fn served_model_name(&self) -> String {
        if let Some(name) = &self.served_model_name {
            return name.clone();
        }
        match &self.model.hub {
            Some(hub) => hub.repo.clone(),
            None => match self.model.model.strip_prefix(BUILTIN_SCHEME) {
                Some(name) => name.to_string(),
                None => self.model.model.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).unwrap().serve
    }

    #[test]
    fn flag_defaults_match_the_engine_defaults() {
        let args = parse(&["--model", "builtin:tiny-moe"]);
        let got = args.engine_config().unwrap();
        let want = EngineConfig::default();
        assert_eq!(got.max_num_seqs, want.max_num_seqs);
        assert_eq!(got.max_num_batched_tokens, want.max_num_batched_tokens);
        assert_eq!(got.max_model_len, want.max_model_len);
        assert_eq!(got.kv_cache_memory, want.kv_cache_memory);
        assert_eq!(got.block_size, want.block_size);
        assert_eq!(got.max_waiting, want.max_waiting);
        assert_eq!(got.enable_prefix_caching, want.enable_prefix_caching);
        assert_eq!((args.host.as_str(), args.port, args.max_request_bytes), ("0.0.0.0", 8000, 1 << 20));
    }

    #[test]
    fn served_name_defaults_to_the_model_source() {
        assert_eq!(parse(&["--model", "builtin:tiny-moe"]).served_model_name(), "tiny-moe");
        assert_eq!(parse(&["--model", "/models/v3"]).served_model_name(), "/models/v3");
        assert_eq!(parse(&["--model", "/m", "--served-model-name", "ds"]).served_model_name(), "ds");
    }

    #[test]
    fn flags_set_the_engine_limits() {
        let args = parse(&[
            "--model",
            "builtin:tiny-moe",
            "--max-num-seqs",
            "2",
            "--kv-cache-memory",
            "64MiB",
            "--max-model-len",
            "128",
            "--no-prefix-caching",
        ]);
        let c = args.engine_config().unwrap();
        assert_eq!((c.max_num_seqs, c.max_model_len), (2, Some(128)));
        assert_eq!(c.kv_cache_memory, KvCacheMemory::Bytes(64 << 20));
        assert!(!c.enable_prefix_caching);
    }

    #[test]
    fn zero_sizes_are_refused_naming_the_flag() {
        let err = parse(&["--model", "x", "--block-size", "0"]).engine_config().unwrap_err();
        assert!(err.to_string().contains("block-size"), "{err}");
        assert!(Cli::try_parse_from(["serve", "--model", "x", "--kv-cache-memory", "lots"]).is_err());
    }
}
