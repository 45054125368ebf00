//! `candle-baseline`: the side-by-side baseline for `baleen-runtime bench`.
//!
//! Runs candle-transformers' own `models::deepseek2::DeepSeekV2` (f32, CPU) on a Hugging Face
//! DeepSeek-V2 directory with exactly the protocol of `baleen-runtime bench` (runtime/src/cli.rs,
//! `bench`/`run_batch`): the same prompt ids, one warm-up run with gen_len 2, then `--repeats` timed
//! runs (best reported) of one batched prefill (argmax of the last position gives the first token)
//! followed by `gen_len - 1` batched greedy decode steps. Prints one JSON object with the same keys.
//!
//! `check` runs the golden greedy prompt of `golden.safetensors` and prints candle-transformers'
//! greedy ids next to Hugging Face's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::deepseek2::{DeepSeekV2, DeepSeekV2Config};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(name = "candle-baseline", about = "candle-transformers deepseek2 baseline for baleen-runtime bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure prefill and decode throughput of a batch (baleen-runtime bench protocol): one JSON object.
    Bench(BenchArgs),
    /// Greedy-decode the golden prompt and print candle-transformers' ids next to Hugging Face's.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// Hugging Face DeepSeek-V2 directory (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Override the config's `topk_method` (`greedy` or `group_limited_greedy`).
    #[arg(long)]
    topk_method: Option<String>,
    /// Hand config.json to candle-transformers strictly as-is (no adapter; see `read_config`).
    #[arg(long)]
    as_is: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    /// Timed repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also print the greedy ids generated for every sequence (last timed run) under "ids".
    #[arg(long)]
    print_ids: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Golden file (default: MODEL/golden.safetensors) holding `greedy.prompt_ids` and `greedy.ids`.
    #[arg(long)]
    golden: Option<PathBuf>,
}

struct Loaded {
    model: DeepSeekV2,
    /// The (possibly adapted) config.json that was handed to `DeepSeekV2Config`.
    config: Value,
    /// What the adapter changed, for the report.
    adaptations: Vec<String>,
}

/// Reads config.json and fills candle-transformers' `DeepSeekV2Config` from it.
///
/// Its fields are `pub(crate)`, so the only way in is serde; the adapter therefore edits the JSON
/// before deserialising (every change is recorded and printed in the output's `config_adaptations`):
/// - routing: candle-transformers 0.11.1's `group_limited_greedy` gate is broken (it takes the group
///   ids from the top-k of the *expert* scores, so `scatter_add` into the `[n, n_group]` mask fails with
///   "invalid index" as soon as an expert id ≥ n_group wins, and its masked_fill masks the mask, not the
///   scores). When `num_experts_per_tok <= topk_group` group-limited routing with max-per-group group
///   scores (DeepSeek-V2's definition) selects exactly the same experts as plain `greedy` top-k — the
///   top-k experts lie in at most k groups, each of which outranks every group without a top-k expert —
///   so the adapter switches to `greedy`, which is exact there (ties aside). Otherwise it is left alone.
/// - rope_scaling: if the file does not parse, a `rope_type` key written by newer transformers is copied
///   to `type`, and `{"rope_type": "default"}` (no scaling) becomes `null`.
///
/// `--topk-method` overrides the routing method explicitly; `--as-is` disables the adapter.
fn read_config(
    dir: &Path,
    topk_method: Option<&str>,
    as_is: bool,
) -> Result<(DeepSeekV2Config, Value, Vec<String>)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut value: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut adaptations = Vec::new();
    if let Some(method) = topk_method {
        adaptations.push(format!("topk_method {} -> {method} (--topk-method)", value["topk_method"]));
        value["topk_method"] = json!(method);
    } else if !as_is
        && value["topk_method"] == "group_limited_greedy"
        && matches!((value["num_experts_per_tok"].as_u64(), value["topk_group"].as_u64()), (Some(k), Some(g)) if k <= g)
    {
        adaptations.push(format!(
            "topk_method group_limited_greedy -> greedy (exact: num_experts_per_tok {} <= topk_group {}; \
             candle-transformers' group_limited_greedy gate is broken)",
            value["num_experts_per_tok"], value["topk_group"]
        ));
        value["topk_method"] = json!("greedy");
    }
    if as_is {
        let cfg = serde_json::from_value::<DeepSeekV2Config>(value.clone()).with_context(|| {
            format!("candle-transformers' DeepSeekV2Config cannot parse {} as-is", path.display())
        })?;
        return Ok((cfg, value, adaptations));
    }
    match serde_json::from_value::<DeepSeekV2Config>(value.clone()) {
        Ok(cfg) => return Ok((cfg, value, adaptations)),
        Err(first) => {
            if let Some(rs) = value.get_mut("rope_scaling").and_then(Value::as_object_mut) {
                let rope_type = rs.get("rope_type").and_then(Value::as_str).map(str::to_owned);
                match rope_type.as_deref() {
                    Some("default") if !rs.contains_key("factor") => {
                        value["rope_scaling"] = Value::Null;
                        adaptations.push("rope_scaling {rope_type: default} -> null".into());
                    }
                    Some(t) if !rs.contains_key("type") => {
                        rs.insert("type".into(), json!(t));
                        adaptations.push(format!("rope_scaling.rope_type -> rope_scaling.type = {t}"));
                    }
                    _ => {}
                }
            }
            let cfg = serde_json::from_value::<DeepSeekV2Config>(value.clone()).with_context(|| {
                format!("candle-transformers' DeepSeekV2Config cannot parse {} (first error: {first})", path.display())
            })?;
            Ok((cfg, value, adaptations))
        }
    }
}

