//! The engine thread: continuous batching with chunked prefill, prefix caching and preemption by recompute.
//!
//! Every step: take new requests, drop cancelled sequences, give each running sequence (oldest first) as many
//! of its pending tokens as the token budget allows (a decode needs one; a prefill takes a chunk), admit waiting
//! requests while budget, sequence slots and blocks remain, run one packed forward pass, then sample for every
//! sequence whose pending tokens are all computed. When a block cannot be found, the youngest running sequence is
//! preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use candle_core::{DType, Device};
use tokio::sync::mpsc::UnboundedSender;

use super::errors::EngineError;
use super::kv::{BlockAllocator, block_hash};
use super::request::{Event, FinishReason, GenerateRequest, TokenLogprob, Usage};
use super::sampler::{Sampler, log_softmax};
use super::stop::TextStream;
use super::{EngineConfig, EngineHandle, EngineInfo, KvCacheMemory, Shared};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::loader::LoadedModel;
use crate::metrics::Metrics;
use crate::model::{DeepseekModel, ForwardOptions, LatentPool, SeqInput};
use crate::tokenizer::Tokenizer;

pub(crate) enum Command {
    Submit(Box<GenerateRequest>, UnboundedSender<Event>),
    Shutdown,
}

struct Sequence {
    req: Box<GenerateRequest>,
    events: UnboundedSender<Event>,
    /// Token events held back for a non-streamed request, sent with its finish.
    held: Vec<Event>,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose latent rows are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Hash chain of this sequence's full blocks registered so far.
    hashes: Vec<u64>,
    cached_tokens: usize,
    sampler: Sampler,
    text: TextStream,
    arrived: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Sends a token now (streamed requests) or holds it for the finish.
    fn token(&mut self, event: Event) {
        if self.req.stream {
            let _ = self.events.send(event);
        } else {
            self.held.push(event);
        }
    }

    /// Sends the held tokens, then the request's last event.
    fn end(&mut self, last: Event) {
        for event in self.held.drain(..) {
            let _ = self.events.send(event);
        }
        let _ = self.events.send(last);
    }
}

/// Tokens a sequence can hold at most: the smaller of the model's context and the configured limit.
fn max_model_len(model: &DeepseekModel, config: &EngineConfig) -> usize {
    let native = model.config().max_position_embeddings;
    config.max_model_len.map_or(native, |m| m.min(native))
}

/// Total memory of the device the cache lives on (system RAM for the CPU).
fn device_memory_bytes(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts the engine thread for `loaded`: sizes the latent KV cache from `config.kv_cache_memory`, and runs the
/// scheduler on a thread whose compute pool has `threads` threads (itself the first).
pub fn spawn(
    loaded: LoadedModel,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    served_model_name: String,
    threads: usize,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let LoadedModel { model, tokenizer, .. } = loaded;
    let max_len = max_model_len(&model, &config);
    let bytes_per_token = model.kv_cache_bytes_per_token();
    let bytes_per_block = bytes_per_token * config.block_size;
    let budget = match config.kv_cache_memory {
        KvCacheMemory::Bytes(b) => b,
        KvCacheMemory::Fraction(f) => {
            let total = device_memory_bytes(model.device()).ok_or_else(|| Error::Setting {
                name: "kv-cache-memory".into(),
                reason: "a fraction needs a known device memory size; give bytes (e.g. 4GiB)".into(),
            })?;
            (total as f64 * f) as u64
        }
    };
    let num_blocks = (budget / bytes_per_block.max(1) as u64) as usize;
    let blocks_per_seq = max_len.div_ceil(config.block_size);
    if num_blocks < blocks_per_seq.min(2) || num_blocks == 0 {
        return Err(Error::Setting {
            name: "kv-cache-memory".into(),
            reason: format!(
                "{budget} bytes hold {num_blocks} blocks of {bytes_per_block} bytes; need at least one sequence"
            ),
        });
    }
    // A request that could never fit the cache is rejected up front by the length limit.
    let max_len = max_len.min(num_blocks * config.block_size);
    let pool = model.new_pool(num_blocks, config.block_size)?;
    metrics.set_cache_config(config.block_size, num_blocks, &format!("{:?}", model.kv_cache_dtype()).to_lowercase());
    metrics.set_model_weights(model.weight_bytes(), &model.weight_format());
    tracing::info!(
        block_size = config.block_size,
        num_blocks,
        kv_cache_bytes = num_blocks * bytes_per_block,
        max_model_len = max_len,
        "latent KV cache allocated"
    );
    let info = Arc::new(EngineInfo {
        served_model_name,
        max_model_len: max_len,
        block_size: config.block_size,
        num_blocks,
        vocab_size: model.config().vocab_size,
    });
    let tokenizer = Arc::new(tokenizer);
    let shared = Arc::new(Shared::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let wake = Arc::new(tokio::sync::Notify::new());
    let handle = EngineHandle {
        tx,
        wake: wake.clone(),
        shared: shared.clone(),
        info: info.clone(),
        tokenizer: tokenizer.clone(),
        max_waiting: config.max_waiting,
    };
    let allocator = BlockAllocator::new(num_blocks, config.block_size, config.enable_prefix_caching);
    let mut engine = Engine {
        model,
        tokenizer,
        pool,
        allocator,
        config,
        max_len,
        metrics,
        shared,
        waiting: VecDeque::new(),
        running: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name("baleen-engine".into())
        .spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).use_current_thread().build();
            match pool {
                Ok(pool) => pool.install(|| engine.run(rx, &wake)),
                Err(e) => tracing::error!(error = %e, "cannot build the engine's compute pool"),
            }
            engine.shared.stopped.store(true, Ordering::SeqCst);
        })
        .map_err(|e| Error::Setting {
            name: "engine".into(),
            reason: format!("cannot start the engine thread: {e}"),
        })?;
    Ok((handle, thread))
}

