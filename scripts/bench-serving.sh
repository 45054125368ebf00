#!/usr/bin/env bash
# HTTP serving throughput of `baleen-runtime serve --model builtin:tiny-moe` under wrk, at several concurrencies.
#
#   scripts/bench-serving.sh             # builds baleen-runtime (release), then benchmarks
#   scripts/bench-serving.sh --no-build  # benchmarks the binary already in $CARGO_TARGET_DIR/release (says so)
#
# Each wrk connection sends POST /v1/completions with a fixed prompt, "max_tokens": 64, "ignore_eos": true and
# temperature 0, back to back, so concurrency = connections. Every completed request generates exactly 64 tokens:
# generated tokens/s = requests/s x 64, cross-checked against the server's vllm:generation_tokens_total delta.
# The server runs with `--threads 1` (one compute thread, the setting the runtime picks for small models on
# these 2-core machines; see scripts/bench-runtime.sh) and `--max-num-seqs 64`; prefix caching is on (the
# default), so after the first request the fixed prompt is served from the cache. wrk runs one thread.
#
# Environment (all optional):
#   CARGO_TARGET_DIR        build directory (default: <repo>/target)
#   BENCH_CONCURRENCY       concurrencies (default: "1 8 32")
#   BENCH_DURATION          seconds measured per concurrency (default: 15)
#   BENCH_WARMUP            seconds of warm-up per concurrency, not measured (default: 3)
#   BENCH_MAX_TOKENS        tokens per request (default: 64)
#   BENCH_SERVER_ARGS       extra `serve` flags, e.g. "--device cuda --dtype bf16" (a build with --features cuda)
#   BENCH_MODEL             the model to serve (default: builtin:tiny-moe), e.g. a checkpoint directory
#
# Raw wrk output and one JSON line per concurrency go to $CARGO_TARGET_DIR/bench/ (serving-c*.txt,
# serving.jsonl); a markdown table is printed. The goal (tokens/s at the highest concurrency >= 6x tokens/s at
# concurrency 1) is printed, not asserted.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init bench-serving
CONCURRENCY="${BENCH_CONCURRENCY:-1 8 32}"
DURATION="${BENCH_DURATION:-15}"
WARMUP="${BENCH_WARMUP:-3}"
MAX_TOKENS="${BENCH_MAX_TOKENS:-64}"
BIN="$CARGO_TARGET_DIR/release/baleen-runtime"
OUT_DIR="$CARGO_TARGET_DIR/bench"
JSONL="$OUT_DIR/serving.jsonl"
LUA="$OUT_DIR/serving-completions.lua"
SERVER_LOG="$OUT_DIR/serving-server.log"
PROMPT="The baleen whale filters krill from"
MODEL=tiny-moe
GOAL=6

bench_args 24 "$@"
command -v python3 >/dev/null || die "python3 is required (metrics parsing and the table)"
command -v curl >/dev/null || die "curl is required (scraping /metrics)"
need_debs wrk:wrk
release_bin baleen-runtime "$BIN"

mkdir -p "$OUT_DIR"
: > "$JSONL"

# The request, and a done() hook that prints wrk's numbers as one JSON line (latencies in microseconds).
BODY="$(PROMPT="$PROMPT" MODEL="$MODEL" MAX_TOKENS="$MAX_TOKENS" python3 -c '
import json, os
print(json.dumps({"model": os.environ["MODEL"], "prompt": os.environ["PROMPT"],
                  "max_tokens": int(os.environ["MAX_TOKENS"]), "temperature": 0, "ignore_eos": True}))')"
cat > "$LUA" <<LUA
wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[$BODY]]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "max_us": %d, "err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, ' ..
    '"err_timeout": %d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
LUA

# ---- the server
STDOUT_FILE="$OUT_DIR/serving-server.stdout"
read -r -a EXTRA_ARGS <<< "${BENCH_SERVER_ARGS:-}"
SERVER_CMD=("$BIN" serve --model "${BENCH_MODEL:-builtin:tiny-moe}" --served-model-name "$MODEL" --host 127.0.0.1 --port 0 --max-num-seqs 64 --threads 1 "${EXTRA_ARGS[@]}")
say "starting: ${SERVER_CMD[*]}"
BALEEN_RUNTIME_LOG="${BALEEN_RUNTIME_LOG:-warn}" spawn "${SERVER_CMD[@]}" > "$STDOUT_FILE" 2> "$SERVER_LOG"
URL="$(listening_url "$STDOUT_FILE" baleen-runtime "${PIDS[-1]}")" || die "no server; its log: $SERVER_LOG"
wait_ready "$URL"
say "server at $URL"

# metric NAME: the sum of every sample of NAME (all label sets) in /metrics.
metric() {
    curl -sf "$URL/metrics" | NAME="$1" python3 -c '
import os, sys
name, total = os.environ["NAME"], 0.0
for line in sys.stdin:
    if line.startswith(name) and line[len(name)] in " {":
        total += float(line.rsplit(" ", 1)[1])
print(repr(total))'
}

