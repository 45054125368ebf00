"""Fixtures for the OpenAI-SDK conformance tests: real `baleen-runtime serve` processes on 127.0.0.1.

The binary is `$BALEEN_RUNTIME_BIN`, or `target/debug/baleen-runtime` under the repository root
(`scripts/test.sh` builds it). A missing binary fails the tests; it never skips them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from binaries import find_binary
from openai import OpenAI

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"^baleen-runtime listening on (http://\S+)$")
MODEL = "tiny-moe"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 40.0


def runtime_bin() -> Path:
    """The server binary; fails (not skips) with a clear message when it is absent."""
    return find_binary("baleen-runtime", "BALEEN_RUNTIME_BIN")


@dataclass
class Server:
    """One running `baleen-runtime serve`."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    def client(self, strict: bool = True, **kwargs) -> OpenAI:
        """An SDK client with strict response validation (`strict=False` only where the SDK's types are wrong)."""
        kwargs.setdefault("timeout", 60.0)
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("api_key", "unused")
        return OpenAI(
            base_url=f"{self.url}/v1",
            _strict_response_validation=strict,
            **kwargs,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM, then wait for the drain and exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the server did not exit within {STOP_TIMEOUT_S}s of SIGTERM\n{self.log()}")
        return self.proc.returncode


def start_server(
    tmp_dir: Path, *extra: str, model: str = "builtin:tiny-moe", env: dict[str, str] | None = None
) -> Server:
    """Starts `serve --model MODEL` on a free port (`env` added to the environment), parses the listening line,
    waits for /ready."""
    binary = runtime_bin()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    log_path = tmp_dir / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 — the child writes to it for its whole life
    cmd = [
        str(binary),
        "serve",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *extra,
    ]
    full_env = dict(os.environ) | (env or {})
    full_env.setdefault("BALEEN_RUNTIME_LOG", "warn")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=full_env, cwd=REPO_ROOT, text=True)
    log.close()
    lines: list[str] = []
    got_line = threading.Event()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            got_line.set()
        got_line.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    server = Server(proc=proc, url="", log_path=log_path, stdout_lines=lines)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not lines:
        if not got_line.wait(timeout=max(0.0, deadline - time.monotonic())) or (not lines and proc.poll() is not None):
            proc.kill()
            proc.wait()
            pytest.fail(f"{' '.join(cmd)} printed no listening line (exit {proc.returncode})\n{server.log()}")
    match = LISTENING.match(lines[0])
    if not match:
        proc.kill()
        proc.wait()
        pytest.fail(f"unexpected first stdout line {lines[0]!r}; want 'baleen-runtime listening on http://HOST:PORT'")
    server.url = match.group(1)
    while True:
        status = None
        try:
            status, _ = server.get("/ready")
        except (urllib.error.URLError, OSError):
            pass
        if status == 200:
            return server
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            pytest.fail(f"{server.url}/ready never answered 200 (last {status})\n{server.log()}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The main server: default limits."""
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    code = s.stop()
    assert code == 0, f"the server exited {code} after SIGTERM\n{s.log()}"


@pytest.fixture(scope="session")
def limited_server(tmp_path_factory: pytest.TempPathFactory):
    """A server with tiny limits: one running sequence, one waiting, 2 KiB bodies."""
    s = start_server(
        tmp_path_factory.mktemp("limited"),
        "--max-num-seqs",
        "1",
        "--max-waiting",
        "1",
        "--max-request-bytes",
        "2048",
    )
    yield s
    code = s.stop()
    assert code == 0, f"the limited server exited {code} after SIGTERM\n{s.log()}"


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return server.client()
