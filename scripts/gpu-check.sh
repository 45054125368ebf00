#!/usr/bin/env bash
# GPU checks of prebuilt CUDA binaries, run on a machine with an NVIDIA GPU (CUDA 13 driver and libraries) but no
# Rust toolchain. Build them first on a build machine (README, "Devices, dtypes and threads"):
#
#   scripts/cuda-toolkit-from-pypi.sh /tmp/cuda && source /tmp/cuda/env.sh   # when there is no CUDA toolkit
#   cargo build --release -p baleen-runtime --features cuda
#   cargo test --release -p baleen-runtime --features cuda --test golden --no-run
#
# and put `baleen-runtime`, the `golden-*` test binary (renamed `golden`), and optionally `wrk` (+ its
# libluajit) in one folder:
#
#   scripts/gpu-check.sh DIR [OUTDIR]
#
# It runs, in one go, each step's output going to OUTDIR (default: DIR/out):
#   1. the transformers goldens on CUDA (BALEEN_TEST_DEVICE=cuda), f32 at 1e-4 and bf16 against transformers' bf16;
#   2. `baleen-runtime bench` decode at batch 1, 8, 32 on CUDA f32 and bf16, and the CPU (one thread) beside it;
#   3. scripts/bench-serving.sh on CUDA (f32, bf16) and on the CPU, at 1, 8 and 32 concurrent requests;
#   4. scripts/bench-expert-parallel.sh on the CPU with every core available (one compute thread per process);
#   5. `baleen-runtime bench` on CUDA bf16 over a random-weight checkpoint in DeepSeek-V2-Lite's shapes, its first
#      GPU_CHECK_LAYERS (default 4) layers (scripts/make-random-checkpoint.py; needs python3 with torch or numpy).
#   6. scripts/bench-serving.sh on CUDA bf16 over that checkpoint.
# A failing step is reported and the next one still runs; the exit status is the number of failed steps.
# GPU_CHECK_ONLY (an extended regex) runs only the steps whose names match it.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(cd "${1:?usage: scripts/gpu-check.sh DIR [OUTDIR]}" && pwd)"
OUTD="${2:-$DIR/out}"
mkdir -p "$OUTD"
cd "$ROOT"
FAILED=0
step() { local name=$1; shift; [[ "$name" =~ ${GPU_CHECK_ONLY:-.} ]] || return 0; echo "=== $name: $*"; local t0=$SECONDS
    if "$@" > "$OUTD/$name.log" 2>&1; then echo "--- $name ok ($((SECONDS - t0)) s)"; else
        echo "--- $name FAILED ($((SECONDS - t0)) s)"; FAILED=$((FAILED + 1))
        local server="$CARGO_TARGET_DIR/bench/serving-server.log"
        [[ "$name" != serving-* || ! -f "$server" ]] || { echo "(server log)"; tail -n 15 "$server"; }
    fi
    tail -n "${TAIL:-25}" "$OUTD/$name.log"; }

# CUDA's libraries: the driver's libcuda and the CUDA 13 math libraries wherever this machine keeps them (not
# CUDA's compat/ libcuda, which a 580 driver refuses with error 803).
libdirs="$(find /usr/local/nvidia /usr/local/cuda* /usr/lib/x86_64-linux-gnu /opt -xdev \
    \( -name 'libcuda.so.1' -o -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \
       -o -name 'libcudart.so.13' -o -name 'libluajit-5.1.so.2' \) -not -path '*/compat/*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)"
export LD_LIBRARY_PATH="$DIR:$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$DIR:$PATH"
BIN="$DIR/baleen-runtime"
nvidia-smi -L; nproc; grep -m1 "model name" /proc/cpuinfo; for t in curl python3 wrk; do command -v "$t" >/dev/null || echo "missing: $t"; done
ldd "$BIN" | grep -E 'not found|cuda|cublas|curand|nvrtc|cudart'

# The bench scripts take the binary from $CARGO_TARGET_DIR/release.
export CARGO_TARGET_DIR="$OUTD/target"
mkdir -p "$CARGO_TARGET_DIR/release" && cp "$BIN" "$CARGO_TARGET_DIR/release/"

step goldens-cuda env BALEEN_TEST_DEVICE=cuda "$DIR/golden" --test-threads 1 --nocapture

# batches MODEL PROMPT_LEN REPEATS BATCHES [FLAGS...]: one `bench` JSON line per batch size.
batches() { local model=$1 plen=$2 rep=$3 sizes=$4 b j; shift 4
    for b in $sizes; do
        j="$("$BIN" bench --model "$model" --batch "$b" --prompt-len "$plen" --gen-len 32 --repeats "$rep" "$@")" || return 1
        echo "batch $b: $j"
    done; }
bench() { batches builtin:tiny-moe 16 3 "1 8 32" "$@"; }
step bench-cuda-f32 bench --device cuda --dtype f32
step bench-cuda-bf16 bench --device cuda --dtype bf16
step bench-cpu-f32 bench --threads 1

export BENCH_DURATION="${BENCH_DURATION:-8}" BENCH_WARMUP=2
TAIL=12 step serving-cuda-f32 env BENCH_SERVER_ARGS="--device cuda" scripts/bench-serving.sh --no-build
TAIL=12 step serving-cuda-bf16 env BENCH_SERVER_ARGS="--device cuda --dtype bf16" scripts/bench-serving.sh --no-build

LITE="$OUTD/v2-lite-random"
[[ -d "$LITE" ]] || step make-v2-lite python3 scripts/make-random-checkpoint.py "$LITE" --layers "${GPU_CHECK_LAYERS:-4}"
lite() { batches "$LITE" 128 2 "1 8 32 128" "$@"; }
step v2-lite-cuda-bf16 lite --device cuda --dtype bf16
TAIL=12 step v2-lite-serving-cuda-bf16 env BENCH_MODEL="$LITE" BENCH_SERVER_ARGS="--device cuda --dtype bf16" \
    scripts/bench-serving.sh --no-build
rm -rf "$LITE"

TAIL=12 step serving-cpu scripts/bench-serving.sh --no-build
TAIL=20 step expert-parallel-cpu scripts/bench-expert-parallel.sh --no-build
echo "failed steps: $FAILED"
exit "$FAILED"
