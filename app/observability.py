"""Langfuse wiring: with keys set, each graph run is one trace and each proxy call one generation, exported in the
background; without keys nothing is imported or sent. A Langfuse host that fails costs one warning, never the run.

    callbacks = run_callbacks(settings, run_id)          # graph runs: config={"callbacks": callbacks, ...}
    with observe_call(settings, request) as call:        # a proxy call that is not a LangChain run
        call.finish(await router.complete(request))
    flush()                                              # CLI, before exit; shutdown() when the server stops
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from app.capture.redact import langfuse_mask
from app.config import Settings
from app.secrets import redact_text, register_secret, strip_url_credentials

log = logging.getLogger(__name__)

DEFAULT_HOST = "https://cloud.langfuse.com"
TOOL_TAG = "tool"  # agents/loop.py tags each tool execution with it
# The OTLP exporter's own loggers: their retry/failure records become one warning (see _ExportFailures). Their
# message formats (export_problem) are the exporter's, not an API: pyproject pins it to the tested minor, and
# tests/test_langfuse.py checks the warning names the status or the connection error.
EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "opentelemetry.exporter.otlp.common.http")
PHRASES = {status.phrase: status.value for status in HTTPStatus}


# --- configuration (pure) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LangfuseKeys:
    public_key: str
    secret_key: str = field(repr=False)
    host: str | None = None

    @property
    def url(self) -> str:
        return self.host or DEFAULT_HOST


def langfuse_keys(settings: Settings, environ: Mapping[str, str] = os.environ) -> LangfuseKeys | None:
    """The keys and host to export with, the environment over `[langfuse]` in the config; None when tracing is off."""
    public, secret, host = _key_values(settings, environ)
    return LangfuseKeys(public, secret, host.rstrip("/") if host else None) if public and secret else None


def off_message(settings: Settings, environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """Why tracing is off, and how loudly to say it: one key without the other is a mistake, no keys a choice."""
    public, secret, _ = _key_values(settings, environ)
    if public or secret:
        missing = "LANGFUSE_SECRET_KEY" if public else "LANGFUSE_PUBLIC_KEY"
        return logging.WARNING, (f"Langfuse tracing is off: {missing} is not set (nor langfuse.{missing[9:].lower()} "
                                 "in the config); set both keys to trace runs")
    return logging.INFO, ("Langfuse tracing is off; set LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY and LANGFUSE_HOST "
                          "to trace runs")


def _key_values(settings: Settings, environ: Mapping[str, str]) -> tuple[str | None, str | None, str | None]:
    conf = settings.langfuse
    return (environ.get("LANGFUSE_PUBLIC_KEY") or conf.public_key,
            environ.get("LANGFUSE_SECRET_KEY") or (conf.secret_key.get_secret_value() if conf.secret_key else None),
            environ.get("LANGFUSE_BASE_URL") or environ.get("LANGFUSE_HOST") or conf.host)


# --- per-call facts (pure) ---------------------------------------------------------------------------------------


def before_call_facts(invocation_params: Mapping[str, Any]) -> dict[str, Any]:
    """What a RouterChatModel run says about itself before the call: its agent (route) and template id."""
    facts = {"agent": invocation_params.get("route"), "template_id": invocation_params.get("template_id")}
    return {k: v for k, v in facts.items() if v is not None}


def call_info(response: Any) -> dict[str, Any]:
    """The Router's CallInfo carried by a LangChain LLMResult (message metadata, generation info or llm_output)."""
    generations = [g for gens in response.generations for g in gens]
    if generations:
        last = generations[-1]
        message_meta = getattr(getattr(last, "message", None), "response_metadata", None) or {}
        info = message_meta.get("slmswap") or (last.generation_info or {}).get("slmswap")
        if info:
            return dict(info)
    return dict((response.llm_output or {}).get("slmswap") or {})


