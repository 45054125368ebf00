#!/usr/bin/env bash
# The project's test command (README, .ci/run): fmt, clippy, every Rust test, then the Python stage in a venv it
# creates (target/py-venv, pinned tests/python/requirements.txt): the official openai SDK against the runtime,
# kubernetes-validate --strict over the CRD and everything the operator renders, and the Helm chart rendered and
# linted with the Helm SDK. The transformers goldens are committed fixtures, so torch is never needed here.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install Rust (https://rustup.rs)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The autoscaling end-to-end test (cli/tests/up.rs) runs the real Prometheus server (Debian `prometheus`).
if ! command -v prometheus >/dev/null && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing prometheus with apt-get"
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
    || echo "warning: apt-get install prometheus failed" >&2
fi
if ! command -v prometheus >/dev/null && [[ "${CI:-}" == "true" ]]; then
  echo "error: prometheus is not installed (apt-get install prometheus); CI=true: a missing test tool is a failure" >&2
  exit 1
fi
echo "== cargo test"
cargo test --workspace --locked

# ---- Python stage: OpenAI SDK conformance (tests/python) against a real `baleen-runtime serve` ----------------
# Creates target/py-venv, installs tests/python/requirements.txt when it changed (hash stamp), builds the debug
# binary and runs pytest. With CI=true a missing tool is a failure; elsewhere it is a loud skip of this stage.
echo "== python: OpenAI SDK conformance, Kubernetes manifests, Helm chart (tests/python)"
py_missing() {
  if [[ "${CI:-}" == "true" ]]; then
    echo "error: $* (CI=true: a missing test tool is a failure)" >&2
    exit 1
  fi
  echo "warning: SKIPPING the Python stage: $*" >&2
  exit 0
}
py_ok() { command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; }
if ! py_ok; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing python3 and python3-venv with apt-get"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null \
      || py_missing "apt-get install python3 python3-venv failed"
  fi
  py_ok || py_missing "python3 with the venv module is required (install python3 and python3-venv)"
fi
echo "== module loops (scripts/check-module-cycles.py runtime gateway operator cli api)"
python3 scripts/check-module-cycles.py runtime gateway operator cli api
PY_VENV=target/py-venv
PY_REQ=tests/python/requirements.txt
PY_STAMP="$PY_VENV/.requirements.sha256"
[[ -x "$PY_VENV/bin/python" ]] || python3 -m venv "$PY_VENV" || py_missing "python3 -m venv $PY_VENV failed"
py_hash="$( (cat "$PY_REQ"; "$PY_VENV/bin/python" -VV) | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$PY_STAMP" 2>/dev/null)" != "$py_hash" ]]; then
  echo "installing $PY_REQ into $PY_VENV"
  "$PY_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$PY_REQ" \
    || py_missing "pip install -r $PY_REQ failed"
  echo "$py_hash" > "$PY_STAMP"
fi
# `--all-targets` resolves features with the dev-dependencies, as `cargo test --workspace` above did, so this
# reuses its build (seconds) instead of rebuilding tokio and everything above it without `test-util` (minutes).
cargo build --workspace --all-targets --locked
export BALEEN_RUNTIME_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/baleen-runtime"
export BALEEN_OPERATOR_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/baleen-operator"
export BALEEN_GATEWAY_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/baleen-gateway"
export BALEEN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/baleen"
PYTHONDONTWRITEBYTECODE=1 "$PY_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/python
