#!/usr/bin/env python3
"""Generate tiny random DeepSeek-V2/V3 checkpoints and Hugging Face reference outputs.

How to run (from the repository root):

    python3 -m venv /tmp/goldenv \
      && /tmp/goldenv/bin/pip install -r scripts/goldens/requirements.txt \
      && /tmp/goldenv/bin/python scripts/goldens/make_goldens.py

Everything is written under ``runtime/tests/fixtures/`` (the four fixture
directories and ``README.md`` are deleted and rewritten).  The output is
committed, so CI and the Rust tests never need torch or transformers: this
script only has to be rerun when a fixture is changed on purpose.  Running it
twice produces byte-identical files (CPU, float32 compute, eager attention,
one thread, fixed seeds, deterministic BPE training).

Fixtures (all: hidden 64, 3 layers, layer 0 dense, layers 1 and 2 MoE with 8
routed experts, MLA attention with kv_lora_rank 32, vocab 320):

* ``tiny-v3/``        DeepseekV3ForCausalLM.  q_lora_rank 32, sigmoid router with
  ``noaux_tc`` group-limited top-k (4 groups, 2 kept, k = 3) and a nonzero
  ``e_score_correction_bias``, norm_topk_prob, routed_scaling_factor 2.5,
  interleaved rope with YaRN (factor 4, mscale 0.9 != mscale_all_dim 1.1, so
  both the cos/sin attention factor and the softmax-scale mscale^2 matter).
* ``tiny-v2/``        DeepseekV2ForCausalLM.  No q LoRA (plain q_proj), softmax
  router with ``group_limited_greedy`` (4 groups, 2 kept, k = 2), 2 shared
  experts, routed_scaling_factor 16, no normalisation, plain rope.  Weights
  stored as bfloat16 (config.json ``dtype: bfloat16``).
* ``tiny-v2-greedy/`` Like tiny-v2 (also bfloat16) but ``greedy`` top-k over
  all experts, 1 shared expert, routed_scaling_factor 1.
* ``tiny-v3-fp8/``    tiny-v3's config with block-wise (16x16) float8_e4m3fn
  weights + ``weight_scale_inv`` (DeepSeek-V3 layout), written as two
  safetensors shards with an index, plus fake multi-token-prediction tensors
  for layer 3 that a loader must skip.  Its goldens come from HF running on the
  dequantized float32 weights (``fp8.float() * scale_inv[i//16, j//16]``).

tiny-v3 stores float32 weights.  The bfloat16 fixtures are generated the same
way: the float32 weights are rounded to bfloat16 and back *before* any golden is
computed, so every golden is a float32 computation on exactly the stored values
(a loader that reads bf16 and upcasts to f32 reproduces the same math).

Every fixture has ``golden.safetensors`` (prompt ids, full-prefill logits,
per-MoE-layer routing decisions, a 10-token greedy KV-cache run) and
``golden.json`` (versions, seed, routing / argmax margins, tokenizer and chat
template cases).  Weights are re-initialised so that activations are O(1) and
routing is decisive; seeds are retried until every routing decision and every
greedy argmax has a margin above ``MARGIN`` (for the bf16 fixtures: measured
on the rounded weights), so a correct float32 implementation cannot flip a
decision through rounding differences.
"""

import copy
import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import DynamicCache  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "runtime" / "tests" / "fixtures"

MARGIN = 1e-3  # every routing / greedy decision must win by more than this
MAX_SEED_TRIES = 1000
PROMPT_LEN = 12
GREEDY_PROMPT_LEN = 5
GREEDY_STEPS = 10
FP8_BLOCK = 16
FP8_MAX = 448.0

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK]
VOCAB_SIZE = 320

CORPUS = [
    "Whales are large marine mammals. The blue whale is the largest animal known to have ever lived, "
    "and its heart alone can weigh as much as a small car. Humpback whales sing long, complex songs that "
    "travel for kilometres through the ocean; the songs of one population change slowly from year to year.",
    "Sperm whales dive deeper than 1,000 metres to hunt squid, holding their breath for 90 minutes or more. "
    "Orcas are whales too: they live in family pods and hunt together with remarkable coordination.",
    "Serving a large language model means batching requests, caching keys and values, and streaming tokens "
    "back to the user as soon as they are sampled. A mixture-of-experts model sends each token to a few "
    "experts; the router scores every expert with a gate and keeps the top ones.",
    "The server handled 1,234,567 requests at 99.95% uptime (p50 = 12 ms, p99 = 340 ms). Throughput rose "
    "from 4096 to 8192 tokens/s after the KV cache was compressed into a latent of rank 512!",
    "Tea at the café costs 3.50 EUR; the naïve résumé said: \"whale-watching, 2019-2024\". "
    "日本の海にもクジラがいます。 Ça va? Señor, ¿dónde está el mar? {braces} [brackets] <angles> #tags @users.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 42 64 100 256 1024 3.14159 2.71828 -1 +1 = * / % & | ^ ~ ` ' _",
]