def generation_update(info: Mapping[str, Any]) -> dict[str, Any]:
    """`generation.update(...)` arguments for a call's CallInfo: facts as metadata, cost, and a warning if invalid."""
    if not info:
        return {}
    facts = {"agent": info.get("route"), **{k: v for k, v in info.items() if k != "route"}}
    update: dict[str, Any] = {"metadata": facts, "cost_details": {"total": float(info.get("cost_usd") or 0.0)}}
    if not info.get("valid", True):
        update["level"] = "WARNING"
        detail = info.get("error_detail") or ""
        update["status_message"] = redact_text(f"invalid output ({info.get('error_type')}): {detail}".strip())
    return update


def trace_input(inputs: Any) -> Any:
    """The trace's input: the workflow's query rather than the whole input state."""
    return inputs["query"] if isinstance(inputs, Mapping) and "query" in inputs else inputs


def trace_output(outputs: Any) -> Any:
    """The trace's output: the workflow's answer rather than the whole final state."""
    return outputs["answer"] if isinstance(outputs, Mapping) and "answer" in outputs else outputs


def export_problem(record: logging.LogRecord) -> str | None:
    """What went wrong, from one OTLP exporter log record: `HTTP 401 Unauthorized`, `ConnectionError: [Errno 111]
    Connection refused`; None for records that name no cause."""
    args = record.args if isinstance(record.args, tuple) else ()
    if not isinstance(record.msg, str):
        return None
    if record.msg.startswith("Failed to export %s batch code") and len(args) == 3:
        status, reason = args[1], args[2]
        return f"HTTP {status} {reason}" if status else describe_error(reason)
    if record.msg.startswith("Transient error %s") and args:
        return describe_error(args[0])
    return None


def describe_error(reason: Any) -> str:
    if isinstance(reason, str):
        return f"HTTP {PHRASES[reason]} {reason}" if reason in PHRASES else reason
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", str(reason))
    return f"{type(reason).__name__}: {errno.group(0).strip() if errno else str(reason)[:200]}"


# --- the client: one per process, built on first use -------------------------------------------------------------


@dataclass
class _Client:
    keys: LangfuseKeys
    langfuse: Any
    provider: Any


_lock = threading.Lock()
_client: _Client | None = None
_announced: set[str] = set()


def _once(key: str, level: int, message: str) -> None:
    if key not in _announced:
        _announced.add(key)
        log.log(level, message)


def client(settings: Settings) -> Any | None:
    """The process's `langfuse.Langfuse` for these settings' keys (None without keys); importing langfuse here only."""
    state = _state(settings)
    return state.langfuse if state else None


def _state(settings: Settings) -> _Client | None:
    global _client
    keys = langfuse_keys(settings)
    if keys is None:
        _once("off", *off_message(settings))
        return None
    with _lock:
        if _client is not None and _client.keys != keys:
            _close(_client)
            _client = None
        if _client is None:
            _client = _build(keys)
        return _client


def _build(keys: LangfuseKeys) -> _Client:
    from langfuse import Langfuse
    from opentelemetry.sdk.trace import TracerProvider

    _EXPORT_FAILURES.watch(keys.url)
    # A private provider: the SDK would otherwise install a process-global one that outlives this client and
    # would send every other OpenTelemetry span of the process to Langfuse too.
    provider = TracerProvider()
    register_secret(keys.secret_key)
    # mask: every span's input, output and metadata is redacted before it leaves the process.
    langfuse = Langfuse(public_key=keys.public_key, secret_key=keys.secret_key, base_url=keys.url,
                        tracer_provider=provider, mask=langfuse_mask)
    log.info("Langfuse tracing on: exporting to %s", strip_url_credentials(keys.url))
    return _Client(keys, langfuse, provider)


def _close(state: _Client) -> None:
    from langfuse._client.resource_manager import LangfuseResourceManager

    state.langfuse.shutdown()
    state.provider.shutdown()
    # The SDK keeps one resource manager per public key for the process; forget this one so a later client with
    # the same key is built afresh instead of reusing a shut-down one. Private in langfuse 5.2 with no public
    # equivalent (reset() would shut every client down): pyproject pins langfuse <5.3, tests/test_langfuse.py
    # guards it.
    with LangfuseResourceManager._lock:
        LangfuseResourceManager._instances.pop(state.keys.public_key, None)


