//! Checkpoint loading against the fixtures: sharded index, FP8 block dequantization against transformers, errors
//! that name what is wrong, and the VarBuilder backend.

// Test helpers outside #[test] functions may unwrap too (clippy.toml allows it only inside them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use baleen_runtime::Error;
use baleen_runtime::weights::{Checkpoint, var_builder};
use candle_core::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A fresh, empty scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baleen-weights-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `quantization_config.weight_block_size` of a fixture's config.json.
fn block_size(dir: &Path) -> Option<[usize; 2]> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let block = config.get("quantization_config")?.get("weight_block_size")?.as_array()?;
    Some([block[0].as_u64()? as usize, block[1].as_u64()? as usize])
}

fn open_fp8() -> Checkpoint {
    let dir = fixture("tiny-v3-fp8");
    let block = block_size(&dir);
    assert_eq!(block, Some([16, 16]));
    Checkpoint::open(&dir, block).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn fp8_block_dequant_matches_transformers() {
    let ckpt = open_fp8();
    let golden =
        candle_core::safetensors::load(fixture("tiny-v3-fp8").join("golden.safetensors"), &Device::Cpu).unwrap();
    // kv_a_proj_with_mqa is 40 x 64: its last 16-row block is partial.
    for name in ["model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.2.mlp.experts.3.down_proj.weight"]
    {
        let expected = &golden[&format!("dequant.{name}")];
        let got = ckpt.load(name, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(got.dims(), expected.dims(), "{name}");
        let diff = max_abs_diff(&got, expected);
        assert!(diff <= 1e-6, "{name}: max abs diff {diff}");
    }
}

#[test]
fn sharded_index_loads_tensors_from_every_shard() {
    let ckpt = open_fp8();
    assert_eq!(ckpt.files().len(), 2);
    assert_eq!(ckpt.dir(), fixture("tiny-v3-fp8"));
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-v3-fp8").join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let names = ckpt.tensor_names();
    assert_eq!(names.len(), weight_map.len());
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "tensor_names is sorted");
    // One tensor from each shard, by the index.
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        let (name, _) =
            weight_map.iter().find(|(n, s)| s.as_str() == Some(shard) && n.ends_with("norm.weight")).unwrap();
        assert!(ckpt.contains(name));
        let t = ckpt.load(name, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), ckpt.shape(name).unwrap());
    }
    let embed = ckpt.load_shaped("model.embed_tokens.weight", &[320, 64], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(embed.dims(), &[320, 64]);
}

#[test]
fn tensor_names_include_the_mtp_layer() {
    let ckpt = open_fp8();
    let names = ckpt.tensor_names();
    for name in [
        "model.layers.3.eh_proj.weight",
        "model.layers.3.enorm.weight",
        "model.layers.3.mlp.experts.0.gate_proj.weight",
        "model.layers.3.mlp.experts.0.gate_proj.weight_scale_inv",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} missing from tensor_names");
    }
}

#[test]
fn missing_tensor_error_names_the_tensor() {
    let ckpt = open_fp8();
    let name = "model.layers.7.self_attn.q_a_proj.weight";
    assert!(!ckpt.contains(name));
    let err = ckpt.load(name, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(name) && msg.contains("missing"), "{msg}");
}

#[test]
fn wrong_shape_error_names_tensor_and_both_shapes() {
    let ckpt = Checkpoint::open(&fixture("tiny-v3"), None).unwrap();
    let err = ckpt.load_shaped("model.embed_tokens.weight", &[321, 64], DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.embed_tokens.weight") && msg.contains("[321, 64]") && msg.contains("[320, 64]"),
        "{msg}"
    );
}

#[test]
fn directory_without_weights_is_a_checkpoint_error() {
    let dir = scratch("empty");
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let err = Checkpoint::open(&dir, None).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        matches!(&err, Error::Checkpoint(msg)
        if msg.contains("model.safetensors") && msg.contains("model.safetensors.index.json")),
        "{err:?}"
    );

    let err = Checkpoint::open(&fixture("no-such-model"), None).unwrap_err();
    assert!(matches!(&err, Error::Checkpoint(msg) if msg.contains("no-such-model")), "{err:?}");
}

#[test]
fn index_naming_a_missing_shard_is_a_checkpoint_error() {
    let dir = scratch("missing-shard");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    let err = Checkpoint::open(&dir, None).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(&err, Error::Checkpoint(msg) if msg.contains("model-00001-of-00001.safetensors")), "{err:?}");
}

#[test]
fn bf16_load_of_an_f32_tensor_rounds_to_bf16() {
    let ckpt = Checkpoint::open(&fixture("tiny-v3"), None).unwrap();
    let name = "model.embed_tokens.weight";
    let f32s = ckpt.load(name, DType::F32, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bf16 = ckpt.load(name, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(bf16.dtype(), DType::BF16);
    let bf16 = bf16.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
    assert_eq!(bf16.len(), f32s.len());
    for (b, f) in bf16.iter().zip(&f32s) {
        assert_eq!(b.to_bits(), half::bf16::from_f32(*f).to_bits());
    }
}

#[test]
fn fp8_weight_without_block_size_is_a_tensor_error() {
    let ckpt = Checkpoint::open(&fixture("tiny-v3-fp8"), None).unwrap();
    let name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight";
    let err = ckpt.load(name, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(&err, Error::Tensor { name: n, reason } if n == name && reason.contains("block size")), "{err:?}");
}

#[test]
fn unsupported_dtype_is_a_tensor_error_naming_it() {
    let dir = scratch("int-dtype");
    let ids = Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("ids", ids)]), dir.join("model.safetensors"))
        .unwrap();
    let ckpt = Checkpoint::open(&dir, None).unwrap();
    let err = ckpt.load("ids", DType::F32, &Device::Cpu).unwrap_err();
    drop(ckpt);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(&err, Error::Tensor { name, reason } if name == "ids" && reason.contains("I64")), "{err:?}");
}

#[test]
fn var_builder_paths_mirror_tensor_names_and_dequantize() {
    let ckpt = open_fp8();
    let direct = ckpt.load("model.layers.2.mlp.experts.3.down_proj.weight", DType::F32, &Device::Cpu).unwrap();
    let vb = var_builder(ckpt, DType::F32, &Device::Cpu);
    let experts = vb.pp("model").pp("layers").pp(2).pp("mlp").pp("experts");
    assert!(experts.contains_tensor("3.down_proj.weight"));
    let via_vb = experts.pp(3).pp("down_proj").get((64, 32), "weight").unwrap();
    assert_eq!(max_abs_diff(&via_vb, &direct), 0.0);
    let unchecked = vb.get_unchecked("model.embed_tokens.weight").unwrap();
    assert_eq!(unchecked.dims(), &[320, 64]);

    let err = experts.pp(3).pp("down_proj").get((32, 64), "weight").unwrap_err().to_string();
    assert!(err.contains("model.layers.2.mlp.experts.3.down_proj.weight") && err.contains("[32, 64]"), "{err}");
    let err = vb.pp("model").get((1,), "no_such.weight").unwrap_err().to_string();
    assert!(err.contains("model.no_such.weight") && err.contains("missing"), "{err}");
}
