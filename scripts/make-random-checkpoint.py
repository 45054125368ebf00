#!/usr/bin/env python3
"""Writes a random-weight Hugging Face checkpoint directory in a real DeepSeek model's shapes, for benchmarks
where downloading the real weights is not possible (machines without internet). Only the shapes are real: the
text it generates is meaningless.

    scripts/make-random-checkpoint.py OUT_DIR [--preset deepseek-v2-lite] [--layers N] [--fp8]

`--layers` keeps the first N decoder layers (the first `first_k_dense_replace` are dense, as in the real model), so
per-layer numbers are the real model's while the file stays small. Weights are bf16, drawn from N(0, 0.02²); norms
are 1. The tokenizer files are copied from runtime/tests/fixtures/tiny-v2 (their ids are all below the vocabulary
size). Uses torch (on CUDA when present) to draw the numbers, or numpy; writes safetensors itself, tensor by
tensor, so memory stays at one tensor.

`--fp8` stores the projections (attention, dense and expert MLPs; not the embeddings, router or lm_head) as
DeepSeek-V3 ships them: `float8_e4m3fn` values with an f32 `weight_scale_inv` per 128×128 block (`amax / 448`),
and `quantization_config` in config.json (numpy only).
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


FP8_BLOCK = 128
FP8_MAX = 448.0


def fp8_projection(name, shape):
    """Whether DeepSeek-V3's FP8 checkpoints store this tensor in FP8 (every linear projection's weight)."""
    return len(shape) == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def e4m3_encoder():
    """A function float32 array -> e4m3fn bytes (uint8), rounding to the nearest value (|v| <= 448)."""
    import numpy as np

    codes = np.arange(0x7F, dtype=np.uint8)  # 0x00..0x7E: every finite non-negative e4m3 value, increasing
    exp, mant = (codes >> 3).astype(np.int32), (codes & 7).astype(np.float64)
    values = np.where(exp == 0, mant / 8 * 2.0 ** -6, (1 + mant / 8) * 2.0 ** (exp - 7))

    def encode(v):
        a = np.minimum(np.abs(v).astype(np.float64), FP8_MAX)
        hi = np.clip(np.searchsorted(values, a), 1, len(values) - 1)
        lo = hi - 1
        code = np.where(a - values[lo] <= values[hi] - a, lo, hi).astype(np.uint8)
        return code | np.where(v < 0, 0x80, 0).astype(np.uint8)

    return encode


def fp8_drawer():
    """A function (shape) -> (e4m3 bytes, f32 block-scale bytes) of a N(0, 0.02²) weight."""
    import numpy as np

    rng, encode = np.random.default_rng(0), e4m3_encoder()

    def draw(shape):
        w = rng.standard_normal(shape, np.float32) * 0.02
        rows, cols = shape
        br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
        scales = np.zeros((br, bc), np.float32)
        q = np.zeros(shape, np.uint8)
        for i in range(br):
            for j in range(bc):
                blk = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
                s = np.float32(np.abs(blk).max() / FP8_MAX) or np.float32(1.0)
                scales[i, j] = s
                q[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] = encode(blk / s)
        return q.tobytes(), scales.astype("<f4").tobytes()

    return draw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--preset", default="deepseek-v2-lite", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="decoder layers to keep (default: all)")
    ap.add_argument("--fp8", action="store_true", help="store the projections in FP8 with 128x128 block scales")
    args = ap.parse_args()
    config = dict(PRESETS[args.preset])
    if args.fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
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
    header, offset, params = {}, 0, 0

    def add(name, dtype, shape, size):
        nonlocal offset
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size

    for name, shape in specs:
        count = 1
        for d in shape:
            count *= d
        params += count
        if args.fp8 and fp8_projection(name, shape):
            add(name, "F8_E4M3", shape, count)
            blocks = (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
            add(name + "_scale_inv", "F32", blocks, 4 * blocks[0] * blocks[1])
        else:
            add(name, "BF16", shape, 2 * count)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    draw = drawer()
    draw_fp8 = fp8_drawer() if args.fp8 else None
    with open(args.out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            if draw_fp8 and fp8_projection(name, shape):
                f.write(b"".join(draw_fp8(shape)))
            else:
                f.write(draw(shape, name.endswith("norm.weight")))
    print(f"{args.out}: {args.preset}{' fp8' if args.fp8 else ''}, {config['num_hidden_layers']} layers, "
          f"{params / 1e9:.2f} B parameters, {offset / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