def flush() -> None:
    """Send what is buffered (blocks up to LANGFUSE_TIMEOUT, 5 s, when the host is down); no-op without keys."""
    with _lock:
        state = _client
    if state is not None:
        state.langfuse.flush()


def shutdown() -> None:
    """Flush and stop the exporter threads (server shutdown). A later run builds a new client."""
    global _client
    with _lock:
        state, _client = _client, None
        _announced.clear()
    if state is not None:
        _close(state)
    _EXPORT_FAILURES.stop()


# --- graph runs: the LangChain callback handler ------------------------------------------------------------------


def run_callbacks(settings: Settings, run_id: str | None = None) -> list[Any]:
    """Callback handlers for one graph run: Langfuse's (one trace, id derived from `run_id`) when keys are set."""
    state = _state(settings)
    if state is None:
        return []
    context = {"trace_id": trace_id(run_id)} if run_id else None
    return [_handler_class()(public_key=state.keys.public_key, trace_context=context)]


def trace_id(run_id: str) -> str:
    """The Langfuse trace id of a run (deterministic, so a run id finds its trace)."""
    from langfuse import Langfuse

    return Langfuse.create_trace_id(seed=run_id)


@functools.cache
def _handler_class() -> type:
    # Built on first use, so langfuse is imported only when keys are set.
    from langfuse.langchain import CallbackHandler

    class SlmSwapHandler(CallbackHandler):
        """The SDK's handler, plus: query/answer as trace input/output, the Router's facts on every generation,
        and tool executions (chains tagged "tool") as tool observations."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._tool_runs: set[Any] = set()

        def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, tags=None, metadata=None, **kw):
            if parent_run_id is not None and TOOL_TAG in (tags or []):
                self._tool_runs.add(run_id)
                return self.on_tool_start(serialized, json.dumps(inputs, default=str), run_id=run_id, tags=tags,
                                          parent_run_id=parent_run_id, metadata=metadata, inputs=inputs, **kw)
            if parent_run_id is None:
                inputs = trace_input(inputs)
            return super().on_chain_start(serialized, inputs, run_id=run_id, parent_run_id=parent_run_id, tags=tags,
                                          metadata=metadata, **kw)

        def on_chain_end(self, outputs, *, run_id, parent_run_id=None, **kw):
            if run_id in self._tool_runs:
                self._tool_runs.discard(run_id)
                return self.on_tool_end(self._tool_output(run_id, outputs), run_id=run_id,
                                        parent_run_id=parent_run_id, **kw)
            if parent_run_id is None:
                outputs, kw["inputs"] = trace_output(outputs), trace_input(kw.get("inputs"))
            return super().on_chain_end(outputs, run_id=run_id, parent_run_id=parent_run_id, **kw)

        def on_chain_error(self, error, *, run_id, parent_run_id=None, **kw):
            if run_id in self._tool_runs:
                self._tool_runs.discard(run_id)
                return self.on_tool_error(error, run_id=run_id, parent_run_id=parent_run_id, **kw)
            if parent_run_id is None:
                kw["inputs"] = trace_input(kw.get("inputs"))
            return super().on_chain_error(error, run_id=run_id, parent_run_id=parent_run_id, **kw)

        def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, tags=None, metadata=None,
                                **kw):
            facts = before_call_facts(kw.get("invocation_params") or {})
            metadata = {**(metadata or {}), **facts}
            kw["name"] = kw.get("name") or facts.get("agent")  # "retrieval" reads better than "RouterChatModel"
            return super().on_chat_model_start(serialized, messages, run_id=run_id, parent_run_id=parent_run_id,
                                               tags=tags, metadata=metadata, **kw)

        def on_llm_end(self, response, *, run_id, parent_run_id=None, **kw):
            # The SDK offers no public way to update its generation after the call: _runs is private in langfuse
            # 5.2 (pinned <5.3), guarded by tests/test_langfuse.py.
            generation = self._runs.get(run_id)
            update = generation_update(call_info(response))
            if generation is not None and update:
                generation.update(**update)
            return super().on_llm_end(response, run_id=run_id, parent_run_id=parent_run_id, **kw)

        def _tool_output(self, run_id: Any, output: Any) -> Any:
            # A tool result (agents.tools.ToolResult) shows what the model was told; a failed tool is a warning.
            span = self._runs.get(run_id)  # private, as in on_llm_end
            if span is not None and getattr(output, "ok", True) is False:
                span.update(level="WARNING", status_message=redact_text(str(getattr(output, "content", output))[:500]))
            return getattr(output, "content", output)

    return SlmSwapHandler


# --- proxy calls: one generation each ----------------------------------------------------------------------------


class CallObservation:
    """One proxy call's generation; `finish(response)` records the answer. A no-op without Langfuse."""

    def __init__(self, generation: Any = None) -> None:
        self.generation = generation

    def finish(self, response: Any) -> None:
        """Record a ChatResponse: output, answering binding, usage, cost and the Router's verdict."""
        if self.generation is None:
            return
        usage = response.usage
        self.generation.update(
            output=response.message.model_dump(exclude_none=True), model=response.model,
            usage_details={"input": usage.prompt_tokens, "output": usage.completion_tokens,
                           "total": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens},
            **generation_update(response.slmswap.model_dump() if response.slmswap else {}))


