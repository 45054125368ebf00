#!/usr/bin/env bash
# What the gateway adds to a request, against nginx doing the same proxying, all legs in one run on this machine.
#
#   scripts/bench-gateway.sh             # builds baleen-gateway (release), then benchmarks
#   scripts/bench-gateway.sh --no-build  # uses the binary already in $CARGO_TARGET_DIR/release (says so)
#
# The backend is an nginx `return 200` of a small chat-completion JSON (and a static vLLM metrics page and
# /ready for the gateway's probes), so no model compute hides the proxy's cost. Three legs, interleaved in
# rounds so drift on a shared machine hits each alike:
#   direct   wrk -> backend
#   nginx    wrk -> nginx (proxy_pass to an upstream with keepalive, HTTP/1.1) -> backend
#   gateway  wrk -> baleen-gateway (least-load, one model, the backend its only replica) -> backend
# at concurrency 1 (latency: p50/p99; added = leg - direct) and 32 (throughput: requests/s, and the CPU time the
# leg's server spent per request, from /proc: steadier than requests/s on a shared machine, since it does not
# count the time the server waited for a core). wrk runs one thread; the median over the rounds is reported.
# Then the streamed time to first token on the tiny model, direct vs through the gateway (time to the first
# `data:` event carrying text, sequential requests, alternating).
#
# Goal (issue 13): gateway-added p50 and p99 at c=1 <= nginx's, and c=32 throughput >= nginx's; printed, not
# asserted (the machines are shared and noisy: compare the ratios).
#
# Environment (all optional):
#   CARGO_TARGET_DIR   build directory (default: <repo>/target)
#   BENCH_DURATION     seconds per measured leg (default: 5)
#   BENCH_ROUNDS       rounds of the three legs (default: 3)
#   BENCH_TTFT_N       streamed requests per side for the TTFT comparison (default: 30; 0 skips it)
#   BENCH_RUNTIME_BIN  runtime for the TTFT leg (default: release build if present, else the debug build)
#   BENCH_BASELINE     another baleen-gateway binary (e.g. a build of an earlier commit), run as a fourth leg
#                      ("baseline") in the same rounds
#   BENCH_PIN          CPU lists OUTSIDE:PROXY (e.g. 0:1): the backend, the runtime and wrk run on OUTSIDE, the nginx
#                      proxy and the gateways on PROXY (taskset; each then sizes itself to those CPUs), so every
#                      proxy leg pays the same wake-ups across CPUs. Unpinned, where the scheduler happens to put
#                      each process decides c=1 latency as much as the proxy's own work: on a small VM one
#                      wake-up across CPUs costs tens of µs.
# Raw output goes to $CARGO_TARGET_DIR/bench/gateway/; a markdown table is printed.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init bench-gateway
DURATION="${BENCH_DURATION:-5}"
ROUNDS="${BENCH_ROUNDS:-3}"
TTFT_N="${BENCH_TTFT_N:-30}"
GATEWAY="$CARGO_TARGET_DIR/release/baleen-gateway"
OUT="$CARGO_TARGET_DIR/bench/gateway"

bench_args 28 "$@"
command -v python3 >/dev/null || die "python3 is required"
command -v curl >/dev/null || die "curl is required"
need_debs wrk:wrk nginx:nginx-light
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# Command prefixes that pin to the OUTSIDE and PROXY CPUs (empty: unpinned). taskset execs the command, so
# `spawn` records the server's own PID.
OUTSIDE=() PROXY=()
if [[ -n "${BENCH_PIN:-}" ]]; then
    [[ "$BENCH_PIN" =~ ^[0-9,-]+:[0-9,-]+$ ]] || die "BENCH_PIN must be OUTSIDE:PROXY CPU lists, like 0:1"
    command -v taskset >/dev/null || die "taskset (util-linux) is required for BENCH_PIN"
    OUTSIDE=(taskset -c "${BENCH_PIN%%:*}") PROXY=(taskset -c "${BENCH_PIN##*:}")
fi
release_bin baleen-gateway "$GATEWAY"
RUNTIME="${BENCH_RUNTIME_BIN:-}"
if [[ -z "$RUNTIME" && "$TTFT_N" != 0 ]]; then
    if [[ -x "$CARGO_TARGET_DIR/release/baleen-runtime" ]]; then
        RUNTIME="$CARGO_TARGET_DIR/release/baleen-runtime"
    else
        (( BUILD )) && { cargo build -p baleen-runtime || die "cargo build -p baleen-runtime failed"; }
        RUNTIME="$CARGO_TARGET_DIR/debug/baleen-runtime"
    fi
