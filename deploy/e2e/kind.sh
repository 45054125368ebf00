#!/usr/bin/env bash
# End-to-end check of Baleen on a throwaway kind cluster: build both images, install the chart, serve the
# built-in demo model, talk to it through its head Service, scale it, and (when the example exists) run an
# expert-parallel replica of two ranks.
#
# Needs docker (with BuildKit), kind, kubectl, helm, curl and network access (base images, crates). Not run in CI
# here. See deploy/e2e/README.md.
#
#   deploy/e2e/kind.sh                 # create, test, delete the cluster
#   KEEP_CLUSTER=1 deploy/e2e/kind.sh  # leave the cluster running afterwards (and after a failure)
#
# Settings (environment): CLUSTER_NAME, KIND_NODE_IMAGE, IMAGE_TAG, OPERATOR_NAMESPACE, MODEL_NAMESPACE,
# WAIT_TIMEOUT, LOCAL_PORT, SKIP_BUILD=1 (use images already built with IMAGE_TAG), KEEP_CLUSTER=1.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-baleen-e2e}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"
IMAGE_TAG="${IMAGE_TAG:-e2e}"
OPERATOR_IMAGE_REPO="${OPERATOR_IMAGE_REPO:-ghcr.io/baleen-dev/baleen-operator}"
RUNTIME_IMAGE_REPO="${RUNTIME_IMAGE_REPO:-ghcr.io/baleen-dev/baleen-runtime}"
GATEWAY_IMAGE_REPO="${GATEWAY_IMAGE_REPO:-ghcr.io/baleen-dev/baleen-gateway}"
OPERATOR_IMAGE="${OPERATOR_IMAGE_REPO}:${IMAGE_TAG}"
RUNTIME_IMAGE="${RUNTIME_IMAGE_REPO}:${IMAGE_TAG}"
GATEWAY_IMAGE="${GATEWAY_IMAGE_REPO}:${IMAGE_TAG}"
OPERATOR_NAMESPACE="${OPERATOR_NAMESPACE:-baleen-system}"
MODEL_NAMESPACE="${MODEL_NAMESPACE:-default}"
RELEASE="${RELEASE:-baleen}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-600s}"
LOCAL_PORT="${LOCAL_PORT:-18000}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"

TINY_EXAMPLE="${REPO_ROOT}/deploy/examples/tiny-local.yaml"
TINY_NAME="tiny-local"
EP2_EXAMPLE="${REPO_ROOT}/deploy/examples/tiny-cpu-ep2.yaml"
SERVED_MODEL="tiny-moe"

WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/baleen-e2e.XXXXXX")"
PORT_FORWARD_PID=""
CREATED_CLUSTER=0
CLUSTER_UP=0

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'kind.sh: %s\n' "$*" >&2; exit 1; }

kctl() { kubectl --context "kind-${CLUSTER_NAME}" "$@"; }

stop_port_forward() {
  if [[ -n "${PORT_FORWARD_PID}" ]]; then
    kill "${PORT_FORWARD_PID}" 2>/dev/null || true
    wait "${PORT_FORWARD_PID}" 2>/dev/null || true
    PORT_FORWARD_PID=""
  fi
}

dump_diagnostics() {
  log "diagnostics"
  kctl get modeldeployments -A -o wide || true
  kctl describe modeldeployments -A || true
  kctl get statefulsets,pods,services,poddisruptionbudgets -A -o wide || true
  kctl get events -A --sort-by=.lastTimestamp | tail -n 50 || true
  kctl -n "${OPERATOR_NAMESPACE}" logs -l app.kubernetes.io/component=operator --tail=200 --all-containers || true
  kctl -n "${MODEL_NAMESPACE}" logs -l app.kubernetes.io/name=baleen-runtime --tail=100 --all-containers \
    --prefix || true
}

