#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The continuous-batching engine in process: batched equals unbatched, chunked prefill, prefix caching,
//! preemption under cache pressure, cancellation and limits.

use std::sync::Arc;
use std::time::Duration;

use baleen_runtime::engine::sampler::ValidSampling;
use baleen_runtime::engine::{
    EngineConfig, EngineHandle, Event, FinishReason, GenerateRequest, KvCacheMemory, RequestError, SubmitError, Usage,
};
use baleen_runtime::loader::{ModelSource, load};
use baleen_runtime::metrics::Metrics;
use candle_core::{DType, Device};
use tokio_util::sync::CancellationToken;

fn engine(config: EngineConfig) -> (EngineHandle, Arc<Metrics>) {
    let loaded = load(&ModelSource::parse("builtin:tiny-moe"), &Device::Cpu, DType::F32).unwrap();
    let metrics = Arc::new(Metrics::new("tiny-moe").unwrap());
    let (handle, _thread) =
        baleen_runtime::engine::spawn(loaded, config, metrics.clone(), "tiny-moe".into(), 1).unwrap();
    (handle, metrics)
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: "test".into(),
        prompt,
        sampling: ValidSampling::greedy(),
        max_tokens,
        stop: Vec::new(),
        ignore_eos: true,
        logprobs: None,
        cancel: CancellationToken::new(),
        stream: true,
        constraint: None,
    }
}

/// Collects a request's events: generated ids, finish reason, usage.
async fn collect(mut rx: baleen_runtime::engine::EventStream) -> (Vec<u32>, FinishReason, Usage) {
    let mut ids = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, .. } => ids.push(id),
            Event::Finished { reason, usage, .. } => return (ids, reason, usage),
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    panic!("stream ended without Finished");
}

fn prompts() -> Vec<Vec<u32>> {
    (0..6).map(|s| (0..(5 + 7 * s)).map(|i| ((s * 31 + i * 17 + 3) % 256) as u32).collect()).collect()
}

/// Each prompt run alone, one at a time.
async fn solo_outputs(handle: &EngineHandle, max_tokens: usize) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for p in prompts() {
        out.push(collect(handle.submit(request(p, max_tokens)).unwrap()).await.0);
    }
    out
}

async fn concurrent_outputs(handle: &EngineHandle, max_tokens: usize) -> Vec<Vec<u32>> {
    let streams: Vec<_> = prompts().into_iter().map(|p| handle.submit(request(p, max_tokens)).unwrap()).collect();
    let mut out = Vec::new();
    for s in streams {
        out.push(collect(s).await.0);
    }
    out
}

#[tokio::test]
async fn batched_mixed_length_requests_equal_unbatched() {
    let (solo, _) = engine(EngineConfig { enable_prefix_caching: false, ..Default::default() });
    let want = solo_outputs(&solo, 12).await;
    let (batched, _) = engine(EngineConfig { enable_prefix_caching: false, ..Default::default() });
    assert_eq!(concurrent_outputs(&batched, 12).await, want);
}

