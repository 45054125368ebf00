"""scripts/check-module-cycles.py: it finds a loop between modules (and names the lines that close it), ignores
containment (a child using its parent), and no crate of the workspace has a loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check-module-cycles.py"


def run(*crates: str, cwd: Path) -> subprocess.CompletedProcess:
    # The script resolves crates relative to its own repository root; copy it next to the fake crates.
    script = cwd / "scripts" / SCRIPT.name
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(SCRIPT.read_text())
    return subprocess.run([sys.executable, str(script), *crates], capture_output=True, text=True)


def write_crate(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "fake" / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_loop_between_modules_fails_and_names_its_lines(tmp_path: Path):
    write_crate(tmp_path, {
        "lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
        "a.rs": "use crate::b::Thing;\n",
        "b.rs": "pub struct Thing;\n// use crate::a::X; (a comment is no import)\nfn f() { crate::c::g(); }\n",
        "c.rs": "use super::a;\n#[cfg(test)]\nmod tests { use crate::b::Thing; }\n",
    })
    r = run("fake", cwd=tmp_path)
    assert r.returncode == 1, r.stdout
    assert "crate::a, crate::b, crate::c" in r.stdout, r.stdout
    assert "a.rs:1" in r.stdout and "b.rs:3" in r.stdout and "c.rs:1" in r.stdout, r.stdout


def test_containment_and_one_way_imports_pass(tmp_path: Path):
    write_crate(tmp_path, {
        "lib.rs": "pub mod server;\npub mod engine;\n",
        "server.rs": "mod chat;\npub struct State;\nuse crate::engine::Engine;\nfn f() { chat::handle(); }\n",
        "server/chat.rs": "use super::State;\nuse crate::engine::{Engine, Event};\npub fn handle() {}\n",
        "engine.rs": "pub struct Engine;\npub struct Event;\n",
    })
    r = run("fake", cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    assert "no module loops" in r.stdout


def test_no_crate_of_the_workspace_has_a_module_loop():
    crates = ["runtime", "gateway", "operator", "cli", "api"]
    r = subprocess.run([sys.executable, str(SCRIPT), *crates], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