fn load(args: &ModelArgs) -> Result<Loaded> {
    let (cfg, config, adaptations) = read_config(&args.model, args.topk_method.as_deref(), args.as_is)?;
    let weights = args.model.join("model.safetensors");
    let device = Device::Cpu;
    // SAFETY: the weight file is memory-mapped read-only and not modified while the process runs.
    // Tensors stored in bf16/f16 are converted to f32 on load.
    #[allow(unsafe_code)]
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
        .with_context(|| format!("mapping {}", weights.display()))?;
    let model = DeepSeekV2::new(&cfg, vb).context("building candle-transformers DeepSeekV2")?;
    Ok(Loaded { model, config, adaptations })
}

fn usize_field(config: &Value, key: &str) -> Result<usize> {
    config[key].as_u64().map(|v| v as usize).with_context(|| format!("config.json: `{key}` missing or not an integer"))
}

/// Bytes per token of candle-transformers' KV cache: per layer it keeps the decompressed K
/// (heads × (qk_nope + qk_rope)) and V (heads × v_head_dim), in f32.
fn kv_cache_bytes_per_token(config: &Value) -> Result<usize> {
    let layers = usize_field(config, "num_hidden_layers")?;
    let heads = usize_field(config, "num_attention_heads")?;
    let k = usize_field(config, "qk_nope_head_dim")? + usize_field(config, "qk_rope_head_dim")?;
    let v = usize_field(config, "v_head_dim")?;
    Ok(layers * heads * (k + v) * DType::F32.size_in_bytes())
}

/// Same as baleen-runtime's `bench_prompt`.
fn bench_prompt(seq: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((seq * 7919 + i * 104_729 + 17) % vocab) as u32).collect()
}