/// A non-streamed request's tokens are held until the finish: nothing arrives while the sequence runs, then
/// every token (equal to the streamed run's) right before `Finished`.
#[tokio::test]
async fn non_streamed_requests_get_their_tokens_with_the_finish() {
    let (handle, metrics) = engine(EngineConfig::default());
    let prompt = prompts().remove(2);
    let (streamed, _, _) = collect(handle.submit(request(prompt.clone(), 10)).unwrap()).await;
    let mut held = request(prompt, 10);
    held.stream = false;
    let mut long = request(vec![5, 6, 7], 300);
    long.stream = false;
    let mut rx = handle.submit(long).unwrap();
    // Wait until the long request has produced tokens, then check none has been sent yet.
    let before = metrics.generation_tokens_total.get();
    for _ in 0..500 {
        if metrics.generation_tokens_total.get() > before + 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(metrics.generation_tokens_total.get() > before + 20, "the long request is not generating");
    assert!(rx.try_recv().is_err(), "a non-streamed request received a token before its finish");
    let (ids, reason, usage) = collect(rx).await;
    assert_eq!((ids.len(), reason, usage.completion_tokens), (300, FinishReason::Length, 300));
    assert_eq!(collect(handle.submit(held).unwrap()).await.0, streamed);
}

#[tokio::test]
async fn chunked_prefill_and_tiny_budgets_give_the_same_tokens() {
    let (solo, _) = engine(EngineConfig::default());
    let want = solo_outputs(&solo, 8).await;
    let config = EngineConfig { max_num_batched_tokens: 5, block_size: 4, ..Default::default() };
    let (chunked, _) = engine(config);
    assert_eq!(concurrent_outputs(&chunked, 8).await, want);
}

#[tokio::test]
async fn cache_pressure_preempts_and_recomputes_without_changing_outputs() {
    let (solo, _) = engine(EngineConfig::default());
    let want = solo_outputs(&solo, 16).await;
    // tiny-moe f32: 640 bytes per token; 14 blocks of 4 hold 56 tokens, one longest sequence (40 + 16), while the
    // six sequences together need 231.
    let config =
        EngineConfig { block_size: 4, kv_cache_memory: KvCacheMemory::Bytes(14 * 4 * 640), ..Default::default() };
    let (tight, metrics) = engine(config);
    assert_eq!(concurrent_outputs(&tight, 16).await, want);
    assert!(metrics.num_preemptions_total.get() > 0, "expected preemptions under cache pressure");
}

#[tokio::test]
async fn repeated_prompt_hits_the_prefix_cache() {
    let (handle, metrics) = engine(EngineConfig { block_size: 4, ..Default::default() });
    let prompt: Vec<u32> = (0..23).map(|i| (i * 7 % 256) as u32).collect();
    let (first, _, u1) = collect(handle.submit(request(prompt.clone(), 6)).unwrap()).await;
    let (second, _, u2) = collect(handle.submit(request(prompt, 6)).unwrap()).await;
    assert_eq!(first, second);
    assert_eq!(u1.cached_tokens, 0);
    assert_eq!(u2.cached_tokens, 20, "five full blocks of four tokens are reused");
    assert_eq!(metrics.prefix_cache_hits_total.get(), 20);
}

#[tokio::test]
async fn cancelled_request_frees_its_sequence_within_a_step() {
    let (handle, metrics) = engine(EngineConfig::default());
    let req = request(vec![1, 2, 3], 2000);
    let cancel = req.cancel.clone();
    let mut rx = handle.submit(req).unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Token { .. })));
    cancel.cancel();
    let mut reason = None;
    while let Some(ev) = rx.recv().await {
        if let Event::Finished { reason: r, .. } = ev {
            reason = Some(r);
        }
    }
    assert_eq!(reason, Some(FinishReason::Abort));
    for _ in 0..100 {
        if metrics.num_requests_running.get() == 0 && metrics.kv_cache_usage_perc.get() == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("running/kv metrics did not fall after cancellation");
}

#[tokio::test]
async fn limits_reject_up_front() {
    let (handle, _) = engine(EngineConfig { max_model_len: Some(64), max_waiting: 2, ..Default::default() });
    let too_long = handle.submit(request(vec![1; 60], 10)).unwrap_err();
    assert!(too_long.to_string().contains("64"), "{too_long}");
    let exceeded = RequestError::ContextExceeded { prompt_tokens: 60, max_tokens: 10, max_model_len: 64 };
    assert_eq!(too_long, SubmitError::Invalid(exceeded));
    let outside = RequestError::OutsideVocabulary { id: 999, vocab_size: 264 };
    assert_eq!(handle.submit(request(vec![999], 1)).unwrap_err(), SubmitError::Invalid(outside));
    assert_eq!(handle.submit(request(vec![], 1)).unwrap_err(), SubmitError::Invalid(RequestError::EmptyPrompt));
    assert_eq!(handle.submit(request(vec![1], 0)).unwrap_err(), SubmitError::Invalid(RequestError::NoCompletionTokens));
    handle.start_drain();
    assert_eq!(handle.submit(request(vec![1], 1)).unwrap_err(), SubmitError::Draining);
}

#[tokio::test]
async fn stop_strings_and_max_tokens_set_the_finish_reason() {
    let (handle, _) = engine(EngineConfig::default());
    let (ids, reason, usage) = collect(handle.submit(request(vec![256, 72, 105], 5)).unwrap()).await;
    assert_eq!((ids.len(), reason, usage.completion_tokens), (5, FinishReason::Length, 5));
    // Greedy text of tiny-moe for this prompt, then stop at its third character.
    let mut rx = handle.submit(request(vec![256, 72, 105], 12)).unwrap();
    let mut text = String::new();
    while let Some(Event::Token { text: t, .. }) = rx.recv().await {
        text.push_str(&t);
    }
    let stop: String = text.chars().skip(2).take(2).collect();
    let mut req = request(vec![256, 72, 105], 12);
    req.stop = vec![stop.clone()];
    let mut rx = handle.submit(req).unwrap();
    let mut got = String::new();
    let mut finish = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { text, .. } => got.push_str(&text),
            Event::Finished { reason, text, .. } => {
                got.push_str(&text);
                finish = Some(reason);
            }
            Event::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(finish, Some(FinishReason::Stop));
    assert!(!got.contains(&stop), "{got:?} contains stop {stop:?}");
    assert!(text.starts_with(&got));
}
