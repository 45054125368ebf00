"""Goldens for chat templates with tools: transformers' rendering of deploy/chat-templates/*.jinja.

For each conversation below, `apply_chat_template(messages, tools=..., chat_template=..., tokenize=False)` of
transformers (the reference every model card assumes) and the ids of the rendered text. runtime/tests/tokenizer.rs
renders the same conversations with Baleen's template engine and compares byte for byte.

Needs only transformers and its tokenizer dependencies (no torch):

    python3 -m venv /tmp/tmplenv && /tmp/tmplenv/bin/pip install transformers==4.57.6 jinja2
    /tmp/tmplenv/bin/python scripts/goldens/make_template_goldens.py

Deterministic: rerunning gives a byte-identical file.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "runtime" / "tests" / "fixtures"
TOKENIZER = "tiny-v3"
TEMPLATES = ["deepseek-v3-tools.jinja"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def call(i: int, name: str, arguments: str) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


CASES = [
    {
        "name": "tools are listed in the system prompt",
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather in Oslo?"},
        ],
        "tools": [WEATHER, CLOCK],
        "add_generation_prompt": True,
    },
    {
        "name": "calls, their results and the answer",
        "messages": [
            {"role": "user", "content": "Weather in Oslo and the time?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call(1, "get_weather", '{"city": "Oslo"}'), call(2, "get_time", "{}")],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear", "c": 4}'},
            {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
            {"role": "assistant", "content": "Clear, 4 °C, and it is noon."},
            {"role": "user", "content": "Thanks!"},
        ],
        "tools": [WEATHER, CLOCK],
        "add_generation_prompt": True,
    },
    {
        "name": "text before a call, no tools listed, no generation prompt",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Use metric units."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [call(3, "get_weather", '{"city":"Bergen"}')]},
            {"role": "tool", "tool_call_id": "call_3", "content": "rain"},
        ],
        "tools": None,
        "add_generation_prompt": False,
    },
]


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / TOKENIZER)
    out = {"transformers": transformers.__version__, "tokenizer": TOKENIZER, "templates": []}
    for name in TEMPLATES:
        source = (ROOT / "deploy" / "chat-templates" / name).read_text()
        cases = []
        for case in CASES:
            text = tokenizer.apply_chat_template(
                case["messages"], tools=case["tools"], chat_template=source, tokenize=False,
                add_generation_prompt=case["add_generation_prompt"],
            )
            ids = tokenizer.encode(text, add_special_tokens=False)
            cases.append({**case, "text": text, "ids": ids})
        out["templates"].append({"template": f"deploy/chat-templates/{name}", "cases": cases})
    path = FIXTURES / "chat-template-goldens.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