/// Batched prefill then `gen_len - 1` batched greedy decode steps, the cache cleared first.
/// Returns (prefill seconds, decode seconds, generated ids per sequence).
fn run_batch(model: &mut DeepSeekV2, prompts: &[Vec<u32>], gen_len: usize) -> Result<(f64, f64, Vec<Vec<u32>>)> {
    model.clear_kv_cache();
    let device = Device::Cpu;
    let (b, t) = (prompts.len(), prompts[0].len());
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    let start = Instant::now();
    let input = Tensor::from_vec(flat, (b, t), &device)?;
    let logits = model.forward(&input, 0)?; // [B, vocab], last position
    let mut next: Vec<u32> = logits.argmax(1)?.to_vec1::<u32>()?;
    let prefill_s = start.elapsed().as_secs_f64();
    let mut out: Vec<Vec<u32>> = next.iter().map(|&id| vec![id]).collect();
    let start = Instant::now();
    for step in 1..gen_len {
        let input = Tensor::from_vec(next, (b, 1), &device)?;
        let logits = model.forward(&input, t + step - 1)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
        for (o, &id) in out.iter_mut().zip(&next) {
            o.push(id);
        }
    }
    let decode_s = start.elapsed().as_secs_f64();
    Ok((prefill_s, decode_s, out))
}

fn bench(args: &BenchArgs) -> Result<Value> {
    if args.batch == 0 || args.prompt_len == 0 || args.gen_len == 0 || args.repeats == 0 {
        bail!("--batch, --prompt-len, --gen-len and --repeats must be at least 1");
    }
    let mut loaded = load(&args.model)?;
    let vocab = usize_field(&loaded.config, "vocab_size")?;
    let prompts: Vec<Vec<u32>> = (0..args.batch).map(|s| bench_prompt(s, args.prompt_len, vocab)).collect();
    // Warm-up, as in baleen-runtime.
    run_batch(&mut loaded.model, &prompts, 2)?;
    let (mut best_prefill, mut best_decode) = (f64::INFINITY, f64::INFINITY);
    let mut ids = Vec::new();
    for _ in 0..args.repeats {
        let (prefill_s, decode_s, out) = run_batch(&mut loaded.model, &prompts, args.gen_len)?;
        best_prefill = best_prefill.min(prefill_s);
        best_decode = best_decode.min(decode_s);
        ids = out;
    }
    let prefill_tokens = (args.batch * args.prompt_len) as f64;
    let decode_tokens = (args.batch * (args.gen_len - 1)) as f64;
    let decode = args.gen_len > 1;
    let mut out = json!({
        "engine": "candle-transformers-0.11.1/deepseek2",
        "model": args.model.model.display().to_string(),
        "device": "cpu",
        "dtype": "f32",
        "threads": candle_core::utils::get_num_threads(),
        "rayon_num_threads_env": std::env::var("RAYON_NUM_THREADS").ok(),
        "topk_method": loaded.config["topk_method"],
        "config_adaptations": loaded.adaptations,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "prefill_s": best_prefill,
        "decode_s": best_decode,
        "prefill_tokens_per_s": prefill_tokens / best_prefill,
        "decode_tokens_per_s": if decode { decode_tokens / best_decode } else { 0.0 },
        "decode_step_ms": if decode { 1e3 * best_decode / (args.gen_len - 1) as f64 } else { 0.0 },
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(&loaded.config)?,
    });
    if args.print_ids {
        out["ids"] = json!(ids);
    }
    Ok(out)
}

fn golden_ids(golden: &std::collections::HashMap<String, Tensor>, key: &str) -> Result<Vec<u32>> {
    let t = golden.get(key).with_context(|| format!("golden file has no `{key}`"))?;
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect())
}

