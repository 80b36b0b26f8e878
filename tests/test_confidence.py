"""Token confidence and OpenAI logprobs: the scoring as plain numbers, then the real SmolLM2 (greedy, sampled, under a
grammar, streamed, read back by the real `openai` SDK), and the Router falling back when the student is unsure."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from app.backends import llamacpp
from app.backends.llamacpp import Generation, TokenProb, _score
from app.bindings import parse_binding
from app.capture.store import CaptureStore
from app.config import load_settings
from app.routing.context import CallContext
from app.routing.router import Router
from app.server.protocol import response_json, sse, sse_chunks
from app.wire import AssistantMessage, ChatRequest, Choice
from tests.support.http import serve
from tests.support.requires import require

PIECES = {i: f"t{i}".encode() for i in range(8)}


def ask(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kw)


# ---- scoring, without a model ----------------------------------------------------------------------------

def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    norm = top + math.log(sum(math.exp(v - top) for v in values if v != -math.inf))
    return [v - norm for v in values]


def test_score_is_the_log_softmax_over_the_allowed_tokens():
    logits = np.array([2.0, -np.inf, 0.5, 1.0, -np.inf], dtype=np.float32)  # tokens 1 and 4 masked
    expected = log_softmax([2.0, 0.5, 1.0])
    scored = _score(logits, 2, 0.0, 0, PIECES.__getitem__)  # greedy: T = 1
    assert scored.logprob == pytest.approx(expected[1], abs=1e-6) and scored.top == ()
    top = _score(logits, 2, 0.0, 4, PIECES.__getitem__).top  # 4 asked, 3 allowed: masked tokens never appear
    assert [p for p, _ in top] == [b"t0", b"t3", b"t2"]
    assert [lp for _, lp in top] == pytest.approx([expected[0], expected[2], expected[1]], abs=1e-6)
    assert sum(math.exp(lp) for _, lp in top) == pytest.approx(1.0)


def test_score_divides_by_the_temperature_and_counts_a_lone_allowed_token_as_certain():
    logits = np.array([2.0, 0.5, 1.0], dtype=np.float32)
    hot = _score(logits, 1, 0.5, 0, PIECES.__getitem__)
    assert hot.logprob == pytest.approx(log_softmax([4.0, 1.0, 2.0])[1], abs=1e-6)
    lone = np.array([-np.inf, 3.7, -np.inf], dtype=np.float32)
    assert _score(lone, 1, 0.8, 2, PIECES.__getitem__) == TokenProb(b"", 0.0, ((b"t1", 0.0),))


def test_confidence_is_the_mean_token_logprob():
    tokens = [TokenProb(b"a", -0.5), TokenProb(b"b", 0.0), TokenProb(b"c", -1.0)]
    assert Generation("abc", 3, 3, "stop", tokens).confidence == pytest.approx(-0.5)
    assert Generation("", 3, 0, "stop").confidence is None


def test_top_logprobs_are_validated_like_openai():
    assert ask("x", logprobs=True, top_logprobs=20).top_logprobs == 20
    for bad, message in [(dict(logprobs=True, top_logprobs=21), "less than or equal to 20"),
                         (dict(logprobs=True, top_logprobs=-1), "greater than or equal to 0"),
                         (dict(top_logprobs=3), "top_logprobs needs logprobs: true")]:
        with pytest.raises(ValidationError, match=message):
            ask("x", **bad)


def test_confidence_is_a_declared_field_of_choice():
    choice = Choice.model_validate({"message": {"content": "x"}, "confidence": -0.25})
    assert choice.confidence == -0.25 and not choice.model_extra
    assert Choice(message=AssistantMessage(content="x")).confidence is None


# ---- the real SmolLM2 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    require("llama_cpp")
    return llamacpp.LlamaCppBackend(parse_binding("gguf:smollm2-135m"))


def fresh(backend, req: ChatRequest):
    """An answer from an empty KV cache, so calls are compared bit for bit."""
    backend.model().llm.n_tokens = 0
    return asyncio.run(backend.complete(req))


def stream(backend, req: ChatRequest):
    async def collect():
        return [c async for c in backend.stream(req)]

    backend.model().llm.n_tokens = 0
    return asyncio.run(collect())


def test_greedy_logprobs_are_the_argmax_and_their_mean_is_the_confidence(smol):
    resp = fresh(smol, ask("What is the capital of France?", max_tokens=24, logprobs=True, top_logprobs=3))
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        best = t.top_logprobs[0]
        assert (best.token, best.logprob) == (t.token, t.logprob)  # greedy picks the likeliest token
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    logprobs = [t.logprob for t in content]
    assert choice.confidence == pytest.approx(sum(logprobs) / len(logprobs))
    assert min(logprobs) <= choice.confidence <= max(logprobs) < 0 and min(logprobs) < max(logprobs)


def test_confidence_without_the_logprobs_flag(smol):
    req = ask("Name three colors.", max_tokens=16)
    plain = fresh(smol, req)
    asked = fresh(smol, req.model_copy(update={"logprobs": True}))
    assert plain.choices[0].logprobs is None and plain.choices[0].confidence < 0
    assert asked.choices[0].confidence == plain.choices[0].confidence
    assert all(t.top_logprobs == [] for t in asked.choices[0].logprobs.content)  # no top_logprobs asked


def test_sampled_logprobs_follow_the_temperature(smol):
    # Same prompt, empty cache: the first step's logits are the same, so the gap between two tokens' logprobs
    # scales exactly as 1/T.
    req = ask("Write a short poem about rain.", max_tokens=1, logprobs=True, top_logprobs=5, seed=3)
    steps = {t: fresh(smol, req.model_copy(update={"temperature": t})).choices[0].logprobs.content[0]
             for t in (0.0, 0.5, 2.0)}
    gaps = {}
    for t, step in steps.items():
        by_token = {x.token: x.logprob for x in step.top_logprobs}
        first, second = (x.token for x in steps[0.0].top_logprobs[:2])
        gaps[t] = by_token[first] - by_token[second]
        if step.token in by_token:
            assert step.logprob == by_token[step.token]
    assert gaps[0.5] == pytest.approx(2 * gaps[0.0], rel=1e-4)
    assert gaps[2.0] == pytest.approx(gaps[0.0] / 2, rel=1e-4)


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_tokens_the_grammar_forces_count_as_certain(smol, monkeypatch):
    steps = []
    real = llamacpp._Decoder._advance
    monkeypatch.setattr(llamacpp._Decoder, "_advance", lambda self, *a: steps.append(real(self, *a)) or steps[-1])
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    resp = fresh(smol, ask("Alice is 30 years old.", max_tokens=40, response_format=fmt, logprobs=True,
                           top_logprobs=2))
    content = resp.choices[0].logprobs.content
    forced = [i > 0 for step in steps for i in range(len(step))]
    assert len(forced) == len(content) and sum(forced) >= 4  # at least the keys `name` and `age` and their quotes
    for t, was_forced in zip(content, forced):
        if was_forced:
            assert t.logprob == 0.0 and [(x.token, x.logprob) for x in t.top_logprobs] == [(t.token, 0.0)]
    logprobs = [t.logprob for t in content]
    assert resp.choices[0].confidence == pytest.approx(sum(logprobs) / len(logprobs))
    assert resp.choices[0].confidence > min(logprobs)  # the zeros pull the mean up
    json.loads(resp.message.content)


@pytest.mark.parametrize("kw", [{}, {"tools": [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}], "tool_choice": "required"}])
def test_streamed_logprobs_add_up_to_the_completed_ones(smol, kw):
    req = ask("Write two sentences about the weather in Paris.", max_tokens=24, logprobs=True, top_logprobs=1, **kw)
    expected = fresh(smol, req).choices[0].logprobs.content
    chunks = stream(smol, req)
    streamed = [t for c in chunks for t in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in expected]
    for c in chunks:
        delta, logprobs = c.choices[0].delta, c.choices[0].logprobs
        if delta.content and not kw:  # plain ASCII text: each chunk carries exactly the tokens of its text
            assert "".join(t.token for t in logprobs.content) == delta.content
    assert not any(c.choices[0].logprobs for c in stream(smol, req.model_copy(update={"logprobs": None,
                                                                                       "top_logprobs": None})))


def proxy_of(backend) -> FastAPI:
    """The smallest OpenAI-shaped server over a backend, serialising as the proxy does (app/server/protocol.py)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = ChatRequest.model_validate(await request.json())
        backend.model().llm.n_tokens = 0
        if not req.stream:
            return response_json(await backend.complete(req), req.model)

        async def events():
            async for chunk in backend.stream(req):
                for data in sse_chunks(chunk, req.model):
                    yield sse(data)
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_the_openai_sdk_reads_the_logprobs(smol):
    from openai import OpenAI

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = fresh(smol, ask(messages[0]["content"], max_tokens=12, logprobs=True, top_logprobs=2))
    with serve(proxy_of(smol)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)
        resp = client.chat.completions.create(model="r", messages=messages, max_tokens=12, logprobs=True,
                                              top_logprobs=2)
        chunks = list(client.chat.completions.create(model="r", messages=messages, max_tokens=12, logprobs=True,
                                                     top_logprobs=2, stream=True))
    content = resp.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in content] == [
        (t.token, t.logprob, t.bytes) for t in expected.choices[0].logprobs.content]
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


