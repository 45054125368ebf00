#!/usr/bin/env bash
# Expert parallelism on loopback, side by side in one run (builtin:tiny-moe, one compute thread per process):
#  1. decode tokens/s of `baleen-runtime bench` as the head of EP = 1, 2, 4 groups (the exchange's cost per step);
#  2. HTTP throughput at 32 concurrent requests: one head (EP = 1) vs two data-parallel-attention heads (EP = 2,
#     16 connections each), with wrk (Debian package; installed when missing and running as root) as the load and
#     the servers' own generated-token counters as the measure; then what the exchange costs per round trip.
#   scripts/bench-expert-parallel.sh [--no-build]
# BENCH_MODEL (a checkpoint directory), BENCH_DTYPE, BENCH_MAX_TOKENS, BENCH_DURATION (seconds) change part 2;
# BENCH_SKIP_DECODE=1 skips part 1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init bench-expert-parallel
BIN="$CARGO_TARGET_DIR/release/baleen-runtime"
OUT="$CARGO_TARGET_DIR/bench"
MODEL="${BENCH_MODEL:-builtin:tiny-moe}"
DTYPE="${BENCH_DTYPE:-f32}"
MAX_TOKENS="${BENCH_MAX_TOKENS:-64}"
DURATION="${BENCH_DURATION:-10}"
mkdir -p "$OUT"
bench_args 9 "$@"
release_bin baleen-runtime "$BIN"
need_debs wrk:wrk

peers() { local n=$1 out=""; for _ in $(seq "$n"); do out="$out${out:+,}127.0.0.1:$(free_port)"; done; echo "$out"; }
# start LOG ARGS...: a serve process in the background (in this shell, so stop_all can stop it).
start() { local log=$1; shift; spawn "$BIN" serve --model "$MODEL" --dtype "$DTYPE" --host 127.0.0.1 --threads 1 "$@" >"$log" 2>/dev/null; }
# addr LOG: HOST:PORT of the process's HTTP listening line (printed once the model is loaded).
addr() { local url; url="$(listening_url "$1" baleen-runtime)" || exit 1; echo "${url#http://}"; }
ready() { wait_ready "http://$1"; }
LUA="$OUT/ep-completions.lua"
cat >"$LUA" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{"prompt": "The baleen whale filters krill from", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true}]]
LUA
sed -i "s/MAX_TOKENS/$MAX_TOKENS/" "$LUA"
# load ADDR CONNECTIONS: wrk for DURATION seconds.
load() { wrk -t1 -c"$2" -d"${DURATION}s" --timeout 120s -s "$LUA" "http://$1/v1/completions" >/dev/null; }
# generated ADDR...: the servers' generated tokens so far.
generated() { local t=0; for a in "$@"; do t=$((t + $(curl -sf "http://$a/metrics" | awk '/^vllm:generation_tokens_total/ {s += $2} END {printf "%d", s}'))); done; echo "$t"; }
now() { date +%s.%N; }

if [[ "${BENCH_SKIP_DECODE:-0}" != 1 ]]; then
echo "## decode tokens/s as the head of an EP group (bench --batch B --prompt-len 16 --gen-len 32)"
echo "| EP | batch 1 | batch 8 | batch 32 | step ms at batch 1 |"
echo "|---:|---:|---:|---:|---:|"
for ep in 1 2 4; do
  P=$(peers "$ep"); row="| $ep "; step=""
  for r in $(seq 1 $((ep - 1))); do start "$OUT/ep-rank$r.log" --port 0 --rank "$r" --world-size "$ep" --peers "$P"; addr "$OUT/ep-rank$r.log" >/dev/null; done
  for b in 1 8 32; do
    args=(bench --model "$MODEL" --batch "$b" --prompt-len 16 --gen-len 32 --repeats 3 --threads 1)
    [[ "$ep" == 1 ]] || args+=(--rank 0 --world-size "$ep" --peers "$P")
    j=$("$BIN" "${args[@]}" 2>/dev/null)
    row="$row| $(python3 -c "import json,sys; print(round(json.loads(sys.argv[1])['decode_tokens_per_s']))" "$j") "
    [[ "$b" != 1 ]] || step=$(python3 -c "import json,sys; print(round(json.loads(sys.argv[1])['decode_step_ms'],3))" "$j")
  done
  echo "$row| $step |"
  stop_all
done
fi