cleanup() {
  local status=$?
  stop_port_forward
  if [[ ${status} -ne 0 && ${CLUSTER_UP} -eq 1 ]]; then
    dump_diagnostics
  fi
  if [[ "${KEEP_CLUSTER}" == "1" ]]; then
    log "KEEP_CLUSTER=1: leaving kind cluster ${CLUSTER_NAME}" \
      "(delete it with: kind delete cluster --name ${CLUSTER_NAME})"
  elif [[ ${CREATED_CLUSTER} -eq 1 ]]; then
    log "deleting kind cluster ${CLUSTER_NAME}"
    kind delete cluster --name "${CLUSTER_NAME}" || true
  fi
  rm -rf "${WORK_DIR}"
  if [[ ${status} -eq 0 ]]; then
    log "e2e passed"
  else
    log "e2e FAILED (exit ${status})"
  fi
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

require() {
  local tool
  for tool in "$@"; do
    command -v "${tool}" >/dev/null 2>&1 || die "${tool} is required (see deploy/e2e/README.md)"
  done
}

# Port-forwards service/$1 in $2 (its port $3, default 8000) to LOCAL_PORT and waits for /health through it.
port_forward() {
  local service=$1 namespace=$2 i
  stop_port_forward
  kctl -n "${namespace}" port-forward "service/${service}" "${LOCAL_PORT}:${3:-8000}" \
    >"${WORK_DIR}/port-forward-${service}.log" 2>&1 &
  PORT_FORWARD_PID=$!
  for i in $(seq 1 60); do
    if curl -fsS "http://127.0.0.1:${LOCAL_PORT}/health" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "${PORT_FORWARD_PID}" 2>/dev/null; then
      cat "${WORK_DIR}/port-forward-${service}.log" >&2
      die "kubectl port-forward service/${service} exited"
    fi
    sleep 1
  done
  cat "${WORK_DIR}/port-forward-${service}.log" >&2
  die "service/${service} did not answer /health through port-forward after ${i}s"
}

# Checks /v1/models and one chat completion through the current port-forward.
check_api() {
  local base="http://127.0.0.1:${LOCAL_PORT}" body request
  request="{\"model\": \"${SERVED_MODEL}\", \"max_tokens\": 8,"
  request+=" \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}"
  body="$(curl -fsS --max-time 30 "${base}/v1/models")"
  printf '%s\n' "${body}"
  grep -q "\"${SERVED_MODEL}\"" <<<"${body}" || die "/v1/models does not list ${SERVED_MODEL}"
  body="$(curl -fsS --max-time 120 "${base}/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "${request}")"
  printf '%s\n' "${body}"
  grep -q '"chat.completion"' <<<"${body}" || die "the chat completion is not a chat.completion object"
  grep -q '"finish_reason"' <<<"${body}" || die "the chat completion has no finish_reason"
}

# Waits until ModelDeployment $1 in $2 reports Available and readyReplicas == $3.
wait_ready() {
  local name=$1 namespace=$2 replicas=$3
  kctl -n "${namespace}" wait --for=condition=Available "modeldeployment/${name}" --timeout="${WAIT_TIMEOUT}"
  kctl -n "${namespace}" wait --for=jsonpath='{.status.readyReplicas}'="${replicas}" "modeldeployment/${name}" \
    --timeout="${WAIT_TIMEOUT}"
  kctl -n "${namespace}" get modeldeployment "${name}" -o wide
}

require docker kind kubectl helm curl
cd "${REPO_ROOT}"

log "kind cluster ${CLUSTER_NAME}"
if kind get clusters 2>/dev/null | grep -qx "${CLUSTER_NAME}"; then
  log "reusing the existing cluster ${CLUSTER_NAME} (it is not deleted at the end)"
else
  create_args=(create cluster --name "${CLUSTER_NAME}" --wait 180s)
  if [[ -n "${KIND_NODE_IMAGE}" ]]; then
    create_args+=(--image "${KIND_NODE_IMAGE}")
  fi
  CREATED_CLUSTER=1
  kind "${create_args[@]}"
fi
CLUSTER_UP=1

if [[ "${SKIP_BUILD}" != "1" ]]; then
  log "building ${RUNTIME_IMAGE} and ${OPERATOR_IMAGE}"
  DOCKER_BUILDKIT=1 docker build -f deploy/docker/runtime.Dockerfile -t "${RUNTIME_IMAGE}" .
  DOCKER_BUILDKIT=1 docker build -f deploy/docker/operator.Dockerfile -t "${OPERATOR_IMAGE}" .
  DOCKER_BUILDKIT=1 docker build -f deploy/docker/gateway.Dockerfile -t "${GATEWAY_IMAGE}" .
fi

log "loading the images into kind"
kind load docker-image --name "${CLUSTER_NAME}" "${RUNTIME_IMAGE}" "${OPERATOR_IMAGE}" "${GATEWAY_IMAGE}"

