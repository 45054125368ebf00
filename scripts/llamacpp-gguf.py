#!/usr/bin/env python3
"""Writes a DeepSeek-V2 Hugging Face checkpoint (safetensors) as a llama.cpp GGUF (arch `deepseek2`), with numpy and
llama.cpp's own gguf-py only: no torch, no transformers. Used by scripts/bench-llamacpp.sh.

    scripts/llamacpp-gguf.py MODEL_DIR OUT.gguf --outtype f32|bf16 --gguf-py LLAMA_CPP/gguf-py [--tokenizer-pre gpt-2]

It writes what llama.cpp's convert_hf_to_gguf.py (DeepseekV2Model, same llama.cpp tree) writes, with two
differences that the converter cannot be told about:
  - `deepseek2.attention.q_lora_rank` = 0 is written when config.json's q_lora_rank is null. llama.cpp reads a
    deepseek2 model without q LoRA ("Lite") only at 26 or 27 layers; at any other depth the key is required, and 0
    selects the plain `attn_q` projection.
  - the pre-tokenizer is given (`--tokenizer-pre`, default gpt-2) instead of detected by hashing transformers'
    encoding of a test string (the random checkpoints' byte-level GPT-2 tokenizer is not in the converter's list).
As the converter does: kv_b_proj is split per head into attn_k_b (transposed) and attn_v_b, the routed experts are
stacked into one 3-D tensor per projection, head_count_kv is 1 (MLA as MQA), and norms, 1-D tensors and the router
(ffn_gate_inp) stay f32 whatever --outtype says. Tensors are written one at a time (memory stays near the largest
stacked tensor). Quantize the result with llama-quantize (e.g. Q8_0).
"""

import argparse
import json
import os
import pathlib
import struct
import sys

import numpy as np

SAFETENSORS_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


def open_safetensors(model_dir):
    """name -> (safetensors dtype, read-only numpy view of the raw values) over every shard, memory-mapped."""
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for file in files:
        path = model_dir / file
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                sys.exit(f"{path}: {name} has dtype {info['dtype']}; only {sorted(SAFETENSORS_DTYPES)} are handled")
            start, end = info["data_offsets"]
            raw = data[start:end].view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            tensors[name] = (info["dtype"], raw)
    return tensors


def to_f32(dtype, raw):
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(raw, dtype=np.float32)