/// Greedy-decodes the golden prompt with one configuration of the model and compares with HF.
fn check_one(
    args: &ModelArgs,
    golden: &std::collections::HashMap<String, Tensor>,
    prompt: &[u32],
    expected: &[u32],
) -> Result<Value> {
    let mut loaded = load(args)?;
    let model = &mut loaded.model;
    model.clear_kv_cache();
    let mut ids = Vec::with_capacity(expected.len());
    let mut step_logits = Vec::with_capacity(expected.len());
    let mut input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let mut offset = 0;
    for _ in 0..expected.len() {
        let len = input.dim(1)?;
        let logits = model.forward(&input, offset)?.i(0)?;
        offset += len;
        let id = logits.argmax(0)?.to_scalar::<u32>()?;
        ids.push(id);
        step_logits.push(logits);
        input = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
    }
    let first_mismatch = ids.iter().zip(expected).position(|(a, b)| a != b);

    // Logit agreement on the steps where both followed the same prefix.
    let mut max_abs_diff_logits = Value::Null;
    if let Some(gl) = golden.get("greedy.logits") {
        let upto = first_mismatch.map_or(ids.len(), |p| p + 1).min(gl.dim(0)?);
        let ours = Tensor::stack(&step_logits[..upto], 0)?;
        let diff = (ours - gl.to_dtype(DType::F32)?.narrow(0, 0, upto)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        max_abs_diff_logits = json!(diff);
    }
    // Last-position logits of a prefill of the golden `prompt_ids`, against HF's `logits` (last row).
    let mut max_abs_diff_prefill_last = Value::Null;
    if let (Some(p), Some(gl)) = (golden.get("prompt_ids"), golden.get("logits")) {
        let p: Vec<u32> = p.to_dtype(DType::I64)?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect();
        model.clear_kv_cache();
        let last = model.forward(&Tensor::new(p.as_slice(), &Device::Cpu)?.unsqueeze(0)?, 0)?.i(0)?;
        let hf = gl.to_dtype(DType::F32)?.i(gl.dim(0)? - 1)?;
        max_abs_diff_prefill_last = json!((last - hf)?.abs()?.max_all()?.to_scalar::<f32>()?);
    }
    Ok(json!({
        "topk_method": loaded.config["topk_method"],
        "config_adaptations": loaded.adaptations,
        "candle_greedy_ids": ids,
        "match": first_mismatch.is_none(),
        "first_mismatch_step": first_mismatch,
        "greedy_logits_max_abs_diff_upto_first_mismatch": max_abs_diff_logits,
        "prompt_ids_last_logits_max_abs_diff": max_abs_diff_prefill_last,
    }))
}

/// Runs the golden greedy prompt with config.json as-is (candle-transformers untouched) and with the
/// adapter (what `bench` measures), printing both next to Hugging Face's ids. Fails if the adapted
/// run does not reproduce HF's ids.
fn check(args: &CheckArgs) -> Result<Value> {
    let golden_path = args.golden.clone().unwrap_or_else(|| args.model.model.join("golden.safetensors"));
    let golden = candle_core::safetensors::load(&golden_path, &Device::Cpu)
        .with_context(|| format!("reading {}", golden_path.display()))?;
    let prompt = golden_ids(&golden, "greedy.prompt_ids")?;
    let expected = golden_ids(&golden, "greedy.ids")?;
    let as_is_args = ModelArgs { model: args.model.model.clone(), topk_method: None, as_is: true };
    let as_is = check_one(&as_is_args, &golden, &prompt, &expected)
        .unwrap_or_else(|e| json!({ "error": format!("{e:#}"), "match": false }));
    let used = check_one(&args.model, &golden, &prompt, &expected)?;
    let matched = used["match"] == true;
    let out = json!({
        "engine": "candle-transformers-0.11.1/deepseek2",
        "model": args.model.model.display().to_string(),
        "golden": golden_path.display().to_string(),
        "prompt_ids": prompt,
        "hf_greedy_ids": expected,
        "config_as_is": as_is,
        "as_benchmarked": used,
        "match": matched,
    });
    if !matched {
        println!("{out}");
        bail!("candle-transformers' greedy ids differ from Hugging Face's (see as_benchmarked)");
    }
    Ok(out)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = match &cli.command {
        Command::Bench(a) => bench(a)?,
        Command::Check(a) => check(a)?,
    };
    println!("{out}");
    Ok(())
}
