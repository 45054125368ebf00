#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a loop.

Reads every `.rs` file under a crate's `src/`, maps it to its module path (`crate::server::chat`), and collects the
modules each one names through `crate::…`, `super::…` and `self::…` paths (in `use` items and in code). An edge
between a module and one of its ancestors or descendants is containment, not a dependency, and is left out; any
other edge is a dependency of one file on another. A strongly connected set of two or more modules is a loop:
each is printed with the lines that close it, and the exit status is 1.

    scripts/check-module-cycles.py runtime gateway operator cli api
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super|self)::((?:[A-Za-z_][A-Za-z0-9_]*::)*)\{([^;]*)\};", re.S)


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("lib", "main", "mod"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def strip_tests(text: str) -> str:
    """Drops `#[cfg(test)] mod … { … }` blocks: tests may reach anywhere."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def resolve(base: tuple[str, ...], head: str, rest: list[str], modules: set[tuple[str, ...]]) -> tuple[str, ...]:
    if head == "crate":
        path = []
    elif head == "self":
        path = list(base)
    else:
        path = list(base[:-1])
        while rest and rest[0] == "super":
            rest = rest[1:]
            path = path[:-1]
    best = tuple(path)
    for part in rest:
        path.append(part)
        if tuple(path) in modules:
            best = tuple(path)
        else:
            break
    return best


def related(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return a[: len(b)] == b or b[: len(a)] == a


def edges_of(crate: Path) -> tuple[dict, dict]:
    src = crate / "src"
    files = {module_of(src, f): f for f in sorted(src.rglob("*.rs"))}
    modules = set(files)
    graph: dict[tuple, set] = {m: set() for m in modules}
    where: dict[tuple, list[str]] = {}
    for module, file in files.items():
        text = strip_tests(strip_comments(file.read_text()))
        found: list[tuple[str, list[str], int]] = []
        for m in USE_GROUP_RE.finditer(text):
            prefix = [p for p in m.group(2).split("::") if p]
            line = text.count("\n", 0, m.start()) + 1
            for item in re.split(r",", m.group(3)):
                names = [p for p in re.split(r"::", item.strip()) if p and re.match(r"^[A-Za-z_]\w*$", p)]
                found.append((m.group(1), prefix + names, line))
        for m in PATH_RE.finditer(text):
            rest = [p for p in m.group(2).split("::") if p and p != "{"]
            found.append((m.group(1), rest, text.count("\n", 0, m.start()) + 1))
        for head, rest, line in found:
            target = resolve(module, head, rest, modules)
            if target != module and not related(module, target):
                graph[module].add(target)
                where.setdefault((module, target), []).append(f"{file}:{line}")
    return graph, where


def strongly_connected(graph: dict) -> list[list]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(component)

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def name(module: tuple) -> str:
    return "crate::" + "::".join(module) if module else "crate"


def main(crates: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    loops = 0
    for crate in crates:
        graph, where = edges_of(root / crate)
        for component in strongly_connected(graph):
            loops += 1
            members = set(component)
            print(f"{crate}: modules import each other in a loop: {', '.join(sorted(map(name, members)))}")
            for a in sorted(members):
                for b in sorted(graph[a] & members):
                    print(f"  {name(a)} -> {name(b)}  ({where[(a, b)][0]})")
    if loops:
        print(f"{loops} loop(s); give each dependency one direction (see CONTRIBUTING.md)")
        return 1
    print(f"no module loops in {', '.join(crates)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["runtime"]))
