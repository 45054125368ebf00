"""Every object the operator renders, checked against the real Kubernetes OpenAPI schemas.

`kubernetes-validate --strict -k 1.33.0` (the oldest Kubernetes Baleen supports) validates the CRD and every object
`baleen-operator render` emits for every example in deploy/examples — rendered fresh here, never read from the
committed deploy/manifests. kubernetes-validate knows no schema for custom resources (PodMonitor, ModelDeployment)
and only warns about them, so the tests assert that every core object is reported as *passed*, check the examples
against the generated CRD's own schema with jsonschema, and prove the checks can fail: a broken StatefulSet is
rejected, and an invalid ModelDeployment makes `render` exit non-zero naming the field. The committed generated
files must equal fresh output (`scripts/gen-deploy.sh --check`).

The operator binary is `$BALEEN_OPERATOR_BIN`, or `target/debug/baleen-operator`; a missing binary fails the tests,
it never skips them.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from binaries import find_binary

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO_ROOT / "deploy" / "examples").glob("*.yaml"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
KUBERNETES_VERSION = "1.33.0"
CORE_KINDS = {"Service", "StatefulSet", "PodDisruptionBudget", "CustomResourceDefinition"}
CUSTOM_KINDS = {"PodMonitor"}
PASSED = re.compile(r"^INFO .* passed for resource (\S+)/(\S+) against version")


def operator_bin() -> Path:
    """The operator binary; fails (never skips) with a clear message when it is absent."""
    return find_binary("baleen-operator", "BALEEN_OPERATOR_BIN")


def validator() -> Path:
    path = Path(sys.executable).parent / "kubernetes-validate"
    if not path.is_file():
        pytest.fail(f"kubernetes-validate not found next to {sys.executable}; pip install -r tests/python/requirements.txt")
    return path


def run_operator(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RUST_BACKTRACE="0")
    return subprocess.run([str(operator_bin()), *args], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60)


def render(example: Path, *flags: str) -> str:
    result = run_operator("render", "-f", str(example), *flags)
    assert result.returncode == 0, f"render -f {example.name} failed:\n{result.stderr}"
    return result.stdout


def kubernetes_validate(path: Path) -> tuple[int, str]:
    result = subprocess.run(
        [str(validator()), "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def passed_resources(output: str) -> set[tuple[str, str]]:
    return {(m.group(1), m.group(2)) for line in output.splitlines() if (m := PASSED.match(line))}


def assert_all_core_objects_pass(path: Path, docs: list[dict]) -> None:
    code, output = kubernetes_validate(path)
    assert code == 0, f"kubernetes-validate rejected {path.name}:\n{output}"
    passed = passed_resources(output)
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in CUSTOM_KINDS:
            continue
        assert kind in CORE_KINDS, f"unexpected kind {kind}: add it to CORE_KINDS or CUSTOM_KINDS"
        assert (kind.lower(), name) in passed, f"{kind}/{name} was not validated:\n{output}"


def test_the_crd_passes_strict_validation(tmp_path: Path) -> None:
    result = run_operator("crd")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "crd.yaml"
    path.write_text(result.stdout)
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["CustomResourceDefinition"]
    assert_all_core_objects_pass(path, docs)


@pytest.mark.parametrize("pod_monitor", [False, True], ids=["default", "pod-monitor"])
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_every_rendered_object_passes_strict_validation(example: Path, pod_monitor: bool, tmp_path: Path) -> None:
    text = render(example, *(["--pod-monitor"] if pod_monitor else []))
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    kinds = [d["kind"] for d in docs]
    md = yaml.safe_load(example.read_text())
    replicas = md["spec"].get("replicas", 1)
    assert kinds.count("StatefulSet") == replicas and kinds.count("Service") == replicas + 1, kinds
    assert kinds.count("PodDisruptionBudget") == 1
    assert kinds.count("PodMonitor") == int(pod_monitor)
    path = tmp_path / example.name
    path.write_text(text)
    assert_all_core_objects_pass(path, docs)


def test_there_are_examples_of_every_source_kind_and_expert_parallelism() -> None:
    names = {e.stem for e in EXAMPLES}
    assert {"tiny-local", "tiny-cpu-ep2", "deepseek-v2-lite", "scale-to-zero"} <= names, names
    specs = [yaml.safe_load(e.read_text())["spec"] for e in EXAMPLES]
    assert any(s["model"]["source"].startswith("hf://") for s in specs)
    assert any(s.get("parallelism", {}).get("expert", 1) > 1 for s in specs)
    assert any(s.get("autoscaling", {}).get("minReplicas") == 0 for s in specs)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_examples_match_the_crd_schema(example: Path) -> None:
    """kubernetes-validate cannot check custom resources: check each example against the CRD's own schema."""
    crd = yaml.safe_load(run_operator("crd").stdout)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate(yaml.safe_load(example.read_text()), schema)