fi

rm -rf "$OUT"
mkdir -p "$OUT"
BACKEND_PORT="$(free_port)"
PROXY_PORT="$(free_port)"

# ---- nginx: the fixed-response backend and the reference proxy (each its own prefix, in the foreground).
ANSWER='{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"The baleen whale filters krill."},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":7,"total_tokens":15}}'
METRICS_PAGE='# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="bench"} 0\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="bench"} 0\n# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="bench"} 0\n'
nginx_conf() { # NAME WORKERS PIN SERVER_BLOCK (PIN: OUTSIDE or PROXY)
    local dir="$OUT/nginx-$1"
    mkdir -p "$dir/tmp"
    cat > "$dir/nginx.conf" <<CONF
worker_processes $2;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_buffer_size 64k;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
$4
}
CONF
    local -n pin="$3"
    spawn "${pin[@]}" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' 2> "$dir/stderr.log"
}
declare -A LEG_PID  # the process each leg's CPU time is read from (with its child processes: nginx's workers)
nginx_conf backend 1 OUTSIDE "    server {
        listen 127.0.0.1:$BACKEND_PORT;
        location = /v1/chat/completions { default_type application/json; return 200 '$ANSWER'; }
        location = /metrics { default_type text/plain; return 200 '$(printf "$METRICS_PAGE")'; }
        location = /ready { default_type application/json; return 200 '{\"status\":\"ready\"}'; }
    }"
LEG_PID[direct]="${PIDS[-1]}"
# One nginx worker and one gateway event loop per CPU the proxies may use (their affinity mask).
PROXY_WORKERS="$("${PROXY[@]}" python3 -c 'import os; print(len(os.sched_getaffinity(0)))')"
nginx_conf proxy "$PROXY_WORKERS" PROXY "    upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$PROXY_PORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
LEG_PID[nginx]="${PIDS[-1]}"

# ---- the runtime for the TTFT leg
RUNTIME_URL=""
if [[ "$TTFT_N" != 0 ]]; then
    BALEEN_RUNTIME_LOG=warn spawn "${OUTSIDE[@]}" "$RUNTIME" serve --model builtin:tiny-moe --host 127.0.0.1 \
        --port 0 --threads 1 > "$OUT/runtime.stdout" 2> "$OUT/runtime.log"
    RUNTIME_URL="$(listening_url "$OUT/runtime.stdout" baleen-runtime "${PIDS[-1]}")" \
        || die "no runtime; its log: $OUT/runtime.log"
fi

# ---- the gateway: model `bench` on the nginx backend, `tiny-moe` on the runtime.
{
    echo "models:"
    echo "  - name: bench"
    echo "    backends: [http://127.0.0.1:$BACKEND_PORT]"
    [[ -n "$RUNTIME_URL" ]] && { echo "  - name: tiny-moe"; echo "    backends: [$RUNTIME_URL]"; }
} > "$OUT/gateway.yaml"
BALEEN_GATEWAY_LOG=warn BALEEN_GATEWAY_WORKERS="$PROXY_WORKERS" spawn "${PROXY[@]}" "$GATEWAY" serve \
    --config "$OUT/gateway.yaml" --host 127.0.0.1 --port 0 --admin-port 0 > "$OUT/gateway.stdout" 2> "$OUT/gateway.log"
GATEWAY_URL="$(listening_url "$OUT/gateway.stdout" baleen-gateway "${PIDS[-1]}")" \
    || die "no gateway; its log: $OUT/gateway.log"
LEG_PID[gateway]="${PIDS[-1]}"
LEGS=(direct nginx gateway)
declare -A URLS=([direct]="http://127.0.0.1:$BACKEND_PORT" [nginx]="http://127.0.0.1:$PROXY_PORT" [gateway]="$GATEWAY_URL")
if [[ -n "${BENCH_BASELINE:-}" ]]; then
    [[ -x "$BENCH_BASELINE" ]] || die "$BENCH_BASELINE is not executable"
    BALEEN_GATEWAY_LOG=warn BALEEN_GATEWAY_WORKERS="$PROXY_WORKERS" spawn "${PROXY[@]}" "$BENCH_BASELINE" serve \
        --config "$OUT/gateway.yaml" --host 127.0.0.1 --port 0 --admin-port 0 \
        > "$OUT/baseline.stdout" 2> "$OUT/baseline.log"
    URLS[baseline]="$(listening_url "$OUT/baseline.stdout" baleen-gateway "${PIDS[-1]}")" \
        || die "no baseline gateway; its log: $OUT/baseline.log"
    LEG_PID[baseline]="${PIDS[-1]}"
    LEGS+=(baseline)
