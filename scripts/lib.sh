# Shared pieces of the scripts/bench-*.sh benchmarks: sourced, never run. Each script calls `bench_init NAME`
# first; it sets ROOT (the repository), CARGO_TARGET_DIR (default <repo>/target) and enters ROOT, and the
# helpers below prefix what they print with NAME.
#
#   bench_init NAME                 ROOT, CARGO_TARGET_DIR, cd ROOT; `die` and `say` name the script
#   bench_args HELP_LINES "$@"      --no-build sets BUILD=0; -h prints lines 2..HELP_LINES of the script
#   need_debs CMD:PACKAGE ...       each CMD on PATH (or in /usr/sbin), else apt-get install as root, else die
#   release_bin PACKAGE BIN         builds PACKAGE (release) unless --no-build; dies unless BIN is executable
#   free_port                       a free TCP port on 127.0.0.1
#   spawn CMD...                    starts CMD in the background and remembers it; `stop_all` (run on EXIT)
#                                   sends SIGTERM to everything spawned, waits (10 s, then SIGKILL)
#   listening_url FILE PROGRAM [PID]  waits (60 s) for PROGRAM's `PROGRAM listening on http://...` line in FILE
#                                   and prints the URL; dies at once if process PID exits first
#   wait_ready URL                  waits (60 s) until URL/ready answers 200

bench_init() {
    BENCH_NAME="$1"
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$ROOT"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    BUILD=1
    PIDS=()
    trap stop_all EXIT
    trap 'exit 130' INT TERM
}

die() { echo "$BENCH_NAME: error: $*" >&2; exit 1; }
say() { echo "$BENCH_NAME: $*" >&2; }

bench_args() {
    local help_lines="$1"
    shift
    for arg in "$@"; do
        case "$arg" in
            --no-build) BUILD=0 ;;
            -h|--help) sed -n "2,${help_lines}p" "$0"; exit 0 ;;
            *) die "unknown argument: $arg (accepted: --no-build)" ;;
        esac
    done
}

need_debs() {
    local missing=() spec cmd
    for spec in "$@"; do
        cmd="${spec%%:*}"
        command -v "$cmd" >/dev/null || [[ -x "/usr/sbin/$cmd" ]] || missing+=("${spec#*:}")
    done
    (( ${#missing[@]} )) || return 0
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]} with apt-get"
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
            || die "apt-get install ${missing[*]} failed"
    else
        die "missing ${missing[*]} (Debian packages: apt-get install ${missing[*]}, as root)"
    fi
}

release_bin() {
    local package="$1" bin="$2"
    if (( BUILD )); then
        say "building $package (release) in $CARGO_TARGET_DIR"
        cargo build --release -p "$package" || die "cargo build --release -p $package failed"
        [[ -x "$bin" ]] || die "$bin was not produced by the build"
    else
        [[ -x "$bin" ]] || die "--no-build: $bin does not exist (build it: cargo build --release -p $package)"
        say "--no-build: NOT rebuilding; using $bin built $(date -u -r "$bin" +%Y-%m-%dT%H:%M:%SZ)"
    fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

spawn() {
    "$@" &
    PIDS+=($!)
}

stop_all() {
    local pid alive
    for pid in "${PIDS[@]:-}"; do [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do # a draining server gets 10 s, then SIGKILL
        alive=0
        for pid in "${PIDS[@]:-}"; do [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]:-}"; do [[ -n "$pid" ]] && { kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; } || true; done
    PIDS=()
}

listening_url() {
    local file="$1" program="$2" pid="${3:-}" url=""
    for _ in $(seq 1 600); do
        url="$(sed -n "s|^$program listening on \(http://[^ ]*\).*|\1|p" "$file" 2>/dev/null | head -n 1)"
        [[ -n "$url" ]] && { echo "$url"; return 0; }
        [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null || die "$program (pid $pid) exited before listening (see its log)"
        sleep 0.1
    done
    die "$program printed no listening line in $file within 60 s"
}

wait_ready() {
    for _ in $(seq 1 600); do
        [[ "$(curl -s -o /dev/null -w '%{http_code}' "$1/ready")" == 200 ]] && return 0
        sleep 0.1
    done
    die "$1/ready never answered 200"
}

# v2lite_checkpoint DIR OUT_DIR [--fp8]: DIR must hold a checkpoint; when it is the default (BENCH_MODEL, with
# --fp8 BENCH_FP8_MODEL, unset) and missing, writes the 4-layer DeepSeek-V2-Lite-shaped random checkpoint there
# (--fp8: its projections in FP8 with 128x128 block scales; numpy in a venv under OUT_DIR; niced).
v2lite_checkpoint() {
    local model="$1" venv="$2/venv" fp8="${3:-}" var=BENCH_MODEL
    [[ -n "$fp8" ]] && var=BENCH_FP8_MODEL
    [[ -f "$model/config.json" ]] && return 0
    [[ -z "${!var:-}" ]] || die "$model has no config.json"
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install -q "numpy==2.4.6" || die "pip install numpy failed"
    say "writing the random checkpoint to $model"
    nice -n 19 "$venv/bin/python" scripts/make-random-checkpoint.py "$model" --preset deepseek-v2-lite --layers 4 ${fp8:+"$fp8"} >&2
}
