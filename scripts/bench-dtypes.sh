#!/usr/bin/env bash
# CPU decode and prefill by weight dtype: `baleen-runtime bench` on a DeepSeek-V2-Lite-shaped random checkpoint
# (scripts/make-random-checkpoint.py --layers 4: 2.25 B parameters, 4.2 GiB in bf16), f32, bf16, int8 and FP8 (the
# same shapes with FP8 projections, --fp8: 2.5 GiB) side by side, interleaved over rounds; optionally a second
# binary (an earlier build) in the same rounds as the baseline.
#
#   scripts/bench-dtypes.sh             # builds baleen-runtime (release), then benchmarks
#   scripts/bench-dtypes.sh --no-build  # uses the binary already in $CARGO_TARGET_DIR/release (says so)
#
# Environment (all optional):
#   BENCH_MODEL       checkpoint directory (default: $CARGO_TARGET_DIR/bench/v2lite-l4, generated when missing with
#                     numpy in $CARGO_TARGET_DIR/bench/venv)
#   BENCH_FP8_MODEL   the FP8 checkpoint (default: $CARGO_TARGET_DIR/bench/v2lite-l4-fp8, generated alike)
#   BENCH_BASELINE    another baleen-runtime binary run in the same rounds (e.g. a build of an earlier commit)
#   BENCH_THREADS     compute threads (default: "1 2")
#   BENCH_BATCHES     decode batch sizes (default: "1,8")
#   BENCH_ROUNDS      interleaved rounds (default: 2); medians are reported
#   BENCH_DTYPES      weight formats (default: "f32 bf16 int8 fp8"; int8 is --dtype bf16 --quantize int8, fp8 is
#                     the FP8 checkpoint with --dtype bf16 --quantize fp8)
#
# One JSON line per run goes to $CARGO_TARGET_DIR/bench/dtypes.jsonl; a markdown table is printed.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init bench-dtypes
BIN="$CARGO_TARGET_DIR/release/baleen-runtime"
OUT_DIR="$CARGO_TARGET_DIR/bench"
MODEL="${BENCH_MODEL:-$OUT_DIR/v2lite-l4}"
FP8_MODEL="${BENCH_FP8_MODEL:-$OUT_DIR/v2lite-l4-fp8}"
JSONL="$OUT_DIR/dtypes.jsonl"
THREADS="${BENCH_THREADS:-1 2}"
BATCHES="${BENCH_BATCHES:-1,8}"
ROUNDS="${BENCH_ROUNDS:-2}"
DTYPES="${BENCH_DTYPES:-f32 bf16 int8 fp8}"

bench_args 18 "$@"
command -v python3 >/dev/null || die "python3 is required"
release_bin baleen-runtime "$BIN"
mkdir -p "$OUT_DIR"
v2lite_checkpoint "$MODEL" "$OUT_DIR"
[[ " $DTYPES " == *" fp8 "* ]] && v2lite_checkpoint "$FP8_MODEL" "$OUT_DIR" --fp8
BINS=(ours)
[[ -n "${BENCH_BASELINE:-}" ]] && { [[ -x "$BENCH_BASELINE" ]] || die "$BENCH_BASELINE is not executable"; BINS+=(baseline); }

: > "$JSONL"
for round in $(seq 1 "$ROUNDS"); do
    for threads in $THREADS; do
        for dtype in $DTYPES; do
            for which in "${BINS[@]}"; do
                bin="$BIN"
                [[ "$which" == baseline ]] && bin="$BENCH_BASELINE"
                say "round $round: $which, $dtype, $threads thread(s)"
                format=(--dtype "$dtype")
                model="$MODEL"
                if [[ "$dtype" == int8 || "$dtype" == fp8 ]]; then
                    format=(--dtype bf16 --quantize "$dtype")
                    [[ "$dtype" == fp8 ]] && model="$FP8_MODEL"
                    help="$("$bin" bench --help 2>/dev/null || true)"
                    [[ "$help" == *--quantize*"$dtype"* ]] || { say "($which has no --quantize $dtype: skipped)"; continue; }
                fi
                "$bin" bench --model "$model" "${format[@]}" --threads "$threads" --batch "$BATCHES" \
                    --prompt-len 64 --gen-len 17 --repeats 2 > "$OUT_DIR/dtypes-run.out" 2> "$OUT_DIR/dtypes-run.log" \
                    || die "$which bench ($dtype, $threads threads) failed; its log: $OUT_DIR/dtypes-run.log"
                while read -r line; do
                    if [[ "$line" == "{"* ]]; then
                        echo "{\"bin\": \"$which\", \"round\": $round, \"run\": $line}" >> "$JSONL"
                    fi
                done < "$OUT_DIR/dtypes-run.out"
            done
        done
    done
done

python3 - "$JSONL" "$MODEL" "$FP8_MODEL" <<'PY'
import collections, json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
runs = collections.defaultdict(list)
for r in rows:
    j = r["run"]
    fmt = j["quantize"] if j.get("quantize", "none") != "none" else j["dtype"]
    runs[(j["threads"], j["batch"], fmt, r["bin"])].append(j)
fp8 = f" (fp8: {sys.argv[3]})" if any(k[2] == "fp8" for k in runs) else ""
print(f"\n`baleen-runtime bench` on {sys.argv[2]}{fp8} (prompt 64, 16 decode steps, best of 2 per run; median over rounds)\n")
print("| threads | batch | weights | binary | decode tok/s | 64-token prefill tok/s | resident weight GiB | runs |")
print("|---:|---:|:--|:--|---:|---:|---:|---:|")
for (threads, batch, dtype, which), js in sorted(runs.items()):
    decode = statistics.median(j["decode_tokens_per_s"] for j in js)
    prefill = statistics.median(j["prefill_tokens_per_s"] for j in js)
    gib = js[0].get("weight_bytes", 0) / 2**30
    print(f"| {threads} | {batch} | {dtype} | {which} | {decode:,.2f} | {prefill:,.1f} | {gib:.2f} | {len(js)} |")
def decode(key):
    return statistics.median(j["decode_tokens_per_s"] for j in runs[key]) if key in runs else None
for (threads, batch, dtype, which) in sorted(runs):
    f32, ours = decode((threads, batch, "f32", which)), decode((threads, batch, dtype, which))
    if dtype != "f32" and f32:
        print(f"\n{threads} thread(s), batch {batch}, {which}: {dtype} decode / f32 decode = {ours / f32:.2f}x", end="")
print()
PY
