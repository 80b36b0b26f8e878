"""Langfuse datasets: push the calls `dataset build` keeps as a Langfuse dataset, pull one back as a dataset folder.

An item is one selected call: input = the request (`messages`, `tools`, `tool_choice`, `parallel_tool_calls`),
expected output = the answer as an OpenAI assistant message, metadata = route, template, binding and call id. Its
id is derived from the dataset name and the call id, so a re-push updates the same items (Langfuse upserts by id,
and an id may not be reused across datasets, hence the name in it). Pulling reads every item first, converts what
it can (the rest dropped with a reason, as `build` does), and writes the folder under a temporary name that is
renamed into place at the end: a failure leaves no half-written folder.

    report = push_dataset(settings, "retrieval-v1", selection.kept, calls_by_id)
    report = pull_dataset(settings, "retrieval-v1", Path("ds"), "hermes")
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.capture.records import CallRecord
from app.config import Settings
from app.errors import UsageError
from app.langfuse_rest import rest_client, rest_errors
from app.wire import Message, Tool
from training import datasets as ds

# uuid5 namespace of item ids; never change it, or a re-push would create every item anew.
ITEM_NAMESPACE = uuid.UUID("5f0c8a52-6a36-4a59-9d3e-1c9b52f0a7d1")
PULL_DROP_REASONS = ("archived", "no_expected_output", "bad_input", "bad_expected_output", "unrenderable",
                     "duplicate")


class BadItem(ValueError):
    """An item that cannot become a training row; `reason` is one of PULL_DROP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class PushReport:
    name: str
    host: str
    pushed: int = 0
    routes: Counter = field(default_factory=Counter)


@dataclass
class PullReport:
    name: str
    host: str
    splits: dict[str, list[ds.Example]] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples_of_drops: dict[str, str] = field(default_factory=dict)  # reason -> first item id and detail


# ---- items (pure) ----------------------------------------------------------------------------------------

def item_id(dataset: str, call_id: str) -> str:
    """The item id of a call in a dataset: the same on every push, different in another dataset.

    >>> item_id("faq", "abc") == item_id("faq", "abc") != item_id("other", "abc")
    True
    """
    return str(uuid.uuid5(ITEM_NAMESPACE, f"{dataset}\0{call_id}"))


def to_item(dataset: str, ex: ds.Example, call: CallRecord | None = None) -> dict[str, Any]:
    """`create_dataset_item` arguments for one selected example (and the call it came from, for its metadata)."""
    request: dict[str, Any] = {"messages": ex.messages}
    for key, value in (("tools", ex.tools), ("tool_choice", ex.tool_choice),
                       ("parallel_tool_calls", ex.parallel_tool_calls)):
        if value is not None:
            request[key] = value
    metadata = {"route": ex.route, "call_id": ex.id, "source": "slmswap"}
    if call is not None:
        metadata |= {"template_id": call.template_id, "binding": call.binding, "role": call.role}
    return {"id": item_id(dataset, ex.id), "input": request, "expected_output": ds.answer_message(ex.answer),
            "metadata": metadata}


def from_item(item: Mapping[str, Any], route: str) -> ds.Example:
    """An Example from one item's JSON (`id`, `status`, `input`, `expectedOutput`, `metadata`); BadItem otherwise.

    Input may be our request object (`messages`, `tools`, ...), a bare list of messages, or a string (one user
    message); the expected output an assistant message, `{content, tool_calls}`, or a string.
    """
    if item.get("status") == "ARCHIVED":
        raise BadItem("archived")
    request = _request_of(item.get("input"))
    answer = _answer_of(item.get("expectedOutput"))
    meta = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
    item_route = meta.get("route") if isinstance(meta.get("route"), str) and meta.get("route") else route
    params = request.get("parallel_tool_calls")
    return ds.Example(id=str(item.get("id")), route=item_route, messages=request["messages"],
                      tools=request.get("tools") or None, answer=answer, tool_choice=request.get("tool_choice"),
                      parallel_tool_calls=params if isinstance(params, bool) else None, key=ds.input_key(request))


