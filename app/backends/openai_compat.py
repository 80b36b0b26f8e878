"""Azure OpenAI and any OpenAI-compatible server, through the `openai` SDK's async clients.

`azure:<deployment>` reads AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and OPENAI_API_VERSION (names overridable by
binding options); `openai:<model>` reads `base_url` and the key from the variable `api_key_env` names. The client is
built on first use, so a missing variable is reported when a route actually needs it, not at import.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import AsyncIterator
from typing import Any

from app.bindings import Binding
from app.errors import BackendError, MissingDependency
from app.secrets import register_secret
from app.wire import ChatChunk, ChatRequest, ChatResponse

# Our extensions and routing fields never go to the upstream server.
NOT_FORWARDED = {"model", "metadata", "decoding", "stream"}


class OpenAICompatBackend:
    def __init__(self, binding: Binding):
        self.binding = binding
        # One client per event loop: an async client's connection pool belongs to the loop that opened it, and
        # this backend outlives loops (Studio's workers, sync callers that run a private loop per call).
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def client(self) -> Any:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            make = _azure_client if self.binding.kind == "azure" else _openai_client
            self._clients[loop] = make(self.binding)
        return self._clients[loop]

    async def complete(self, req: ChatRequest) -> ChatResponse:
        import openai

        try:
            resp = await self.client().chat.completions.create(model=self.binding.target, **_payload(req))
        except openai.APIError as exc:
            raise BackendError(_describe(self.binding, exc)) from None
        return ChatResponse.model_validate(resp.model_dump())

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        import openai

        try:
            chunks = await self.client().chat.completions.create(
                model=self.binding.target, stream=True, stream_options={"include_usage": True}, **_payload(req))
            async for chunk in chunks:
                yield ChatChunk.model_validate(chunk.model_dump())
        except openai.APIError as exc:
            raise BackendError(_describe(self.binding, exc)) from None


def _payload(req: ChatRequest) -> dict[str, Any]:
    return req.model_dump(exclude_none=True, exclude=NOT_FORWARDED)


def _env(name: str, binding: Binding, hint: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise MissingDependency(f"{name} is not set; export it ({hint}) or bind the route to gguf:smollm2-135m "
                                f"(binding {binding.name})")
    return value


def _azure_client(binding: Binding) -> Any:
    from openai import AsyncAzureOpenAI

    opts = binding.options
    version = opts.api_version or os.environ.get("OPENAI_API_VERSION") or "2024-10-21"
    register_secret(os.environ.get(opts.api_key_env))  # before any call: an upstream may echo the key back
    return AsyncAzureOpenAI(
        azure_endpoint=_env(opts.endpoint_env, binding, "your resource's https://<name>.openai.azure.com"),
        api_key=_env(opts.api_key_env, binding, "the resource's key"),
        api_version=version, timeout=opts.timeout, max_retries=1,
    )


def _openai_client(binding: Binding) -> Any:
    from openai import AsyncOpenAI

    opts = binding.options
    key = os.environ.get(opts.api_key_env)
    register_secret(key)  # before any call: an upstream may echo the key back
    if not key and not opts.base_url:
        _env(opts.api_key_env, binding, "your API key, or set base_url for a local server")
    # Local OpenAI-compatible servers often need no key; the SDK insists on a non-empty string.
    return AsyncOpenAI(base_url=opts.base_url, api_key=key or "not-needed", timeout=opts.timeout, max_retries=1)


def _describe(binding: Binding, exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or type(exc).__name__
    where = f"HTTP {status}" if status else "connection failed"
    return f"{binding.name} failed ({where}): {message}"