log "helm install ${RELEASE} charts/baleen"
helm --kube-context "kind-${CLUSTER_NAME}" upgrade --install "${RELEASE}" charts/baleen \
  --namespace "${OPERATOR_NAMESPACE}" --create-namespace \
  --set operator.image.repository="${OPERATOR_IMAGE_REPO}" \
  --set operator.image.tag="${IMAGE_TAG}" \
  --set operator.image.pullPolicy=IfNotPresent \
  --set operator.runtimeImage="${RUNTIME_IMAGE}" \
  --set gateway.image.repository="${GATEWAY_IMAGE_REPO}" \
  --set gateway.image.tag="${IMAGE_TAG}" \
  --set gateway.image.pullPolicy=IfNotPresent \
  --wait --timeout "${WAIT_TIMEOUT}"
kctl wait --for=condition=Established crd/modeldeployments.baleen.dev --timeout=60s
kctl -n "${OPERATOR_NAMESPACE}" rollout status deployment -l app.kubernetes.io/component=operator \
  --timeout="${WAIT_TIMEOUT}"

log "ModelDeployment ${TINY_NAME} (builtin:tiny-moe)"
kctl create namespace "${MODEL_NAMESPACE}" --dry-run=client -o yaml | kctl apply -f -
kctl -n "${MODEL_NAMESPACE}" apply -f "${TINY_EXAMPLE}"
wait_ready "${TINY_NAME}" "${MODEL_NAMESPACE}" 1

log "OpenAI API through service/${TINY_NAME}"
port_forward "${TINY_NAME}" "${MODEL_NAMESPACE}"
check_api
stop_port_forward

log "kubectl scale md/${TINY_NAME} --replicas 2"
kctl -n "${MODEL_NAMESPACE}" scale "md/${TINY_NAME}" --replicas 2
wait_ready "${TINY_NAME}" "${MODEL_NAMESPACE}" 2
port_forward "${TINY_NAME}" "${MODEL_NAMESPACE}"
check_api
stop_port_forward

log "OpenAI API through the gateway (service/${RELEASE}-gateway): it discovered ${TINY_NAME}'s two heads"
port_forward "${RELEASE}-gateway" "${OPERATOR_NAMESPACE}" 80
for _ in 1 2 3 4; do check_api; done
stop_port_forward

if [[ -f "${EP2_EXAMPLE}" ]]; then
  ep2_name="$(kctl create --dry-run=client -f "${EP2_EXAMPLE}" -o jsonpath='{.metadata.name}')"
  ep2_ranks="$(kctl create --dry-run=client -f "${EP2_EXAMPLE}" -o jsonpath='{.spec.parallelism.expert}')"
  ep2_replicas="$(kctl create --dry-run=client -f "${EP2_EXAMPLE}" -o jsonpath='{.spec.replicas}')"
  ep2_replicas="${ep2_replicas:-1}"
  log "expert-parallel ModelDeployment ${ep2_name} (${ep2_ranks} ranks per replica)"
  kctl -n "${MODEL_NAMESPACE}" apply -f "${EP2_EXAMPLE}"
  wait_ready "${ep2_name}" "${MODEL_NAMESPACE}" "${ep2_replicas}"
  pods="$(kctl -n "${MODEL_NAMESPACE}" get pods -l "baleen.dev/model-deployment=${ep2_name}" \
    --field-selector=status.phase=Running -o name | wc -l)"
  want=$((ep2_ranks * ep2_replicas))
  [[ "${pods}" -eq "${want}" ]] || die "${ep2_name}: ${pods} running rank pods, want ${want}"
  port_forward "${ep2_name}" "${MODEL_NAMESPACE}"
  check_api
  stop_port_forward
  kctl -n "${MODEL_NAMESPACE}" delete -f "${EP2_EXAMPLE}" --wait=true --timeout="${WAIT_TIMEOUT}"
else
  log "skipping the expert-parallel example: ${EP2_EXAMPLE} does not exist"
fi

log "deleting ${TINY_NAME}: its StatefulSets and Services go with it (owner references)"
kctl -n "${MODEL_NAMESPACE}" delete modeldeployment "${TINY_NAME}" --wait=true --timeout="${WAIT_TIMEOUT}"
for _ in $(seq 1 120); do
  left="$(kctl -n "${MODEL_NAMESPACE}" get statefulsets,services -l "baleen.dev/model-deployment=${TINY_NAME}" -o name)"
  [[ -z "${left}" ]] && break
  sleep 1
done
[[ -z "${left}" ]] || die "objects of ${TINY_NAME} left after deleting it: ${left}"