def _request_of(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = {"messages": [{"role": "user", "content": raw}]}
    elif isinstance(raw, list):
        raw = {"messages": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list) or not raw["messages"]:
        raise BadItem("bad_input", "input is not a request with messages, a list of messages, or a string")
    # Validated, but kept as they came: the rows then equal what `build` writes from the same call.
    messages, tools = raw["messages"], raw.get("tools") or None
    try:
        checked = [Message.model_validate(m) for m in messages]
        for tool in tools or []:
            Tool.model_validate(tool)
    except ValidationError as exc:
        raise BadItem("bad_input", _first_error(exc)) from None
    if tools is not None and not isinstance(tools, list):
        raise BadItem("bad_input", "tools is not a list")
    if checked[-1].role == "assistant":
        raise BadItem("bad_input", "the input ends with an assistant message; the answer belongs in expected output")
    return {"messages": messages, "tools": tools, "tool_choice": raw.get("tool_choice"),
            "parallel_tool_calls": raw.get("parallel_tool_calls")}


def _answer_of(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = {"content": raw}
    if raw is None or raw == "" or raw == {}:
        raise BadItem("no_expected_output")
    if not isinstance(raw, dict):
        raise BadItem("bad_expected_output", f"expected output is a {type(raw).__name__}, not a message")
    calls = [_with_json_arguments(c) for c in raw.get("tool_calls") or []] or None
    answer = {"content": raw.get("content"), "tool_calls": calls}
    try:
        message = Message.model_validate(ds.answer_message(answer))
    except ValidationError as exc:
        raise BadItem("bad_expected_output", _first_error(exc)) from None
    if not message.content and not message.tool_calls:
        raise BadItem("no_expected_output", "expected output has neither content nor tool_calls")
    return answer


def _with_json_arguments(call: Any) -> Any:
    # Items written by hand often hold arguments as an object; OpenAI (and our rows) carry a JSON string.
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        arguments = call["function"].get("arguments")
        if isinstance(arguments, (dict, list)):
            return {**call, "function": {**call["function"], "arguments": json.dumps(arguments)}}
    return call


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def convert(items: Iterable[Mapping[str, Any]], fmt: str, route: str) -> tuple[list[ds.Example], PullReport]:
    """The items that make rows in `fmt` (each rendered once to prove it), deduplicated on normalised input."""
    report = PullReport(name="", host="")
    kept, seen = [], set()
    for item in items:
        try:
            ex = from_item(item, route)
            if ex.key in seen:
                raise BadItem("duplicate")
            try:
                ds.ROW_WRITERS[fmt](ex)
            except Exception as exc:  # the codec refuses it (e.g. a tool call naming no tool); say why, go on
                raise BadItem("unrenderable", f"{type(exc).__name__}: {exc}"[:200]) from None
        except BadItem as bad:
            report.dropped[bad.reason] += 1
            report.examples_of_drops.setdefault(bad.reason, f"{item.get('id')}: {bad}")
            continue
        seen.add(ex.key)
        kept.append(ex)
    return kept, report


# ---- push ------------------------------------------------------------------------------------------------

def push_dataset(settings: Settings, name: str, examples: list[ds.Example], calls: Mapping[str, CallRecord], *,
                 description: str | None = None) -> PushReport:
    """Create (or update) dataset `name` and upsert one item per example. Re-running pushes the same ids."""
    _check_name(name)
    langfuse, host = rest_client(settings)
    report = PushReport(name, host)
    after = "run the same command again: items already pushed are updated, not duplicated"
    with rest_errors(host, f"creating dataset {name!r}", after):
        langfuse.create_dataset(name=name, description=description or "slm-swap: selected captured calls",
                                metadata={"source": "slmswap"})
    for ex in examples:
        with rest_errors(host, f"pushing item {ex.id} to dataset {name!r}", after):
            langfuse.create_dataset_item(dataset_name=name, **to_item(name, ex, calls.get(ex.id)))
        report.pushed += 1
        report.routes[ex.route] += 1
    return report


def _check_name(name: str) -> None:
    if not name.strip():
        raise UsageError("--name must not be empty; give the Langfuse dataset's name")


# ---- pull ------------------------------------------------------------------------------------------------

def fetch_items(settings: Settings, name: str) -> tuple[list[dict[str, Any]], str]:
    """Every item of dataset `name` as its JSON (the SDK's models dumped by alias), and the host."""
    _check_name(name)
    langfuse, host = rest_client(settings)
    with rest_errors(host, f"reading dataset {name!r}"):
        dataset = langfuse.get_dataset(name)
    return [item.model_dump(by_alias=True, mode="json") for item in dataset.items], host


def pull_dataset(settings: Settings, name: str, out: Path, fmt: str, *, val_percent: int = ds.VAL_PERCENT,
                 min_examples: int = 1) -> PullReport:
    """Fetch dataset `name`, convert its items, and write `out` as `dataset build` would (atomically)."""
    items, host = fetch_items(settings, name)
    kept, report = convert(items, fmt, route=f"langfuse:{name}")
    report.name, report.host = name, host
    if len(kept) < min_examples:
        drops = ", ".join(f"{reason} {n}" for reason, n in report.dropped.most_common()) or "nothing dropped"
        raise UsageError(f"dataset {name!r} at {host} gives {len(kept)} usable items of {len(items)} ({drops}); "
                         f"--min-examples is {min_examples}: nothing was written")
    report.splits = ds.split(kept, val_percent)
    rows = {split: [ds.ROW_WRITERS[fmt](ex) for ex in exs] for split, exs in report.splits.items()}
    manifest = {"source": f"langfuse:{name}", "host": host, "items": len(items), "val_percent": val_percent,
                "dropped": dict(report.dropped), "dropped_examples": report.examples_of_drops}
    write_atomically(out, rows, fmt, manifest)
    return report


def write_atomically(out: Path, rows: dict[str, list[dict[str, Any]]], kind: str, manifest: dict[str, Any]) -> None:
    """`ds.write_dataset` into a sibling temporary folder, then swapped into place: `out` is either as it was or
    complete. An earlier dataset at `out` is replaced only once the new one is fully written."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        ds.write_dataset(staging, rows, kind, manifest)
        old = None
        if out.exists():
            old = out.with_name(f"{staging.name}.old")
            out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