def test_the_crd_schema_check_can_fail() -> None:
    crd = yaml.safe_load(run_operator("crd").stdout)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    md = yaml.safe_load((REPO_ROOT / "deploy" / "examples" / "tiny-local.yaml").read_text())
    md["spec"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(md, schema)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda s: s["spec"].__setitem__("replicas", "two"), "spec.replicas"),
        (lambda s: s["spec"]["template"]["spec"]["containers"][0].__setitem__("colour", "red"), "colour"),
        (lambda s: s["spec"].__delitem__("selector"), "selector"),
    ],
    ids=["string-replicas", "unknown-field", "missing-selector"],
)
def test_the_validator_rejects_a_broken_statefulset(break_it, message: str, tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(render(REPO_ROOT / "deploy" / "examples" / "tiny-cpu-ep2.yaml")))
    statefulset = copy.deepcopy(next(d for d in docs if d["kind"] == "StatefulSet"))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(statefulset))
    assert kubernetes_validate(good)[0] == 0
    break_it(statefulset)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(statefulset))
    code, output = kubernetes_validate(bad)
    assert code != 0, f"a broken StatefulSet was accepted:\n{output}"
    assert "did not validate" in output and message in output, output


def test_render_refuses_an_invalid_model_deployment_naming_the_field() -> None:
    result = run_operator("render", "-f", str(FIXTURES / "invalid-modeldeployment.yaml"))
    assert result.returncode != 0
    assert result.stdout == "", "nothing is rendered for an invalid input"
    assert "spec.parallelism.expert" in result.stderr and "document 1" in result.stderr, result.stderr


def test_the_committed_deploy_files_equal_fresh_output() -> None:
    env = dict(os.environ, BALEEN_OPERATOR_BIN=str(operator_bin()))
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gen-deploy.sh"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, f"stale generated files (run scripts/gen-deploy.sh):\n{result.stdout}{result.stderr}"


def test_the_freshness_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    """Runs gen-deploy.sh --check on a copy of the deploy files with one manifest edited and one removed."""
    copy_root = tmp_path / "repo"
    (copy_root / "scripts").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "scripts" / "gen-deploy.sh", copy_root / "scripts" / "gen-deploy.sh")
    shutil.copytree(REPO_ROOT / "deploy" / "examples", copy_root / "deploy" / "examples")
    shutil.copytree(REPO_ROOT / "deploy" / "crds", copy_root / "deploy" / "crds")
    shutil.copytree(REPO_ROOT / "deploy" / "manifests", copy_root / "deploy" / "manifests")
    crd_dir = copy_root / "charts" / "baleen" / "files" / "crds"
    crd_dir.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "charts" / "baleen" / "files" / "crds" / "modeldeployments.baleen.dev.yaml", crd_dir)
    env = dict(os.environ, BALEEN_OPERATOR_BIN=str(operator_bin()))
    check = ["bash", str(copy_root / "scripts" / "gen-deploy.sh"), "--check"]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(check, capture_output=True, text=True, env=env, timeout=120)

    assert run().returncode == 0, "the unmodified copy is fresh"
    manifest = copy_root / "deploy" / "manifests" / "tiny-local.yaml"
    manifest.write_text(manifest.read_text().replace("replicas: 1", "replicas: 2"))
    (copy_root / "deploy" / "manifests" / "scale-to-zero.yaml").unlink()
    result = run()
    assert result.returncode != 0
    assert "replicas: 2" in result.stdout and "scale-to-zero.yaml" in result.stdout, result.stdout