@contextmanager
def observe_call(settings: Settings, request: Any, name: str = "proxy", route: str | None = None) -> Iterator[CallObservation]:
    """Trace one ChatRequest that is not a LangChain run (the proxy's) as a one-generation trace.

    Example: `with observe_call(settings, req) as call: call.finish(await router.complete(req))`
    """
    langfuse = client(settings)
    if langfuse is None:
        yield CallObservation()
        return
    meta = {**(request.metadata or {}), **before_call_facts({"route": route or request.model})}
    generation = langfuse.start_observation(
        name=name, as_type="generation", model=request.model, metadata=meta,
        input=[m.model_dump(exclude_none=True) for m in request.messages],
        trace_context={"trace_id": trace_id(meta["run_id"])} if meta.get("run_id") else None)
    try:
        yield CallObservation(generation)
    except BaseException as exc:
        generation.update(level="ERROR", status_message=redact_text(f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        generation.end()


# --- export failures: one warning per process --------------------------------------------------------------------


class _ExportFailures(logging.Filter):
    """Silences the OTLP exporter's retry and failure records and logs one warning naming the host and the status
    instead: an unreachable or misconfigured Langfuse must not flood the terminal of every run."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.host: str | None = None
        self.warned = False
        self.last_problem: str | None = None
        self.installed = False

    def watch(self, host: str) -> None:
        with self.lock:
            self.host = host
            if not self.installed:
                for name in EXPORTER_LOGGERS:
                    logging.getLogger(name).addFilter(self)
                self.installed = True

    def stop(self) -> None:
        """Give the exporter its own logging back and forget what was reported (shutdown)."""
        with self.lock:
            for name in EXPORTER_LOGGERS:
                logging.getLogger(name).removeFilter(self)
            self.installed, self.warned, self.last_problem = False, False, None

    def filter(self, record: logging.LogRecord) -> bool:
        problem = export_problem(record)
        with self.lock:
            self.last_problem = problem or self.last_problem
            if record.levelno < logging.ERROR or self.warned:
                return False
            self.warned = True
            problem = self.last_problem or record.getMessage()
        log.warning("sending traces to Langfuse at %s failed (%s); this process's traces are dropped. Check "
                    "LANGFUSE_HOST and the keys LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY.", self.host, problem)
        return False


_EXPORT_FAILURES = _ExportFailures()
