#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! Baleen's CUDA kernels against the paths they replace: the routing kernel against the host router (every
//! `topk_method` × `scoring_func`, ties included), the grouped expert kernels against the batched matmul chains,
//! the kernels' decode step and its CUDA graph against candle's decode, and the device expert counters against the
//! host's.
//!
//! They run on the CPU unless `BALEEN_TEST_DEVICE` names a CUDA device (a build with the `cuda` feature). On the
//! CPU the kernels are unavailable: the kernel functions must refuse with a kernel error, and the model's results
//! must not depend on the CUDA settings.

use std::path::PathBuf;

use baleen_api::names::{ENV_TEST_DEVICE, METRIC_RUNTIME_EXPERT_TOKENS_TOTAL};
use baleen_runtime::device::parse_device;
use baleen_runtime::kernels::{self, RouteParams};
use baleen_runtime::model::config::{MoeConfig, ScoringFunc, TopkMethod};
use baleen_runtime::model::experts::ExpertRows;
use baleen_runtime::model::experts::StackedExperts;
use baleen_runtime::model::moe::route_logits;
use baleen_runtime::model::{Accel, DeepseekModel, ForwardOptions, ModelConfig, SeqCache};
use baleen_runtime::weights::{Checkpoint, var_builder};
use candle_core::{DType, Device, Tensor};

fn device() -> Device {
    std::env::var(ENV_TEST_DEVICE).map_or(Device::Cpu, |spec| parse_device(&spec).unwrap())
}

fn load(name: &str, dtype: DType, accel: Accel) -> DeepseekModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir, config.fp8_block).unwrap();
    let mut model = DeepseekModel::load(&config, var_builder(ckpt, dtype, &device())).unwrap();
    model.set_accel(accel);
    model
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_device(&Device::Cpu).unwrap(), b.to_device(&Device::Cpu).unwrap());
    let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Deterministic pseudo-random values in [-4, 4) on a grid of 1/256 (so host and device scores of different values
/// never round into each other), or of 1/4 when `ties` (many exact repeats).
fn values(n: usize, seed: u64, ties: bool) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0;
            let grid = if ties { 4.0 } else { 256.0 };
            (v * grid).round() / grid
        })
        .collect()
}

fn moe_config(
    e: usize,
    k: usize,
    method: TopkMethod,
    scoring: ScoringFunc,
    groups: (usize, usize),
    norm: bool,
) -> MoeConfig {
    MoeConfig {
        n_routed_experts: e,
        n_shared_experts: 0,
        num_experts_per_tok: k,
        moe_intermediate_size: 8,
        topk_method: method,
        scoring_func: scoring,
        n_group: groups.0,
        topk_group: groups.1,
        norm_topk_prob: norm,
        routed_scaling_factor: 2.5,
        first_k_dense_replace: 0,
        moe_layer_freq: 1,
    }
}

