#!/usr/bin/env bash
# CPU decode and prefill side by side with llama.cpp, on the same DeepSeek-V2-Lite-shaped random checkpoint
# (scripts/make-random-checkpoint.py --layers 4), at the same thread counts, in interleaved rounds (medians):
# f32 vs f32, bf16 vs bf16 and `--quantize int8` vs llama.cpp's Q8_0 (both: int8 in blocks of 32 with a scale).
#
#   scripts/bench-llamacpp.sh             # builds baleen-runtime (release), then benchmarks
#   scripts/bench-llamacpp.sh --no-build  # uses the binary already in $CARGO_TARGET_DIR/release (says so)
#
# llama.cpp is built either way when it is missing (about 6-15 minutes on 2 cores, once): the llama.cpp tree
# vendored in PyPI's llama-cpp-python sdist, its llama-bench, llama-batched-bench and llama-quantize, CPU only,
# -march=native, with cmake from PyPI in a venv. The GGUFs are written by scripts/llamacpp-gguf.py (numpy and
# that tree's gguf-py; no torch): f32 and bf16, and Q8_0 by llama-quantize. Builds and conversions run under
# `nice -n 19`. Measured, each run the best of 2, both engines alike:
#   decode:  64-token prompts, then 32 decode steps per sequence at each batch size (llama-batched-bench
#            -npp 64 -ntg 32, its S_TG; runtime: bench --prompt-len 64 --gen-len 33)
#   prefill: one 512-token prompt (llama-bench -p 512 -n 0; runtime: bench --prompt-len 512 --gen-len 1)
# llama.cpp runs with flash attention on, an f16 KV cache (its CPU cache cannot be f32), the weights read into
# memory (-lm none, as the runtime does; no mmap) and its own defaults otherwise (repacking, polling).
# Differences the table does not hide: llama-batched-bench feeds the same token to every sequence, so at batch > 1
# its sequences all take the same experts and read batch-1 expert bytes (an upper bound for llama.cpp; the
# runtime's sequences are distinct prompts). Q8_0 stores f16 scales (1.0625 bytes per weight against the runtime's
# 1.125) and also narrows token_embd, attn_k_b and attn_v_b, which the runtime keeps in bf16.
#
# Environment (all optional):
#   BENCH_MODEL       checkpoint directory (default: $CARGO_TARGET_DIR/bench/v2lite-l4, generated when missing with
#                     numpy in $CARGO_TARGET_DIR/bench/venv)
#   BENCH_LLAMACPP    llama.cpp tooling and GGUFs (default: $CARGO_TARGET_DIR/bench/llamacpp; about 1 GiB of
#                     tooling and 15 GiB of GGUFs)
#   BENCH_THREADS     compute threads (default: "1 2")
#   BENCH_BATCHES     decode batch sizes (default: "1,8")
#   BENCH_ROUNDS      interleaved rounds (default: 3); medians are reported
#   BENCH_FORMATS     rows (default: "f32 bf16 int8"); int8 needs a binary with --quantize
#   BENCH_INT8_DTYPE  the runtime's --dtype with --quantize int8 (default: bf16)
#   BENCH_FLASH_ATTN  llama.cpp -fa: on, off or auto (default: on)
#   BENCH_KV_TYPE     llama.cpp -ctk/-ctv: f16, bf16 or q8_0 (default: f16)
#   BENCH_BASELINE    a baleen-runtime binary of an earlier build, run as a third engine in the same rounds (the
#                     three take turns going first); the table gains its tok/s and the runtime's ratio to it
#
# One JSON line per measurement goes to $CARGO_TARGET_DIR/bench/llamacpp.jsonl; a markdown table is printed.
# Not run by CI or the tests.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init bench-llamacpp
BIN="$CARGO_TARGET_DIR/release/baleen-runtime"
OUT_DIR="$CARGO_TARGET_DIR/bench"
MODEL="${BENCH_MODEL:-$OUT_DIR/v2lite-l4}"
LLAMA="${BENCH_LLAMACPP:-$OUT_DIR/llamacpp}"
JSONL="$OUT_DIR/llamacpp.jsonl"
THREADS="${BENCH_THREADS:-1 2}"
BATCHES="${BENCH_BATCHES:-1,8}"
ROUNDS="${BENCH_ROUNDS:-3}"
FORMATS="${BENCH_FORMATS:-f32 bf16 int8}"
INT8_DTYPE="${BENCH_INT8_DTYPE:-bf16}"
FLASH_ATTN="${BENCH_FLASH_ATTN:-on}"
KV_TYPE="${BENCH_KV_TYPE:-f16}"
BASELINE="${BENCH_BASELINE:-}"
# Pinned tooling: llama.cpp as vendored by this llama-cpp-python release, and the venv's packages.
LLAMA_CPP_PYTHON=0.3.36
PIP_PINS=(cmake==4.4.5 numpy==2.4.6 PyYAML==6.0.4)
PROMPT=64
STEPS=32
PREFILL=512