# DeepSeek-V3-style chat template, written for these fixtures.  It uses the same
# Jinja constructs as the real Hugging Face templates so a Rust renderer is
# exercised on them: a namespace() collecting the system prompt, loop.last,
# add_generation_prompt, raise_exception, `in`, .split(...)[-1], .strip() and
# whitespace control.
CHAT_TEMPLATE = (
    "{%- if add_generation_prompt is not defined -%}{%- set add_generation_prompt = false -%}{%- endif -%}\n"
    "{%- set ns = namespace(system_prompt='', seen_system=false) -%}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'system' -%}\n"
    "        {%- if ns.seen_system -%}\n"
    "            {%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'].strip() -%}\n"
    "        {%- else -%}\n"
    "            {%- set ns.system_prompt = message['content'].strip() -%}\n"
    "            {%- set ns.seen_system = true -%}\n"
    "        {%- endif -%}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{{- bos_token -}}{{- ns.system_prompt -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'user' -%}\n"
    "        {{- '<｜User｜>' + message['content'] -}}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    "        {%- set content = message['content'] -%}\n"
    "        {%- if '</think>' in content -%}\n"
    "            {%- set content = content.split('</think>')[-1] -%}\n"
    "        {%- endif -%}\n"
    "        {{- '<｜Assistant｜>' + content.strip() + '<｜end▁of▁sentence｜>' -}}\n"
    "    {%- elif message['role'] != 'system' -%}\n"
    "        {{- raise_exception('Unsupported chat role: ' + message['role']) -}}\n"
    "    {%- endif -%}\n"
    "    {%- if loop.last and add_generation_prompt and message['role'] != 'assistant' -%}\n"
    "        {{- '<｜Assistant｜>' -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, THINK, END_THINK],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    assert len(tok) == VOCAB_SIZE, len(tok)
    return tok


ENCODE_CASES = [
    ("", True),
    ("", False),
    ("Whales sing.", True),
    ("The blue whale is the largest animal known to have ever lived.", False),
    ("   three leading spaces, and two trailing  ", False),
    (" one leading space", True),
    ("café 日本 naïve résumé 🐋", True),
    (f"{USER}Hello!{ASSISTANT}{THINK}hmm{END_THINK}Hi.{EOS}", False),
    (f"text before {BOS} and after", True),
    ("1,234,567 requests at 99.95% uptime; p99 = 340 ms!", False),
    ("tabs\tand\nnewlines\n\nend", False),
]

CHAT_CASES = [
    (
        [
            {"role": "system", "content": "You are a helpful assistant who knows whales."},
            {"role": "user", "content": "How big is a blue whale?"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "<think>Two plus two is four.</think>\n\nThe answer is 4."},
            {"role": "user", "content": "And 3 + 3?"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "  Hi there!  "},
        ],
        False,
    ),
    (
        [
            {"role": "system", "content": "  First rule.  "},
            {"role": "user", "content": "café?"},
            {"role": "system", "content": "Second rule."},
        ],
        False,
    ),
]

CHAT_ERROR_CASES = [
    [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
]


def tokenizer_goldens(tok: PreTrainedTokenizerFast) -> dict:
    encode = []
    for text, add_special in ENCODE_CASES:
        ids = tok.encode(text, add_special_tokens=add_special)
        assert all(0 <= i < VOCAB_SIZE for i in ids)
        encode.append({"text": text, "add_special_tokens": add_special, "ids": ids})

    decode_ids = [
        encode[6]["ids"],  # non-ASCII with BOS
        encode[7]["ids"],  # special tokens spelled in the text
        encode[4]["ids"],  # leading / trailing spaces
        encode[10]["ids"],  # tabs and newlines
    ]
    # A lone byte-level token that is an incomplete UTF-8 sequence (first byte of 日).
    partial = tok.convert_tokens_to_ids(bytes_to_unicode()[0xE6])
    decode_ids.append([partial])
    decode = []
    for ids in decode_ids:
        for skip in (False, True):
            decode.append({"ids": ids, "skip_special_tokens": skip, "text": tok.decode(ids, skip_special_tokens=skip)})

    chat = []
    for messages, add_gen in CHAT_CASES:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_gen)
        assert list(ids) == tok.encode(rendered, add_special_tokens=False)
        chat.append({"messages": messages, "add_generation_prompt": add_gen, "rendered": rendered, "ids": list(ids)})

    chat_errors = []
    for messages in CHAT_ERROR_CASES:
        try:
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2 TemplateError raised by raise_exception
            chat_errors.append({"messages": messages, "error_contains": "Unsupported chat role: tool"})
            assert "Unsupported chat role: tool" in str(e), str(e)
        else:
            raise AssertionError("chat template accepted an unknown role")

    return {"encode": encode, "decode": decode, "chat": chat, "chat_errors": chat_errors}


def bytes_to_unicode() -> dict:
    """GPT-2 byte -> printable unicode mapping used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# ---------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=128,
    moe_intermediate_size=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    hidden_act="silu",
)

V3_EXTRA = dict(
    q_lora_rank=32,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    rope_interleave=True,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.9,
        "mscale_all_dim": 1.1,
    },
)

V2_EXTRA = dict(
    q_lora_rank=None,
    n_shared_experts=2,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    topk_method="group_limited_greedy",
    scoring_func="softmax",
    norm_topk_prob=False,
    routed_scaling_factor=16.0,
    rope_scaling=None,
)

V2_GREEDY_EXTRA = dict(
    V2_EXTRA,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    num_experts_per_tok=2,
    n_shared_experts=1,
    routed_scaling_factor=1.0,
)

# name, family, config extras, first seed, stored weight format:
#   "f32"  float32 model.safetensors
#   "bf16" bfloat16 model.safetensors; goldens are float32 on the bf16-rounded weights
#   "fp8"  block-wise float8_e4m3fn shards; goldens are float32 on the dequantized weights
FIXTURE_SPECS = [
    ("tiny-v3", "v3", V3_EXTRA, 1000, "f32"),
    ("tiny-v2", "v2", V2_EXTRA, 2000, "bf16"),
    ("tiny-v2-greedy", "v2", V2_GREEDY_EXTRA, 3000, "bf16"),
    ("tiny-v3-fp8", "v3", V3_EXTRA, 4000, "fp8"),
]
WEIGHT_FORMATS = ("f32", "bf16", "fp8")

# Router weight std is ROUTER_C / sqrt(hidden).  The softmax routers get a large
# c so routing is decisive.  The sigmoid (V3) router needs a smaller one: with
# c >= 2 many sigmoid scores sit near 0, and with a +-0.1 correction bias they
# become negative, where HF's "mask excluded groups with 0.0" would diverge from
# DeepSeek's "-inf" masking (margin check (c) below).
ROUTER_C = {"v3": 0.8, "v2": 3.0}
BIAS_RANGE = 0.1
# Routed experts' down_proj std is further multiplied by min(1, 4 / routed_scaling_factor):
# tiny-v2's factor of 16 (meant for 160 experts) would otherwise make the MoE output ~10x the residual stream.
ROUTED_DOWN_RE = re.compile(r"\.mlp\.experts\.\d+\.down_proj\.weight$")


def make_config(family: str, extra: dict, tok: PreTrainedTokenizerFast):
    kwargs = dict(COMMON)
    kwargs.update(json.loads(json.dumps(extra)))  # deep copy (HF mutates rope_scaling)
    kwargs["bos_token_id"] = tok.bos_token_id
    kwargs["eos_token_id"] = tok.eos_token_id
    kwargs["attn_implementation"] = "eager"
    if family == "v3":
        return DeepseekV3Config(**kwargs), DeepseekV3ForCausalLM
    # HF's native V2 gate ignores norm_topk_prob (the original code honours it).
    assert not kwargs["norm_topk_prob"]
    return DeepseekV2Config(**kwargs), DeepseekV2ForCausalLM


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

FP8_RE = re.compile(r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


@torch.no_grad()
def reinit(model, family: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name == "model.embed_tokens.weight":
            v = torch.randn(shape, generator=g)
        elif name == "lm_head.weight":
            v = torch.randn(shape, generator=g) / math.sqrt(hidden)
        elif name.endswith(".mlp.gate.weight"):
            v = torch.randn(shape, generator=g) * (ROUTER_C[family] / math.sqrt(hidden))
        elif p.dim() == 1 and ("norm" in name):
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif p.dim() == 2:
            v = torch.randn(shape, generator=g) / math.sqrt(shape[1])
            if ROUTED_DOWN_RE.search(name):
                v = v * min(1.0, 4.0 / model.config.routed_scaling_factor)
        else:
            raise AssertionError(f"unexpected parameter {name} {shape}")
        p.copy_(v)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_((torch.rand(tuple(b.shape), generator=g) * 2.0 - 1.0) * BIAS_RANGE)


def expand_blocks(scale_inv: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    return scale_inv.repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]


def quantize_fp8(w: torch.Tensor):
    """Block-wise e4m3 quantisation; returns (fp8 weight, f32 scale_inv, f32 dequantized)."""
    out_f, in_f = w.shape
    bo, bi = -(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)
    padded = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK, dtype=torch.float32)
    padded[:out_f, :in_f] = w
    blockmax = padded.abs().view(bo, FP8_BLOCK, bi, FP8_BLOCK).amax(dim=(1, 3))
    scale_inv = (blockmax / FP8_MAX).to(torch.float32)
    assert (scale_inv > 0).all()
    q = (w / expand_blocks(scale_inv, out_f, in_f)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    deq = q.to(torch.float32) * expand_blocks(scale_inv, out_f, in_f)
    return q, scale_inv, deq


@torch.no_grad()
def apply_fp8(model):
    """Replace the quantisable weights by their fp8 round trip; return the tensors to store."""
    stored = {}
    for name, p in model.named_parameters():
        if FP8_RE.search(name):
            q, s, deq = quantize_fp8(p.detach().clone())
            p.copy_(deq)
            stored[name] = q
            stored[name + "_scale_inv"] = s
        else:
            stored[name] = p.detach().clone()
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            stored[name] = b.detach().clone()
    return stored


@torch.no_grad()
def round_to_bf16(model) -> None:
    """Round every stored float32 tensor to bfloat16 and back, in place (the model stays float32).

    Goldens are then computed in float32 on exactly the values the bf16 checkpoint holds."""
    for name, p in model.named_parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(b.to(torch.bfloat16).to(torch.float32))


# ---------------------------------------------------------------------------
# Routing recomputation and margins
# ---------------------------------------------------------------------------


def recompute_route(gate, cfg, family: str, h: torch.Tensor):
    """Re-derive the router decision from the gate input with the HF formulas.

    Returns (sorted expert ids, weights in that order, stats dict)."""
    h = h.reshape(-1, cfg.hidden_size).to(torch.float32)
    n = h.shape[0]
    E, G, TG, K = cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
    logits = F.linear(h, gate.weight.to(torch.float32))
    stats = {}
    if family == "v3":
        scores = logits.sigmoid()
        choice = scores + gate.e_score_correction_bias.unsqueeze(0)
        stats["min_score"] = choice.min().item()
        group_scores = choice.view(n, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    else:
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        choice = scores
        stats["min_score"] = choice.min().item()
        group_scores = choice.view(n, G, E // G).max(dim=-1).values
    if G > 1:
        gs = group_scores.sort(dim=-1, descending=True).values
        stats["group_margin"] = (gs[:, TG - 1] - gs[:, TG]).min().item()
        group_idx = group_scores.topk(TG, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
        allowed = group_mask.unsqueeze(-1).expand(n, G, E // G).reshape(n, E)
    else:
        stats["group_margin"] = None
        allowed = torch.ones(n, E, dtype=torch.bool)
    masked_zero = choice.masked_fill(~allowed, 0.0)  # what HF does
    masked_inf = choice.masked_fill(~allowed, float("-inf"))  # what DeepSeek's reference code does
    idx_zero = masked_zero.topk(K, dim=-1).indices.sort(dim=-1).values
    idx_inf = masked_inf.topk(K, dim=-1).indices.sort(dim=-1).values
    stats["zero_vs_inf_equal"] = bool(torch.equal(idx_zero, idx_inf))
    cand = masked_inf.sort(dim=-1, descending=True).values
    if cand.shape[1] > K and torch.isfinite(cand[:, K]).all():
        stats["route_margin"] = (cand[:, K - 1] - cand[:, K]).min().item()
    else:
        stats["route_margin"] = float("inf")
    w = scores.gather(1, idx_inf)
    if family == "v3" and cfg.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor
    return idx_inf, w, stats


class GateRecorder:
    def __init__(self, model, moe_layers):
        self.records = {L: [] for L in moe_layers}
        self.handles = []
        for L in moe_layers:
            gate = model.model.layers[L].mlp.gate
            self.handles.append(gate.register_forward_hook(self._hook(L)))

    def _hook(self, L):
        def fn(module, inputs, output):
            idx, w = output
            self.records[L].append((inputs[0].detach().clone(), idx.detach().clone(), w.detach().clone()))

        return fn

    def clear(self):
        for v in self.records.values():
            v.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def sorted_route(idx: torch.Tensor, w: torch.Tensor):
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


# ---------------------------------------------------------------------------
# Running one candidate seed
# ---------------------------------------------------------------------------


@torch.no_grad()
def run_candidate(name, family, extra, seed, weights, tok, prompt_ids, greedy_prompt_ids):
    assert weights in WEIGHT_FORMATS, weights
    cfg, cls = make_config(family, extra, tok)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    assert model.config._attn_implementation == "eager"
    reinit(model, family, seed)
    stored = apply_fp8(model) if weights == "fp8" else None
    if weights == "bf16":
        round_to_bf16(model)

    moe_layers = [L for L in range(cfg.num_hidden_layers) if L >= cfg.first_k_dense_replace]
    rec = GateRecorder(model, moe_layers)

    # 1. one full prefill, no cache
    out = model(input_ids=prompt_ids[None], use_cache=False)
    logits = out.logits[0].to(torch.float32).clone()
    golden = {"prompt_ids": prompt_ids.clone(), "logits": logits}
    stats_all = []
    for L in moe_layers:
        assert len(rec.records[L]) == 1
        h, idx, w = rec.records[L][0]
        s_idx, s_w = sorted_route(idx, w)
        r_idx, r_w, st = recompute_route(model.model.layers[L].mlp.gate, cfg, family, h)
        assert torch.equal(s_idx, r_idx), (name, L)
        assert torch.allclose(s_w, r_w, rtol=1e-6, atol=1e-6), (name, L)
        golden[f"router.{L}.experts"] = s_idx.to(torch.int64)
        golden[f"router.{L}.weights"] = s_w.to(torch.float32)
        stats_all.append(st)
    rec.clear()

    # 2. greedy decoding with the KV cache, never stopping at EOS
    cache = DynamicCache(config=model.config)
    out = model(input_ids=greedy_prompt_ids[None], past_key_values=cache, use_cache=True)
    gen_ids, gen_logits = [], []
    for step in range(GREEDY_STEPS):
        step_logits = out.logits[0, -1].to(torch.float32).clone()
        nid = int(step_logits.argmax())
        gen_ids.append(nid)
        gen_logits.append(step_logits)
        if step + 1 < GREEDY_STEPS:
            out = model(
                input_ids=torch.tensor([[nid]], dtype=torch.int64),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    gen_logits = torch.stack(gen_logits)
    top2 = gen_logits.topk(2, dim=-1).values
    argmax_margin = (top2[:, 0] - top2[:, 1]).min().item()
    for L in moe_layers:
        assert len(rec.records[L]) == GREEDY_STEPS
        for h, idx, w in rec.records[L]:
            s_idx, s_w = sorted_route(idx, w)
            r_idx, r_w, st = recompute_route(model.model.layers[L].mlp.gate, cfg, family, h)
            assert torch.equal(s_idx, r_idx)
            assert torch.allclose(s_w, r_w, rtol=1e-6, atol=1e-6)
            stats_all.append(st)
    rec.remove()

    # cached decoding must agree with a cache-free forward over the same tokens
    full = torch.cat([greedy_prompt_ids, torch.tensor(gen_ids[:-1], dtype=torch.int64)])
    ref = model(input_ids=full[None], use_cache=False).logits[0, GREEDY_PROMPT_LEN - 1 :]
    cache_vs_full = (ref - gen_logits).abs().max().item()
    assert cache_vs_full < 1e-4, cache_vs_full

    golden["greedy.prompt_ids"] = greedy_prompt_ids.clone()
    golden["greedy.ids"] = torch.tensor(gen_ids, dtype=torch.int64)
    golden["greedy.logits"] = gen_logits

    margins = {
        "min_route_margin": min(s["route_margin"] for s in stats_all),
        "min_group_margin": (
            None if cfg.n_group <= 1 else min(s["group_margin"] for s in stats_all)
        ),
        "min_argmax_margin": argmax_margin,
        "min_choice_score": min(s["min_score"] for s in stats_all),
        "zero_vs_inf_equal": all(s["zero_vs_inf_equal"] for s in stats_all),
        "cache_vs_full_max_abs": cache_vs_full,
    }
    ok = (
        margins["min_route_margin"] > MARGIN
        and (margins["min_group_margin"] is None or margins["min_group_margin"] > MARGIN)
        and margins["min_argmax_margin"] > MARGIN
        and margins["zero_vs_inf_equal"]
        and (family != "v3" or margins["min_choice_score"] > MARGIN)
    )
    return ok, model, cfg, golden, margins, stored


@torch.no_grad()
def bf16_reference(model, golden: dict) -> dict:
    """transformers' own bf16 run of the same weights: prefill logits, and decode-step logits teacher-forced on
    the f32 greedy ids. Its distance from the f32 goldens is the yardstick for a bf16 implementation."""
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    logits = m16(input_ids=golden["prompt_ids"][None], use_cache=False).logits[0].to(torch.float32)
    cache = DynamicCache(config=m16.config)
    out = m16(input_ids=golden["greedy.prompt_ids"][None], past_key_values=cache, use_cache=True)
    steps = []
    for i, nid in enumerate(golden["greedy.ids"].tolist()):
        steps.append(out.logits[0, -1].to(torch.float32).clone())
        if i + 1 < len(golden["greedy.ids"]):
            nxt = torch.tensor([[nid]], dtype=torch.int64)
            out = m16(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return {"bf16.logits": logits.clone(), "bf16.greedy.logits": torch.stack(steps)}


@torch.no_grad()
def activation_norms(model, prompt_ids):
    """RMS of the residual stream (embeddings, after each layer) and std of the logits."""
    rms = []

    def hook(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        rms.append(round(float(h.pow(2).mean().sqrt()), 3))

    handles = [model.model.embed_tokens.register_forward_hook(hook)]
    handles += [layer.register_forward_hook(hook) for layer in model.model.layers]
    logits = model(input_ids=prompt_ids[None], use_cache=False).logits
    for h in handles:
        h.remove()
    return rms, round(float(logits.std()), 3)


@torch.no_grad()
def verify_written(out_dir: Path, family: str, weights: str, golden: dict) -> None:
    """Reload the checkpoint from disk the way a loader would and re-check the prefill logits."""
    fp8 = weights == "fp8"
    cfg_dict = json.loads((out_dir / "config.json").read_text())
    if not fp8:
        want = {"f32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}[weights]
        raw = load_file(str(out_dir / "model.safetensors"))
        bad = sorted(k for k, t in raw.items() if t.dtype != want[0])
        assert not bad, (out_dir, want[0], bad[:5])
        assert cfg_dict.get("dtype", cfg_dict.get("torch_dtype")) == want[1], (out_dir, cfg_dict.get("dtype"))
    cfg_dict.pop("quantization_config", None)
    cfg_cls, model_cls = (DeepseekV3Config, DeepseekV3ForCausalLM) if family == "v3" else (DeepseekV2Config, DeepseekV2ForCausalLM)
    cfg = cfg_cls.from_dict(cfg_dict, attn_implementation="eager")
    if fp8:
        index = json.loads((out_dir / "model.safetensors.index.json").read_text())
        raw = {}
        for fname in sorted(set(index["weight_map"].values())):
            raw.update(load_file(str(out_dir / fname)))
        assert set(raw) == set(index["weight_map"])
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in raw.values())
        state = {}
        for k, t in raw.items():
            if k.startswith(f"model.layers.{cfg.num_hidden_layers}.") or k.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                t = t.to(torch.float32) * expand_blocks(raw[k + "_scale_inv"], *t.shape)
            state[k] = t
        model = model_cls(cfg).eval()
        model.load_state_dict(state, strict=True)
    else:
        # bf16 checkpoints are upcast to float32 here (exact), as a Rust loader would.
        model = model_cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32).eval()
        assert all(p.dtype == torch.float32 for p in model.parameters())
    logits = model(input_ids=golden["prompt_ids"][None], use_cache=False).logits[0]
    assert torch.equal(logits, golden["logits"]), (out_dir, (logits - golden["logits"]).abs().max())


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def rewrite_json(path: Path, update: dict) -> None:
    data = json.loads(path.read_text())
    data.update(update)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_fp8_checkpoint(out_dir: Path, model, cfg, stored: dict) -> dict:
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    rewrite_json(
        out_dir / "config.json",
        {
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            }
        },
    )
    # Fake multi-token-prediction module (layer index == num_hidden_layers), as in
    # the real DeepSeek-V3 checkpoint.  A loader must skip all of these.
    g = torch.Generator().manual_seed(12345)
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    h = cfg.hidden_size
    extra = {
        f"{mtp}.eh_proj.weight": torch.randn(h, 2 * h, generator=g),
        f"{mtp}.enorm.weight": torch.ones(h),
        f"{mtp}.hnorm.weight": torch.ones(h),
        f"{mtp}.shared_head.norm.weight": torch.ones(h),
        f"{mtp}.self_attn.kv_a_proj_with_mqa.weight": torch.randn(
            cfg.kv_lora_rank + cfg.qk_rope_head_dim, h, generator=g
        ),
    }
    q, s, _ = quantize_fp8(torch.randn(cfg.moe_intermediate_size, h, generator=g))
    extra[f"{mtp}.mlp.experts.0.gate_proj.weight"] = q
    extra[f"{mtp}.mlp.experts.0.gate_proj.weight_scale_inv"] = s
    tensors = dict(stored)
    tensors.update(extra)
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    def shard_of(key: str) -> int:
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if key == "model.embed_tokens.weight" or (m and int(m.group(1)) <= 1):
            return 1
        return 2

    shards = {1: {}, 2: {}}
    for k, v in tensors.items():
        shards[shard_of(k)][k] = v
    weight_map = {}
    for i, part in shards.items():
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {k: v for k, v in tensors.items()}


def fixed_len_ids(tok, text: str, n: int) -> torch.Tensor:
    ids = tok.encode(text, add_special_tokens=True)
    assert len(ids) >= n, (text, len(ids))
    return torch.tensor(ids[:n], dtype=torch.int64)


PROMPT_TEXT = "The blue whale sings while the model serves tokens to experts."
GREEDY_PROMPT_TEXT = "Humpback whales travel"


def fmt(x):
    if x is None:
        return "n/a"
    return f"{x:.4g}"


def main() -> int:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok_golden = tokenizer_goldens(tok)
    prompt_ids = fixed_len_ids(tok, PROMPT_TEXT, PROMPT_LEN)
    greedy_prompt_ids = fixed_len_ids(tok, GREEDY_PROMPT_TEXT, GREEDY_PROMPT_LEN)
    print(f"tokenizer: {len(tok)} tokens, bos={tok.bos_token_id} eos={tok.eos_token_id}")
    print(f"prompt ids: {prompt_ids.tolist()}  greedy prompt ids: {greedy_prompt_ids.tolist()}")

    summary = []
    for name, family, extra, first_seed, weights in FIXTURE_SPECS:
        out_dir = FIXTURES / name
        for seed in range(first_seed, first_seed + MAX_SEED_TRIES):
            ok, model, cfg, golden, margins, stored = run_candidate(
                name, family, extra, seed, weights, tok, prompt_ids, greedy_prompt_ids
            )
            if ok:
                break
        else:
            raise SystemExit(f"{name}: no seed in [{first_seed}, {first_seed + MAX_SEED_TRIES}) met the margins")
        tries = seed - first_seed + 1
        rms, logit_std = activation_norms(model, prompt_ids)
        print(f"{name}: seed {seed} ({tries} tries) residual rms per layer {rms}, logits std {logit_std}")

        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        if weights == "fp8":
            tensors = write_fp8_checkpoint(out_dir, model, cfg, stored)
            for key in (
                "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                "model.layers.2.mlp.experts.3.down_proj.weight",
            ):
                q, s = tensors[key], tensors[key + "_scale_inv"]
                deq = q.to(torch.float32) * expand_blocks(s, *q.shape)
                param = dict(model.named_parameters())[key]
                assert torch.equal(deq, param), key
                golden[f"dequant.{key}"] = deq.clone()
        elif weights == "bf16":
            # The f32 parameters already hold bf16-representable values, so this cast is exact;
            # save_pretrained then writes bf16 tensors and "dtype": "bfloat16" to config.json.
            f32_params = {k: v.detach().clone() for k, v in model.named_parameters()}
            model.to(torch.bfloat16)
            for k, v in model.named_parameters():
                assert v.dtype == torch.bfloat16 and torch.equal(v.to(torch.float32), f32_params[k]), k
            model.save_pretrained(out_dir, safe_serialization=True)
        else:
            model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir, save_jinja_files=False)
        golden.update(bf16_reference(model, golden))

        golden = {k: v.contiguous() for k, v in sorted(golden.items())}
        save_file(golden, str(out_dir / "golden.safetensors"), metadata={"format": "pt"})
        verify_written(out_dir, family, weights, golden)
        meta = {
            "fixture": name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "seed": seed,
            "margin_threshold": MARGIN,
            "min_route_margin": margins["min_route_margin"],
            "min_group_margin": margins["min_group_margin"],
            "min_argmax_margin": margins["min_argmax_margin"],
            "min_choice_score": margins["min_choice_score"],
            "prompt_text": PROMPT_TEXT,
            "greedy_prompt_text": GREEDY_PROMPT_TEXT,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "tokenizer": tok_golden,
        }
        (out_dir / "golden.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        # safetensors writes its files 0600; make every fixture file world-readable, independent of umask.
        for f in out_dir.iterdir():
            f.chmod(0o644)
        size = sum(f.stat().st_size for f in out_dir.iterdir())
        summary.append((name, seed, tries, margins, size))

    write_readme(summary)

    print()
    print(f"{'fixture':<16} {'seed':>5} {'tries':>5} {'route':>9} {'group':>9} {'argmax':>9} {'minscore':>9} {'bytes':>9}")
    for name, seed, tries, m, size in summary:
        print(
            f"{name:<16} {seed:>5} {tries:>5} {fmt(m['min_route_margin']):>9} {fmt(m['min_group_margin']):>9} "
            f"{fmt(m['min_argmax_margin']):>9} {fmt(m['min_choice_score']):>9} {size:>9}"
        )
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"total under {FIXTURES.relative_to(REPO_ROOT)}: {total} bytes")
    digest = hashlib.sha256()
    for f in sorted(FIXTURES.rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(FIXTURES)).encode() + b"\0" + f.read_bytes())
    print(f"sha256 of all fixture files: {digest.hexdigest()}")
    return 0


README_TEMPLATE = """\
# Golden fixtures

Generated by `scripts/goldens/make_goldens.py`; do not edit by hand.  Regenerate with

    python3 -m venv /tmp/goldenv \\
      && /tmp/goldenv/bin/pip install -r scripts/goldens/requirements.txt \\
      && /tmp/goldenv/bin/python scripts/goldens/make_goldens.py

The output is deterministic (rerunning gives byte-identical files).  CI only reads these files; it never needs
torch or transformers.

## Fixtures

All are random tiny models (hidden 64, 3 layers: layer 0 dense MLP, layers 1 and 2 MoE with 8 routed experts,
MLA attention with 4 heads, kv_lora_rank 32, qk_nope 16, qk_rope 8, v_head 16, vocab 320) sharing one byte-level
BPE tokenizer and a DeepSeek-V3-style chat template.  Weights are re-initialised so activations are O(1) and routing
is decisive; goldens are HF transformers outputs (float32, CPU, eager attention).

Weight storage: `tiny-v3` is float32; `tiny-v2` and `tiny-v2-greedy` are **bfloat16** (every tensor in
`model.safetensors` is BF16, config.json has `"dtype": "bfloat16"`); `tiny-v3-fp8` is float8 (below).  For the bf16
fixtures the float32 weights were rounded to bf16 and back *before* computing any golden, so all their goldens
(logits, router choices and weights, greedy ids and logits) are float32 computations on exactly the stored bf16
values: a loader that reads the bf16 tensors and upcasts them to f32 (exact) must reproduce them as closely as the
float32 fixtures.

| dir | model | what it exercises |
|---|---|---|
| `tiny-v3/` | DeepseekV3ForCausalLM | q LoRA; sigmoid router, `noaux_tc` (4 groups, keep 2, group score = sum of top-2 biased scores, k = 3) with a nonzero `e_score_correction_bias` (bias is used for selection only, weights use the raw sigmoid), `norm_topk_prob`, routed_scaling_factor 2.5; interleaved rope with YaRN (factor 4, original 64, mscale 0.9, mscale_all_dim 1.1: cos/sin are multiplied by yarn_mscale(4, 0.9) / yarn_mscale(4, 1.1) and the softmax scale by yarn_mscale(4, 1.1)^2) |
| `tiny-v2/` | DeepseekV2ForCausalLM | bf16 weights (goldens in f32 from the bf16-rounded weights); plain `q_proj`; softmax router, `group_limited_greedy` (4 groups, keep 2, group score = max, k = 2), no normalisation, routed_scaling_factor 16, 2 shared experts; plain rope |
| `tiny-v2-greedy/` | DeepseekV2ForCausalLM | like tiny-v2 (bf16 weights, f32 goldens) but `greedy` top-2 over all experts, 1 shared expert, routed_scaling_factor 1 |
| `tiny-v3-fp8/` | tiny-v3 config | float8_e4m3fn weights with 16x16 block `weight_scale_inv` (`w = fp8.float() * scale_inv[i/16, j/16]`, scale_inv = blockmax/448; `kv_a_proj_with_mqa` is 40 x 64, so its last row block is partial) on every attention projection and every MLP / expert / shared-expert matrix; embeddings, norms, router and lm_head stay f32; `quantization_config` in config.json; two shards + `model.safetensors.index.json` (no `model.safetensors`); fake MTP tensors `model.layers.3.*` (some f32, one fp8 with scale) that a loader must skip.  Goldens are HF outputs on the dequantized f32 weights. |

Each directory holds `config.json`, `generation_config.json`, the weights, `tokenizer.json`,
`tokenizer_config.json` (with `chat_template`), `special_tokens_map.json`, `golden.safetensors` and `golden.json`.

## golden.safetensors

| tensor | dtype, shape | meaning |
|---|---|---|
| `prompt_ids` | I64 [12] | BOS + the encoded prompt text, truncated to 12 ids |
| `logits` | F32 [12, 320] | logits at every position of one cache-free forward over `prompt_ids` |
| `router.{1,2}.experts` | I64 [12, k] | experts chosen for each prompt token in MoE layer L, each row sorted ascending |
| `router.{1,2}.weights` | F32 [12, k] | their routing weights as the HF gate returns them (after norm_topk_prob and routed_scaling_factor), in the same order |
| `greedy.prompt_ids` | I64 [5] | prompt of the greedy run |
| `greedy.ids` | I64 [10] | 10 greedily decoded ids using the KV cache (one prefill + 9 single-token steps, EOS not special-cased) |
| `greedy.logits` | F32 [10, 320] | the logits that produced each generated id (row 0 = last prompt position) |
| `dequant.<name>` | F32 | tiny-v3-fp8 only: dequantized `model.layers.1.self_attn.kv_a_proj_with_mqa.weight` and `model.layers.2.mlp.experts.3.down_proj.weight` |

## golden.json

Versions, the seed, margins and tokenizer cases: `tokenizer.encode` (text, add_special_tokens, ids),
`tokenizer.decode` (ids, skip_special_tokens, text; includes a lone partial UTF-8 byte token, which decodes to
U+FFFD), `tokenizer.chat` (messages, add_generation_prompt, rendered text, ids = encode(rendered,
add_special_tokens=False)), `tokenizer.chat_errors` (an unknown role must raise), `bos_token_id`, `eos_token_id`.

Margins (seeds were advanced until all exceed {margin}, over every MoE layer and every token of the 12-token
prefill and of the greedy run; for the bf16 fixtures they are measured on the bf16-rounded weights):
`min_group_margin` = topk_group-th best group score minus the next one (null when n_group = 1);
`min_route_margin` = k-th chosen score minus the best non-chosen allowed candidate;
`min_argmax_margin` = top-1 minus top-2 logit over the greedy steps; `min_choice_score` = smallest score used for
selection (V3: sigmoid + bias, always > {margin}, so HF's masking of excluded groups with 0.0 selects the same
experts as DeepSeek's -inf masking).

{table}

## Notes on the HF reference

* HF's `DeepseekV2` applies rotary embeddings as complex pairs, i.e. interleaved (x[2i], x[2i+1]) like DeepSeek's
  code; `DeepseekV3` with `rope_interleave: true` de-interleaves q/k rope dims before a rotate-half rope, which is
  equivalent for attention scores.
* HF's native `DeepseekV2Attention` does not multiply the softmax scale by YaRN's mscale(factor, mscale_all_dim)^2
  (the original DeepSeek-V2 code and HF's DeepseekV3 do), so `tiny-v2` has no `rope_scaling`; YaRN is only tested
  through `tiny-v3`.
* HF's native `DeepseekV2MoEGate` ignores `norm_topk_prob` (never normalises); the V2 fixtures set it to false, where
  both agree.
* HF's V3 router masks excluded groups with 0.0 instead of -inf; `min_choice_score` > 0 makes both agree here.
* HF's V3 router ignores `topk_method` / `scoring_func` (always sigmoid + noaux_tc, group score = sum of the top-2
  biased scores of the group); HF's V2 ignores `moe_layer_freq` (MoE iff layer >= first_k_dense_replace).  Both are
  written to config.json for loaders that read them.
* YaRN in HF (and in DeepSeek's HF remote code): cos/sin are multiplied by mscale(factor, mscale) /
  mscale(factor, mscale_all_dim) and the softmax scale by mscale(factor, mscale_all_dim)^2, with
  mscale(s, m) = 0.1 * m * ln(s) + 1.  DeepSeek's standalone `inference/model.py` applies no cos/sin factor, which
  only agrees when mscale == mscale_all_dim (true for the real V3 configs, deliberately false here).
* config.json uses transformers 4.57 spellings: `dtype` (not `torch_dtype`), and `rope_scaling` carries both `type`
  and `rope_type`.  DeepseekV2/V3Config also write `head_dim` = qk_rope_head_dim (8); it is not the attention head
  size (qk_nope + qk_rope = 24 for q/k, v_head_dim = 16 for v).
"""


def write_readme(summary) -> None:
    rows = ["| fixture | seed | min_route_margin | min_group_margin | min_argmax_margin | min_choice_score |", "|---|---|---|---|---|---|"]
    for name, seed, _tries, m, _size in summary:
        rows.append(
            f"| `{name}` | {seed} | {fmt(m['min_route_margin'])} | {fmt(m['min_group_margin'])} | "
            f"{fmt(m['min_argmax_margin'])} | {fmt(m['min_choice_score'])} |"
        )
    text = README_TEMPLATE.replace("{table}", "\n".join(rows)).replace("{margin}", f"{MARGIN:g}")
    (FIXTURES / "README.md").write_text(text)
    (FIXTURES / "README.md").chmod(0o644)


if __name__ == "__main__":
    sys.exit(main())