# Waits until the engine has nothing running or waiting (requests wrk abandoned at the end of a run finish).
settle() {
    for _ in $(seq 1 300); do
        local busy
        busy="$(python3 -c "print(int($(metric vllm:num_requests_running) + $(metric vllm:num_requests_waiting)))")"
        [[ "$busy" == 0 ]] && return 0
        sleep 0.1
    done
    die "the server still had requests in flight 30 s after wrk stopped"
}

# A sanity request: the body is accepted and yields exactly MAX_TOKENS tokens.
check="$(curl -sf -H 'Content-Type: application/json' -d "$BODY" "$URL/v1/completions")" \
    || die "the benchmark request failed: $(curl -s -H 'Content-Type: application/json' -d "$BODY" "$URL/v1/completions")"
got="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["usage"]["completion_tokens"])' "$check")"
[[ "$got" == "$MAX_TOKENS" ]] || die "the benchmark request generated $got tokens, not $MAX_TOKENS"

run_id="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
for c in $CONCURRENCY; do
    raw="$OUT_DIR/serving-c$c.txt"
    say "concurrency $c: warm-up ${WARMUP}s"
    wrk -t 1 -c "$c" -d "${WARMUP}s" --timeout 30s -s "$LUA" "$URL" > "$OUT_DIR/serving-c$c-warmup.txt" \
        || die "wrk warm-up failed at concurrency $c"
    settle
    gen0="$(metric vllm:generation_tokens_total)"
    ok0="$(metric vllm:request_success_total)"
    say "concurrency $c: measuring ${DURATION}s"
    wrk -t 1 -c "$c" -d "${DURATION}s" --timeout 30s --latency -s "$LUA" "$URL" > "$raw" \
        || die "wrk failed at concurrency $c (output: $raw)"
    settle
    gen1="$(metric vllm:generation_tokens_total)"
    ok1="$(metric vllm:request_success_total)"
    line="$(sed -n 's/^WRK_JSON //p' "$raw")"
    [[ -n "$line" ]] || die "wrk printed no summary at concurrency $c (output: $raw)"
    C="$c" GEN="$(python3 -c "print($gen1 - $gen0)")" OK="$(python3 -c "print($ok1 - $ok0)")" \
        MAX_TOKENS="$MAX_TOKENS" RUN_ID="$run_id" python3 -c '
import json, os, sys
o = json.loads(sys.argv[1])
o.update(concurrency=int(os.environ["C"]), run_id=os.environ["RUN_ID"], max_tokens=int(os.environ["MAX_TOKENS"]),
         metrics_generation_tokens=float(os.environ["GEN"]), metrics_requests_finished=float(os.environ["OK"]))
print(json.dumps(o))' "$line" >> "$JSONL"
done

stop_all
say "raw results in $OUT_DIR (serving.jsonl, serving-c*.txt, serving-server.log)"
echo
python3 - "$JSONL" "$GOAL" "$PROMPT" "$BIN" "${BENCH_SERVER_ARGS:-}" "${BENCH_MODEL:-builtin:tiny-moe}" <<'PY'
import json, sys
path, goal, prompt, binary, extra, model = sys.argv[1:7]
goal = float(goal)
rows = [json.loads(l) for l in open(path) if l.strip()]
device = extra if "--device" in extra else (extra + " (CPU)").strip()
print(f"`{binary} serve --model {model} --max-num-seqs 64 --threads 1` {device}, wrk 1 thread; "
      f"POST /v1/completions, prompt {prompt!r}, max_tokens {rows[0]['max_tokens']}, ignore_eos, temperature 0; "
      f"{rows[0]['duration_us'] / 1e6:.0f} s per concurrency after a warm-up")
print()
print("| concurrency | requests/s | generated tok/s (req/s × max_tokens) | tok/s from /metrics | p50 ms | p99 ms "
      "| errors |")
print("|---:|---:|---:|---:|---:|---:|---:|")
tps = {}
for o in rows:
    secs = o["duration_us"] / 1e6
    rps = o["requests"] / secs
    tok = rps * o["max_tokens"]
    tps[o["concurrency"]] = tok
    # The metrics delta also counts requests wrk abandoned when its time ran out (they finish server-side).
    mtok = o["metrics_generation_tokens"] / secs
    errors = o["err_connect"] + o["err_read"] + o["err_write"] + o["err_status"] + o["err_timeout"]
    print(f"| {o['concurrency']} | {rps:.1f} | {tok:.0f} | {mtok:.0f} | {o['p50_us'] / 1e3:.1f} "
          f"| {o['p99_us'] / 1e3:.1f} | {errors} |")
    extra = o["metrics_generation_tokens"] - o["requests"] * o["max_tokens"]
    if not (0 <= extra <= o["concurrency"] * o["max_tokens"]):
        print(f"\nWARNING: at concurrency {o['concurrency']} /metrics counted {o['metrics_generation_tokens']:.0f} "
              f"generated tokens but wrk completed {o['requests']} x {o['max_tokens']}", file=sys.stderr)
lo, hi = min(tps), max(tps)
if lo != hi:
    ratio = tps[hi] / tps[lo]
    verdict = "met" if ratio >= goal else "NOT met"
    print()
    print(f"aggregate tok/s at concurrency {hi} / at {lo}: {ratio:.2f}× (goal ≥ {goal:g}×: {verdict})")
PY