# ---- the Router --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold, answers", [(-1e-9, "teacher"), (-1e9, "student")])
def test_an_unsure_local_student_falls_back_to_the_teacher(tmp_path, scripted, threshold, answers):
    require("llama_cpp")
    Path("slmswap.toml").write_text(f'''
[routes.r]
teacher = "scripted:t"
student = "gguf:smollm2-135m"
stage = "student"
auto = false
min_confidence = {threshold}
''')
    scripted("t").default = "Paris."
    store = CaptureStore.open(f"sqlite:///{tmp_path}/calls.db")
    try:
        router = Router(load_settings(), store)
        req = ChatRequest(model="r", messages=[{"role": "user", "content": "What is the capital of France?"}],
                          max_tokens=16)
        resp = asyncio.run(router.complete(req, CallContext(route="r", source="proxy")))
        rows = sorted(store.list_calls(limit=10), key=lambda c: c.created_at)
    finally:
        store.close()
    assert resp.slmswap.role == answers
    if answers == "student":
        [student] = rows
        assert student.valid and resp.choices[0].confidence < 0
        return
    student, teacher = rows
    assert (student.role, student.binding, student.valid, student.error_type) == (
        "student", "gguf:smollm2-135m", False, "low_confidence")
    assert (teacher.role, teacher.parent_id, teacher.fallback_reason) == ("teacher", student.id, "confidence")
    assert resp.message.content == "Paris."


# ---- an OpenAI-compatible upstream ---------------------------------------------------------------------------

def test_openai_bindings_forward_the_flags_and_read_the_logprobs_back():
    from app.backends.openai_compat import OpenAICompatBackend

    seen = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        seen.append(await request.json())
        entry = {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}
        return {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop",
                             "logprobs": {"content": [{**entry, "top_logprobs": [entry]}], "refusal": None}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}

    with serve(app) as url:
        backend = OpenAICompatBackend(parse_binding(f"openai:m?base_url={url}/v1"))
        resp = asyncio.run(backend.complete(ask("hello", logprobs=True, top_logprobs=1)))
    assert (seen[0]["logprobs"], seen[0]["top_logprobs"]) == (True, 1)
    [token] = resp.choices[0].logprobs.content
    assert (token.token, token.logprob, token.bytes, token.top_logprobs[0].logprob) == ("Hi", -0.25, [72, 105], -0.25)
    assert resp.choices[0].confidence is None  # an upstream's answer has no confidence of ours
