#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Expert parallelism's arithmetic: a head holding only its shard of the routed experts, with the other ranks'
//! shards reached through a transport, computes what the whole model computes — for contiguous placements over 2
//! and 4 ranks and with redundant replicas. (The gRPC transport between processes is tested in expert_grpc.rs and
//! the multi-process CLI tests.)

use std::path::PathBuf;
use std::sync::Arc;

use baleen_api::topology::ExpertPlacement;
use baleen_runtime::model::{
    AttentionMode, DeepseekModel, ExpertParallel, ExpertShard, ForwardOptions, InProcessExperts, LogitsFor,
    ModelConfig, SeqCache,
};
use baleen_runtime::weights::{Checkpoint, var_builder};
use candle_core::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn vb(name: &str, config: &ModelConfig) -> candle_nn::VarBuilder<'static> {
    vb_as(name, config, DType::F32)
}

fn vb_as(name: &str, config: &ModelConfig, dtype: DType) -> candle_nn::VarBuilder<'static> {
    var_builder(Checkpoint::open(&fixture(name), config.fp8_block).unwrap(), dtype, &Device::Cpu)
}

fn group(name: &str, placement: &ExpertPlacement) -> DeepseekModel {
    group_as(name, placement, DType::F32)
}

fn group_as(name: &str, placement: &ExpertPlacement, dtype: DType) -> DeepseekModel {
    let config = ModelConfig::from_dir(&fixture(name)).unwrap();
    let shards = (0..placement.world_size())
        .map(|r| (r != 0).then(|| ExpertShard::load(&config, placement, r, vb_as(name, &config, dtype)).unwrap()))
        .collect();
    let parallel =
        ExpertParallel { placement: placement.clone(), rank: 0, dispatcher: Arc::new(InProcessExperts::new(shards)) };
    DeepseekModel::load_parallel(&config, Some(&parallel), vb_as(name, &config, dtype)).unwrap()
}

fn logits(model: &DeepseekModel, tokens: &[u32]) -> Tensor {
    logits_with(model, tokens, AttentionMode::Auto)
}

fn logits_with(model: &DeepseekModel, tokens: &[u32], attention: AttentionMode) -> Tensor {
    let mut pool = model.new_pool(0, 4).unwrap();
    let opts = ForwardOptions { logits: LogitsFor::AllTokens, attention, ..Default::default() };
    model.forward_cached(&mut pool, &mut [(tokens, &mut SeqCache::default())], opts).unwrap().logits
}

fn greedy(model: &DeepseekModel, prompt: &[u32], steps: usize) -> Vec<u32> {
    let (mut pool, mut cache) = (model.new_pool(0, 4).unwrap(), SeqCache::default());
    let (mut next, mut out) = (prompt.to_vec(), Vec::new());
    for _ in 0..steps {
        let l = model.forward_cached(&mut pool, &mut [(&next, &mut cache)], ForwardOptions::default()).unwrap();
        let id = l.logits.squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(id);
        next = vec![id];
    }
    out
}

#[test]
fn sharded_experts_compute_the_same_logits_and_ids_as_one_process() {
    let prompt: Vec<u32> = vec![0, 45, 90, 312, 71, 5, 17, 200, 3, 99, 150, 250];
    for name in ["tiny-v3", "tiny-v2"] {
        let config = ModelConfig::from_dir(&fixture(name)).unwrap();
        let whole = DeepseekModel::load(&config, vb(name, &config)).unwrap();
        let want = logits(&whole, &prompt);
        let want_ids = greedy(&whole, &prompt[..5], 10);
        let placements = [
            ExpertPlacement::contiguous(8, 2).unwrap(),
            ExpertPlacement::contiguous(8, 4).unwrap(),
            ExpertPlacement::contiguous(8, 4).unwrap().with_replicas(&[(7, 0), (2, 3), (3, 1)]).unwrap(),
        ];
        for placement in placements {
            let model = group(name, &placement);
            let got = logits(&model, &prompt);
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5, "{name} over {:?}: logits differ by {diff}", placement.world_size());
            assert_eq!(greedy(&model, &prompt[..5], 10), want_ids, "{name}: greedy ids");
        }
    }
}

/// How far bf16 logits may move when the rows that travel between ranks are rounded to bf16 (one bf16 step, 2⁻⁸
/// relative, of each remote expert's output, carried through the remaining layers of these tiny random models).
const BF16_TRAVEL: f32 = 0.05;

/// bf16 on the CPU: the host path (bf16 weights, f32 rows) and the tensor path (naive attention, bf16 rows) both
/// send rows to other ranks in bf16 and combine what comes back, so a sharded group computes the one-process logits
/// up to the bf16 rounding of the rows that travel (the one-process model keeps them in f32 on the host path).
#[test]
fn sharded_bf16_experts_on_the_cpu_compute_the_one_process_logits() {
    let prompt: Vec<u32> = vec![0, 45, 90, 312, 71, 5, 17, 200, 3, 99, 150, 250];
    for name in ["tiny-v3", "tiny-v2"] {
        let config = ModelConfig::from_dir(&fixture(name)).unwrap();
        let whole = DeepseekModel::load(&config, vb_as(name, &config, DType::BF16)).unwrap();
        let model = group_as(name, &ExpertPlacement::contiguous(8, 2).unwrap(), DType::BF16);
        for attention in [AttentionMode::Auto, AttentionMode::Naive] {
            let want = logits_with(&whole, &prompt, attention).to_dtype(DType::F32).unwrap();
            let got = logits_with(&model, &prompt, attention).to_dtype(DType::F32).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("{name} bf16 {attention:?}: sharded vs one process {diff}");
            assert!(diff <= BF16_TRAVEL, "{name} bf16 {attention:?}: logits differ by {diff}");
        }
        assert_eq!(greedy(&model, &prompt[..5], 4).len(), 4, "{name}: bf16 decode steps over the group");
    }
}

#[test]
fn each_rank_holds_only_its_share_of_the_expert_weights() {
    let config = ModelConfig::from_dir(&fixture("tiny-v3")).unwrap();
    let one =
        ExpertShard::load(&config, &ExpertPlacement::contiguous(8, 1).unwrap(), 0, vb("tiny-v3", &config)).unwrap();
    let four =
        ExpertShard::load(&config, &ExpertPlacement::contiguous(8, 4).unwrap(), 2, vb("tiny-v3", &config)).unwrap();
    assert_eq!(four.held(), &[4, 5]);
    assert_eq!(four.bytes() * 4, one.bytes());
}
