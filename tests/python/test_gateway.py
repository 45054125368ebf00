"""The official OpenAI SDK through `baleen-gateway serve` (the binary, static discovery) in front of two real
`baleen-runtime serve` processes: strict response validation, streams that arrive chunk by chunk, the same
greedy text as a runtime answering directly, and OpenAI-shaped errors the SDK raises as its typed exceptions.

The gateway binary is `$BALEEN_GATEWAY_BIN`, or `target/debug/baleen-gateway` (scripts/test.sh builds it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from binaries import find_binary
from conftest import MODEL, REPO_ROOT, Server, start_server
from openai import OpenAI

LISTENING = re.compile(r"^baleen-gateway listening on (http://\S+) admin (http://\S+)$")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 40.0
GREEDY = {"temperature": 0.0, "seed": 0}


@dataclass
class Gateway:
    proc: subprocess.Popen
    url: str
    admin: str
    log_path: Path

    def client(self, strict: bool = True) -> OpenAI:
        """Strict response validation unless the SDK's own types are wrong (completion chunks' finish_reason)."""
        return OpenAI(
            base_url=f"{self.url}/v1",
            api_key="unused",
            timeout=60.0,
            max_retries=0,
            _strict_response_validation=strict,
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=10) as r:
            return r.read().decode()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory):
    servers = [start_server(tmp_path_factory.mktemp(f"replica{i}")) for i in range(2)]
    yield servers
    for s in servers:
        assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def gateway(replicas: list[Server], tmp_path_factory: pytest.TempPathFactory):
    binary = find_binary("baleen-gateway", "BALEEN_GATEWAY_BIN")
    tmp = tmp_path_factory.mktemp("gateway")
    config = tmp / "gateway.yaml"
    backends = "\n".join(f"      - {s.url}" for s in replicas)
    config.write_text(f"models:\n  - name: {MODEL}\n    policy: round-robin\n    backends:\n{backends}\n")
    log_path = tmp / "gateway.log"
    log = open(log_path, "wb")  # noqa: SIM115 — the child writes to it for its whole life
    cmd = [str(binary), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0", "--admin-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=dict(os.environ), cwd=REPO_ROOT, text=True)
    log.close()
    lines: list[str] = []
    got = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            got.set()
        got.set()

    threading.Thread(target=read, daemon=True).start()
    if not got.wait(timeout=START_TIMEOUT_S) or not lines:
        proc.kill()
        proc.wait()
        pytest.fail(f"{' '.join(cmd)} printed no listening line\n{log_path.read_text(errors='replace')}")
    match = LISTENING.match(lines[0])
    assert match, f"unexpected first line {lines[0]!r}"
    gw = Gateway(proc=proc, url=match.group(1), admin=match.group(2), log_path=log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # the model is listed once a probe found a backend ready
        try:
            with urllib.request.urlopen(f"{gw.url}/v1/models", timeout=5) as r:
                if MODEL in r.read().decode():
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the gateway never listed {MODEL}\n{gw.log()}"
        time.sleep(0.05)
    yield gw
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the gateway did not exit within {STOP_TIMEOUT_S}s of SIGTERM\n{gw.log()}") from None
    assert code == 0, f"the gateway exited {code}\n{gw.log()}"


def test_models_lists_the_model_of_the_ready_backends(gateway: Gateway):
    models = gateway.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_models_retrieve_through_the_gateway(gateway: Gateway):
    model = gateway.client().models.retrieve(MODEL)
    assert (model.id, model.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().models.retrieve("org/other-model")
    assert caught.value.body["code"] == "model_not_found"
    assert f"`{MODEL}`" in caught.value.body["message"], caught.value.body


def test_chat_through_the_gateway_matches_a_replica_answering_directly(gateway: Gateway, replicas: list[Server]):
    messages = [{"role": "user", "content": "Say something about whales."}]
    direct = replicas[0].client().chat.completions.create(model=MODEL, messages=messages, max_tokens=16, **GREEDY)
    # Round robin: two requests reach both replicas; both answer as the direct one did (same weights, greedy).
    for _ in range(2):
        r = gateway.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=16, **GREEDY)
        assert r.object == "chat.completion"
        assert r.choices[0].message.content == direct.choices[0].message.content
        assert r.usage is not None and r.usage.completion_tokens == direct.usage.completion_tokens


def test_streams_arrive_chunk_by_chunk_with_usage(gateway: Gateway):
    stream = gateway.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=400,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    arrivals = []
    chunks = []
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    assert len(chunks) >= 400
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 400
    # Streamed, not buffered: the first chunk came well before the last (a buffering proxy delivers them at once).
    assert arrivals[-1] - arrivals[0] > 0.0
    first_half = sum(1 for t in arrivals if t < arrivals[0] + (arrivals[-1] - arrivals[0]) / 2)
    assert 0 < first_half < len(arrivals), "every chunk arrived at the same moment"


def test_completions_stream_through_the_gateway(gateway: Gateway):
    want = gateway.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, **GREEDY)
    # The SDK types a completion chunk's finish_reason as required; streams send null until the last chunk.
    stream = gateway.client(strict=False).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True, **GREEDY
    )
    chunks = list(stream)
    assert chunks and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text


def test_errors_are_the_sdk_typed_exceptions(gateway: Gateway):
    client = gateway.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert MODEL in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.status_code == 400


def test_the_gateway_counts_what_it_served(gateway: Gateway, replicas: list[Server]):
    gateway.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    page = gateway.metrics()
    for s in replicas:
        line = next(
            (l for l in page.splitlines() if l.startswith("baleen_gateway_requests_total{") and s.url in l and 'code="200"' in l),
            None,
        )
        assert line is not None, page
        assert float(line.rsplit(" ", 1)[1]) >= 1
    assert "baleen_gateway_time_to_first_byte_seconds_bucket" in page
