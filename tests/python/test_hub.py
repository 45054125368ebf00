"""Models from the Hugging Face Hub: `baleen-runtime download` and `serve --model hf://...` against a Hub-compatible
server on 127.0.0.1 (tests/python/fake_hub.py) reached through HF_ENDPOINT, each test with its own cache.

The repository served is the tiny DeepSeek-V3 checkpoint the golden script made (runtime/tests/fixtures/tiny-v3),
plus files the loader does not read (which must not be downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from binaries import find_binary
from conftest import REPO_ROOT, runtime_bin, start_server
from fake_hub import FakeHub, HubRepo
from openai import OpenAI

FIXTURE = REPO_ROOT / "runtime/tests/fixtures/tiny-v3"
TOKEN = "hf_baleen_test_token"
COMMIT = "1" * 40
RESUME_COMMIT = "4" * 40
# The files of the fixture the loader reads (golden.* are the test's own, not the model's).
MODEL_FILES = sorted(p.name for p in FIXTURE.iterdir() if p.is_file() and not p.name.startswith("golden"))
WEIGHTS = "model.safetensors"
DOWNLOAD_TIMEOUT_S = 120


def model_repo(commit: str, **kwargs) -> HubRepo:
    repo = HubRepo.from_dir(FIXTURE, commit, **kwargs)
    for name in list(repo.files):
        if name.startswith("golden"):
            del repo.files[name]
    # Files a Hub repository has that the loader does not read.
    repo.files["README.md"] = b"# tiny-v3\n"
    repo.files["pytorch_model.bin"] = b"\0" * 4096
    repo.files["figures/arch.png"] = b"png"
    return repo


@pytest.fixture(scope="module")
def hub():
    weights = (FIXTURE / WEIGHTS).read_bytes()
    tampered = bytearray(weights)
    tampered[len(tampered) // 2] ^= 0xFF
    h = FakeHub(
        {
            "test/tiny-v3": model_repo(COMMIT, refs=("main", "v1")),
            "test/gated": model_repo("2" * 40, gated=True),
            "test/corrupt": model_repo("3" * 40, tampered={WEIGHTS: bytes(tampered)}),
            "test/resume": model_repo(RESUME_COMMIT),
            "test/no-weights": HubRepo(files={"config.json": b"{}", "tokenizer.json": b"{}", "model.bin": b"x"}),
        },
        token=TOKEN,
    )
    yield h
    h.close()


def hub_env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    """The Hub variables for one test: its own HF_HOME (cache and token file), the fake Hub, no token unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(home), "HF_ENDPOINT": hub.url, "BALEEN_RUNTIME_LOG": "info"}
    return env | extra


def download(env: dict[str, str], model: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(runtime_bin()), "download", "--model", model, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DOWNLOAD_TIMEOUT_S,
        cwd=REPO_ROOT,
    )


def ok(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, f"download failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def failed(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, f"expected a failure, got:\n{result.stdout}\n{result.stderr[-2000:]}"
    return result.stderr


def chat(server, model: str) -> tuple[str, list]:
    out = server.client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello from the Hub"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    choice = out.choices[0]
    top = [[(t.token, t.logprob) for t in tok.top_logprobs] for tok in choice.logprobs.content]
    return choice.message.content, top


def test_a_hub_model_downloads_once_then_serves_from_the_cache_with_the_same_logits(hub, tmp_path):
    home = tmp_path / "hf"
    env = hub_env(hub, home)
    cache = home / "hub" / "models--test--tiny-v3"
    first = len(hub.log())

    # A bare org/name, as vLLM takes it: downloaded on first use.
    s = start_server(tmp_path / "s1", model="test/tiny-v3", env=env)
    try:
        assert [m.id for m in s.client().models.list().data] == ["test/tiny-v3"]
        got = chat(s, "test/tiny-v3")
    finally:
        assert s.stop() == 0
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.log()[first:] if "/resolve/" in r.path}
    assert fetched == set(MODEL_FILES), "exactly the files the loader reads, nothing else"
    snapshot = cache / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == MODEL_FILES
    for name in MODEL_FILES:
        link = snapshot / name
        assert link.is_symlink() and link.resolve().parent == cache / "blobs", name
        assert link.read_bytes() == (FIXTURE / name).read_bytes(), name
    weights_blob = (snapshot / WEIGHTS).resolve().name
    assert weights_blob == hashlib.sha256((FIXTURE / WEIGHTS).read_bytes()).hexdigest(), "LFS blobs named by SHA-256"
    assert (cache / "refs" / "main").read_text() == COMMIT
    assert not (cache / "refs" / COMMIT).exists()

    # The same checkpoint from its directory gives the same tokens and log-probabilities.
    d = start_server(tmp_path / "disk", model=str(FIXTURE))
    try:
        want = chat(d, str(FIXTURE))
    finally:
        assert d.stop() == 0
    assert got == want

    # Again: the complete cached snapshot serves without a single request to the Hub.
    before = len(hub.log())
    s = start_server(tmp_path / "s2", model="hf://test/tiny-v3", env=env)
    try:
        assert chat(s, "test/tiny-v3") == want
    finally:
        assert s.stop() == 0
    assert hub.log()[before:] == []

    # `download` asks the Hub which commit `main` is now (one request) and finds nothing to fetch.
    before = len(hub.log())
    out = ok(download(env, "hf://test/tiny-v3"))
    assert out["path"] == str(snapshot) and out["commit"] == COMMIT
    assert (out["files"], out["downloaded_bytes"], out["from_cache"]) == (len(MODEL_FILES), 0, False)
    assert [r.path for r in hub.log()[before:]] == ["/api/models/test/tiny-v3/revision/main"]

    # Offline with a warm cache: serves, no request.
    before = len(hub.log())
    s = start_server(tmp_path / "s3", model="hf://test/tiny-v3", env=env | {"HF_HUB_OFFLINE": "1"})
    try:
        assert chat(s, "test/tiny-v3") == want
    finally:
        assert s.stop() == 0
    assert hub.log()[before:] == []