/// How often an idle engine that drives its expert transport looks for a closed command channel (every handle
/// gone) without a wake-up.
const IDLE_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// The next command of an idle engine, blocking; `None` once every handle is gone. With an expert `driver`, the
/// thread drives the transport while it waits, woken by `wake` when a command is sent.
fn idle_wait(rx: &Receiver<Command>, driver: Option<&Driver>, wake: &tokio::sync::Notify) -> Option<Command> {
    let Some(driver) = driver else { return rx.recv().ok() };
    loop {
        match rx.try_recv() {
            Ok(cmd) => return Some(cmd),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {
                // A command sent between try_recv and here left a permit: notified() completes at once.
                let _ = driver.block_on(async { tokio::time::timeout(IDLE_RECHECK, wake.notified()).await });
            }
        }
    }
}

struct Engine {
    model: DeepseekModel,
    tokenizer: Arc<Tokenizer>,
    pool: LatentPool,
    allocator: BlockAllocator,
    config: EngineConfig,
    max_len: usize,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

impl Engine {
    fn run(&mut self, rx: Receiver<Command>, wake: &tokio::sync::Notify) {
        // A head that drives its own expert transport keeps driving it while idle, so reconnects, handshakes and
        // keepalives progress on this thread.
        let driver = self.model.expert_driver();
        loop {
            // Block for work when idle; otherwise just take what has arrived.
            if self.waiting.is_empty() && self.running.is_empty() {
                // Routed-row counts kept on the device reach the metrics before the engine sleeps.
                if let Err(e) = self.model.flush_expert_counts(true) {
                    tracing::warn!(error = %e, "flushing the expert token counters failed");
                }
                match idle_wait(&rx, driver.as_ref(), wake) {
                    Some(cmd) => {
                        if !self.accept(cmd) {
                            break;
                        }
                    }
                    None => break,
                }
            }
            let mut shutdown = false;
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.accept(cmd) {
                            shutdown = true;
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        shutdown = self.waiting.is_empty() && self.running.is_empty();
                        break;
                    }
                }
            }
            if shutdown {
                break;
            }
            self.step();
            self.publish();
        }
        // Requests still here were cut short by shutdown: they end like any other, with `abort` and their usage.
        let cut: Vec<Sequence> = self.running.drain(..).chain(self.waiting.drain(..)).collect();
        for seq in cut {
            self.finish(seq, FinishReason::Abort);
        }
        self.publish();
    }

    /// Takes one command; false on shutdown.
    fn accept(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Shutdown => false,
            Command::Submit(req, events) => {
                let sampler = Sampler::new(req.sampling.clone());
                let prompt_len = req.prompt.len();
                self.waiting.push_back(Sequence {
                    tokens: req.prompt.clone(),
                    text: TextStream::new(req.stop.clone()),
                    req,
                    events,
                    held: Vec::new(),
                    prompt_len,
                    computed: 0,
                    blocks: Vec::new(),
                    hashes: Vec::new(),
                    cached_tokens: 0,
                    sampler,
                    arrived: Instant::now(),
                    first_token: None,
                    last_token: None,
                });
                true
            }
        }
    }

    fn publish(&self) {
        self.shared.waiting.store(self.waiting.len(), Ordering::SeqCst);
        self.shared.running.store(self.running.len(), Ordering::SeqCst);
        self.metrics.num_requests_waiting.set(self.waiting.len() as i64);
        self.metrics.num_requests_running.set(self.running.len() as i64);
        self.metrics.kv_cache_usage_perc.set(self.allocator.usage());
    }

    fn finish(&mut self, mut seq: Sequence, reason: FinishReason) {
        self.allocator.release(&seq.blocks);
        let usage = Usage {
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated().len(),
            cached_tokens: seq.cached_tokens,
        };
        let text = seq.text.finish();
        // Metrics first, so a scrape right after the response already counts it.
        self.metrics.request_success_total.with_label_values(&[reason.as_str()]).inc();
        self.metrics.e2e_request_latency_seconds.observe(seq.arrived.elapsed().as_secs_f64());
        seq.end(Event::Finished { reason, usage, text });
    }

    /// Removes sequences whose client went away, freeing their blocks now.
    fn reap_cancelled(&mut self) {
        let (cancelled, kept): (Vec<_>, Vec<_>) = self.running.drain(..).partition(|s| s.req.cancel.is_cancelled());
        self.running = kept;
        for seq in cancelled {
            self.finish(seq, FinishReason::Abort);
        }
        let (cancelled, kept): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|s| s.req.cancel.is_cancelled());
        self.waiting = kept.into();
        for seq in cancelled {
            self.finish(seq, FinishReason::Abort);
        }
    }

    /// Ensures `seq` has blocks for `upto` tokens. False when the cache is out of blocks.
    fn reserve(allocator: &mut BlockAllocator, seq: &mut Sequence, upto: usize) -> bool {
        while seq.blocks.len() * allocator.block_size() < upto {
            match allocator.allocate() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Frees the youngest running sequence and queues it for recompute.
    fn preempt_youngest(&mut self) -> bool {
        let Some(mut victim) = self.running.pop() else { return false };
        self.allocator.release(&victim.blocks);
        victim.blocks.clear();
        victim.hashes.clear();
        victim.computed = 0;
        self.metrics.num_preemptions_total.inc();
        tracing::debug!(request_id = %victim.req.request_id, "preempted (recompute)");
        self.waiting.push_front(victim);
        true
    }

    /// Plans one step: `(running index, tokens to compute)`.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.config.max_num_batched_tokens;
        let mut plan = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let pending = self.running[i].tokens.len() - self.running[i].computed;
            let n = pending.min(budget);
            let upto = self.running[i].computed + n;
            if Self::reserve(&mut self.allocator, &mut self.running[i], upto) {
                plan.push((i, n));
                budget -= n;
                i += 1;
                continue;
            }
            // Out of blocks: preempt the youngest (possibly this one) and retry.
            let youngest = self.running.len() - 1;
            if let Some(pos) = plan.iter().position(|&(j, _)| j == youngest) {
                budget += plan.remove(pos).1;
            }
            if !self.preempt_youngest() || youngest == i {
                break;
            }
        }
        // Admit waiting requests into the free slots.
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if seq.computed == 0 && seq.blocks.is_empty() {
                let hit = self.allocator.match_prefix(&seq.tokens, seq.tokens.len() - 1);
                self.metrics.prefix_cache_queries_total.inc_by(seq.tokens.len() as u64);
                self.metrics.prefix_cache_hits_total.inc_by(hit.tokens as u64);
                if seq.first_token.is_none() {
                    seq.cached_tokens = hit.tokens;
                }
                seq.computed = hit.tokens;
                seq.blocks = hit.blocks;
                seq.hashes = hit.hashes;
            }
            let n = (seq.tokens.len() - seq.computed).min(budget);
            let upto = seq.computed + n;
            if !Self::reserve(&mut self.allocator, &mut seq, upto) {
                // Not enough cache for its first chunk: give back what it holds and wait.
                self.allocator.release(&seq.blocks);
                seq.blocks.clear();
                seq.hashes.clear();
                seq.computed = 0;
                self.waiting.push_front(seq);
                break;
            }
            self.metrics.request_queue_time_seconds.observe(seq.arrived.elapsed().as_secs_f64());
            budget -= n;
            plan.push((self.running.len(), n));
            self.running.push(seq);
        }
        plan
    }

    fn step(&mut self) {
        self.reap_cancelled();
        let plan = self.schedule();
        // Gauges reflect admissions before any token of this step reaches a client.
        self.publish();
        if plan.is_empty() {
            if !self.waiting.is_empty() && self.running.is_empty() {
                // Nothing fits even an empty cache: fail the head of the queue rather than spin.
                if let Some(seq) = self.waiting.pop_front() {
                    let needed = seq.tokens.len().div_ceil(self.allocator.block_size());
                    let total = self.allocator.num_blocks();
                    let _ = seq.events.send(Event::Error(EngineError::DoesNotFit { needed, total }));
                    self.allocator.release(&seq.blocks);
                }
            }
            return;
        }
        let inputs: Vec<SeqInput<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                SeqInput { tokens: &s.tokens[s.computed..s.computed + n], past: s.computed, blocks: &s.blocks }
            })
            .collect();
        let logits = self
            .model
            .forward(&mut self.pool, &inputs, ForwardOptions::default())
            .and_then(|o| Ok(o.logits.to_dtype(DType::F32)?.to_vec2::<f32>()?));
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                let mut failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
                failed.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in failed {
                    let seq = self.running.remove(i);
                    self.allocator.release(&seq.blocks);
                    let _ = seq.events.send(Event::Error(EngineError::Forward(e.to_string())));
                }
                return;
            }
        };
        let mut done = Vec::new();
        for (&(i, n), row) in plan.iter().zip(&logits) {
            let seq = &mut self.running[i];
            seq.computed += n;
            register_full_blocks(&mut self.allocator, seq);
            if seq.computed < seq.tokens.len() {
                continue; // mid-prefill chunk: nothing to sample yet
            }
            if let Some(reason) = self.sample_into(i, row) {
                done.push((i, reason));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, reason) in done {
            let seq = self.running.remove(i);
            self.finish(seq, reason);
        }
    }

    /// Samples the next token of running sequence `i`, streams it, and says whether the sequence is done.
    fn sample_into(&mut self, i: usize, logits: &[f32]) -> Option<FinishReason> {
        let eos = self.tokenizer.eos_token_ids().to_vec();
        let seq = &mut self.running[i];
        let (prompt, generated) = seq.tokens.split_at(seq.prompt_len);
        let masked;
        let allowed = match seq.req.constraint.as_mut() {
            Some(constraint) => {
                let mut row = logits.to_vec();
                let result = constraint.mask(&mut row);
                masked = row;
                result.map(|()| &masked[..])
            }
            None => Ok(logits),
        };
        let sampled = allowed.and_then(|row| seq.sampler.sample(row, prompt, generated));
        let consumed = sampled.and_then(|id| match seq.req.constraint.as_mut() {
            Some(constraint) => constraint.consume(id).map(|()| id),
            None => Ok(id),
        });
        let id = match consumed {
            Ok(id) => id,
            Err(e) => {
                let _ = seq.events.send(Event::Error(EngineError::Sampling(e.to_string())));
                return Some(FinishReason::Abort);
            }
        };
        let now = Instant::now();
        match seq.last_token {
            None => self.metrics.time_to_first_token_seconds.observe((now - seq.arrived).as_secs_f64()),
            Some(prev) => self.metrics.inter_token_latency_seconds.observe((now - prev).as_secs_f64()),
        }
        seq.first_token.get_or_insert(now);
        seq.last_token = Some(now);
        self.metrics.generation_tokens_total.inc();
        if seq.tokens.len() == seq.prompt_len {
            self.metrics.prompt_tokens_total.inc_by(seq.prompt_len as u64);
        }
        seq.tokens.push(id);
        let logprob = seq.req.logprobs.map(|top| token_logprob(&self.tokenizer, logits, id, top));
        let step = seq.text.push(&self.tokenizer, id).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "detokenization failed");
            super::stop::Step { text: String::new(), stopped: false }
        });
        seq.token(Event::Token { id, text: step.text, logprob });
        let generated = seq.tokens.len() - seq.prompt_len;
        let grammar_done = seq.req.constraint.as_ref().is_some_and(crate::grammar::Constraint::is_finished);
        if step.stopped || grammar_done || seq.sampler.is_stop_token(id) || (!seq.req.ignore_eos && eos.contains(&id)) {
            Some(FinishReason::Stop)
        } else if generated >= seq.req.max_tokens || seq.tokens.len() >= self.max_len {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

/// Registers every newly completed full block of `seq` for prefix reuse.
fn register_full_blocks(allocator: &mut BlockAllocator, seq: &mut Sequence) {
    let bs = allocator.block_size();
    while seq.hashes.len() < seq.computed / bs {
        let b = seq.hashes.len();
        let parent = seq.hashes.last().copied().unwrap_or(0);
        let h = block_hash(parent, &seq.tokens[b * bs..(b + 1) * bs]);
        allocator.register(seq.blocks[b], h);
        seq.hashes.push(h);
    }
}

fn token_logprob(tokenizer: &Tokenizer, logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let lp = log_softmax(logits);
    let text = |t: u32| tokenizer.decode(&[t], false).unwrap_or_default();
    let mut order: Vec<usize> = (0..lp.len()).collect();
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]));
    TokenLogprob {
        id,
        token: text(id),
        logprob: lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top: order.into_iter().take(top).map(|t| (t as u32, text(t as u32), lp[t])).collect(),
    }
}