fi

BODY='{"model":"bench","messages":[{"role":"user","content":"Tell me about baleen whales."}],"max_tokens":16}'
for leg in "${LEGS[@]}"; do
    url="${URLS[$leg]}"
    ok=""
    for _ in $(seq 1 100); do
        if [[ "$(curl -s -o "$OUT/check-$leg.json" -w '%{http_code}' -H 'Content-Type: application/json' -d "$BODY" "$url/v1/chat/completions")" == 200 ]]; then
            ok=1; break
        fi
        sleep 0.1
    done
    [[ -n "$ok" ]] || die "$leg ($url) never answered 200: $(cat "$OUT/check-$leg.json" 2>/dev/null)"
    cmp -s "$OUT/check-$leg.json" <(printf '%s' "$ANSWER") || die "$leg returned a different body: $(cat "$OUT/check-$leg.json")"
done
say "backend :$BACKEND_PORT, nginx :$PROXY_PORT, gateway $GATEWAY_URL; ${ROUNDS} rounds x ${DURATION}s per leg"

# CPU time (user + system, clock ticks) of a process and its children: the server a leg measures.
cpu_ticks() {
    local pid total=0 t
    for pid in "$1" $(pgrep -P "$1" || true); do
        # utime + stime: fields 14 and 15, counted after the `(name)` field, which may hold spaces.
        t="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}')" || continue
        total=$(( total + ${t:-0} ))
    done
    echo "$total"
}
CLK_TCK="$(getconf CLK_TCK)"

cat > "$OUT/post.lua" <<LUA
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[$BODY]]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"errors": %d}\n', summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
LUA

: > "$OUT/results.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    for c in 1 32; do
        for leg in "${LEGS[@]}"; do
            raw="$OUT/wrk-$leg-c$c-r$round.txt"
            "${OUTSIDE[@]}" wrk -t 1 -c "$c" -d 1s -s "$OUT/post.lua" "${URLS[$leg]}" > /dev/null  # warm up
            ticks="$(cpu_ticks "${LEG_PID[$leg]}")"
            "${OUTSIDE[@]}" wrk -t 1 -c "$c" -d "${DURATION}s" --latency -s "$OUT/post.lua" "${URLS[$leg]}" > "$raw" \
                || die "wrk failed ($raw)"
            ticks=$(( $(cpu_ticks "${LEG_PID[$leg]}") - ticks ))
            line="$(sed -n 's/^WRK_JSON //p' "$raw")"
            [[ -n "$line" ]] || die "wrk printed no summary ($raw)"
            echo "{\"leg\": \"$leg\", \"c\": $c, \"round\": $round, \"cpu_ticks\": $ticks, \"clk_tck\": $CLK_TCK, \"wrk\": $line}" \
                >> "$OUT/results.jsonl"
        done
    done
    say "round $round of $ROUNDS done"
done

# ---- streamed TTFT on the tiny model: direct vs through the gateway.
if [[ -n "$RUNTIME_URL" ]]; then
    "${OUTSIDE[@]}" python3 - "$RUNTIME_URL" "$GATEWAY_URL" "$TTFT_N" > "$OUT/ttft.json" <<'PY'
import http.client, json, sys, time, urllib.parse
direct, gateway, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = json.dumps({"model": "tiny-moe", "messages": [{"role": "user", "content": "Tell me about baleen whales."}],
                   "max_tokens": 16, "temperature": 0, "stream": True})
def ttft(base):
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.status
    first = None
    for line in r:
        if first is None and line.startswith(b"data: {") and b'"content"' in line:
            first = time.perf_counter() - start
    conn.close()
    assert first is not None, "no content event"
    return first
for base in (direct, gateway):  # warm the prefix cache and connections
    ttft(base)
out = {"direct": [], "gateway": []}
for _ in range(n):
    out["direct"].append(ttft(direct))
    out["gateway"].append(ttft(gateway))
print(json.dumps(out))
PY
fi

