"""Binding strings: the one parser that turns `kind:target?opt=val` into a typed Binding.

    azure:<deployment>                 Azure OpenAI (AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, OPENAI_API_VERSION)
    openai:<model>?base_url=...        any OpenAI-compatible server (api_key_env names the key's variable)
    gguf:<alias or path>?lora=...      a local GGUF model through llama-cpp-python
    hf:<path>                          transformers (+ a peft adapter when the path holds one)

Options come inline (query-style) or from config (`[bindings."<binding>"]`); inline wins.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from app.errors import BindingError


class BindingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # USD per million tokens; overrides the built-in price table (app/cost.py).
    price_in: float | None = None
    price_out: float | None = None
    # Seconds to wait for one answer: long enough for a hosted model's long reply, short enough that a stalled
    # upstream is reported while the user still waits.
    timeout: float = Field(60.0, gt=0)


class RemoteOptions(BindingOptions):
    # Extra attempts after a 408/409/429/5xx or a failed connection (never after a timeout): app/backends/retry.py.
    max_retries: int = Field(2, ge=0, le=10)


def _choice_list(value: Any) -> Any:
    # Inline options are strings: "required,named"; "auto" or "" declares neither.
    if isinstance(value, str):
        return {v.strip() for v in value.split(",") if v.strip() and v.strip() != "auto"}
    return value


# The tool_choice forms beyond "auto"/"none" an upstream takes; None = unknown, learned (app/backends/degrade.py).
ToolChoiceSupport = Annotated[set[Literal["required", "named"]] | None, BeforeValidator(_choice_list)]


class AzureOptions(RemoteOptions):
    endpoint_env: str = "AZURE_OPENAI_ENDPOINT"
    api_key_env: str = "AZURE_OPENAI_API_KEY"
    api_version: str | None = None  # default: $OPENAI_API_VERSION
    # What the upstream supports: None = unknown (learned from its first refusal), true/false = declared.
    supports_json_schema: bool | None = None
    supports_tool_choice: ToolChoiceSupport = None
    supports_parallel_tool_calls: bool | None = None


class OpenAIOptions(RemoteOptions):
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    # What the upstream supports: None = unknown (learned from its first refusal), true/false = declared.
    supports_json_schema: bool | None = None
    supports_tool_choice: ToolChoiceSupport = None
    supports_parallel_tool_calls: bool | None = None


class LocalOptions(BindingOptions):
    # USD per hour of the machine this model runs on; a call costs its compute time at this rate (app/cost.py).
    # None: the config's [cost] usd_per_hour.
    usd_per_hour: float | None = Field(None, ge=0)


class GGUFOptions(LocalOptions):
    lora: str | None = None
    n_ctx: int = 4096
    n_threads: int | None = None
    n_gpu_layers: int = 0
    seed: int = 0


class HFOptions(LocalOptions):
    device: str = "auto"
    dtype: str = "auto"


OPTIONS_BY_KIND: dict[str, type[BindingOptions]] = {
    "azure": AzureOptions,
    "openai": OpenAIOptions,
    "gguf": GGUFOptions,
    "hf": HFOptions,
}

FORMS = (
    "azure:<deployment>",
    "openai:<model>[?base_url=URL&api_key_env=VAR]",
    "gguf:<alias|path>[?lora=PATH&n_ctx=N&n_threads=N]  (aliases: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b)",
    "hf:<path>",
)


@dataclass(frozen=True)
class Binding:
    kind: str
    target: str
    options: BindingOptions = field(compare=False)
    raw_options: tuple[tuple[str, str], ...] = ()

    def canonical(self) -> str:
        """The binding with its explicit options, sorted: the key of the backend cache."""
        return _canonical(self.kind, self.target, self.raw_options)

    @property
    def name(self) -> str:
        """The binding without options: what the capture store and reports show."""
        return f"{self.kind}:{self.target}"

    def __str__(self) -> str:
        return self.canonical()


def register_kind(kind: str, options: type[BindingOptions] = BindingOptions) -> None:
    """Make a new binding kind parseable (tests register `scripted` this way)."""
    OPTIONS_BY_KIND[kind] = options


def parse_binding(text: str, config_options: dict[str, dict[str, Any]] | None = None) -> Binding:
    """Parse `kind:target?opt=val`, merging options from config (inline ones win).

    >>> parse_binding("gguf:smollm2-135m?n_ctx=2048").options.n_ctx
    2048
    """
    if not isinstance(text, str) or ":" not in text.strip():
        raise BindingError(_unknown(text))
    body, _, query = text.strip().partition("?")
    kind, _, target = body.partition(":")
    if kind not in OPTIONS_BY_KIND or not target:
        raise BindingError(_unknown(text))
    inline = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    merged = {**(config_options or {}).get(body, {}), **inline}
    try:
        options = OPTIONS_BY_KIND[kind](**merged)
    except ValidationError as exc:
        raise BindingError(_bad_options(text, kind, exc)) from None
    raw = tuple(sorted((k, str(v)) for k, v in merged.items()))
    return Binding(kind=kind, target=target, options=options, raw_options=raw)


def _unknown(text: object) -> str:
    forms = "\n  ".join(FORMS)
    return f"unknown binding {text!r}; a binding is one of:\n  {forms}"


def _bad_options(text: str, kind: str, exc: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    valid = ", ".join(OPTIONS_BY_KIND[kind].model_fields)
    return f"bad options in binding {text!r} ({problems}); options for {kind}: {valid}"


@functools.lru_cache(maxsize=1024)  # looked up on every call (the backend cache's key); a URL encode is not free
def _canonical(kind: str, target: str, raw_options: tuple[tuple[str, str], ...]) -> str:
    query = urlencode(sorted(raw_options), safe="/:.-_")
    return f"{kind}:{target}" + (f"?{query}" if query else "")
