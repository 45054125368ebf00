//! The inference engine: a continuous-batching scheduler over a paged latent KV cache, on its own thread.
//!
//! The API layer calls [`EngineHandle::submit`] with a tokenized [`GenerateRequest`]; the request carries a
//! cancellation token and gets its own event stream. Each engine step admits waiting requests by free cache
//! blocks and a token budget (chunked prefill), runs one packed forward pass for every scheduled sequence,
//! samples, streams tokens, and preempts (recompute) when the cache runs out.

pub mod errors;
pub mod kv;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod stop;

pub use scheduler::spawn;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub use errors::{EngineError, Limits, RequestError, SubmitError};
pub use request::{Event, EventStream, FinishReason, GenerateRequest, TokenLogprob, Usage};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// How much memory the latent KV cache may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheMemory {
    Bytes(u64),
    /// A fraction of the device's memory (system RAM on CPU).
    Fraction(f64),
}

impl std::str::FromStr for KvCacheMemory {
    type Err = Error;

    /// `0.2` (a fraction), `1073741824`, `512MiB`, `4GiB`, `2GB`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Setting {
            name: "kv-cache-memory".into(),
            reason: format!("`{s}`: expected a fraction in (0, 1] or a size such as 4GiB"),
        };
        let t = s.trim();
        let units: [(&str, u64); 8] = [
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("KB", 1_000),
            ("G", 1 << 30),
            ("M", 1 << 20),
        ];
        for (suffix, mult) in units {
            if let Some(num) = t.strip_suffix(suffix) {
                let v: f64 = num.trim().parse().map_err(|_| bad())?;
                if v.is_nan() || v <= 0.0 {
                    return Err(bad());
                }
                return Ok(Self::Bytes((v * mult as f64) as u64));
            }
        }
        if t.contains('.') {
            let f: f64 = t.parse().map_err(|_| bad())?;
            return if f > 0.0 && f <= 1.0 { Ok(Self::Fraction(f)) } else { Err(bad()) };
        }
        match t.parse::<u64>() {
            Ok(0) | Err(_) => Err(bad()),
            Ok(b) => Ok(Self::Bytes(b)),
        }
    }
}

/// Engine limits (the `serve` flags of the same names).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences in the running batch at most.
    pub max_num_seqs: usize,
    /// Tokens processed in one step at most (decode tokens plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Prompt plus generated tokens of one sequence at most; `None` = the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    pub kv_cache_memory: KvCacheMemory,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Requests waiting for admission at most; beyond it `submit` answers [`SubmitError::QueueFull`] (HTTP 429).
    pub max_waiting: usize,
    pub enable_prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            kv_cache_memory: KvCacheMemory::Bytes(1 << 30),
            block_size: 16,
            max_waiting: 256,
            enable_prefix_caching: true,
        }
    }
}

/// Shared counters the API layer reads without talking to the engine thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) draining: AtomicBool,
    pub(crate) waiting: AtomicUsize,
    pub(crate) running: AtomicUsize,
    pub(crate) stopped: AtomicBool,
}

/// Static facts about the engine the API layer needs.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub served_model_name: String,
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub vocab_size: usize,
}

impl EngineInfo {
    pub fn limits(&self) -> Limits {
        Limits { max_model_len: self.max_model_len, vocab_size: self.vocab_size }
    }
}

/// A cloneable handle to the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::Sender<scheduler::Command>,
    /// Wakes an engine thread that waits for commands while driving its expert transport.
    wake: Arc<tokio::sync::Notify>,
    shared: Arc<Shared>,
    info: Arc<EngineInfo>,
    tokenizer: Arc<Tokenizer>,
    max_waiting: usize,
}

impl EngineHandle {
    /// Queues a request. Fails fast when draining, when the queue is full, or when the request can never fit.
    pub fn submit(&self, request: GenerateRequest) -> std::result::Result<EventStream, SubmitError> {
        if !self.is_ready() {
            return Err(SubmitError::Draining);
        }
        self.info.limits().check(&request.prompt, request.max_tokens)?;
        let waiting = self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { waiting });
        }
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        if self.tx.send(scheduler::Command::Submit(Box::new(request), events)).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Draining);
        }
        self.wake.notify_one();
        Ok(rx)
    }

    /// Whether `submit` would admit a request now (not draining, the queue not full): checked before work that
    /// costs more than the check (compiling a schema), so a refused request costs nothing.
    pub fn check_admission(&self) -> std::result::Result<(), SubmitError> {
        if !self.is_ready() {
            return Err(SubmitError::Draining);
        }
        let waiting = self.shared.waiting.load(Ordering::SeqCst);
        if waiting >= self.max_waiting {
            return Err(SubmitError::QueueFull { waiting });
        }
        Ok(())
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Stops admitting new requests; in-flight ones run to completion.
    pub fn start_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Requests waiting or running.
    pub fn in_flight(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst) + self.shared.running.load(Ordering::SeqCst)
    }

    /// Whether the engine thread is alive and admitting.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && !self.shared.stopped.load(Ordering::SeqCst)
    }

    /// Asks the engine thread to abort everything and exit.
    pub fn shutdown(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = self.tx.send(scheduler::Command::Shutdown);
        self.wake.notify_one();
    }
}
