#!/usr/bin/env python3
"""Writes a random-weight Hugging Face checkpoint directory in a real DeepSeek model's shapes, for benchmarks
where downloading the real weights is not possible (machines without internet). Only the shapes are real: the
text it generates is meaningless.

    scripts/make-random-checkpoint.py OUT_DIR [--preset deepseek-v2-lite] [--layers N]

`--layers` keeps the first N decoder layers (the first `first_k_dense_replace` are dense, as in the real model), so
per-layer numbers are the real model's while the file stays small. Weights are bf16, drawn from N(0, 0.02²); norms
are 1. The tokenizer files are copied from runtime/tests/fixtures/tiny-v2 (their ids are all below the vocabulary
size). Uses torch (on CUDA when present) to draw the numbers, or numpy; writes safetensors itself, tensor by
tensor, so memory stays at one tensor.
"""

import argparse
import json
import pathlib
import shutil
import struct

PRESETS = {
    # deepseek-ai/DeepSeek-V2-Lite config.json (27 layers, 64 routed experts, 6 per token, MLA rank 512).
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 1408,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "v_head_dim": 128,
        "vocab_size": 102400,
    },
}


def tensors(c):
    """(name, shape) of every tensor of the checkpoint, in the hub's names (experts one by one)."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        a = p + "self_attn."
        if c["q_lora_rank"] is None:
            out.append((a + "q_proj.weight", (heads * qk, h)))
        else:
            r = c["q_lora_rank"]
            out += [(a + "q_a_proj.weight", (r, h)), (a + "q_a_layernorm.weight", (r,)),
                    (a + "q_b_proj.weight", (heads * qk, r))]
        rank = c["kv_lora_rank"]
        out += [
            (a + "kv_a_proj_with_mqa.weight", (rank + c["qk_rope_head_dim"], h)),
            (a + "kv_a_layernorm.weight", (rank,)),
            (a + "kv_b_proj.weight", (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), rank)),
            (a + "o_proj.weight", (h, heads * c["v_head_dim"])),
        ]

        def mlp(prefix, inter):
            return [(prefix + "gate_proj.weight", (inter, h)), (prefix + "up_proj.weight", (inter, h)),
                    (prefix + "down_proj.weight", (h, inter))]

        if i < c["first_k_dense_replace"]:
            out += mlp(p + "mlp.", c["intermediate_size"])
        else:
            m = c["moe_intermediate_size"]
            out.append((p + "mlp.gate.weight", (c["n_routed_experts"], h)))
            for e in range(c["n_routed_experts"]):
                out += mlp(f"{p}mlp.experts.{e}.", m)
            out += mlp(p + "mlp.shared_experts.", m * c["n_shared_experts"])
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return out


def drawer():
    """A function (shape, is_norm) -> little-endian bf16 bytes."""
    try:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"

        def draw(shape, norm):
            t = torch.ones(shape, dtype=torch.bfloat16, device=dev) if norm else \
                (torch.randn(shape, device=dev) * 0.02).to(torch.bfloat16)
            return t.view(torch.int16).cpu().numpy().tobytes()

        return draw
    except ImportError:
        import numpy as np

        rng = np.random.default_rng(0)

        def draw(shape, norm):
            f = np.ones(shape, np.float32) if norm else rng.standard_normal(shape, np.float32) * 0.02
            return (f.view(np.uint32) >> 16).astype("<u2").tobytes()

        return draw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--preset", default="deepseek-v2-lite", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="decoder layers to keep (default: all)")
    args = ap.parse_args()
    config = dict(PRESETS[args.preset])
    if args.layers is not None:
        if not 1 <= args.layers <= config["num_hidden_layers"]:
            ap.error(f"--layers must be in 1..{config['num_hidden_layers']}")
        config["num_hidden_layers"] = args.layers
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    fixture = pathlib.Path(__file__).resolve().parent.parent / "runtime/tests/fixtures/tiny-v2"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(fixture / name, args.out / name)

    specs = tensors(config)
    header, offset = {}, 0
    for name, shape in specs:
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    draw = drawer()
    with open(args.out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            f.write(draw(shape, name.endswith("norm.weight")))
    params = offset // 2
    print(f"{args.out}: {args.preset}, {config['num_hidden_layers']} layers, {params / 1e9:.2f} B parameters, "
          f"{offset / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
