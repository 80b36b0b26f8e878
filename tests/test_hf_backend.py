"""The thin `hf:` backend on the SmolLM2 GGUF, loaded by transformers (dequantised) on CPU."""

import asyncio

import pytest

from app.backends.hf import HFBackend
from app.bindings import parse_binding
from app.errors import MissingDependency
from app.wire import ChatRequest
from tests.support.requires import require

require("transformers")


def test_hf_backend_generates_from_the_smollm2_gguf():
    backend = HFBackend(parse_binding("hf:smollm2-135m"))
    req = ChatRequest(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
    resp = asyncio.run(backend.complete(req))
    assert resp.message.content.strip()
    assert 0 < resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 5


def test_hf_backend_names_a_missing_path():
    backend = HFBackend(parse_binding("hf:/nonexistent/model"))
    with pytest.raises(MissingDependency, match="no such file or directory"):
        asyncio.run(backend.complete(ChatRequest(messages=[{"role": "user", "content": "hi"}])))
