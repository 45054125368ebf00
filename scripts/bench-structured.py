#!/usr/bin/env python3
"""The per-token cost of structured outputs: generated tokens/s of `baleen-runtime serve` with and without a
`response_format` JSON schema, side by side in one run (interleaved rounds, so machine noise hits both alike).

    scripts/bench-structured.py                      # target/release/baleen-runtime, builtin:tiny-moe
    scripts/bench-structured.py --bin target/debug/baleen-runtime --rounds 3 --concurrency 8

Each round runs `--requests` chat completions at `--concurrency` without a schema (free text, `max_tokens` 64,
`ignore_eos`), then the same with the whale schema (its grammar ends each answer at the closing brace, so the
token counts differ; tokens/s is what compares). Tokens come from each answer's `usage`. Prints a markdown table
and the ratio (schema / free); one JSON line per round goes to target/bench/structured.jsonl. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENING = "baleen-runtime listening on "
WHALE = json.loads((ROOT / "tests/support/whale-schema.json").read_text())


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def run(url: str, schema: bool, requests: int, concurrency: int) -> tuple[int, float]:
    def one(seed: int) -> int:
        body = {
            "model": "tiny-moe", "messages": [{"role": "user", "content": "A whale as JSON."}], "max_tokens": 64,
            "temperature": 1.0, "seed": seed, "ignore_eos": True,
        }
        if schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "whale", "schema": WHALE}}
        return post(url, body)["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/release/baleen-runtime"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    if not Path(args.bin).exists():
        print(f"error: {args.bin} not found (cargo build --release -p baleen-runtime, or --bin)", file=sys.stderr)
        return 1
    out = ROOT / "target/bench"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [args.bin, "serve", "--model", "builtin:tiny-moe", "--host", "127.0.0.1", "--port", "0", "--threads", "1"]
    env = {**os.environ, "BALEEN_RUNTIME_LOG": "warn"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if not line.startswith(LISTENING):
            print(f"error: unexpected first line {line!r}", file=sys.stderr)
            return 1
        url = line.removeprefix(LISTENING) + "/v1/chat/completions"
        run(url, True, args.concurrency, args.concurrency)  # warm-up: builds the grammar engine once
        rows = []
        with open(out / "structured.jsonl", "a") as jsonl:
            for r in range(args.rounds):
                for schema in (False, True):
                    tokens, secs = run(url, schema, args.requests, args.concurrency)
                    row = {"round": r, "schema": schema, "tokens": tokens, "seconds": round(secs, 3),
                           "tokens_per_s": round(tokens / secs, 1), "bin": args.bin,
                           "concurrency": args.concurrency}
                    rows.append(row)
                    jsonl.write(json.dumps(row) + "\n")
        print(f"binary: {args.bin}; {args.requests} requests per cell at concurrency {args.concurrency}\n")
        print("| round | free tok/s | schema tok/s | schema / free |")
        print("|---|---|---|---|")
        ratios = []
        for r in range(args.rounds):
            free, sch = (next(x for x in rows if x["round"] == r and x["schema"] == s) for s in (False, True))
            ratio = sch["tokens_per_s"] / free["tokens_per_s"]
            ratios.append(ratio)
            print(f"| {r} | {free['tokens_per_s']} | {sch['tokens_per_s']} | {ratio:.2f} |")
        ratios.sort()
        print(f"\nmedian schema / free: {ratios[len(ratios) // 2]:.2f}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
