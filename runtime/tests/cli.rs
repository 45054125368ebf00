#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `baleen-runtime` command-line contract (design brief): `logits`, `generate`, `bench` and `info` print one
//! JSON object; bad input exits non-zero with a message naming the problem.

use std::path::PathBuf;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baleen-runtime")).args(args).output().unwrap()
}

fn run_json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn golden_ids(name: &str, key: &str) -> Vec<u32> {
    let g = candle_core::safetensors::load(fixture(name).join("golden.safetensors"), &Device::Cpu).unwrap();
    g[key].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|v| v as u32).collect()
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn logits_prints_every_position_matching_transformers() {
    let model = fixture("tiny-v3");
    let prompt = golden_ids("tiny-v3", "prompt_ids");
    let v = run_json(&["logits", "--model", model.to_str().unwrap(), "--ids", &csv(&prompt)]);
    let rows: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    assert_eq!(rows.len(), prompt.len());
    let got = Tensor::new(rows, &Device::Cpu).unwrap();
    let g = candle_core::safetensors::load(model.join("golden.safetensors"), &Device::Cpu).unwrap();
    let diff = (got - &g["logits"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-4, "CLI logits differ from transformers by {diff}");
}

#[test]
fn generate_prints_the_greedy_ids_of_transformers() {
    let model = fixture("tiny-v2");
    let want = golden_ids("tiny-v2", "greedy.ids");
    let prompt = csv(&golden_ids("tiny-v2", "greedy.prompt_ids"));
    let max = want.len().to_string();
    let v = run_json(&["generate", "--model", model.to_str().unwrap(), "--ids", &prompt, "--max-tokens", &max]);
    let got: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(got, want);
}

#[test]
fn seeded_sampling_is_reproducible_and_differs_from_greedy() {
    let args = |seed: &str| {
        run_json(&[
            "generate",
            "--model",
            "builtin:tiny-moe",
            "--prompt",
            "Hello",
            "--max-tokens",
            "24",
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ])["ids"]
            .clone()
    };
    assert_eq!(args("7"), args("7"));
    assert_ne!(args("7"), args("8"));
}

#[test]
fn bench_reports_throughput_and_kv_bytes() {
    let v = run_json(&[
        "bench",
        "--model",
        "builtin:tiny-moe",
        "--batch",
        "4",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--repeats",
        "1",
    ]);
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key} in {v}");
    }
    // tiny-moe: 4 layers × (32 + 8) latent values × 4 bytes (f32).
    assert_eq!(v["kv_cache_bytes_per_token"], 640);
    assert_eq!(v["quantize"], "none");
}

/// `--quantize int8`: `bench` and `generate` run on int8 weights, which take under half the bytes, and the load
/// log says what is resident (the accuracy bounds are in tests/golden.rs).
#[test]
fn int8_weights_run_every_command_in_fewer_bytes() {
    let args = ["bench", "--model", "builtin:tiny-moe", "--prompt-len", "8", "--gen-len", "4", "--repeats", "1"];
    let wide = run_json(&args);
    let narrow = run_json(&[&args[..], &["--quantize", "int8"]].concat());
    assert_eq!(narrow["quantize"], "int8");
    let (wide, narrow) = (wide["weight_bytes"].as_u64().unwrap(), narrow["weight_bytes"].as_u64().unwrap());
    assert!(2 * narrow < wide, "int8 {narrow} bytes vs f32 {wide}");
    let out =
        run(&["generate", "--model", "builtin:tiny-moe", "--ids", "1,2,3", "--max-tokens", "4", "--quantize", "int8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model weights resident") && err.contains("weight_format=int8"), "{err}");
}