def test_download_reports_progress_in_log_lines_and_pins_tags(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    result = download(env, "hf://test/tiny-v3@v1")
    out = ok(result)
    size = sum((FIXTURE / n).stat().st_size for n in MODEL_FILES)
    assert out["downloaded_bytes"] == size and out["model"] == "hf://test/tiny-v3@v1"
    # Not a terminal: one line per file started and finished, and a total at the end.
    log = result.stderr
    assert log.count("downloading") >= len(MODEL_FILES) and "model.safetensors" in log, log
    assert "downloaded: " in log and "(100.0%)" in log, log
    assert (tmp_path / "hf/hub/models--test--tiny-v3/refs/v1").read_text() == COMMIT
    # A commit hash is its own revision.
    out = ok(download(env, f"hf://test/tiny-v3@{COMMIT}"))
    assert out["commit"] == COMMIT and out["downloaded_bytes"] == 0


def test_missing_gated_and_unknown_revisions_fail_with_what_to_do(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    err = failed(download(env, "hf://test/missing"))
    assert "test/missing: no such model repository" in err and "HF_TOKEN" in err, err
    err = failed(download(env, "hf://test/gated"))
    assert "test/gated is gated" in err and "HF_TOKEN" in err and "restricted" in err, err
    err = failed(download(env, "hf://test/tiny-v3@no-such-branch"))
    assert "revision `no-such-branch` does not exist" in err, err
    err = failed(download(env, "hf://test/no-weights"))
    assert "safetensors" in err, err
    err = failed(download(env, str(FIXTURE)))
    assert "is not a Hub model" in err, err
    assert not (tmp_path / "hf/hub/models--test--gated/snapshots").exists()

    # The token, from HF_TOKEN or from the token file `huggingface-cli login` writes.
    assert ok(download(env | {"HF_TOKEN": TOKEN}, "hf://test/gated"))["downloaded_bytes"] > 0
    (tmp_path / "hf2").mkdir()
    (tmp_path / "hf2/token").write_text(TOKEN + "\n")
    before = len(hub.log())
    ok(download(hub_env(hub, tmp_path / "hf2"), "hf://test/gated"))
    hub_requests = [r for r in hub.log()[before:] if not r.path.startswith("/cdn/")]
    assert hub_requests and all(r.authorized for r in hub_requests)


def test_offline_without_the_model_in_the_cache_fails_without_a_request(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf", HF_HUB_OFFLINE="1")
    before = len(hub.log())
    err = failed(download(env, "hf://test/tiny-v3"))
    assert "test/tiny-v3@main is not (completely) in the Hub cache" in err and "HF_HUB_OFFLINE" in err, err
    serve = subprocess.run(
        [str(runtime_bin()), "serve", "--model", "hf://test/tiny-v3", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DOWNLOAD_TIMEOUT_S,
    )
    assert serve.returncode != 0 and "HF_HUB_OFFLINE" in serve.stderr, serve.stderr
    assert hub.log()[before:] == []


def test_an_unreachable_hub_is_an_error_unless_the_cache_has_the_model(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    ok(download(env, "hf://test/tiny-v3"))
    # A closed port: nothing listens on port 9 of 127.0.0.1 in the tests' machines.
    away = env | {"HF_ENDPOINT": "http://127.0.0.1:9"}
    result = download(away, "hf://test/tiny-v3")
    out = ok(result)
    assert out["commit"] == COMMIT and out["from_cache"] is True
    assert "cannot be reached" in result.stderr, result.stderr
    err = failed(download(hub_env(hub, tmp_path / "cold") | {"HF_ENDPOINT": "http://127.0.0.1:9"}, "test/tiny-v3"))
    assert "cannot reach http://127.0.0.1:9" in err and "HF_HUB_OFFLINE" in err, err


def test_a_corrupted_transfer_is_refused_and_removed(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    err = failed(download(env, "hf://test/corrupt"))
    assert "model.safetensors: SHA-256 is" in err and "run again" in err, err
    cache = tmp_path / "hf/hub/models--test--corrupt"
    assert not (cache / "snapshots" / ("3" * 40) / WEIGHTS).exists()
    assert not [p for p in (cache / "blobs").iterdir() if len(p.name) == 64], "the bad blob is gone"


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    chunk = 64 * 1024
    stall_at = 4 * chunk
    hub.stall("test/resume", WEIGHTS, stall_at)
    cmd = [str(runtime_bin()), "download", "--model", "hf://test/resume", "--chunk-size", "64K", "--parallel", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    try:
        assert hub.stalled.wait(timeout=DOWNLOAD_TIMEOUT_S), "the download never reached the stalled range"
        time.sleep(1.0)  # the chunks before the stall are written and committed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        hub.release()
    blobs = tmp_path / "hf/hub/models--test--resume/blobs"
    parts = list(blobs.glob("*.sync.part"))
    assert len(parts) == 1, list(blobs.iterdir())
    assert not (tmp_path / "hf/hub/models--test--resume/snapshots" / RESUME_COMMIT / WEIGHTS).exists()
    # hf-hub's part file is the file's length plus the count of leading bytes it has written (little-endian u64):
    # the chunks before the first one missing. The chunks take the download slots in file order, so that is
    # every chunk before the stalled one.
    size = (FIXTURE / WEIGHTS).stat().st_size
    part = parts[0].read_bytes()
    assert len(part) == size + 8
    assert int.from_bytes(part[size:], "little") == stall_at

    before = len(hub.log())
    ok(download(env, "hf://test/resume", "--chunk-size", "64K", "--parallel", "2"))
    starts = [
        int(r.range.split("=")[1].split("-")[0])
        for r in hub.log()[before:]
        if r.path == f"/cdn/test/resume/{WEIGHTS}" and r.range and r.range != "bytes=0-0"
    ]
    assert starts and min(starts) == stall_at, f"the second run fetched bytes the first had: {sorted(starts)}"
    snapshot = tmp_path / "hf/hub/models--test--resume/snapshots" / RESUME_COMMIT
    assert (snapshot / WEIGHTS).read_bytes() == (FIXTURE / WEIGHTS).read_bytes()
    assert not list(blobs.glob("*.sync.part"))


def baleen_bin() -> Path:
    return find_binary("baleen", "BALEEN_BIN")


def test_baleen_up_downloads_a_hub_model_once_and_every_rank_loads_it_from_the_cache(hub, tmp_path):
    """`baleen up` on an `hf://` manifest: one `download` fills the cache, then an expert-parallel group of two
    ranks starts from it without a request, behind the gateway, serving the repo's name."""
    home = tmp_path / "hf"
    env = hub_env(hub, home)
    manifest = tmp_path / "model.yaml"
    manifest.write_text(
        "apiVersion: baleen.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: tiny}\n"
        "spec:\n  model: {source: 'hf://test/tiny-v3@v1', dtype: f32}\n  parallelism: {expert: 2}\n"
    )
    before = len(hub.log())
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 — the child writes to it for its whole life
    proc = subprocess.Popen(
        [str(baleen_bin()), "up", str(manifest), "--port", "0", "--admin-port", "0", "--ready-timeout", "170"],
        env=env | {"BALEEN_RUNTIME_BIN": str(runtime_bin())},
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=REPO_ROOT,
    )
    log.close()
    try:
        base = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if "OpenAI base URL: " in line:
                base = line.split("OpenAI base URL: ")[1].strip()
                break
        assert base, f"no ready banner (exit {proc.poll()}):\n{(tmp_path / 'up.log').read_text()[-3000:]}"
        # hf-hub asks for byte 0 of a file (its metadata), then for the whole file: once each, by one process.
        downloads = [r for r in hub.log()[before:] if "/resolve/" in r.path and r.range != "bytes=0-0"]
        assert sorted(r.path.rsplit("/", 1)[-1] for r in downloads) == MODEL_FILES, "each file once, by one process"
        assert all(f"/resolve/{COMMIT}/" in r.path for r in downloads), "pinned to the tag's commit"
        served = OpenAI(base_url=base, api_key="unused", max_retries=0)
        assert [m.id for m in served.models.list().data] == ["test/tiny-v3"]
        out = served.chat.completions.create(
            model="test/tiny-v3", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert out.usage.completion_tokens > 0
        loaded = len(hub.log())
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert rc == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert hub.log()[loaded:] == []
    assert (home / "hub" / "models--test--tiny-v3" / "refs" / "v1").read_text() == COMMIT
