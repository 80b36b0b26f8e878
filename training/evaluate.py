"""The evaluation runner behind `slmswap eval`: asks every item of a suite of each model through the Router, scores
the answers, and writes items.jsonl, summary.json, report.md and report.png.

Choices later issues rely on:
- Capture is OFF: the Router runs without a store (and requests say source="eval"), so eval outputs never become
  training data. Every route of the run is bound to the model under test; config routes and stages are ignored.
- BFCL items are sent with their own messages and `to_openai_tools` signatures (dotted names kept); a local model
  sees them in the Hermes function-calling system prompt. tool_choice is "required" (each item expects a call, so
  a text answer counts as invalid, as in the issue's baseline), "auto" in the (ir)relevance categories; and
  parallel_tool_calls is false outside the parallel categories, whose items alone expect several calls.
- Greedy decoding (temperature 0), `max_tokens` per answer (256 by default).
- Models run one after another; items of one model run `concurrency` at a time (1 for local gguf/hf bindings,
  whose calls llama.cpp serialises anyway, so latencies stay honest; 8 for remote ones).
- A model whose backend raises stops there: its finished items are written, the summary names the failure, the
  next model runs, and `run_eval` raises BackendError (exit 1) at the end.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from app.config import Settings, load_settings
from app.errors import BackendError, SlmSwapError, UsageError
from app.routing.context import CallContext
from app.routing.router import Router
from app.secrets import redact_text, register_settings
from app.validation import ParsedCall, parse_calls
from app.wire import AssistantMessage, ChatRequest, ChatResponse
from training import metrics
from training.suites import EvalItem, Suite, check_window, load_suite

DECODINGS = ("constrained", "free")
DEFAULT_MAX_TOKENS = 256
REMOTE_CONCURRENCY = 8
EVAL_ROUTE = "eval"


@dataclass(frozen=True)
class EvalOptions:
    suite: str
    models: tuple[str, ...]
    limit: int | None = None
    offset: int = 0
    decoding: str = "constrained"
    template: str | None = None
    out: str | Path | None = None
    config: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    concurrency: int | None = None  # None: 1 for local bindings, REMOTE_CONCURRENCY otherwise


@dataclass
class ModelRun:
    binding: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None


# ---- entry point -----------------------------------------------------------------------------------------

def run_eval(options: EvalOptions, console: Any = None, progress: Any = None) -> dict[str, Any]:
    """Evaluate each model on the suite, write the four files to `options.out`, and return the summary.

    `progress` (a rich Console) shows a bar per model; `console` gets the summary table.

    Bad input raises UsageError before any model is called; a model that fails mid-run raises BackendError
    after the files are written. Example:

        run_eval(EvalOptions("bfcl:simple_python", ("gguf:smollm2-135m",), limit=50, out="/tmp/e"))
    """
    from training.report import print_summary, write_report

    check_options(options)
    settings = load_settings(options.config)
    for binding in options.models:
        register_settings(settings.bound_to(binding))  # a malformed or unknown binding fails here, before any call
    suite, template = _prepare(options, settings)
    out = output_dir(options)
    runs = asyncio.run(_run_models(options, settings, suite, template, out / "items.jsonl", progress))
    summary = write_report(out, suite, runs, options)
    if console is not None:
        print_summary(summary, out, console)
    _raise_failures(runs, out)
    return summary


def check_options(options: EvalOptions) -> None:
    check_window(options.offset, options.limit)
    if not options.models:
        raise UsageError("name at least one model, e.g. --model gguf:smollm2-135m")
    if twice := sorted({m for m in options.models if options.models.count(m) > 1}):
        raise UsageError(f"model {twice[0]!r} is given twice; each --model names a different binding")
    if options.decoding not in DECODINGS:
        raise UsageError(f"--decoding must be one of {', '.join(DECODINGS)}, got {options.decoding!r}")
    if options.max_tokens < 1 or (options.concurrency is not None and options.concurrency < 1):
        raise UsageError("max_tokens and concurrency must be at least 1")


def _prepare(options: EvalOptions, settings: Settings) -> tuple[Suite, dict[str, str] | None]:
    """The suite's items and the template (id, text), or UsageError; opens the store only when needed."""
    store = None
    try:
        if options.suite.startswith("captured:") or options.template:
            from app.capture.store import CaptureStore

            store = CaptureStore.open(settings.store.url)
        suite = load_suite(options.suite, offset=options.offset, limit=options.limit, store=store, settings=settings)
        template = resolve_template(options.template, store) if options.template else None
    finally:
        if store is not None:
            store.close()
    if template and suite.kind == "workflow":
        raise UsageError("--template applies to bfcl, captured and jsonl suites; a workflow uses each agent's own")
    return suite, template


def output_dir(options: EvalOptions) -> Path:
    slug = options.suite.replace(":", "-").replace("/", "_").strip("._-")[-60:]
    out = Path(options.out) if options.out else Path(".slmswap/eval") / f"{slug}-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "items.jsonl").write_text("", encoding="utf-8")
    return out