/// Every router variant DeepSeek ships, at its real sizes and at small ones, with and without tied scores: the
/// kernel chooses the host router's experts in the same order, with the same weights and margins.
#[test]
fn routing_kernel_matches_the_host_router() {
    let dev = device();
    let cases = [
        moe_config(64, 6, TopkMethod::Greedy, ScoringFunc::Softmax, (1, 1), false), // DeepSeek-V2-Lite
        moe_config(160, 6, TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, (8, 3), false), // DeepSeek-V2
        moe_config(256, 8, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, (8, 4), true), // DeepSeek-V3
        moe_config(8, 3, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, (4, 2), true),
        moe_config(16, 4, TopkMethod::Greedy, ScoringFunc::Sigmoid, (1, 1), true),
        moe_config(8, 8, TopkMethod::Greedy, ScoringFunc::Softmax, (1, 1), true),
    ];
    for (case, c) in cases.iter().enumerate() {
        for ties in [false, true] {
            let (tokens, e) = (37, c.n_routed_experts);
            let logits = values(tokens * e, 11 + case as u64, ties);
            let bias: Vec<f32> = values(e, 99, ties).iter().map(|v| v * 0.05).collect();
            let bias = (c.topk_method == TopkMethod::NoauxTc).then_some(bias);
            let want = route_logits(c, &logits, bias.as_deref());
            let t = Tensor::from_vec(logits, (tokens, e), &dev).unwrap();
            let b = bias.as_ref().map(|b| Tensor::from_slice(b, e, &dev).unwrap());
            let got = kernels::route(&t, b.as_ref(), &RouteParams::from_config(c));
            if !kernels::available(&dev) {
                assert!(matches!(got, Err(baleen_runtime::Error::Kernel(_))), "the CPU has no routing kernel");
                return;
            }
            let (ids, out) = got.unwrap();
            let (ids, out) = (ids.to_vec1::<u32>().unwrap(), out.to_vec1::<f32>().unwrap());
            let k = c.num_experts_per_tok;
            assert_eq!(ids, want.experts, "case {case} ties {ties}: experts");
            for (i, (g, w)) in out[..tokens * k].iter().zip(&want.weights).enumerate() {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "case {case} ties {ties} weight {i}: {g} vs {w}");
            }
            for (t, (g, w)) in out[tokens * k..].iter().zip(&want.margins).enumerate() {
                let same = (g.is_infinite() && w.is_infinite()) || (g - w).abs() <= 1e-5;
                assert!(same, "case {case} ties {ties} token {t}: margin {g} vs {w}");
            }
        }
    }
}

/// The grouped expert kernels (dispatch, gate/up with SwiGLU, down, combine) compute what the batched matmul
/// chains compute for the same routing: balanced, skewed and single-row routings, in f32 and bf16.
#[test]
fn grouped_expert_kernels_match_the_batched_matmuls() {
    let dev = device();
    let (hidden, inter, n_experts, k, tokens) = (64, 32, 16, 4, 9);
    for dtype in [DType::F32, DType::BF16] {
        let vb = baleen_runtime::builtin::var_builder(dtype, &dev).pp("model.layers.1.mlp.experts");
        let held: Vec<usize> = (0..n_experts).collect();
        let experts = StackedExperts::load(&held, n_experts, hidden, inter, None, vb).unwrap();
        let Some((gate_up, down)) = experts.stacked() else {
            let host = dev.is_cpu() && matches!(dtype, DType::F32 | DType::BF16);
            assert!(host, "only f32 and bf16 on the CPU pack experts for the host");
            continue;
        };
        let x = Tensor::from_vec(values(tokens * hidden, 5, false), (tokens, hidden), &dev).unwrap();
        let x = (x * 0.25).unwrap().to_dtype(dtype).unwrap();
        let routings: [Vec<u32>; 3] = [
            (0..tokens * k).map(|a| ((a * 7 + a / k) % n_experts) as u32).collect(),
            (0..tokens * k).map(|a| if a % k == 0 { 3 } else { (a % n_experts) as u32 }).collect(),
            (0..tokens * k).map(|a| ((a % k) * 5) as u32).collect(),
        ];
        for (r, ids) in routings.iter().enumerate() {
            let weights: Vec<f32> = (0..tokens * k).map(|a| 0.1 + (a % 7) as f32 * 0.05).collect();
            let mut groups: Vec<ExpertRows> = Vec::new();
            for e in 0..n_experts {
                let rows: Vec<usize> = (0..tokens * k).filter(|&a| ids[a] as usize == e).collect();
                if !rows.is_empty() {
                    groups.push(ExpertRows {
                        expert: e,
                        rows: rows.iter().map(|&a| (a / k) as u32).collect(),
                        weights: rows.iter().map(|&a| weights[a]).collect(),
                    });
                }
            }
            let want = experts.sum_groups(&x, &groups).unwrap().to_dtype(dtype).unwrap();
            let ids_t = Tensor::from_slice(ids, tokens * k, &dev).unwrap();
            let plan = kernels::dispatch(&ids_t, n_experts, k, None);
            if !kernels::available(&dev) {
                assert!(matches!(plan, Err(baleen_runtime::Error::Kernel(_))), "the CPU has no dispatch kernel");
                continue;
            }
            let plan = plan.unwrap();
            let w = Tensor::from_slice(&weights, tokens * k, &dev).unwrap();
            let h = kernels::expert_gate_up(&x, gate_up, &plan).unwrap();
            let y = kernels::expert_down(&h, down, &plan, &w).unwrap();
            let got = kernels::combine(&y, None, k, dtype).unwrap();
            let diff = max_abs_diff(&got, &want);
            let scale = max_abs_diff(&want, &want.zeros_like().unwrap());
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 * scale.max(1.0) };
            assert!(scale > 1e-3, "the experts produced nothing");
            assert!(
                diff <= tol,
                "{dtype:?} routing {r}: kernels differ from the matmul chains by {diff} (scale {scale})"
            );
        }
    }
}

