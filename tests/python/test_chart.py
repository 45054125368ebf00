"""The Helm chart charts/baleen, checked with the real Helm SDK (helm-python-sdk: Helm's Go code through its C ABI)
and the real Kubernetes OpenAPI schemas (kubernetes-validate --strict).

- `helm lint --strict` passes, with the defaults and with every optional part turned on;
- the rendered objects carry what the operator needs (flags, downward-API identity, probes, security context,
  exactly the RBAC verbs it uses), for the defaults and for each variant;
- and what the gateway needs (`serve --kubernetes` and its flags from the values, the API keys Secret, probes,
  security context, read-only RBAC on ModelDeployments and EndpointSlices, the Service and the optional Ingress);
  `gateway.enabled: false` renders none of it;
- every rendered object of a built-in kind passes `kubernetes-validate --strict` against Kubernetes 1.33 (the
  oldest API the workspace builds against, k8s-openapi `v1_33`), and the example ModelDeployment passes the CRD's
  own schema;
- values.schema.json rejects wrong types, unknown keys and values outside their enums;
- the CRD in the chart is exactly what `baleen-operator crd` prints. The binary is `$BALEEN_OPERATOR_BIN`, or
  `target/debug/baleen-operator` (`cargo build -p baleen-operator`); a missing binary fails the test, it never
  skips it.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from binaries import find_binary

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "baleen"
CRD_FILE = CHART_DIR / "files" / "crds" / "modeldeployments.baleen.dev.yaml"
CRD_NAME = "modeldeployments.baleen.dev"
RELEASE = "baleen"
NAMESPACE = "baleen-system"
OPERATOR = "baleen-operator"  # `<release>-operator`; the release name already contains the chart name
GATEWAY = "baleen-gateway"  # `<release>-gateway`
KUBE_VERSION = "1.33.0"
# API groups whose kinds kubernetes-validate knows; anything else is a custom resource it can only warn about.
CUSTOM_GROUPS = {"baleen.dev", "monitoring.coreos.com"}

ALL_VERBS_OWNED = ["get", "list", "watch", "create", "patch", "update", "delete"]
# (apiGroup, resource) -> verbs: what the operator does, and nothing more.
EXPECTED_WORKLOAD_RULES = {
    ("baleen.dev", "modeldeployments"): {"get", "list", "watch", "patch", "update"},
    ("baleen.dev", "modeldeployments/status"): {"get", "patch", "update"},
    ("baleen.dev", "modeldeployments/scale"): {"get", "patch", "update"},
    ("apps", "statefulsets"): set(ALL_VERBS_OWNED),
    ("", "services"): set(ALL_VERBS_OWNED),
    ("", "pods"): {"get", "list", "watch"},
    ("policy", "poddisruptionbudgets"): set(ALL_VERBS_OWNED),
    ("events.k8s.io", "events"): {"create", "patch"},
    ("", "events"): {"create", "patch"},
}
PODMONITOR_RULE = {("monitoring.coreos.com", "podmonitors"): set(ALL_VERBS_OWNED)}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "update", "patch"}}
CRD_READER_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list"}}
# What the gateway reads (discovery: lists and watches of both) and writes (its autoscaler: a merge patch of the
# scale subresource), and nothing more.
GATEWAY_RULES = {
    ("baleen.dev", "modeldeployments"): {"get", "list", "watch"},
    ("baleen.dev", "modeldeployments/scale"): {"patch"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    # One Event per autoscaling change on its ModelDeployment (a fresh Recorder each: created, never patched).
    ("events.k8s.io", "events"): {"create"},
}
# The autoscaler's Lease, in the gateway's namespace: read, create, replace (renew or take over).
GATEWAY_LEASE = f"{GATEWAY}-autoscaler-lease"
GATEWAY_LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
GATEWAY_DEFAULT_ARGS = [
    "serve",
    "--kubernetes",
    "--host=0.0.0.0",
    "--port=8080",
    "--admin-port=9090",
    "--relist-interval=30",
    "--scrape-interval=1",
    "--retries=2",
    "--max-request-bytes=10485760",
    "--request-timeout=600",
]

def pod_placement(component: str) -> dict[str, Any]:
    """Pod annotations, labels and scheduling values that spread `component`'s pods over nodes."""
    return {
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "ml"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": component}},
                        },
                    }
                ]
            }
        },
    }