bench_args 34 "$@"
command -v python3 >/dev/null || die "python3 is required"
for fmt in $FORMATS; do
    case "$fmt" in f32|bf16|int8) ;; *) die "BENCH_FORMATS: unknown format $fmt (accepted: f32 bf16 int8)" ;; esac
done
release_bin baleen-runtime "$BIN"
[[ -z "$BASELINE" || -x "$BASELINE" ]] || die "BENCH_BASELINE: $BASELINE is not an executable file"
help="$("$BIN" bench --help 2>/dev/null || true)"
if [[ " $FORMATS " == *" int8 "* && "$help" != *--quantize* ]]; then
    die "$BIN has no --quantize (an older build?); build a newer one or set BENCH_FORMATS=\"f32 bf16\""
fi
mkdir -p "$OUT_DIR" "$LLAMA"
v2lite_checkpoint "$MODEL" "$OUT_DIR"

# --- llama.cpp tooling, built once (whatever --no-build says: it is not ours to build with cargo) ---
LVENV="$LLAMA/venv"
SRC="$LLAMA/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
BUILD_DIR="$LLAMA/build-$LLAMA_CPP_PYTHON"
LBIN="$BUILD_DIR/bin"
timed() { # timed LABEL LOG CMD...: runs CMD under nice -n 19, its output appended to LOG; says how long it took
    local label="$1" log="$2" start=$SECONDS
    shift 2
    nice -n 19 "$@" >> "$log" 2>&1 || return 1
    say "$label took $((SECONDS - start)) s"
}
if [[ "$(cat "$LVENV/.pins" 2>/dev/null)" != "${PIP_PINS[*]}" ]]; then
    say "creating the llama.cpp tooling venv in $LVENV (${PIP_PINS[*]})"
    [[ -x "$LVENV/bin/python" ]] || python3 -m venv "$LVENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    timed "pip install" "$LLAMA/pip.log" "$LVENV/bin/pip" install --only-binary :all: "${PIP_PINS[@]}" \
        || die "pip install ${PIP_PINS[*]} failed; its log: $LLAMA/pip.log"
    echo "${PIP_PINS[*]}" > "$LVENV/.pins"
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    say "downloading llama-cpp-python==$LLAMA_CPP_PYTHON's sdist (it vendors llama.cpp) into $LLAMA"
    # --no-binary for this package only: with `:all:` pip would also build its build dependencies (cmake!) from
    # source just to read the sdist's metadata.
    timed "pip download" "$LLAMA/pip.log" "$LVENV/bin/pip" download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$LLAMA" \
        || die "pip download llama-cpp-python==$LLAMA_CPP_PYTHON failed; its log: $LLAMA/pip.log"
    tar -xzf "$LLAMA/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$LLAMA" || die "unpacking the sdist failed"
    [[ -f "$SRC/CMakeLists.txt" ]] || die "the sdist has no vendor/llama.cpp"