/// `--quantize fp8` on an FP8 checkpoint: `bench` and `generate` run on the weights kept in 8 bits, fewer bytes
/// than the same checkpoint dequantized at load (the accuracy bounds are in tests/golden.rs).
#[test]
fn fp8_weights_kept_as_fp8_run_every_command_in_fewer_bytes() {
    let dir = fixture("tiny-v3-fp8");
    let model = dir.to_str().unwrap();
    let args = ["bench", "--model", model, "--dtype", "bf16", "--prompt-len", "8", "--gen-len", "4", "--repeats", "1"];
    let wide = run_json(&args);
    let kept = run_json(&[&args[..], &["--quantize", "fp8"]].concat());
    assert_eq!((wide["quantize"].as_str(), kept["quantize"].as_str()), (Some("none"), Some("fp8")));
    let (wide, kept) = (wide["weight_bytes"].as_u64().unwrap(), kept["weight_bytes"].as_u64().unwrap());
    assert!(kept < wide, "fp8 {kept} bytes vs dequantized bf16 {wide}");
    let out = run(&["generate", "--model", model, "--ids", "1,2,3", "--max-tokens", "4", "--quantize", "fp8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model weights resident") && err.contains("weight_format=fp8"), "{err}");

    // A bf16 conversion that kept its quantization_config: no weight is FP8, so fp8 is refused, not claimed.
    let converted = std::env::temp_dir().join(format!("baleen-fp8-claimed-{}", std::process::id()));
    std::fs::create_dir_all(&converted).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-v3")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, converted.join(path.file_name().unwrap())).unwrap();
    }
    let config = converted.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["quantization_config"] =
        serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]});
    std::fs::write(&config, json.to_string()).unwrap();
    let out = run(&["generate", "--model", converted.to_str().unwrap(), "--ids", "1", "--quantize", "fp8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no weight of this checkpoint is stored in FP8"), "{err}");
    std::fs::remove_dir_all(converted).unwrap();
}

#[test]
fn deepseek_v3_kv_cache_is_70272_bytes_per_token() {
    let dir = fixture("deepseek-v3-config");
    let v = run_json(&["info", "--model", dir.to_str().unwrap(), "--dtype", "bf16"]);
    assert_eq!(v["kv_cache_bytes_per_token"], 70_272);
    assert_eq!(v["routed_experts"], 256);
    assert_eq!(v["moe_layers"], 58);
}

#[test]
fn bad_input_fails_with_a_message_naming_the_problem() {
    let cases: [(&[&str], &str); 10] = [
        (&["generate", "--model", "/nonexistent/model", "--ids", "1"], "config.json"),
        (&["serve", "--model", "builtin:tiny-moe", "--port", "0", "--api-key", " , "], "api-key"),
        (&["serve", "--model", "builtin:tiny-moe", "--port", "0", "--max-connections", "0"], "max-connections"),
        (&["generate", "--model", "builtin:tiny-moe", "--ids", "1,x"], "`x`"),
        (&["generate", "--model", "builtin:tiny-moe", "--ids", "999"], "outside the vocabulary"),
        (
            &["generate", "--model", "builtin:tiny-moe", "--ids", "1", "--max-tokens", "1000000000000000"],
            "context length",
        ),
        (&["logits", "--model", "builtin:tiny-moe", "--ids", "1", "--dtype", "f64"], "dtype"),
        (
            &["serve", "--model", "builtin:tiny-moe", "--port", "0", "--quantize", "int4"],
            "`int4` is not one of none, int8",
        ),
        (
            &["generate", "--model", "builtin:tiny-moe", "--ids", "1", "--dtype", "f16", "--quantize", "int8"],
            "--dtype f32 or bf16",
        ),
        (&["generate", "--model", "builtin:tiny-moe", "--ids", "1", "--quantize", "fp8"], "weights are not FP8"),
    ];
    for (args, needle) in cases {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: stderr should mention {needle}: {err}");
    }
}

#[test]
fn a_chat_template_that_cannot_be_read_or_compiled_stops_serve_at_start() {
    let broken = std::env::temp_dir().join(format!("baleen-broken-{}.jinja", std::process::id()));
    std::fs::write(&broken, "{% if %}").unwrap();
    let missing = "/nonexistent/template.jinja";
    for (path, needle) in [(missing, missing), (broken.to_str().unwrap(), "chat template")] {
        let out = run(&["serve", "--model", "builtin:tiny-moe", "--port", "0", "--chat-template", path]);
        assert!(!out.status.success(), "{path} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{path}: stderr should mention {needle}: {err}");
    }
    std::fs::remove_file(broken).unwrap();
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = run(&["generate", "--model", "builtin:tiny-moe", "--ids", "1", "--device", "cuda"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cuda"));
}