python3 - "$OUT/results.jsonl" "$OUT/ttft.json" "$DURATION" "$ROUNDS" "$RUNTIME" "${#ANSWER}" "${BENCH_PIN:-}" <<'PY'
import json, os, statistics, sys
path, ttft_path, duration, rounds, runtime, answer_bytes, pin = sys.argv[1:8]
rows = [json.loads(l) for l in open(path) if l.strip()]
def med(leg, c, key):
    vals = [r["wrk"][key] for r in rows if r["leg"] == leg and r["c"] == c]
    return statistics.median(vals)
def rps(leg, c):
    return statistics.median(r["wrk"]["requests"] / (r["wrk"]["duration_us"] / 1e6) for r in rows if r["leg"] == leg and r["c"] == c)
def cpu(leg, c):
    """The server's CPU time per request (µs; the proxy's own for nginx and the gateways, the backend's for direct)."""
    return statistics.median(r["cpu_ticks"] / r["clk_tck"] * 1e6 / r["wrk"]["requests"]
                             for r in rows if r["leg"] == leg and r["c"] == c)
errors = sum(r["wrk"]["errors"] for r in rows)
print(f"POST /v1/chat/completions ({answer_bytes}-byte JSON answer from nginx `return 200`); wrk 1 thread, "
      f"{duration}s per leg, median of {rounds} interleaved rounds; {errors} wrk errors in all; "
      + (f"pinned: backend, runtime and wrk on CPUs {pin.split(':')[0]}, proxies on {pin.split(':')[1]}" if pin
         else "unpinned"))
print()
print("| leg | c=1 p50 | c=1 p99 | added p50 | added p99 | c=32 req/s | c=32 p99 | c=32 CPU/request |")
print("|---|---|---|---|---|---|---|---|")
d50, d99 = med("direct", 1, "p50_us"), med("direct", 1, "p99_us")
for leg in ("direct", "nginx", "gateway", "baseline"):
    if not any(r["leg"] == leg for r in rows):
        continue
    p50, p99 = med(leg, 1, "p50_us"), med(leg, 1, "p99_us")
    added = "—" if leg == "direct" else f"{p50 - d50:+.0f} µs"
    added99 = "—" if leg == "direct" else f"{p99 - d99:+.0f} µs"
    print(f"| {leg} | {p50:.0f} µs | {p99:.0f} µs | {added} | {added99} | {rps(leg, 32):,.0f} | "
          f"{med(leg, 32, 'p99_us'):.0f} µs | {cpu(leg, 32):.1f} µs |")
print()
g50, n50 = med("gateway", 1, "p50_us") - d50, med("nginx", 1, "p50_us") - d50
g99, n99 = med("gateway", 1, "p99_us") - d99, med("nginx", 1, "p99_us") - d99
ratio = rps("gateway", 32) / rps("nginx", 32)
print(f"goal: gateway-added p50 {g50:+.0f} µs vs nginx {n50:+.0f} µs ({'met' if g50 <= n50 else 'NOT met'}); "
      f"p99 {g99:+.0f} µs vs {n99:+.0f} µs ({'met' if g99 <= n99 else 'NOT met'}); "
      f"c=32 throughput gateway/nginx = {ratio:.2f}x ({'met' if ratio >= 1 else 'NOT met'}); "
      f"CPU per request at c=32 gateway/nginx = {cpu('gateway', 32) / cpu('nginx', 32):.2f}x")
if any(r["leg"] == "baseline" for r in rows):
    b50 = med("baseline", 1, "p50_us") - d50
    print(f"against the baseline build: added p50 {g50:+.0f} µs vs {b50:+.0f} µs; c=32 throughput "
          f"gateway/baseline = {rps('gateway', 32) / rps('baseline', 32):.2f}x; CPU per request "
          f"gateway/baseline = {cpu('gateway', 32) / cpu('baseline', 32):.2f}x")
if os.path.getsize(ttft_path) if os.path.exists(ttft_path) else 0:
    t = json.load(open(ttft_path))
    dm, gm = statistics.median(t["direct"]) * 1e3, statistics.median(t["gateway"]) * 1e3
    print(f"streamed TTFT on builtin:tiny-moe ({os.path.basename(os.path.dirname(runtime))} runtime, "
          f"{len(t['direct'])} requests each, median): direct {dm:.2f} ms, through the gateway {gm:.2f} ms "
          f"({gm - dm:+.2f} ms)")
PY
