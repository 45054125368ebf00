"""Where the tests find the project's binaries: `$VAR`, or `target/debug/NAME` under the repository root.

A missing binary fails the test that needs it with how to build it; it never skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_binary(name: str, env_var: str) -> Path:
    """The executable `name` (a cargo binary of this workspace), from `$env_var` or the default debug build."""
    env = os.environ.get(env_var)
    path = Path(env) if env else REPO_ROOT / "target" / "debug" / name
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        how = env_var if env else "the default path"
        pytest.fail(
            f"{name} binary not found at {path} (from {how}); build it with `cargo build -p {name}` or set {env_var}",
            pytrace=False,
        )
    return path
