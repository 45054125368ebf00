"""API conformance: the official `openai` SDK (strict response validation) against a real `baleen-runtime serve`.

builtin:tiny-moe has random weights and a byte-level tokenizer, so its text is meaningless; the tests check
shapes, counts, determinism and the documented parameter semantics, never the words.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
import pydantic
from openai import OpenAI
from openai.types import Completion

from conftest import MODEL, Server, start_server

CHAT = [{"role": "user", "content": "Tell me about whales."}]
PROMPT = "The baleen whale"
GREEDY = {"temperature": 0}
FIXED_LEN = {"ignore_eos": True}  # EOS can't end a run early: completion_tokens == max_tokens


def chat_text(client: OpenAI, **kwargs) -> tuple[str, object]:
    kwargs.setdefault("messages", CHAT)
    r = client.chat.completions.create(model=MODEL, **kwargs)
    assert len(r.choices) == 1
    return r.choices[0].message.content, r


# ---------------------------------------------------------------- models


def test_models_list(client: OpenAI):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL]
    assert models.data[0].object == "model"


def test_models_retrieve_the_served_model_and_404_for_another(client: OpenAI):
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("deepseek-ai/not-served")
    assert caught.value.body["code"] == "model_not_found"
    assert "deepseek-ai/not-served" in caught.value.body["message"]


def test_probes_and_metrics(server: Server):
    assert server.get("/health")[0] == 200
    assert server.get("/ready")[0] == 200
    status, text = server.get("/metrics")
    assert status == 200
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total"):
        assert name in text, f"/metrics lacks {name}"


# ---------------------------------------------------------------- chat


def test_chat_non_stream(client: OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16)
    assert r.object == "chat.completion"
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    u = r.usage
    assert u is not None
    assert u.prompt_tokens > 0
    assert 1 <= u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None
    assert isinstance(u.prompt_tokens_details.cached_tokens, int)
    assert 0 <= u.prompt_tokens_details.cached_tokens <= u.prompt_tokens


def test_chat_stream_with_usage_matches_greedy(client: OpenAI):
    want, ref = chat_text(client, max_tokens=24, extra_body=FIXED_LEN, **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FIXED_LEN,
        **GREEDY,
    )
    chunks = list(stream)
    assert len(chunks) >= 3
    ids = {c.id for c in chunks}
    assert len(ids) == 1, f"one id for the whole stream, got {ids}"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices == [], "the usage chunk has no choices"
    assert last.usage is not None
    assert all(c.usage is None for c in chunks[:-1]), "only the last chunk carries usage"
    finish = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert finish == ["length"]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == want
    assert last.usage.completion_tokens == 24 == ref.usage.completion_tokens
    assert last.usage.prompt_tokens == ref.usage.prompt_tokens


def test_chat_stream_without_usage_has_no_usage_chunk(client: OpenAI):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_max_tokens_gives_length(client: OpenAI):
    _, r = chat_text(client, max_tokens=5, extra_body=FIXED_LEN)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    _, r = chat_text(client, max_completion_tokens=5, extra_body=FIXED_LEN)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_seed_reproducible(client: OpenAI):
    def sample(seed: int) -> str:
        return chat_text(client, max_tokens=16, temperature=1.0, seed=seed, extra_body=FIXED_LEN)[0]

    a, b = sample(42), sample(42)
    assert a == b, "the same seed must give the same text"
    others = {sample(s) for s in (1, 2, 3, 4)}
    assert others - {a}, "four other seeds all reproduced seed 42's text"


def test_greedy_is_deterministic(client: OpenAI):
    a = chat_text(client, max_tokens=16, extra_body=FIXED_LEN, **GREEDY)[0]
    b = chat_text(client, max_tokens=16, extra_body=FIXED_LEN, **GREEDY)[0]
    assert a == b


def pick_stop(text: str) -> tuple[str, int]:
    """A 2-character printable-ASCII stop string whose first occurrence is past the start of `text`."""
    for i in range(1, len(text) - 1):
        s = text[i : i + 2]
        if all(c.isascii() and c.isprintable() for c in s) and text.find(s) == i:
            return s, i
    pytest.fail(f"no usable stop string in greedy text {text!r}")


def test_chat_stop_string(client: OpenAI):
    text = chat_text(client, max_tokens=48, extra_body=FIXED_LEN, **GREEDY)[0]
    stop, at = pick_stop(text)
    got, r = chat_text(client, max_tokens=48, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert got == text[:at], f"stop={stop!r}: want {text[:at]!r}, got {got!r}"


def test_chat_stop_string_stream(client: OpenAI):
    text = chat_text(client, max_tokens=48, extra_body=FIXED_LEN, **GREEDY)[0]
    stop, at = pick_stop(text)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=48, stop=stop, stream=True, **GREEDY))
    got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert got == text[:at], f"stop={stop!r}: want {text[:at]!r}, got {got!r}"


def test_chat_logprobs(client: OpenAI):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=3, extra_body=FIXED_LEN, **GREEDY
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content) == r.usage.completion_tokens == 6
    for entry in lp.content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True), "top_logprobs are most likely first"
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(top[0], abs=1e-4)
        assert entry.bytes is not None
    assert b"".join(bytes(e.bytes) for e in lp.content).decode("utf-8", "replace") == r.choices[0].message.content


def test_chat_without_logprobs_has_none(client: OpenAI):
    _, r = chat_text(client, max_tokens=2)
    assert r.choices[0].logprobs is None


def test_prefix_caching_reports_cached_tokens(client: OpenAI):
    long = [{"role": "user", "content": "Baleen plates filter krill from sea water. " * 8}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    second = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens, f"cached_tokens={cached} of {second.usage.prompt_tokens}"


# ---------------------------------------------------------------- completions


def test_completion_non_stream(client: OpenAI):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, extra_body=FIXED_LEN)
    assert r.object == "text_completion"
    assert r.model == MODEL
    assert len(r.choices) == 1
    c = r.choices[0]
    assert isinstance(c.text, str)
    assert c.finish_reason == "length"
    # Byte-level tokenizer: one token per byte, plus a BOS token when the tokenizer adds one.
    assert r.usage.prompt_tokens in (len(PROMPT.encode()), len(PROMPT.encode()) + 1)
    assert r.usage.completion_tokens == 8


def validate_completion_chunk(chunk: Completion) -> None:
    """Strict validation of one legacy-completions stream chunk, except `finish_reason: null`.

    OpenAI's own API sends `"finish_reason": null` on every chunk but the last (openai/openai-openapi#100), and
    vLLM does the same, yet the SDK types `CompletionChoice.finish_reason` as non-nullable, so a strict client
    rejects every real completions stream. Everything else in the chunk is validated as strictly as elsewhere.
    """
    data = chunk.to_dict()
    for choice in data.get("choices", []):
        if choice.get("finish_reason") is None:
            choice["finish_reason"] = "length"
    Completion.model_validate(data)


def test_completion_stream_matches_greedy(server: Server, client: OpenAI):
    want = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, extra_body=FIXED_LEN, **GREEDY)
    lenient = server.client(strict=False)
    chunks = list(
        lenient.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FIXED_LEN,
            **GREEDY,
        )
    )
    for c in chunks:
        validate_completion_chunk(c)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.choices[0].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])


def test_completion_max_tokens_length(client: OpenAI):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, extra_body=FIXED_LEN)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_completion_stop_string(client: OpenAI):
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, extra_body=FIXED_LEN, **GREEDY)
    text = text.choices[0].text
    stop, at = pick_stop(text)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:at]


def test_completion_seed(client: OpenAI):
    def sample(seed: int) -> str:
        r = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed, extra_body=FIXED_LEN
        )
        return r.choices[0].text

    a = sample(42)
    assert sample(42) == a
    assert {sample(s) for s in (7, 8, 9)} - {a}


def test_completion_logprobs(client: OpenAI):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=2, extra_body=FIXED_LEN, **GREEDY)
    lp = r.choices[0].logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0.0 for x in lp.token_logprobs)
    for top in lp.top_logprobs:
        # Keys are token strings; two byte tokens that decode alike could share one, hence "at most".
        assert 1 <= len(top) <= 2
    # Greedy: the chosen token's logprob is the best alternative's.
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset)


def test_sampling_filters_reduce_to_greedy(client: OpenAI):
    def run(**kw) -> str:
        kw.setdefault("extra_body", {})
        kw["extra_body"] = {**FIXED_LEN, **kw["extra_body"]}
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, **kw).choices[0].text

    greedy = run(**GREEDY)
    assert run(temperature=1.0, seed=5, extra_body={"top_k": 1}) == greedy, "top_k=1 must be greedy"
    assert run(temperature=1.0, seed=5, top_p=1e-6) == greedy, "a tiny top_p must be greedy"


def test_penalties_change_greedy_output(client: OpenAI):
    def run(**kw) -> str:
        return client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=32, extra_body=FIXED_LEN, **GREEDY, **kw
        ).choices[0].text

    plain = run()
    assert len(set(plain)) < len(plain), f"the greedy text has no repeats to penalise: {plain!r}"
    assert run(frequency_penalty=2.0) != plain
    assert run(presence_penalty=2.0) != plain
    assert run(frequency_penalty=0.0, presence_penalty=0.0) == plain


def test_multi_turn_chat(client: OpenAI):
    one = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    msgs = [
        {"role": "system", "content": "You are a marine biologist."},
        *CHAT,
        {"role": "assistant", "content": "They are large."},
        {"role": "user", "content": "How large?"},
    ]
    more = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert more.usage.prompt_tokens > one.usage.prompt_tokens


def test_chat_stream_logprobs(client: OpenAI):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=2, extra_body=FIXED_LEN, **GREEDY)
    want = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    got = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in got] == [(e.token, round(e.logprob, 4)) for e in want]
    assert all(len(e.top_logprobs) == 2 for e in got)


# ---------------------------------------------------------------- errors


def test_n_greater_than_one_is_400(client: OpenAI):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2)


def test_bad_sampling_params_are_400(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=-1)
    assert e.value.body is not None
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, top_p=1.5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, presence_penalty=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)


# The five-field schema runtime/tests/structured_outputs.rs and scripts/bench-structured.py use too.
WHALE = json.loads((Path(__file__).resolve().parent.parent / "support" / "whale-schema.json").read_text())
WHALE_FORMAT = {"type": "json_schema", "json_schema": {"name": "whale", "schema": WHALE, "strict": True}}
SAMPLES = 100


def parallel(fn, items):
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, items))


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_validate_in_100_of_100_seeded_samples(client: OpenAI, stream: bool):
    # builtin:tiny-moe has random weights: without the grammar its text is noise, never JSON.
    def one(seed: int) -> tuple[str, str]:
        kwargs = dict(
            model=MODEL, messages=[{"role": "user", "content": "A whale as JSON."}], max_tokens=200,
            temperature=1.0, seed=seed, response_format=WHALE_FORMAT,
        )
        if not stream:
            r = client.chat.completions.create(**kwargs)
            return r.choices[0].finish_reason, r.choices[0].message.content
        text, finish = "", None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return finish, text

    for finish, text in parallel(one, range(SAMPLES)):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), WHALE)


def test_json_object_answers_parse_as_objects(client: OpenAI):
    def one(seed: int) -> tuple[str, str]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "JSON please."}], max_tokens=256,
            temperature=0.7, seed=seed, response_format={"type": "json_object"},
        )
        return r.choices[0].finish_reason, r.choices[0].message.content

    results = parallel(one, range(SAMPLES))
    finished = [text for finish, text in results if finish == "stop"]
    # A random model may still be inside a long string after 256 tokens; what finished must be an object, and
    # what did not is a prefix of one.
    assert finished, results[:3]
    for text in finished:
        assert isinstance(json.loads(text), dict), text
    for finish, text in results:
        assert text.startswith("{"), text


def test_bad_schemas_are_400_naming_response_format(client: OpenAI):
    for fmt in (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
        {"type": "json_schema", "json_schema": {"name": "x"}},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, response_format=fmt)
        assert e.value.param == "response_format", e.value.body


def test_fields_the_server_would_ignore_are_400_naming_them(client: OpenAI):
    for kwargs, param in [
        ({"extra_body": {"functions": [{"name": "lookup"}]}}, "functions"),
        ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **kwargs)
        assert e.value.param == param, e.value.body
        assert e.value.code == "unsupported_parameter", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, suffix="the end")
    assert e.value.param == "suffix"
    # Metadata and values asking for the default behaviour are accepted.
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=2, response_format={"type": "text"}, metadata={"team": "krill"},
        store=False, user="u-1",
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_type_errors_and_limits_name_the_parameter(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={"temperature": "hot"})
    assert e.value.param == "temperature" and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stop=[str(i) for i in range(17)])
    assert e.value.param == "stop" and "16" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}], max_tokens=2)
    assert e.value.param == "messages[0].role"


def test_developer_and_tool_roles_are_accepted(client: OpenAI):
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Weather?"},
        {"role": "tool", "content": "{\"sky\": \"clear\"}", "tool_call_id": "call_1"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, extra_body=FIXED_LEN)
    assert r.usage.completion_tokens == 3


def test_logit_bias_forces_a_token(client: OpenAI):
    # The byte-level tokenizer: token 65 is "A"; +100 makes it certain even at temperature 1.
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=1, logit_bias={"65": 100}, extra_body=FIXED_LEN
    )
    assert r.choices[0].text == "AAAAA"
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, logit_bias={"66": 100}, extra_body=FIXED_LEN
    )
    assert r.choices[0].message.content == "BBBB"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logit_bias={"65": 200})
    assert e.value.param == "logit_bias"


def test_api_key_is_required_when_set(tmp_path):
    s = start_server(tmp_path, "--api-key", "sk-baleen-test")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="sk-wrong").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        good = s.client(api_key="sk-baleen-test")
        assert [m.id for m in good.models.list()] == [MODEL]
        assert good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens <= 2
        assert s.get("/health")[0] == 200 and s.get("/metrics")[0] == 200
    finally:
        assert s.stop() == 0, s.log()


def test_negative_top_k_other_than_minus_one_is_400(client: OpenAI):
    # vLLM: "top_k must be -1 (disable), or at least 1" (0 also disables); -1 and 0 are accepted.
    for ok in (-1, 0):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"top_k": ok})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"top_k": -5})


def max_model_len(server: Server) -> int:
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as r:
        return int(json.load(r)["data"][0]["max_model_len"])


def test_prompt_longer_than_context_is_400(client: OpenAI, server: Server):
    too_long = "a" * (max_model_len(server) + 8)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=2)
    assert "context" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": too_long}], max_tokens=2)


def test_prompt_plus_max_tokens_over_context_is_400(client: OpenAI, server: Server):
    # vLLM and OpenAI refuse a request whose prompt plus max_tokens exceeds the context.
    n = max_model_len(server)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="a" * (n - 4), max_tokens=64)


def test_unknown_model_is_404(client: OpenAI):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)


def test_body_over_limit_is_413(limited_server: Server):
    client = limited_server.client()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="x" * 4096, max_tokens=2)
    assert e.value.status_code == 413
    # A body under the limit still works.
    r = client.completions.create(model=MODEL, prompt="x" * 100, max_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_queue_full_is_429(limited_server: Server):
    client = limited_server.client()
    workers = 12
    barrier = threading.Barrier(workers)
    results: list[object] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        try:
            r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=64, extra_body=FIXED_LEN)
            out: object = r
        except Exception as e:  # noqa: BLE001 — sorted below
            out = e
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == workers
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    ok = [r for r in results if not isinstance(r, Exception)]
    other = [r for r in results if isinstance(r, Exception) and not isinstance(r, openai.RateLimitError)]
    assert not other, f"unexpected errors: {other!r}"
    assert limited, "no request was refused with 429 although 12 raced for 1 running + 1 waiting slot"
    assert ok, "every request was refused"
    assert all(r.usage.completion_tokens == 64 for r in ok)
    assert limited[0].response.headers.get("retry-after") is not None


# ---------------------------------------------------------------- shutdown


DRAIN_TOKENS = 1200


def test_sigterm_drains_in_flight_and_refuses_new_work(tmp_path):
    s = start_server(tmp_path)
    try:
        client = s.client()
        # Long enough to be in flight through the checks below, short enough to finish well inside the drain
        # timeout in a debug build on a busy machine (per-token cost grows with the sequence).
        stream = s.client(strict=False).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=DRAIN_TOKENS, stream=True, stream_options={"include_usage": True},
            extra_body=FIXED_LEN,
        )
        it = iter(stream)
        first = next(it)  # the request is in flight
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while s.get("/ready")[0] != 503:
            assert time.monotonic() < deadline, "/ready did not turn 503 after SIGTERM"
            time.sleep(0.01)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 503
        rest = list(it)
        for chunk in (first, *rest):
            validate_completion_chunk(chunk)
        assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == DRAIN_TOKENS, "the in-flight request finished"
        assert first.choices
    finally:
        code = s.stop()
    assert code == 0, s.log()
def test_sigterm_when_idle_exits_zero(tmp_path):
    s = start_server(tmp_path)
    client = s.client()
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens <= 2
    assert s.stop() == 0, s.log()


# ---------------------------------------------------------------- tool calls


class Whale(pydantic.BaseModel):
    """The whale schema as a pydantic model: the SDK turns it into a strict function tool and parses the
    arguments back into it (a ValidationError fails the test)."""

    name: str = pydantic.Field(max_length=12)
    length_m: int = pydantic.Field(ge=1, le=40)
    species: Literal["blue", "humpback", "minke"]
    krill: bool
    tags: list[Annotated[str, pydantic.Field(max_length=5)]] = pydantic.Field(max_length=3)


WHALE_TOOL = openai.pydantic_function_tool(Whale, name="record_whale", description="Log a whale sighting.")
NAMED = {"type": "function", "function": {"name": "record_whale"}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_sdk_parses_forced_tool_calls_strictly(client: OpenAI, stream: bool, tool_choice: str):
    # The SDK's parse() and stream() validate each call's arguments against the pydantic model (strict tools).
    def one(seed: int):
        kwargs = dict(
            model=MODEL, messages=[{"role": "user", "content": "I saw a whale."}], max_tokens=300,
            temperature=1.0, seed=seed, tools=[WHALE_TOOL], tool_choice=NAMED if tool_choice == "named" else "required",
        )
        if not stream:
            return client.chat.completions.parse(**kwargs)
        with client.chat.completions.stream(**kwargs) as events:
            for _ in events:
                pass
            return events.get_final_completion()

    for completion in parallel(one, range(20)):
        choice = completion.choices[0]
        # OpenAI finishes a named function's call with "stop", a required one with "tool_calls".
        assert choice.finish_reason == ("stop" if tool_choice == "named" else "tool_calls"), choice
        calls = choice.message.tool_calls
        assert calls and all(c.function.name == "record_whale" for c in calls), choice
        if tool_choice == "named":
            assert len(calls) == 1
        for call in calls:
            assert isinstance(call.function.parsed_arguments, Whale), call
            assert call.id.startswith("call_") and call.type == "function"
        assert not choice.message.content


def test_tool_results_continue_the_conversation(client: OpenAI):
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "I saw a whale."}], max_tokens=300, seed=3,
        tools=[WHALE_TOOL], tool_choice="required", parallel_tool_calls=False,
    )
    message = first.choices[0].message
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    messages = [
        {"role": "user", "content": "I saw a whale."},
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "logged"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, tools=[WHALE_TOOL], extra_body=FIXED_LEN
    )
    assert second.choices[0].finish_reason == "length"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(call.function.arguments)
    # With tool_choice auto a random model answers text; no call is invented.
    assert isinstance(second.choices[0].message.content, str) and not second.choices[0].message.tool_calls


def test_bad_tool_requests_are_400_naming_the_field(client: OpenAI):
    for kwargs, param in [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WHALE_TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tools": [WHALE_TOOL], "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **kwargs)
        assert e.value.param == param, e.value.body