fi
if [[ ! -x "$LBIN/llama-bench" || ! -x "$LBIN/llama-batched-bench" || ! -x "$LBIN/llama-quantize" ]]; then
    say "building llama.cpp (llama-bench, llama-batched-bench, llama-quantize; CPU, -march=native) in $BUILD_DIR;" \
        "about 6-15 minutes on 2 cores, once, --no-build or not; log: $BUILD_DIR.log"
    { timed "cmake configure" "$BUILD_DIR.log" "$LVENV/bin/cmake" -S "$SRC" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release \
            -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF &&
        timed "llama.cpp build" "$BUILD_DIR.log" "$LVENV/bin/cmake" --build "$BUILD_DIR" --config Release \
            -j "$(nproc)" --target llama-bench llama-batched-bench llama-quantize; } \
        || die "building llama.cpp failed; its log: $BUILD_DIR.log"
fi
LLAMA_VERSION="$( { "$LBIN/llama-bench" --version 2>&1 || true; } | sed -n 's/^version: //p' | head -n 1)"

# --- GGUFs of this checkpoint (keyed by its path, config and weight files' sizes and times) ---
MODEL_KEY="$( { realpath "$MODEL"; cat "$MODEL/config.json"; stat -c '%n %s %Y' "$MODEL"/*.safetensors; } | sha256sum | cut -c 1-12)"
GGUF_DIR="$LLAMA/gguf-$(basename "$MODEL")-$MODEL_KEY"
mkdir -p "$GGUF_DIR"
gguf_of() { case "$1" in f32) echo "$GGUF_DIR/f32.gguf" ;; bf16) echo "$GGUF_DIR/bf16.gguf" ;; int8) echo "$GGUF_DIR/q8_0.gguf" ;; esac; }
for fmt in $FORMATS; do
    gguf="$(gguf_of "$fmt")"
    [[ -f "$gguf" ]] && continue
    if [[ "$fmt" == int8 ]]; then
        src="$(gguf_of bf16)"
        if [[ ! -f "$src" ]]; then
            say "writing $src (the source of the Q8_0 file)"
            timed "GGUF bf16" "$GGUF_DIR/bf16.log" "$LVENV/bin/python" scripts/llamacpp-gguf.py "$MODEL" "$src" \
                --outtype bf16 --gguf-py "$SRC/gguf-py" || die "GGUF conversion failed; its log: $GGUF_DIR/bf16.log"
        fi
        say "quantizing $src to Q8_0 with llama-quantize"
        timed "llama-quantize Q8_0" "$GGUF_DIR/q8_0.log" "$LBIN/llama-quantize" "$src" "$gguf.partial" Q8_0 "$(nproc)" \
            || die "llama-quantize failed; its log: $GGUF_DIR/q8_0.log"
        mv "$gguf.partial" "$gguf"
    else
        say "writing $gguf"
        timed "GGUF $fmt" "$GGUF_DIR/$fmt.log" "$LVENV/bin/python" scripts/llamacpp-gguf.py "$MODEL" "$gguf" \
            --outtype "$fmt" --gguf-py "$SRC/gguf-py" || die "GGUF conversion failed; its log: $GGUF_DIR/$fmt.log"
    fi
done

