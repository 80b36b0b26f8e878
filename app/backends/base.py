"""The one protocol every model backend implements, and the registry that turns a binding into one.

A backend answers OpenAI chat requests: `complete(req) -> ChatResponse` and `stream(req) -> AsyncIterator[ChatChunk]`.
Backends register by binding kind (`gguf`, `openai`, ...) as "module:attr" paths, so importing slm-swap never imports
llama_cpp, torch or openai; a backend module is imported only when a binding of its kind is first used.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Literal, Protocol, runtime_checkable

from app.bindings import Binding
from app.errors import BindingError
from app.wire import ChatChunk, ChatRequest, ChatResponse


@runtime_checkable
class Backend(Protocol):
    binding: Binding

    async def complete(self, req: ChatRequest) -> ChatResponse: ...

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]: ...


BackendFactory = Callable[[Binding], Backend]
# How a kind's calls are priced (app/cost.py): "hosted" by the provider's token prices, "local" by the machine.
Pricing = Literal["hosted", "local"]

_FACTORIES: dict[str, str | BackendFactory] = {
    "azure": "app.backends.openai_compat:OpenAICompatBackend",
    "openai": "app.backends.openai_compat:OpenAICompatBackend",
    "gguf": "app.backends.llamacpp:LlamaCppBackend",
    "hf": "app.backends.hf:HFBackend",
}
_PRICING: dict[str, Pricing] = {"azure": "hosted", "openai": "hosted", "gguf": "local", "hf": "local"}


def register_backend(kind: str, factory: str | BackendFactory, pricing: Pricing) -> None:
    """Register a backend for a binding kind, saying how its calls are priced; a test's scripted backend
    registers exactly like a real one."""
    if pricing not in ("hosted", "local"):
        raise ValueError(f"pricing must be 'hosted' or 'local', not {pricing!r}")
    _FACTORIES[kind] = factory
    _PRICING[kind] = pricing


def pricing_of(kind: str) -> Pricing:
    """How calls of a binding kind are priced; a kind no backend registered is an error, never a guess."""
    try:
        return _PRICING[kind]
    except KeyError:
        raise BindingError(f"no backend is registered for binding kind {kind!r}; known kinds: "
                           f"{', '.join(sorted(_PRICING))}") from None


def is_local(kind: str) -> bool:
    """True for kinds that run on this machine (one request at a time per loaded model)."""
    return pricing_of(kind) == "local"


def _resolve(kind: str) -> BackendFactory:
    if kind not in _FACTORIES:
        pricing_of(kind)  # raises the BindingError that lists the known kinds
    factory = _FACTORIES[kind]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
        _FACTORIES[kind] = factory
    return factory


class BackendCache:
    """One backend instance per binding per process: a GGUF model is loaded once, however many routes use it."""

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def get(self, binding: Binding) -> Backend:
        key = binding.canonical()
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = _resolve(binding.kind)(binding)
                self._backends[key] = backend
            return backend

    def clear(self) -> None:
        with self._lock:
            self._backends.clear()


BACKENDS = BackendCache()