/// Decodes `steps` greedy tokens for several prompts of different lengths in one batch; returns each step's
/// logits `[seqs, vocab]`.
fn batched_decode(model: &DeepseekModel, prompts: &[&[u32]], steps: usize) -> Vec<Tensor> {
    let mut pool = model.new_pool(0, 4).unwrap();
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| SeqCache::default()).collect();
    let mut next: Vec<Vec<u32>> = Vec::new();
    for (p, c) in prompts.iter().zip(caches.iter_mut()) {
        let logits = model.forward_cached(&mut pool, &mut [(p, c)], ForwardOptions::default()).unwrap().logits;
        next.push(vec![logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0]]);
    }
    let mut out = Vec::new();
    for _ in 0..steps {
        let mut batch: Vec<(&[u32], &mut SeqCache)> =
            next.iter().zip(caches.iter_mut()).map(|(t, c)| (t.as_slice(), c)).collect();
        let logits = model.forward_cached(&mut pool, &mut batch, ForwardOptions::default()).unwrap().logits;
        next = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap().into_iter().map(|id| vec![id]).collect();
        out.push(logits);
    }
    out
}

/// The kernels' decode step, run as issued and replayed from a CUDA graph (a padded batch), gives the logits of
/// candle's decode path at every step, for both DeepSeek generations (V3: low-rank queries, grouped sigmoid
/// routing; V2: softmax routing).
#[test]
fn kernel_decode_and_its_graph_equal_candle_decode() {
    for name in ["tiny-v3", "tiny-v2"] {
        let candle = load(name, DType::F32, Accel { kernels: false, graphs: false });
        let eager = load(name, DType::F32, Accel { kernels: true, graphs: false });
        let graphs = load(name, DType::F32, Accel { kernels: true, graphs: true });
        let prompt: Vec<u32> = (0..13).map(|i| (i * 37 + 5) % 300).collect();
        let prompts = [&prompt[..5], &prompt[2..13], &prompt[..9]];
        let steps = 6;
        let want = batched_decode(&candle, &prompts, steps);
        for (label, model) in [("as issued", &eager), ("graph", &graphs)] {
            let got = batched_decode(model, &prompts, steps);
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                let diff = max_abs_diff(g, w);
                assert!(diff <= 1e-4, "{name} {label} step {step}: logits differ from candle's decode by {diff}");
            }
        }
        let (captured, failed) = graphs.graph_status();
        assert_eq!(failed, None, "{name}: capturing the decode step failed");
        if kernels::available(&device()) {
            assert!(captured >= 1, "{name}: no decode graph was captured");
        } else {
            assert_eq!(captured, 0, "{name}: a graph was captured without CUDA");
        }
    }
}