echo
echo "## HTTP at 32 concurrent requests, $MAX_TOKENS tokens each ($MODEL, $DTYPE, ${DURATION}s)"
# cpu PID...: user+system seconds the processes have used so far.
cpu() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; python3 -c "print($t / $(getconf CLK_TCK))"; }
start "$OUT/ep-single.log" --port 0; A=$(addr "$OUT/ep-single.log"); ready "$A"
c0=$(cpu "${PIDS[0]}"); g0=$(generated "$A"); t0=$(now)
load "$A" 32
one_cpu=$(python3 -c "print($(cpu "${PIDS[0]}") - $c0)"); one_tokens=$(($(generated "$A") - g0)); one_s=$(python3 -c "print($(now) - $t0)")
stop_all
P=$(peers 2)
start "$OUT/ep-head0.log" --port 0 --rank 0 --world-size 2 --peers "$P" --data-parallel-attention
start "$OUT/ep-head1.log" --port 0 --rank 1 --world-size 2 --peers "$P" --data-parallel-attention
A0=$(addr "$OUT/ep-head0.log"); A1=$(addr "$OUT/ep-head1.log")
ready "$A0"; ready "$A1"
c0=$(cpu "${PIDS[@]}"); g0=$(generated "$A0" "$A1"); t0=$(now)
load "$A0" 16 & first=$!
load "$A1" 16; wait "$first"
two_cpu=$(python3 -c "print($(cpu "${PIDS[@]}") - $c0)"); two_tokens=$(($(generated "$A0" "$A1") - g0)); two_s=$(python3 -c "print($(now) - $t0)")
stop_all
# MoE layers of the model: one round trip each per step.
moe_layers=$(python3 - "$MODEL" <<'PY'
import json, pathlib, sys
model = sys.argv[1]
if model.startswith("builtin:"):
    print(3)  # tiny-moe: 4 layers, the first dense
else:
    c = json.loads((pathlib.Path(model) / "config.json").read_text())
    print(c["num_hidden_layers"] - c.get("first_k_dense_replace", 0))
PY
)
# What one round trip between two processes costs this machine's kernel: blocking loopback TCP, 8 KiB each way
# (about a batch-16 dispatch of the tiny model), no gRPC, no compute.
floor=$(python3 - <<'PY'
import os, resource, socket
N, SIZE = 20000, 8192
msg = b"x" * SIZE
def recv_exact(s, n):
    buf = bytearray(n); view = memoryview(buf); got = 0
    while got < n:
        got += s.recv_into(view[got:])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
pid = os.fork()
if pid == 0:
    c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(N):
        recv_exact(c, SIZE); c.sendall(msg)
    os._exit(0)
s = socket.create_connection(srv.getsockname()); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(N):
    s.sendall(msg); recv_exact(s, SIZE)
os.waitpid(pid, 0)
me, kid = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print((me.ru_stime + kid.ru_stime) / N * 1e6)
PY
)
python3 - "$one_tokens" "$one_s" "$two_tokens" "$two_s" "$one_cpu" "$two_cpu" "$(nproc)" "$floor" "$moe_layers" <<'PY'
import sys
one_tokens, one_s, two_tokens, two_s, one_cpu, two_cpu, cores, floor, moe_layers = map(float, sys.argv[1:])
one, two = one_tokens / one_s, two_tokens / two_s
print("| setup | generated tok/s | CPU per token |")
print("|:--|---:|---:|")
print(f"| EP=1, one head | {one:,.0f} | {one_cpu / one_tokens * 1e6:.1f} us |")
print(f"| EP=2, two data-parallel heads | {two:,.0f} | {two_cpu / two_tokens * 1e6:.1f} us |")
print(f"\nEP=2 with data-parallel attention / EP=1: {two/one:.2f}x (goal >= 1.6x)")
# Each head runs 16 sequences per step and makes one round trip per MoE layer per step.
per_trip = 16 / moe_layers
spent = (two_cpu / two_tokens - one_cpu / one_tokens) * per_trip * 1e6
budget = (cores / (1.6 * one) - one_cpu / one_tokens) * per_trip * 1e6
print(f"CPU per round trip beyond one head's CPU per token (the exchange, both sides, and each head's smaller batch): {spent:.0f} us")
print(f"CPU per round trip that 1.6x leaves on {cores:.0f} cores: {budget:.0f} us")
print(f"kernel CPU of a bare blocking loopback round trip (two processes, 8 KiB each way): {floor:.0f} us")
PY