def _raise_failures(runs: list[ModelRun], out: Path) -> None:
    failed = [r for r in runs if r.failure]
    if failed:
        what = "; ".join(f"{r.binding} failed after {len(r.rows)} items: {r.failure}" for r in failed)
        raise BackendError(f"{what}. The items done so far and the summary are in {out}")


# ---- templates -------------------------------------------------------------------------------------------

def resolve_template(template_id: str, store: Any = None) -> dict[str, str]:
    """A shipped base template or a stored one, by id (e.g. "retrieval/base@1")."""
    from prompts.base import base_templates

    known = {t.id: t.text for t in base_templates().values()}
    if store is not None:
        known.update({t.id: t.text for t in store.list_templates()})
    if template_id not in known:
        raise UsageError(f"no template has id {template_id!r}; known ids: {', '.join(sorted(known))}")
    return {"id": template_id, "text": known[template_id]}


def with_template(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The messages with the template as the one system message (any system or developer ones replaced)."""
    return [{"role": "system", "content": text}, *(m for m in messages if m["role"] not in ("system", "developer"))]


# ---- requests and scores (pure) --------------------------------------------------------------------------

def build_request(item: EvalItem, decoding: str, max_tokens: int,
                  template: dict[str, str] | None = None) -> ChatRequest:
    """The chat request an item sends (greedy)."""
    messages = with_template(item.messages, template["text"]) if template else item.messages
    return ChatRequest(model=EVAL_ROUTE, messages=messages, tools=item.tools,
                       tool_choice=item.tool_choice if item.tools else None,
                       parallel_tool_calls=item.parallel_tool_calls if item.tools else None,
                       response_format=item.response_format, max_tokens=max_tokens, temperature=0.0,
                       decoding=decoding)


def raw_output(message: AssistantMessage) -> str:
    """What the model wrote: its text, then its tool calls in the Hermes form the local models write them."""
    from app import hermes

    return hermes.assistant_text(message.content, [(c.function.name, c.function.arguments)
                                                   for c in message.tool_calls or []])


def item_row(item: EvalItem, binding: str, resp: ChatResponse) -> dict[str, Any]:
    """One line of items.jsonl for an answered item (the Router's verdict, then the scores)."""
    info, message = resp.slmswap, resp.message
    calls = _calls(message) if info.valid else []
    value = _json_value(message) if info.valid and item.kind == "json" else None
    exact, f1 = score(item, calls, value, message.content or "")
    usage = resp.usage
    return {"id": item.id, "model": binding, "output": raw_output(message),
            "calls": [{"name": c.name, "arguments": c.arguments} for c in calls], "valid": info.valid,
            "error_type": info.error_type, "exact": exact, "f1": f1, "latency_ms": round(info.latency_ms, 2),
            "tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens, "cost": info.cost_usd}


def _calls(message: AssistantMessage) -> list[ParsedCall]:
    tool_calls = [c.model_dump() for c in message.tool_calls or []]
    return list(parse_calls(content=message.content, tool_calls=tool_calls or None).calls)


def _json_value(message: AssistantMessage) -> Any:
    try:
        return json.loads((message.content or "").strip())
    except json.JSONDecodeError:
        return None


def score(item: EvalItem, calls: list[ParsedCall], value: Any, text: str) -> tuple[bool, float]:
    """(exact, f1) of an answer. An invalid answer comes in with no calls and no value."""
    if item.kind == "bfcl":
        return _score_bfcl(item, calls)
    if item.kind == "calls":
        return metrics.exact_match(calls, item.expected), metrics.arg_f1(calls, item.expected)
    if item.kind == "json":
        exact = value is not None and metrics.normalize_value(value) == metrics.normalize_value(item.expected)
        return exact, metrics.json_f1(value, item.expected)
    same = " ".join(text.split()) == " ".join(str(item.expected).split())
    return same, float(same)


def _score_bfcl(item: EvalItem, calls: list[ParsedCall]) -> tuple[bool, float]:
    from training.bfcl import reference_calls

    if item.category == "live_relevance":  # BFCL: any call is right, none is wrong
        return bool(calls), float(bool(calls))
    exact, _ = metrics.bfcl_match(calls, item.expected, item.functions)
    return exact, metrics.arg_f1(calls, reference_calls(item.expected))


# ---- running ---------------------------------------------------------------------------------------------

class _Tally:
    """The Router calls made while one workflow item runs."""

    def __init__(self) -> None:
        self.responses: list[ChatResponse] = []
        self.errors: list[BaseException] = []


_TALLY: contextvars.ContextVar[_Tally | None] = contextvars.ContextVar("slmswap_eval_tally", default=None)


class EvalRouter(Router):
    """The Router with capture off, every request decoded as the run asks, and calls tallied per workflow item."""

    def __init__(self, settings: Settings, decoding: str):
        super().__init__(settings, store=None)
        self.decoding = decoding

    async def complete(self, req: ChatRequest, ctx: CallContext | None = None) -> ChatResponse:
        ctx = (ctx or CallContext(route=req.model)).but(source="eval")
        req = req.model_copy(update={"decoding": self.decoding})
        tally = _TALLY.get()
        try:
            resp = await super().complete(req, ctx)
        except Exception as exc:
            if tally is not None:
                tally.errors.append(exc)  # sub-agents swallow backend errors; the run must still see them
            raise
        if tally is not None:
            tally.responses.append(resp)
        return resp


def eval_settings(settings: Settings, binding: str) -> Settings:
    """Every route bound to `binding`, whatever the config's routes and rollout stages say."""
    return settings.bound_to(binding).model_copy(update={"routes": {}})


def concurrency_for(binding: str, settings: Settings, explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    from app.backends.base import is_local

    # A local model decodes one request at a time per process; a hosted one takes many.
    return 1 if is_local(settings.binding(binding).kind) else REMOTE_CONCURRENCY


async def _run_models(options: EvalOptions, settings: Settings, suite: Suite, template: dict | None,
                      items_path: Path, progress: Any) -> list[ModelRun]:
    from training.report import model_progress

    runs = []
    with model_progress(progress, options.models, len(suite.items)) as advance:
        for binding in options.models:
            router = EvalRouter(eval_settings(settings, binding), options.decoding)
            ask = _workflow_asker(router) if suite.kind == "workflow" else item_asker(router, options, template)
            run = ModelRun(redact_text(binding))  # what the files and the console show: no base_url password
            try:
                await run_items(run, suite.items, ask, concurrency_for(binding, settings, options.concurrency),
                                lambda: advance(binding))
            finally:
                append_rows(items_path, run.rows)
            runs.append(run)
    return runs


Asker = Callable[[EvalItem, str], Any]  # (item, binding) -> awaitable row


async def run_items(run: ModelRun, items: list[EvalItem], ask: Asker, concurrency: int,
                    on_done: Callable[[], None] = lambda: None) -> None:
    """Ask every item, `concurrency` at a time; the first exception stops the model and is recorded.

    Rows end up in item order; after a failure, only items answered before it are kept.
    """
    done: dict[int, dict[str, Any]] = {}
    queue = iter(enumerate(items))

    async def worker() -> None:
        for index, item in queue:  # the workers share one iterator: each takes the next item
            if run.failure is not None:
                return
            try:
                row = await ask(item, run.binding)
            except Exception as exc:
                run.failure = run.failure or _describe(exc, item)
                return
            done[index] = row
            on_done()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    run.rows = [done[i] for i in sorted(done)]


def _describe(exc: BaseException, item: EvalItem) -> str:
    if isinstance(exc, SlmSwapError):  # our messages already say what failed where
        return f"on item {item.id}: {exc}"[:1000]
    text = str(exc) if str(exc) else type(exc).__name__
    return redact_text(f"on item {item.id}: {type(exc).__name__}: {text}")[:1000]


def item_asker(router: Router, options: EvalOptions, template: dict | None) -> Asker:
    async def ask(item: EvalItem, binding: str) -> dict[str, Any]:
        ctx = CallContext(route=EVAL_ROUTE, template_id=template["id"] if template else None, source="eval")
        resp = await router.complete(build_request(item, options.decoding, options.max_tokens, template), ctx)
        return item_row(item, binding, resp)

    return ask


def _workflow_asker(router: Router) -> Asker:
    from app.services import Services

    services = Services(settings=router.settings, router=router, store=None)

    async def ask(item: EvalItem, binding: str) -> dict[str, Any]:
        tally, started = _Tally(), time.perf_counter()
        token = _TALLY.set(tally)
        try:
            state = await _invoke_graph(item.query, services)
        finally:
            _TALLY.reset(token)
        if tally.errors:
            raise tally.errors[0]
        return workflow_row(item, binding, state, tally.responses, (time.perf_counter() - started) * 1000)

    return ask


async def _invoke_graph(query: str, services: Any) -> dict[str, Any]:
    # The workflow suite evaluates the whole graph, so this edge reaches up to graphs/ as the CLI does.
    from graphs.state import WorkflowContext
    from graphs.workflow import graph

    return await graph.ainvoke({"query": query}, {"run_name": "slmswap eval"},
                               context=WorkflowContext(services=services))


def workflow_row(item: EvalItem, binding: str, state: dict[str, Any], responses: list[ChatResponse],
                 latency_ms: float) -> dict[str, Any]:
    """One items.jsonl line for a workflow query: exact = the answer passes its check, f1 = routing Jaccard."""
    chosen = list((state.get("plan") or {}).get("sub_agents") or [])
    expected = item.expected["agents"]
    invalid = next((r.slmswap for r in responses if not r.slmswap.valid), None)
    answer = state.get("answer") or ""
    return {"id": item.id, "model": binding, "output": answer, "calls": [], "valid": invalid is None,
            "error_type": invalid.error_type if invalid else None,
            "exact": metrics.workflow_success(answer, item.expected["check"]),
            "f1": metrics.routing_jaccard([chosen], [expected]), "latency_ms": round(latency_ms, 2),
            "tokens": sum(r.usage.total_tokens for r in responses),
            "cost": sum(r.slmswap.cost_usd for r in responses),
            "agents": chosen, "routed": metrics.routing_accuracy([chosen], [expected]) == 1.0}


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.writelines(redact_text(json.dumps(row, ensure_ascii=False, default=str)) + "\n" for row in rows)