# Values that turn every optional part of the chart on (for lint and schema validation of the whole chart).
EVERYTHING_ON = {
    "operator": {
        "replicas": 2,
        "podMonitor": True,
        "imagePullSecrets": [{"name": "regcred"}],
        **pod_placement("operator"),
        "priorityClassName": "system-cluster-critical",
        "serviceAccount": {"annotations": {"example.com/role": "operator"}},
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}},
    },
    "gateway": {
        "replicas": 2,
        "image": {"repository": "registry.example.com/baleen-gateway", "tag": "dev", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "logLevel": "info,baleen_gateway=debug",
        "port": 8081,
        "adminPort": 9091,
        "relistIntervalSeconds": 10,
        "scrapeIntervalSeconds": 0.5,
        "retries": 3,
        "maxRequestBytes": 104857600,
        "requestTimeoutSeconds": 120,
        "prometheusUrl": "http://prometheus-operated.monitoring:9090",
        "apiKeys": {"secretName": "gateway-keys"},
        "service": {
            "type": "LoadBalancer",
            "port": 443,
            "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
        },
        "serviceAccount": {"annotations": {"example.com/role": "gateway"}},
        **pod_placement("gateway"),
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "host": "llm.example.com",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"},
            "tls": [{"secretName": "gateway-tls", "hosts": ["llm.example.com"]}],
        },
    },
    "examples": {"tinyModel": {"enabled": True, "replicas": 2, "expertParallelism": 2}},
}

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no-crds": {"crds": {"install": False}},
    "watch-namespace": {"operator": {"watchNamespace": "models"}},
    "watch-namespace-pod-monitor": {"operator": {"watchNamespace": "models", "podMonitor": True}},
    "gateway-watch-namespace": {"gateway": {"watchNamespace": "models"}},
    "gateway-ingress-no-host": {"gateway": {"ingress": {"enabled": True}}},
    "no-gateway": {"gateway": {"enabled": False}},
    "everything-on": EVERYTHING_ON,
}


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def render_templates(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template RELEASE charts/baleen -n NAMESPACE` renders it."""
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=namespace)


def render(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every rendered object, in template order."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_templates(values, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                assert isinstance(doc, dict), f"{path}: a document that is not a mapping: {doc!r}"
                objects.append(doc)
    return objects


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (and `name`); fails when there are none or several."""
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"want one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """A role's rules as (apiGroup, resource) -> verbs; fails on a resource granted twice (the sets would hide it)."""
    table: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        verbs = rule["verbs"]
        assert len(verbs) == len(set(verbs)), f"repeated verbs in {rule}"
        assert "*" not in verbs, f"wildcard verb in {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert resource != "*" and group != "*", f"wildcard in {rule}"
                key = (group, resource)
                assert key not in table, f"{key} granted twice in {role['metadata']['name']}"
                table[key] = set(verbs)
    return table


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = only(objects, "Deployment", OPERATOR)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def gateway_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = only(objects, "Deployment", GATEWAY)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return containers[0]


def of_component(objects: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    """The objects labelled `app.kubernetes.io/component: component`."""
    return [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == component]


def assert_hardened(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """Non-root (a numeric user), read-only root filesystem, no capabilities, the runtime's seccomp profile."""
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsGroup"] == 65532


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or name -> {"fieldRef": path} for downward-API variables."""
    env: dict[str, Any] = {}
    for var in container.get("env", []):
        assert var["name"] not in env, f"{var['name']} set twice"
        if "valueFrom" in var:
            env[var["name"]] = {"fieldRef": var["valueFrom"]["fieldRef"]["fieldPath"]}
        else:
            env[var["name"]] = var["value"]
    return env


def chart_metadata() -> dict[str, Any]:
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.metadata


def operator_bin() -> Path:
    """The operator binary; fails (never skips) with a clear message when it is absent."""
    return find_binary("baleen-operator", "BALEEN_OPERATOR_BIN")


def operator_crd_text() -> str:
    binary = operator_bin()
    proc = subprocess.run([str(binary), "crd"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{binary} crd exited {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc.stdout


def kubernetes_validate(objects: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`kubernetes-validate --strict -k KUBE_VERSION` over one file per object."""
    files = []
    for i, obj in enumerate(objects):
        path = tmp_path / f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        files.append(str(path))
    tool = Path(sys.executable).parent / "kubernetes-validate"
    assert tool.is_file(), f"{tool} is missing: install tests/python/requirements.txt into this venv"
    return subprocess.run(
        [str(tool), "--strict", "--quiet", "-k", KUBE_VERSION, *files],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def is_custom(obj: dict[str, Any]) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return group in CUSTOM_GROUPS


def without_header(text: str) -> str:
    """The text without its leading comment lines (scripts/gen-deploy.sh heads generated files with one)."""
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def strip_chart_additions(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD as the operator prints it: without the labels and annotations the chart adds."""
    crd = copy.deepcopy(crd)
    meta = crd["metadata"]
    for key in ("labels", "annotations"):
        added = meta.pop(key, None) or {}
        for name in list(added):
            if name.startswith(("helm.sh/", "app.kubernetes.io/")):
                del added[name]
        if added:
            meta[key] = added
    return crd


# ---------------------------------------------------------------------------------------------------------------
# Chart metadata and lint
# ---------------------------------------------------------------------------------------------------------------


def test_chart_metadata_names_the_release():
    meta = chart_metadata()
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "baleen"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict_passes(variant: str):
    report = helm.lint(CHART_DIR, VARIANTS[variant], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], f"helm lint --strict: {problems} {report['errors']}"


def test_lint_catches_a_broken_value():
    # The negative control: lint really checks values against the schema.
    report = helm.lint(CHART_DIR, {"operator": {"replicas": "two"}}, strict=True)
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"]), report


# ---------------------------------------------------------------------------------------------------------------
# Rendered objects
# ---------------------------------------------------------------------------------------------------------------


def test_default_render_has_the_operator_the_gateway_their_rbac_and_the_crd():
    objects = render()
    assert kinds(objects) == sorted(
        [
            # The operator.
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            # The gateway.
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "CustomResourceDefinition",
        ]
    )
    assert sorted((o["kind"], o["metadata"]["name"]) for o in of_component(objects, "gateway")) == [
        ("ClusterRole", GATEWAY),
        ("ClusterRoleBinding", GATEWAY),
        ("Deployment", GATEWAY),
        ("Role", GATEWAY_LEASE),
        ("RoleBinding", GATEWAY_LEASE),
        ("Service", GATEWAY),
        ("ServiceAccount", GATEWAY),
    ]
    for obj in objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "baleen"
        assert labels["helm.sh/chart"] == "baleen-0.1.0"


def test_operator_deployment_defaults():
    objects = render()
    deployment = only(objects, "Deployment", OPERATOR)
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == OPERATOR
    container = operator_container(objects)
    assert container["image"] == "ghcr.io/baleen-dev/baleen-operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == ["run", "--drain-timeout=30"]
    assert "command" not in container  # the image's ENTRYPOINT is the binary
    env = env_of(container)
    assert env == {
        "BALEEN_OPERATOR_RUNTIME_IMAGE": "ghcr.io/baleen-dev/baleen-runtime:0.1.0",
        "BALEEN_OPERATOR_NAMESPACE": "",
        "BALEEN_OPERATOR_LEASE_NAMESPACE": {"fieldRef": "metadata.namespace"},
        "BALEEN_OPERATOR_IDENTITY": {"fieldRef": "metadata.name"},
        "BALEEN_OPERATOR_ADMIN_ADDR": "0.0.0.0:9090",
        "BALEEN_OPERATOR_LOG": "info",
    }
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert probe["port"] in (9090, "metrics")
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # Hardened: non-root, read-only root filesystem, no capabilities, the runtime's seccomp profile.
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets", "priorityClassName"):
        assert key not in pod


def test_operator_settings_reach_flags_and_environment():
    objects = render(
        {
            "operator": {
                "image": {"repository": "registry.example.com/baleen-operator", "tag": "dev", "pullPolicy": "Never"},
                "runtimeImage": "registry.example.com/baleen-runtime:dev",
                "drainTimeoutSeconds": 90,
                "logLevel": "debug,kube=info",
                "adminPort": 9191,
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                                    ]
                                }
                            ]
                        }
                    }
                },
            }
        }
    )
    container = operator_container(objects)
    assert container["image"] == "registry.example.com/baleen-operator:dev"
    assert container["imagePullPolicy"] == "Never"
    assert container["args"] == ["run", "--drain-timeout=90"]
    env = env_of(container)
    assert env["BALEEN_OPERATOR_RUNTIME_IMAGE"] == "registry.example.com/baleen-runtime:dev"
    assert "BALEEN_OPERATOR_DOWNLOADER_IMAGE" not in env, "the runtime image downloads hf:// models"
    assert env["BALEEN_OPERATOR_ADMIN_ADDR"] == "0.0.0.0:9191"
    assert env["BALEEN_OPERATOR_LOG"] == "debug,kube=info"
    assert container["ports"][0]["containerPort"] == 9191
    pod = only(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert "nodeAffinity" in pod["affinity"]
    service = only(objects, "Service", OPERATOR)
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"}]


def test_operator_metrics_service_selects_the_operator_pods():
    objects = render()
    service = only(objects, "Service", OPERATOR)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = only(objects, "Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "operator"


def test_two_replicas_are_safe_with_leader_election():
    objects = render({"operator": {"replicas": 2}})
    deployment = only(objects, "Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 2
    # Never two leaders' worth of new pods during a rollout: replace one replica at a time.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    # Each replica names itself in the Lease by its pod name, in its own namespace.
    env = env_of(operator_container(objects))
    assert env["BALEEN_OPERATOR_IDENTITY"] == {"fieldRef": "metadata.name"}
    assert env["BALEEN_OPERATOR_LEASE_NAMESPACE"] == {"fieldRef": "metadata.namespace"}
    assert rules_of(only(objects, "Role", f"{OPERATOR}-leader-election")) == LEASE_RULES


def test_cluster_rbac_grants_exactly_what_the_operator_uses():
    objects = render()
    cluster_role = only(objects, "ClusterRole", OPERATOR)
    assert rules_of(cluster_role) == EXPECTED_WORKLOAD_RULES
    binding = only(objects, "ClusterRoleBinding", OPERATOR)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OPERATOR}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]
    # The leader Lease lives in the operator's own namespace: a namespaced Role is enough.
    lease_role = only(objects, "Role", f"{OPERATOR}-leader-election")
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert rules_of(lease_role) == LEASE_RULES
    lease_binding = only(objects, "RoleBinding", f"{OPERATOR}-leader-election")
    assert lease_binding["metadata"]["namespace"] == NAMESPACE
    assert lease_binding["roleRef"]["name"] == f"{OPERATOR}-leader-election"
    assert lease_binding["subjects"] == binding["subjects"]
    account = only(objects, "ServiceAccount", OPERATOR)
    assert account["metadata"]["namespace"] == NAMESPACE


def test_watch_namespace_uses_a_role_not_a_cluster_role():
    objects = render({"operator": {"watchNamespace": "models"}})
    # No cluster-wide grant for the operator (the gateway's are its own: gateway.watchNamespace).
    assert not [o for o in of_component(objects, "operator") if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = only(objects, "Role", OPERATOR)
    assert role["metadata"]["namespace"] == "models"
    assert rules_of(role) == EXPECTED_WORKLOAD_RULES
    binding = only(objects, "RoleBinding", OPERATOR)
    assert binding["metadata"]["namespace"] == "models"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR}
    # The ServiceAccount stays in the release namespace, and so do the Lease and its Role.
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]
    assert only(objects, "Role", f"{OPERATOR}-leader-election")["metadata"]["namespace"] == NAMESPACE
    assert env_of(operator_container(objects))["BALEEN_OPERATOR_NAMESPACE"] == "models"


def test_pod_monitor_adds_the_flag_and_its_rbac():
    objects = render({"operator": {"podMonitor": True}})
    container = operator_container(objects)
    assert container["args"] == ["run", "--drain-timeout=30", "--pod-monitor"]
    assert rules_of(only(objects, "ClusterRole", OPERATOR)) == EXPECTED_WORKLOAD_RULES | PODMONITOR_RULE
    # Read-only CRD access, to tell whether the PodMonitor CRD exists.
    crd_reader = only(objects, "ClusterRole", f"{OPERATOR}-crd-reader")
    assert rules_of(crd_reader) == CRD_READER_RULES
    assert only(objects, "ClusterRoleBinding", f"{OPERATOR}-crd-reader")["roleRef"]["name"] == f"{OPERATOR}-crd-reader"
    # Without it, no PodMonitor rule anywhere.
    for role in render():
        if role["kind"] in ("ClusterRole", "Role"):
            assert ("monitoring.coreos.com", "podmonitors") not in rules_of(role)


def test_pod_monitor_with_watch_namespace_grants_podmonitors_in_that_namespace():
    objects = render({"operator": {"watchNamespace": "models", "podMonitor": True}})
    assert rules_of(only(objects, "Role", OPERATOR)) == EXPECTED_WORKLOAD_RULES | PODMONITOR_RULE
    operator_objects = of_component(objects, "operator")
    assert [o["metadata"]["name"] for o in operator_objects if o["kind"] == "ClusterRole"] == [f"{OPERATOR}-crd-reader"]


def test_rbac_and_service_account_can_be_left_to_someone_else():
    objects = render({"operator": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}}})
    assert kinds(of_component(objects, "operator")) == ["Deployment", "Service"]
    assert only(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    objects = render({"gateway": {"rbac": {"create": False}, "serviceAccount": {"create": False}}})
    assert kinds(of_component(objects, "gateway")) == ["Deployment", "Service"]
    assert only(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]["serviceAccountName"] == "default"
    # A ServiceAccount of one's own name, created by the chart, is the one the gateway's binding names.
    objects = render({"gateway": {"serviceAccount": {"name": "llm-gateway"}}})
    assert only(objects, "ServiceAccount", "llm-gateway")["metadata"]["namespace"] == NAMESPACE
    assert only(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]["serviceAccountName"] == "llm-gateway"
    assert only(objects, "ClusterRoleBinding", GATEWAY)["subjects"] == [
        {"kind": "ServiceAccount", "name": "llm-gateway", "namespace": NAMESPACE}
    ]


def test_service_monitor_is_optional():
    assert not [o for o in render() if o["kind"] == "ServiceMonitor"]
    objects = render({"operator": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "p"}}}})
    monitor = only(objects, "ServiceMonitor", OPERATOR)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "p"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = only(objects, "Service", OPERATOR)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_tiny_model_example_is_off_by_default_and_serves_builtin_tiny_moe():
    assert not [o for o in render() if o["kind"] == "ModelDeployment"]
    objects = render({"examples": {"tinyModel": {"enabled": True}}})
    md = only(objects, "ModelDeployment")
    assert md["apiVersion"] == "baleen.dev/v1alpha1"
    assert md["metadata"]["name"] == "tiny-moe"
    assert md["metadata"]["namespace"] == NAMESPACE
    assert md["spec"]["model"]["source"] == "builtin:tiny-moe"
    assert md["spec"]["replicas"] == 1
    assert md["spec"]["parallelism"] == {"expert": 1}
    # A hook, so a fresh install creates it after the CRD it needs.
    assert md["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    scaled = only(
        render({"examples": {"tinyModel": {"enabled": True, "replicas": 3, "expertParallelism": 4}}}), "ModelDeployment"
    )
    assert scaled["spec"]["replicas"] == 3 and scaled["spec"]["parallelism"] == {"expert": 4}
    watched = only(
        render({"operator": {"watchNamespace": "models"}, "examples": {"tinyModel": {"enabled": True}}}),
        "ModelDeployment",
    )
    assert watched["metadata"]["namespace"] == "models"


@pytest.mark.parametrize("values", [{}, {"examples": {"tinyModel": {"enabled": True}}}], ids=["apply", "example"])
def test_notes_say_how_to_apply_and_reach_a_model(values: dict[str, Any]):
    notes = render_templates(values)["baleen/templates/NOTES.txt"]
    assert "builtin:tiny-moe" in notes or "tiny-moe" in notes
    assert "kubectl" in notes and "wait --for=condition=Available modeldeployment/tiny-moe" in notes
    assert "port-forward service/tiny-moe 8000:8000" in notes
    assert "/v1/chat/completions" in notes and "/v1/models" in notes
    assert "scale md/tiny-moe" in notes


# ---------------------------------------------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------------------------------------------


def test_gateway_deployment_defaults():
    objects = render()
    deployment = only(objects, "Deployment", GATEWAY)
    assert deployment["metadata"]["namespace"] == NAMESPACE
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    # Its selector must not pick up the operator's pods, nor the operator's the gateway's.
    operator_selector = only(objects, "Deployment", OPERATOR)["spec"]["selector"]["matchLabels"]
    assert not operator_selector.items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == GATEWAY
    assert pod["automountServiceAccountToken"] is True  # it lists and watches through the API server
    # No service-link variables: BALEEN_GATEWAY_PORT=tcp://... (from the Service `baleen-gateway`) would be read
    # as the gateway's own --port variable.
    assert pod["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] > 30  # the gateway drains answers in flight for up to 30 s
    container = gateway_container(objects)
    assert container["image"] == "ghcr.io/baleen-dev/baleen-gateway:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert "command" not in container  # the image's ENTRYPOINT is the binary
    assert container["args"] == GATEWAY_DEFAULT_ARGS
    assert env_of(container) == {"BALEEN_GATEWAY_LOG": "info"}
    assert container["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "admin", "containerPort": 9090, "protocol": "TCP"},
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "admin"}
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert_hardened(pod, container)
    # No API keys: nothing mounted, no flag.
    assert "volumeMounts" not in container and "volumes" not in pod
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        assert key not in pod


def test_gateway_settings_reach_its_flags_ports_and_pod():
    objects = render(EVERYTHING_ON)
    deployment = only(objects, "Deployment", GATEWAY)
    assert deployment["spec"]["replicas"] == 2
    container = gateway_container(objects)
    assert container["image"] == "registry.example.com/baleen-gateway:dev"
    assert container["imagePullPolicy"] == "Always"
    assert container["args"] == [
        "serve",
        "--kubernetes",
        "--host=0.0.0.0",
        "--port=8081",
        "--admin-port=9091",
        "--relist-interval=10",
        "--scrape-interval=0.5",
        "--retries=3",
        "--max-request-bytes=104857600",  # an integer, not 1.048576e+08
        "--request-timeout=120",
        "--prometheus-url=http://prometheus-operated.monitoring:9090",
        "--api-keys=/etc/baleen-gateway/keys.yaml",
    ]
    assert env_of(container) == {"BALEEN_GATEWAY_LOG": "info,baleen_gateway=debug"}
    assert container["ports"] == [
        {"name": "http", "containerPort": 8081, "protocol": "TCP"},
        {"name": "admin", "containerPort": 9091, "protocol": "TCP"},
    ]
    # The probes follow the ports by name.
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert container["livenessProbe"]["httpGet"]["port"] == "admin"
    # The API keys Secret, read-only, only its keys.yaml, where --api-keys points.
    assert container["volumeMounts"] == [{"name": "api-keys", "mountPath": "/etc/baleen-gateway", "readOnly": True}]
    template = deployment["spec"]["template"]
    pod = template["spec"]
    secret = {"secretName": "gateway-keys", "items": [{"key": "keys.yaml", "path": "keys.yaml"}]}
    assert pod["volumes"] == [{"name": "api-keys", "secret": secret}]
    assert_hardened(pod, container)
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert "podAntiAffinity" in pod["affinity"]
    assert template["metadata"]["annotations"] == {"example.com/a": "b"}
    assert template["metadata"]["labels"]["team"] == "ml"
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    service = only(objects, "Service", GATEWAY)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 443, "targetPort": "http", "protocol": "TCP"},
        {"name": "admin", "port": 9091, "targetPort": "admin", "protocol": "TCP"},
    ]
    account = only(objects, "ServiceAccount", GATEWAY)
    assert account["metadata"]["annotations"] == {"example.com/role": "gateway"}


def test_gateway_api_keys_alone_add_the_volume_mount_and_flag():
    objects = render({"gateway": {"apiKeys": {"secretName": "keys"}}})
    container = gateway_container(objects)
    assert container["args"] == [*GATEWAY_DEFAULT_ARGS, "--api-keys=/etc/baleen-gateway/keys.yaml"]
    mount = only([{**m, "kind": "m", "metadata": {"name": m["name"]}} for m in container["volumeMounts"]], "m")
    assert mount["mountPath"] == "/etc/baleen-gateway" and mount["readOnly"] is True
    pod = only(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    volume = only([{**v, "kind": "v", "metadata": {"name": v["name"]}} for v in pod["volumes"]], "v")
    assert volume["name"] == mount["name"]
    assert volume["secret"]["secretName"] == "keys"
    assert {"key": "keys.yaml", "path": "keys.yaml"} in volume["secret"]["items"]


def test_gateway_service_selects_the_gateway_pods():
    objects = render()
    service = only(objects, "Service", GATEWAY)
    assert service["metadata"]["namespace"] == NAMESPACE
    assert service["spec"]["type"] == "ClusterIP"
    assert "annotations" not in service["metadata"]
    # The API on port 80, and the admin port for scraping /metrics.
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "admin", "port": 9090, "targetPort": "admin", "protocol": "TCP"},
    ]
    selector = service["spec"]["selector"]
    assert selector["app.kubernetes.io/component"] == "gateway"
    assert selector.items() <= only(objects, "Deployment", GATEWAY)["spec"]["template"]["metadata"]["labels"].items()
    operator_pod_labels = only(objects, "Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= operator_pod_labels.items()
    # Every named target port is a port of the gateway container.
    container_ports = {p["name"] for p in gateway_container(objects)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_gateway_rbac_reads_patches_scale_and_holds_its_lease_cluster_wide_by_default():
    objects = render()
    cluster_role = only(objects, "ClusterRole", GATEWAY)
    assert rules_of(cluster_role) == GATEWAY_RULES
    binding = only(objects, "ClusterRoleBinding", GATEWAY)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": GATEWAY}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": GATEWAY, "namespace": NAMESPACE}]
    # The Lease role, in the release namespace, bound to it.
    lease_role = only(objects, "Role", GATEWAY_LEASE)
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert rules_of(lease_role) == GATEWAY_LEASE_RULES
    lease_binding = only(objects, "RoleBinding", GATEWAY_LEASE)
    assert lease_binding["metadata"]["namespace"] == NAMESPACE
    assert lease_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": GATEWAY_LEASE}
    assert lease_binding["subjects"] == [{"kind": "ServiceAccount", "name": GATEWAY, "namespace": NAMESPACE}]
    # Nothing else is granted to the gateway's ServiceAccount.
    gateway_roles = [o for o in of_component(objects, "gateway") if o["kind"] in ("Role", "ClusterRole")]
    assert gateway_roles == [cluster_role, lease_role]
    # And nothing in the cluster binds the gateway's account to any other role.
    bound = [
        o["roleRef"]["name"]
        for o in objects
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["name"] == GATEWAY for s in o["subjects"])
    ]
    assert sorted(bound) == [GATEWAY, GATEWAY_LEASE]
    assert only(objects, "ServiceAccount", GATEWAY)["metadata"]["namespace"] == NAMESPACE


def test_gateway_watch_namespace_uses_a_role_and_the_namespace_flag():
    objects = render({"gateway": {"watchNamespace": "models"}})
    gateway_objects = of_component(objects, "gateway")
    assert not [o for o in gateway_objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = only(objects, "Role", GATEWAY)
    assert role["metadata"]["namespace"] == "models"
    assert rules_of(role) == GATEWAY_RULES
    binding = only(objects, "RoleBinding", GATEWAY)
    assert binding["metadata"]["namespace"] == "models"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": GATEWAY}
    # The ServiceAccount (and the Deployment) stay in the release namespace.
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": GATEWAY, "namespace": NAMESPACE}]
    assert only(objects, "Deployment", GATEWAY)["metadata"]["namespace"] == NAMESPACE
    args = gateway_container(objects)["args"]
    assert args == ["serve", "--kubernetes", "--namespace=models", *GATEWAY_DEFAULT_ARGS[2:]]
    # The operator's RBAC is its own business: still cluster-wide.
    assert rules_of(only(objects, "ClusterRole", OPERATOR)) == EXPECTED_WORKLOAD_RULES


def test_gateway_disabled_renders_no_gateway_objects():
    for values in (
        {"gateway": {"enabled": False}},
        # Its options do nothing without it.
        {"gateway": {"enabled": False, "watchNamespace": "models", "ingress": {"enabled": True}}},
    ):
        objects = render(values)
        assert not of_component(objects, "gateway")
        assert not [o for o in objects if o["metadata"]["name"] == GATEWAY or o["kind"] == "Ingress"]
        for obj in objects:
            if obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
                assert GATEWAY not in {s["name"] for s in obj["subjects"]}
        # The operator and the CRD stay.
        assert only(objects, "Deployment", OPERATOR)
        assert only(objects, "CustomResourceDefinition", CRD_NAME)
        notes = render_templates(values)["baleen/templates/NOTES.txt"]
        assert GATEWAY not in notes


def test_gateway_ingress_is_optional_and_points_at_the_api_port():
    assert not [o for o in render() if o["kind"] == "Ingress"]
    objects = render(EVERYTHING_ON)
    ingress = only(objects, "Ingress", GATEWAY)
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["metadata"]["namespace"] == NAMESPACE
    assert ingress["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"}
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "gateway-tls", "hosts": ["llm.example.com"]}]
    backend = {"service": {"name": GATEWAY, "port": {"name": "http"}}}
    assert spec["rules"] == [
        {"host": "llm.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}
    ]
    assert "http" in {p["name"] for p in only(objects, "Service", GATEWAY)["spec"]["ports"]}
    # Without a host, class or TLS: one rule for every host, the cluster's default class.
    bare = only(render({"gateway": {"ingress": {"enabled": True}}}), "Ingress", GATEWAY)
    assert "annotations" not in bare["metadata"]
    assert bare["spec"] == {"rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}]}


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_notes_say_how_to_reach_the_gateway(values: dict[str, Any]):
    notes = render_templates(values)["baleen/templates/NOTES.txt"]
    port = values.get("gateway", {}).get("service", {}).get("port", 80)
    assert f"kubectl -n {NAMESPACE} port-forward svc/{GATEWAY} 8080:{port}" in notes
    assert "http://127.0.0.1:8080/v1" in notes
    assert f"rollout status deployment/{GATEWAY}" in notes
    if values:
        assert "Authorization: Bearer" in notes
        assert "https://llm.example.com/v1" in notes
        assert f"service/{GATEWAY} port 9091 (/metrics)" in notes
    else:
        assert "Authorization: Bearer" not in notes and "Ingress" not in notes
        assert f"service/{GATEWAY} port 9090 (/metrics)" in notes


def test_notes_warn_when_the_gateway_does_not_watch_the_example_namespace():
    notes = render_templates({"gateway": {"watchNamespace": "models"}})["baleen/templates/NOTES.txt"]
    assert 'namespace "models"' in notes and f'does not see ModelDeployments in "{NAMESPACE}"' in notes
    same = {"operator": {"watchNamespace": "models"}, "gateway": {"watchNamespace": "models"}}
    assert "does not see" not in render_templates(same)["baleen/templates/NOTES.txt"]


# ---------------------------------------------------------------------------------------------------------------
# The CRD
# ---------------------------------------------------------------------------------------------------------------


def test_crd_is_installed_by_default_and_kept_on_uninstall():
    crd = only(render(), "CustomResourceDefinition", CRD_NAME)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "baleen"
    assert crd["spec"]["group"] == "baleen.dev"
    assert crd["spec"]["names"]["kind"] == "ModelDeployment"
    assert crd["spec"]["names"]["shortNames"] == ["md"]
    version = only([{**v, "kind": "v", "metadata": {"name": v["name"]}} for v in crd["spec"]["versions"]], "v")
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]


def test_crd_keep_false_drops_the_resource_policy():
    crd = only(render({"crds": {"keep": False}}), "CustomResourceDefinition", CRD_NAME)
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


def test_crds_install_false_renders_no_crd():
    objects = render({"crds": {"install": False}})
    assert not [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    assert only(objects, "Deployment", OPERATOR)


def test_chart_crd_equals_baleen_operator_crd_output():
    printed = operator_crd_text()
    assert CRD_FILE.is_file(), f"{CRD_FILE} is missing; run scripts/gen-deploy.sh"
    assert without_header(CRD_FILE.read_text()) == printed, (
        f"{CRD_FILE.relative_to(REPO_ROOT)} differs from `baleen-operator crd`: regenerate it with scripts/gen-deploy.sh"
    )
    # And the chart's template renders that CRD unchanged apart from its own labels and annotation (no value lost
    # or reformatted on the way through fromYaml/toYaml, e.g. a large integer turned into a float).
    rendered = only(render(), "CustomResourceDefinition", CRD_NAME)
    assert strip_chart_additions(rendered) == yaml.safe_load(printed)


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes schemas
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_core_objects_pass_kubernetes_validate_strict(variant: str, tmp_path: Path):
    objects = [o for o in render(VARIANTS[variant]) if not is_custom(o)]
    assert objects
    proc = kubernetes_validate(objects, tmp_path)
    assert proc.returncode == 0, f"kubernetes-validate --strict -k {KUBE_VERSION}:\n{proc.stdout}\n{proc.stderr}"


def test_kubernetes_validate_rejects_a_broken_deployment(tmp_path: Path):
    # The negative control: an unknown field in the pod spec must fail strict validation.
    deployment = copy.deepcopy(only(render(), "Deployment", OPERATOR))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    proc = kubernetes_validate([deployment], tmp_path)
    assert proc.returncode != 0, proc.stdout


def test_example_model_deployment_passes_the_crd_schema():
    objects = render(EVERYTHING_ON)
    crd = only(objects, "CustomResourceDefinition", CRD_NAME)
    schema = only([{**v, "kind": "v", "metadata": {"name": v["name"]}} for v in crd["spec"]["versions"]], "v")
    validator = jsonschema.Draft7Validator(schema["schema"]["openAPIV3Schema"])
    md = only(objects, "ModelDeployment")
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(md)]
    assert not errors, errors
    bad = copy.deepcopy(md)
    bad["spec"]["replicas"] = "two"
    assert list(validator.iter_errors(bad)), "the CRD schema accepted replicas: two"


# ---------------------------------------------------------------------------------------------------------------
# values.schema.json
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_values_schema_accepts_the_defaults_and_variants(variant: str):
    with helm.Chart.load(CHART_DIR) as chart:
        assert chart.schema is not None
        chart.validate_schema(chart.merge_values(VARIANTS[variant]))


BAD_VALUES = {
    "replicas-as-string": ({"operator": {"replicas": "two"}}, "/operator/replicas"),
    "negative-replicas": ({"operator": {"replicas": -1}}, "/operator/replicas"),
    "unknown-operator-key": ({"operator": {"replicaCount": 2}}, "replicaCount"),
    "unknown-top-level-key": ({"router": {"enabled": True}}, "router"),
    "unknown-gateway-key": ({"gateway": {"replicaCount": 2}}, "replicaCount"),
    "unknown-gateway-ingress-key": ({"gateway": {"ingress": {"path": "/v1"}}}, "path"),
    "bad-gateway-service-type": ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type"),
    "gateway-enabled-as-string": ({"gateway": {"enabled": "yes"}}, "/gateway/enabled"),
    "gateway-port-out-of-range": ({"gateway": {"port": 0}}, "/gateway/port"),
    "gateway-service-port-out-of-range": ({"gateway": {"service": {"port": 65536}}}, "/gateway/service/port"),
    "gateway-zero-scrape-interval": ({"gateway": {"scrapeIntervalSeconds": 0}}, "/gateway/scrapeIntervalSeconds"),
    "gateway-relist-interval-too-long": (
        {"gateway": {"relistIntervalSeconds": 86401}},
        "/gateway/relistIntervalSeconds",
    ),
    "gateway-negative-retries": ({"gateway": {"retries": -1}}, "/gateway/retries"),
    "gateway-zero-max-request-bytes": ({"gateway": {"maxRequestBytes": 0}}, "/gateway/maxRequestBytes"),
    "gateway-bad-watch-namespace": ({"gateway": {"watchNamespace": "Models"}}, "/gateway/watchNamespace"),
    "gateway-bad-api-keys-secret": ({"gateway": {"apiKeys": {"secretName": "Keys!"}}}, "/gateway/apiKeys/secretName"),
    "gateway-https-prometheus-url": (
        {"gateway": {"prometheusUrl": "https://prometheus:9090"}},
        "/gateway/prometheusUrl",
    ),
    "gateway-bad-ingress-host": ({"gateway": {"ingress": {"host": "https://llm"}}}, "/gateway/ingress/host"),
    "unknown-crds-key": ({"crds": {"enabled": True}}, "enabled"),
    "bad-pull-policy": ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "/operator/image/pullPolicy"),
    "crds-install-as-string": ({"crds": {"install": "yes"}}, "/crds/install"),
    "port-out-of-range": ({"operator": {"adminPort": 70000}}, "/operator/adminPort"),
    "bad-watch-namespace": ({"operator": {"watchNamespace": "Not_A_Namespace"}}, "/operator/watchNamespace"),
    "bad-service-type": ({"operator": {"service": {"type": "Ingress"}}}, "/operator/service/type"),
    "ep-not-dividing-16": ({"examples": {"tinyModel": {"expertParallelism": 3}}}, "expertParallelism"),
    "example-name-too-long": ({"examples": {"tinyModel": {"name": "x" * 41}}}, "/examples/tinyModel/name"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_values_schema_rejects_bad_values(case: str):
    values, where = BAD_VALUES[case]
    with helm.Chart.load(CHART_DIR) as chart:
        with pytest.raises(helm.HelmValuesError) as caught:
            chart.validate_schema(chart.merge_values(values))
        assert where in str(caught.value), str(caught.value)
        # And an install (render) refuses them too.
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_values_yaml_and_schema_describe_the_same_keys():
    """Every key of values.yaml is in the schema (additionalProperties false checks that) and every key the schema
    defines at a level of our own is in values.yaml, so nothing is documented in one place only."""
    with helm.Chart.load(CHART_DIR) as chart:
        schema = chart.schema
        values = chart.values
    assert schema is not None

    def walk(node: dict[str, Any], value: dict[str, Any], path: str) -> None:
        props = node.get("properties")
        if not props:
            return
        assert node.get("additionalProperties") is False, f"{path or '/'}: additionalProperties is not false"
        for key, sub in props.items():
            if key == "global" and not path:
                continue  # Helm's own
            if path in ("/operator/resources", "/gateway/resources"):
                continue  # a Kubernetes ResourceRequirements: the schema lists every field, values only some
            assert key in value, f"{path}/{key} is in values.schema.json but not in values.yaml"
            if sub.get("type") == "object" and isinstance(value[key], dict):
                walk(sub, value[key], f"{path}/{key}")

    walk(schema, values, "")
