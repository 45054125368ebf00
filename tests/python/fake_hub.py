"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, for the download tests (reached through HF_ENDPOINT).

It answers the requests `hf-hub` and `huggingface_hub` make, the way huggingface.co does:

- `GET /api/models/{org}/{name}/revision/{rev}?blobs=true`: the commit and the files, with sizes and (for LFS
  files) their SHA-256.
- `GET /{org}/{name}/resolve/{rev}/{file}`: small files answered directly with `ETag` (the git blob SHA-1) and
  `X-Repo-Commit`; LFS files (`*.safetensors`) as a 302 to an absolute "CDN" URL with `X-Linked-Etag` (the SHA-256),
  `X-Linked-Size` and `X-Repo-Commit`, as the Hub redirects to its storage.
- `Range: bytes=a-b` answered 206 with `Content-Range` (the end clamped to the file), on files and the CDN.
- Refusals carry `X-Error-Code`: `RepoNotFound` (401 anonymous, 404 with a token), `GatedRepo` (401 without the
  token), `RevisionNotFound` and `EntryNotFound` (404).

Every request is logged (path, range, whether it had a token) for the tests' assertions. `stall(repo, file, at)`
holds every CDN request for that file whose range starts at or after byte `at` until `release()`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    """One model repository: its files at one commit, the branches and tags that point there."""

    files: dict[str, bytes]
    commit: str = "0" * 40
    refs: tuple[str, ...] = ("main",)
    gated: bool = False
    # Bytes the CDN serves instead of the file's (a corrupted transfer), by file name.
    tampered: dict[str, bytes] = field(default_factory=dict)

    @staticmethod
    def from_dir(directory: Path, commit: str, **kwargs) -> HubRepo:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        return HubRepo(files=files, commit=commit, **kwargs)

    def is_lfs(self, name: str) -> bool:
        return name.endswith((".safetensors", ".bin", ".pth"))


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool


class FakeHub:
    def __init__(self, repos: dict[str, HubRepo], token: str):
        self.repos = repos
        self.token = token
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stall: tuple[str, str, int] | None = None
        self._released = threading.Event()
        self.stalled = threading.Event()
        # The Hub and its "CDN" on two ports: a redirect to another origin is not followed by the metadata request
        # (hf-hub follows relative redirects only), as with huggingface.co and its storage hosts.
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), self._handler()) for _ in range(2)]
        for server in self.servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)

    def close(self) -> None:
        self.release()
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def stall(self, repo: str, name: str, at: int) -> None:
        self._released.clear()
        self.stalled.clear()
        self._stall = (repo, name, at)

    def release(self) -> None:
        self._stall = None
        self._released.set()

    def log(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self.handle_any(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self.handle_any(head=False)

            def handle_any(self, head: bool) -> None:
                url = urlsplit(self.path)
                path = unquote(url.path)
                authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
                with hub._lock:
                    hub.requests.append(Request(self.command, path, self.headers.get("Range"), authorized))
                self.head = head
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
                    return self.info(m.group(1), m.group(2), authorized)
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self.resolve(m.group(1), m.group(2), m.group(3), authorized)
                if m := re.fullmatch(r"/cdn/([^/]+/[^/]+)/([^/]+)", path):
                    return self.cdn(m.group(1), m.group(2))
                self.send(404, b"not found", {"X-Error-Code": "EntryNotFound"})

            def refusal(self, repo: str, revision: str, authorized: bool) -> tuple[HubRepo | None, bool]:
                r = hub.repos.get(repo)
                if r is None:
                    self.send(
                        404 if authorized else 401,
                        b'{"error":"Repository not found"}',
                        {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                    )
                    return None, True
                if r.gated and not authorized:
                    self.send(
                        401,
                        b'{"error":"gated"}',
                        {
                            "X-Error-Code": "GatedRepo",
                            "X-Error-Message": f"Access to model {repo} is restricted. You must have access to it.",
                        },
                    )
                    return None, True
                if revision not in r.refs and revision != r.commit:
                    self.send(404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
                    return None, True
                return r, False

            def info(self, repo: str, revision: str, authorized: bool) -> None:
                r, refused = self.refusal(repo, revision, authorized)
                if refused:
                    return
                siblings = []
                for name, data in r.files.items():
                    s = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
                    if r.is_lfs(name):
                        s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    siblings.append(s)
                body = json.dumps({"id": repo, "modelId": repo, "sha": r.commit, "siblings": siblings}).encode()
                self.send(200, body, {"Content-Type": "application/json"})

            def resolve(self, repo: str, revision: str, name: str, authorized: bool) -> None:
                r, refused = self.refusal(repo, revision, authorized)
                if refused:
                    return
                data = r.files.get(name)
                if data is None:
                    self.send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
                    return
                headers = {"X-Repo-Commit": r.commit}
                if r.is_lfs(name):
                    sha = hashlib.sha256(data).hexdigest()
                    headers |= {
                        "Location": f"{hub.cdn_url}/cdn/{repo}/{name}",
                        "X-Linked-Etag": f'"{sha}"',
                        "X-Linked-Size": str(len(data)),
                        "ETag": f'"{git_blob_sha1(data)}"',
                    }
                    self.send(302, b"", headers)
                    return
                self.ranged(data, headers | {"ETag": f'"{git_blob_sha1(data)}"'})

            def cdn(self, repo: str, name: str) -> None:
                r = hub.repos.get(repo)
                if r is None or name not in r.files:
                    self.send(404, b"NoSuchKey", {})
                    return
                stall = hub._stall
                m = RANGE.match(self.headers.get("Range") or "")
                if stall and stall[:2] == (repo, name) and m and int(m.group(1)) >= stall[2]:
                    hub.stalled.set()
                    hub._released.wait(timeout=120)
                    self.close_connection = True
                    return  # the connection is dropped without an answer
                self.ranged(r.tampered.get(name, r.files[name]), {})

            def ranged(self, data: bytes, headers: dict[str, str]) -> None:
                m = RANGE.match(self.headers.get("Range") or "")
                if not m:
                    self.send(200, data, headers)
                    return
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    self.send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    return
                self.send(206, data[start : end + 1], headers | {"Content-Range": f"bytes {start}-{end}/{len(data)}"})

            def send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not self.head:
                    self.wfile.write(body)

        return Handler