/// The routed rows of every MoE layer reach `baleen_runtime_expert_tokens_total` whether the router ran on the
/// host or the device counted them (flushed when asked): tokens × experts per token × MoE layers in all.
#[test]
fn expert_counters_count_every_routed_row() {
    let metrics = baleen_runtime::metrics::Metrics::new("tiny-v3").unwrap();
    let mut model = load("tiny-v3", DType::F32, Accel::default());
    model.observe_experts(&metrics.expert_tokens_total).unwrap();
    let prompt: Vec<u32> = (0..6).collect();
    // Three sequences: a CUDA graph pads the batch to four, and the padding row must not be counted.
    let decoded = batched_decode(&model, &[&prompt, &prompt[..4], &prompt[1..6]], 3);
    model.flush_expert_counts(true).unwrap();
    let config = model.config();
    let moe_layers = (0..config.num_hidden_layers).filter(|&l| config.is_moe_layer(l)).count();
    let k = config.moe.as_ref().unwrap().num_experts_per_tok;
    // Prefill of 6, 4 and 5 tokens, then 3 steps of 3 sequences.
    let tokens = 6 + 4 + 5 + decoded.len() * 3;
    let prefix = format!("{METRIC_RUNTIME_EXPERT_TOKENS_TOTAL}{{");
    let total: u64 = metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, (tokens * k * moe_layers) as u64);
}

/// The built-in models' weights drawn on a CUDA device are the host generator's draws (to the last bit or one
/// rounding of the double-precision logarithm and cosine): the same model on every device.
#[test]
fn builtin_weights_drawn_on_the_device_equal_the_hosts() {
    let dev = device();
    let on_device = baleen_runtime::builtin::var_builder(DType::F32, &dev);
    let on_host = baleen_runtime::builtin::var_builder(DType::F32, &Device::Cpu);
    let tensors: [(&str, (usize, usize)); 4] = [
        ("model.layers.1.mlp.experts.3.up_proj", (32, 64)),
        ("model.layers.1.mlp.gate", (16, 64)),
        ("model.embed_tokens", (264, 64)),
        ("lm_head", (264, 64)),
    ];
    for (prefix, shape) in tensors {
        let d = on_device.pp(prefix).get(shape, "weight").unwrap();
        let h = on_host.pp(prefix).get(shape, "weight").unwrap();
        let scale = max_abs_diff(&h, &h.zeros_like().unwrap());
        let diff = max_abs_diff(&d, &h);
        assert!(scale > 0.01 && diff <= 1e-6 * scale, "{prefix}: device draws differ from the host's by {diff}");
    }
    let norm = on_device.pp("model.norm").get(64, "weight").unwrap().to_device(&Device::Cpu).unwrap();
    let norm = norm.to_vec1::<f32>().unwrap();
    assert!(norm.iter().all(|v| (0.5..1.5).contains(v)), "norm weights near 1: {norm:?}");
    if !kernels::available(&dev) {
        assert!(matches!(kernels::random_normal(4, 1, 0.0, 1.0, &dev), Err(baleen_runtime::Error::Kernel(_))));
    }
}

/// Batches large enough for the expert slabs (batched GEMMs over every expert's padded rows) — a 120-token
/// prefill, and a decode step of 100 sequences through its graph — give candle's logits.
#[test]
fn large_batches_on_expert_slabs_equal_candle() {
    let candle = load("tiny-v3", DType::F32, Accel { kernels: false, graphs: false });
    let kernels = load("tiny-v3", DType::F32, Accel::default());
    let prompt: Vec<u32> = (0..120).map(|i| (i * 53 + 7) % 300).collect();
    let options = ForwardOptions { logits: baleen_runtime::model::LogitsFor::AllTokens, ..Default::default() };
    let prefill = |model: &DeepseekModel| {
        let mut pool = model.new_pool(0, 16).unwrap();
        model.forward_cached(&mut pool, &mut [(&prompt, &mut SeqCache::default())], options).unwrap().logits
    };
    let diff = max_abs_diff(&prefill(&kernels), &prefill(&candle));
    assert!(diff <= 1e-4, "a 120-token prefill on the slabs differs from candle's by {diff}");
    let prompts: Vec<&[u32]> = (0..100).map(|i| &prompt[i % 7..i % 7 + 3 + i % 5]).collect();
    let (got, want) = (batched_decode(&kernels, &prompts, 2), batched_decode(&candle, &prompts, 2));
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        let diff = max_abs_diff(g, w);
        assert!(diff <= 1e-4, "step {step} of 100 sequences differs from candle's decode by {diff}");
    }
}