# --- measurements ---
max_batch=0
twice="" # every batch size twice for llama-batched-bench: the best of 2, as the runtime's --repeats 2
for b in ${BATCHES//,/ }; do
    (( b > max_batch )) && max_batch=$b
    twice="${twice:+$twice,}$b,$b"
done
record() { # record ENGINE PHASE ROUND THREADS FORMAT FILE: appends its measurements to $JSONL
    python3 - "$@" >> "$JSONL" <<'PY' || die "could not parse $6"
import json, sys
engine, phase, rnd, threads, fmt, path = sys.argv[1:]
text = open(path).read()
objs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
def out(batch, tps, extra):
    print(json.dumps({"engine": engine, "phase": phase, "round": int(rnd), "threads": int(threads), "format": fmt,
                      "batch": batch, "tokens_per_s": tps, **extra}))
if engine in ("runtime", "baseline"):
    for j in objs:
        key = "decode_tokens_per_s" if phase == "decode" else "prefill_tokens_per_s"
        out(j["batch"], j[key], {"kv_cache_bytes_per_token": j.get("kv_cache_bytes_per_token"),
                                 "weight_bytes": j.get("weight_bytes")})
elif phase == "decode":  # llama-batched-bench --output-format jsonl: one line per -npl entry
    best = {}
    for j in objs:
        best[j["pl"]] = max(best.get(j["pl"], 0.0), j["speed_tg"])
    if not best:
        sys.exit(f"no results in {path}")
    for pl, tps in sorted(best.items()):
        out(pl, tps, {})
else:  # llama-bench -o json: an array with one test
    (test,) = json.loads(text)
    out(1, max(test["samples_ts"]), {"model_size": test["model_size"], "type_k": test["type_k"]})
PY
}
run_llamacpp() { # run_llamacpp ROUND THREADS FORMAT
    local gguf log="$OUT_DIR/llamacpp-run.log" out="$OUT_DIR/llamacpp-run.out"
    gguf="$(gguf_of "$3")"
    "$LBIN/llama-batched-bench" -m "$gguf" -t "$2" -c $((max_batch * (PROMPT + STEPS))) -npp "$PROMPT" -ntg "$STEPS" \
        -npl "$twice" -fa "$FLASH_ATTN" -ctk "$KV_TYPE" -ctv "$KV_TYPE" -lm none --output-format jsonl > "$out" 2> "$log" \
        || die "llama-batched-bench ($3, $2 threads) failed; its log: $log"
    record llamacpp decode "$1" "$2" "$3" "$out"
    "$LBIN/llama-bench" -m "$gguf" -t "$2" -p "$PREFILL" -n 0 -r 2 -fa "$FLASH_ATTN" -ctk "$KV_TYPE" -ctv "$KV_TYPE" \
        -lm none -o json > "$out" 2> "$log" || die "llama-bench ($3, $2 threads) failed; its log: $log"
    record llamacpp prefill "$1" "$2" "$3" "$out"
}
run_runtime() { # run_runtime ROUND THREADS FORMAT [ENGINE BINARY]: the runtime (or the baseline build)
    local engine="${4:-runtime}" bin="${5:-$BIN}" args=(--dtype "$3")
    local log="$OUT_DIR/llamacpp-$engine.log" out="$OUT_DIR/llamacpp-$engine.out"
    [[ "$3" == int8 ]] && args=(--dtype "$INT8_DTYPE" --quantize int8)
    "$bin" bench --model "$MODEL" "${args[@]}" --threads "$2" --batch "$BATCHES" --prompt-len "$PROMPT" \
        --gen-len $((STEPS + 1)) --repeats 2 > "$out" 2> "$log" || die "$engine bench ($3, $2 threads) failed; its log: $log"
    record "$engine" decode "$1" "$2" "$3" "$out"
    "$bin" bench --model "$MODEL" "${args[@]}" --threads "$2" --batch 1 --prompt-len "$PREFILL" --gen-len 1 \
        --repeats 2 > "$out" 2> "$log" || die "$engine bench ($3, $2 threads) failed; its log: $log"
    record "$engine" prefill "$1" "$2" "$3" "$out"
}
run_baseline() { run_runtime "$@" baseline "$BASELINE"; }
engines=(llamacpp runtime)
[[ -n "$BASELINE" ]] && engines+=(baseline)

: > "$JSONL"
run=0
for round in $(seq 1 "$ROUNDS"); do
    for threads in $THREADS; do
        for fmt in $FORMATS; do
            # rotate which engine goes first from one measurement to the next (and so within each row from round
            # to round), so none always runs on a warmer (or hotter) machine
            run=$((run + 1))
            order=()
            for i in "${!engines[@]}"; do order+=("${engines[(run + round + i) % ${#engines[@]}]}"); done
            for engine in "${order[@]}"; do
                say "round $round/$ROUNDS: $engine, $fmt, $threads thread(s)"
                "run_$engine" "$round" "$threads" "$fmt"
            done
        done
    done
done

python3 - "$JSONL" "$MODEL" "$LLAMA_VERSION" "$LLAMA_CPP_PYTHON" "$FLASH_ATTN" "$KV_TYPE" "$ROUNDS" "$INT8_DTYPE" <<'PY'
import collections, json, statistics, sys
path, model, version, sdist, fa, kv, rounds, int8_dtype = sys.argv[1:]
rows = [json.loads(line) for line in open(path)]
runs = collections.defaultdict(list)
for r in rows:
    runs[(r["threads"], r["phase"], r["batch"], r["format"], r["engine"])].append(r["tokens_per_s"])
kv_runtime = {r["format"]: r.get("kv_cache_bytes_per_token") for r in rows if r["engine"] == "runtime"}
print(f"\nllama.cpp {version} (llama-cpp-python {sdist} sdist; CPU, -march=native; -fa {fa}, KV {kv}, -lm none) vs "
      f"baleen-runtime on {model}. Decode: 64-token prompts then 32 steps per sequence (llama-batched-bench S_TG); "
      f"prefill: one 512-token prompt (llama-bench pp512). Best of 2 per run, median over {rounds} round(s). "
      + (f"int8 = runtime --quantize int8 (--dtype {int8_dtype}) vs llama.cpp Q8_0 (llama-quantize). "
         if "int8" in kv_runtime else "")
      + f"Runtime KV cache bytes/token: {', '.join(f'{k} {v}' for k, v in kv_runtime.items())}. "
      + "At batch > 1 llama-batched-bench decodes the same token in every sequence (one set of experts for all): "
      + "an upper bound for llama.cpp.\n")
baseline = any(r["engine"] == "baseline" for r in rows)
extra = (" baseline tok/s | runtime / baseline |", "---:|---:|") if baseline else ("", "")
print("| threads | phase | format | llama.cpp tok/s | runtime tok/s | runtime / llama.cpp |" + extra[0] + " runs |")
print("|---:|:--|:--|---:|---:|---:|" + extra[1] + "---:|")
order = {"f32": 0, "bf16": 1, "int8": 2}
keys = sorted({k[:4] for k in runs}, key=lambda k: (k[0], k[1] == "prefill", k[2], order[k[3]]))
for threads, phase, batch, fmt in keys:
    llama = runs.get((threads, phase, batch, fmt, "llamacpp"), [])
    ours = runs.get((threads, phase, batch, fmt, "runtime"), [])
    lm = statistics.median(llama) if llama else float("nan")
    om = statistics.median(ours) if ours else float("nan")
    label = f"decode, batch {batch}" if phase == "decode" else "prefill 512"
    name = "int8 / Q8_0" if fmt == "int8" else fmt
    ratio = f"{om / lm:.2f}x" if lm > 0 else "-"
    cells, runs_n = "", min(len(llama), len(ours))
    if baseline:
        base = runs.get((threads, phase, batch, fmt, "baseline"), [])
        bm = statistics.median(base) if base else float("nan")
        cells = f" {bm:,.2f} | " + (f"{om / bm:.2f}x" if bm > 0 else "-") + " |"
        runs_n = min(runs_n, len(base))
    print(f"| {threads} | {label} | {name} | {lm:,.2f} | {om:,.2f} | {ratio} |{cells} {runs_n} |")
print()
PY