def to_bf16(dtype, raw):
    """bf16 bit patterns (uint16); a bf16 source is copied bit for bit, others are rounded to nearest even."""
    if dtype == "BF16":
        return np.ascontiguousarray(raw)
    bits = to_f32(dtype, raw).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(bits.view(np.float32))
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--outtype", choices=["f32", "bf16"], required=True)
    parser.add_argument("--gguf-py", type=pathlib.Path, required=True, help="llama.cpp's gguf-py directory")
    parser.add_argument("--tokenizer-pre", default="gpt-2", help="llama.cpp pre-tokenizer name (default: gpt-2)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.gguf_py))
    import gguf  # noqa: E402 (from the llama.cpp tree being benchmarked, so the format matches its loader)

    cfg = json.loads((args.model_dir / "config.json").read_text())
    if cfg.get("model_type") != "deepseek_v2":
        sys.exit(f"{args.model_dir}: model_type {cfg.get('model_type')!r}; only deepseek_v2 is handled")
    n_layer = cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    nope, rope, v_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv_lora = cfg["kv_lora_rank"]
    n_experts = cfg["n_routed_experts"]
    vocab_size = cfg["vocab_size"]
    f32_out = args.outtype == "f32"
    wide_type = gguf.GGMLQuantizationType.F32 if f32_out else gguf.GGMLQuantizationType.BF16
    file_type = gguf.LlamaFileType.ALL_F32 if f32_out else gguf.LlamaFileType.MOSTLY_BF16

    # --- metadata: convert_hf_to_gguf.py's TextModel + DeepseekV2Model.set_gguf_parameters, in that order ---
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(args.model_dir.name)
    w.add_block_count(n_layer)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    rope_scaling = cfg.get("rope_scaling") or {}
    if rope_scaling.get("type", rope_scaling.get("rope_type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope_scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(rope_scaling["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope_scaling.get(key) is not None:
                add(rope_scaling[key])
    elif rope_scaling:
        sys.exit(f"rope_scaling {rope_scaling} is not handled (only yarn)")
    w.add_rope_freq_base(cfg.get("rope_theta", 10000))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_expert_count(n_experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    gating = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}
    w.add_expert_gating_func(gating[cfg.get("scoring_func", "softmax")])
    w.add_file_type(file_type)
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace", 0))
    w.add_vocab_size(vocab_size)
    w.add_q_lora_rank(cfg.get("q_lora_rank") or 0)  # 0 explicitly: see the module docstring
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(v_dim)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg.get("n_shared_experts", 0))
    if cfg.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    if rope_scaling.get("mscale_all_dim") is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * rope_scaling["mscale_all_dim"])  # llama.cpp divides by 0.1 again
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # --- vocabulary: the converter's get_vocab_base, from tokenizer.json instead of transformers ---
    tok = json.loads((args.model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok["model"]["type"] != "BPE":
        sys.exit(f"tokenizer model {tok['model']['type']} is not handled (only byte-level BPE)")
    reverse = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    reverse.update({i: a["content"] for i, a in added.items()})
    if max(reverse) >= vocab_size:
        sys.exit(f"tokenizer ids reach {max(reverse)}, past vocab_size {vocab_size}")
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            toktypes.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            toktypes.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(args.tokenizer_pre)
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    gguf.SpecialVocab(args.model_dir, load_merges=True).add_to_gguf(w)

    # --- tensors: planned first (the header lists them), then produced and written one by one ---
    src = open_safetensors(args.model_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layer)
    plan = []  # (gguf name, shape, keep f32, producer(wide: bool) -> np.ndarray)

    def convert(dtype, raw, wide):
        return to_f32(dtype, raw) if wide else to_bf16(dtype, raw)

    def gguf_name(hf_name):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            sys.exit(f"no llama.cpp name for tensor {hf_name}")
        return name

    def add(hf_name, shape, producer):
        name = gguf_name(hf_name)
        keep_f32 = len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name
        plan.append((name, tuple(shape), keep_f32, producer))

    for hf_name, (dtype, raw) in src.items():
        if hf_name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            continue
        parts = hf_name.split(".")
        if ".mlp.experts." in hf_name:
            if parts[5] != "0":  # model.layers.B.mlp.experts.X.PROJ.weight
                continue  # stacked with expert 0
            bid, proj = int(parts[2]), parts[6]

            def stack(wide, bid=bid, proj=proj):
                return np.stack([convert(*src[f"model.layers.{bid}.mlp.experts.{x}.{proj}.weight"], wide)
                                 for x in range(n_experts)])
            add(f"model.layers.{bid}.mlp.experts.{proj}.weight", (n_experts, *raw.shape), stack)
        elif hf_name.endswith("kv_b_proj.weight"):
            assert raw.shape == (n_head * (nope + v_dim), kv_lora), raw.shape
            per_head = raw.reshape(n_head, nope + v_dim, kv_lora)
            k_b = per_head[:, :nope, :].transpose(0, 2, 1)  # [head, kv_lora, nope]
            v_b = per_head[:, nope:, :]  # [head, v, kv_lora]
            add(hf_name.replace("kv_b_proj", "k_b_proj"), k_b.shape,
                lambda wide, d=dtype, t=k_b: convert(d, np.ascontiguousarray(t), wide))
            add(hf_name.replace("kv_b_proj", "v_b_proj"), v_b.shape,
                lambda wide, d=dtype, t=v_b: convert(d, np.ascontiguousarray(t), wide))
        else:
            add(hf_name, raw.shape, lambda wide, d=dtype, t=raw: convert(d, t, wide))

    for name, shape, keep_f32, _ in plan:
        wide = f32_out or keep_f32
        n = int(np.prod(shape))
        if wide:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.uint16), 2 * n, raw_dtype=gguf.GGMLQuantizationType.BF16)

    tmp = args.out.with_name(args.out.name + ".partial")
    w.write_header_to_file(path=tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, shape, keep_f32, producer) in enumerate(plan):
        data = producer(f32_out or keep_f32)
        assert data.shape == shape, (name, data.shape, shape)
        w.write_tensor_data(data)
        print(f"[{i + 1}/{len(plan)}] {name} {list(reversed(shape))} "
              f"{'F32' if f32_out or keep_f32 else wide_type.name}", file=sys.stderr)
    w.close()
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB, {len(plan)} tensors)", file=sys.stderr)


if __name__ == "__main__":
    main()
