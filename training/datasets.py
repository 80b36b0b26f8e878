"""Training data from captured calls and from BFCL: which calls to keep, in which split, as which rows.

Everything here is a plain function over plain records (CallRecords, feedback verdicts, BFCL items) except the
writers and `read_dataset` at the bottom. Rows are written with the one Hermes codec (`app/hermes.py`) through
`chat_format.to_turns`, so a LoRA learns exactly the text it is later served.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app import hermes
from app.backends import chat_format
from app.capture.records import CallRecord
from app.errors import UsageError
from app.toolplan import plan_tools
from app.wire import Message, Tool
from app.holdout import is_held_out
from training.suites import BFCL_HELD_OUT

Format = Literal["hermes", "openai"]
FORMATS = ("hermes", "openai")
DROP_REASONS = ("eval", "held_out", "invalid", "unconfirmed_student", "duplicate", "over_cap")
VAL_PERCENT = 10
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass(frozen=True)
class Example:
    """One training example: what was asked (OpenAI messages and tools) and the answer to learn."""

    id: str
    route: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    answer: dict[str, Any]  # content, tool_calls (OpenAI shape, arguments as JSON strings)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    key: str = ""  # the normalised input's hash: dedupe and split read it


@dataclass(frozen=True)
class Pair:
    """A preference pair: the same input, the teacher's valid answer and the student's failed one."""

    example: Example  # its answer is the chosen one
    rejected: dict[str, Any]
    why: str  # error type of the rejected answer, or "disagreement"


@dataclass
class Selection:
    kept: list[Example] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason → count
    invalid_types: Counter = field(default_factory=Counter)  # error_type of dropped invalid calls → count


# ---- choosing calls --------------------------------------------------------------------------------------

def feedback_verdicts(rows: Iterable[tuple[str, float | None, bool | None]]) -> dict[str, bool]:
    """(call_id, score, success) feedback rows → call id: True when every judgement was positive, False when any
    was negative (success false or score <= 0, the rule `student_outcomes` uses)."""
    verdicts: dict[str, bool] = {}
    for call_id, score, success in rows:
        positive = success is not False and (score is None or score > 0)
        verdicts[call_id] = verdicts.get(call_id, True) and positive
    return verdicts


def drop_reason(call: CallRecord, verdicts: dict[str, bool]) -> str | None:
    """Why a call cannot be a training example, or None when its answer is one to learn."""
    if call.source == "eval":
        return "eval"
    # A shadow of a held-out call has its input, and `select` drops every input seen in a held-out call.
    if is_held_out(call.id):
        return "held_out"
    if not call.valid or call.response is None or verdicts.get(call.id) is False:
        return "invalid"
    if call.role != "teacher" and not (call.agreement is True or verdicts.get(call.id) is True):
        return "unconfirmed_student"
    return None


def select(calls: Iterable[CallRecord], verdicts: dict[str, bool], *, routes: Iterable[str] | None = None,
           cap: int | None = None) -> Selection:
    """The calls to learn from, deduplicated on normalised input and capped per route, with what was dropped.

    Calls are read oldest first and a teacher answer wins over a student one for the same input, so the result
    does not depend on the store's order. An input seen in a held-out call is dropped everywhere (as held_out):
    the test split must not leak into training through a duplicate.
    """
    wanted = set(routes) if routes else None
    ordered = sorted((c for c in calls if wanted is None or c.route in wanted),
                     key=lambda c: (c.role != "teacher", c.created_at, c.id))
    sel, candidates, held_keys = Selection(), [], set()
    for call in ordered:
        reason = drop_reason(call, verdicts)
        if reason == "held_out":
            held_keys.add(input_key(call.request))
        if reason:
            sel.dropped[reason] += 1
            if reason == "invalid":
                sel.invalid_types[call.error_type or "negative_feedback"] += 1
        else:
            candidates.append(example_of(call))
    seen: set[str] = set()
    per_route: Counter = Counter()
    for ex in candidates:
        reason = ("held_out" if ex.key in held_keys else "duplicate" if ex.key in seen
                  else "over_cap" if cap is not None and per_route[ex.route] >= cap else None)
        seen.add(ex.key)
        if reason:
            sel.dropped[reason] += 1
        else:
            per_route[ex.route] += 1
            sel.kept.append(ex)
    return sel


def example_of(call: CallRecord) -> Example:
    request, response = call.request, call.response or {}
    params = request.get("params") or {}
    return Example(id=call.id, route=call.route, messages=request.get("messages") or [],
                   tools=request.get("tools") or None,
                   answer={"content": response.get("content"), "tool_calls": response.get("tool_calls")},
                   tool_choice=request.get("tool_choice"), parallel_tool_calls=params.get("parallel_tool_calls"),
                   key=input_key(request))


# ---- normalising and splitting ---------------------------------------------------------------------------

def normalised_input(request: dict[str, Any]) -> str:
    """The input as canonical JSON: messages (whitespace collapsed), tools and tool_choice, keys sorted."""
    messages = [{**m, "content": _squash(m.get("content"))} for m in request.get("messages") or []]
    return json.dumps({"messages": messages, "tools": request.get("tools") or None,
                       "tool_choice": request.get("tool_choice")}, sort_keys=True, ensure_ascii=False)


def input_key(request: dict[str, Any]) -> str:
    return hashlib.sha256(normalised_input(request).encode()).hexdigest()


def _squash(content: Any) -> Any:
    if isinstance(content, str):
        return re.sub(r"\s+", " ", content).strip()
    if isinstance(content, list):
        return [{**p, "text": _squash(p["text"])} if isinstance(p, dict) and "text" in p else p for p in content]
    return content


def split_of(key: str, val_percent: int = VAL_PERCENT) -> str:
    """train or val, from the hash of the normalised input only (stable across runs, machines and order).

    >>> split_of("0" * 64), split_of("f" * 64)
    ('val', 'train')
    """
    return "val" if int(key[:8], 16) % 100 < val_percent else "train"


def split(items: Iterable[Any], val_percent: int = VAL_PERCENT, key=lambda ex: ex.key) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {name: [] for name in SPLITS}
    for item in items:
        out[split_of(key(item), val_percent)].append(item)
    return out


# ---- preference pairs ------------------------------------------------------------------------------------

def preference_pairs(calls: Iterable[CallRecord], verdicts: dict[str, bool], *,
                     routes: Iterable[str] | None = None) -> list[Pair]:
    """DPO pairs from fallbacks (a teacher call whose parent is the failed student attempt) and from shadow
    disagreements (a shadow whose parent is the teacher call): chosen = the teacher's valid answer, rejected =
    the student's answer as it wrote it. Eval and held-out calls never make a pair; one pair per input."""
    calls = list(calls)
    by_id = {c.id: c for c in calls}
    wanted = set(routes) if routes else None
    pairs, seen = [], set()
    for call in sorted(calls, key=lambda c: (c.created_at, c.id)):
        found = _pair_of(call, by_id)
        if found is None or (wanted is not None and call.route not in wanted):
            continue
        teacher, student, why = found
        if drop_reason(teacher, verdicts) or is_held_out(student.id) or student.source == "eval":
            continue
        pair = Pair(example_of(teacher), dict(student.response or {}), why)
        if pair.example.key not in seen:
            seen.add(pair.example.key)
            pairs.append(pair)
    return pairs


def _pair_of(call: CallRecord, by_id: dict[str, CallRecord]) -> tuple[CallRecord, CallRecord, str] | None:
    parent = by_id.get(call.parent_id) if call.parent_id else None
    if parent is None:
        return None
    if call.role == "teacher" and parent.role == "student" and call.fallback_reason and parent.response:
        return call, parent, parent.error_type or call.fallback_reason
    if call.role == "shadow" and parent.role == "teacher" and call.response and (
            call.agreement is False or not call.valid):
        return parent, call, call.error_type if not call.valid else "disagreement"
    return None


# ---- BFCL ground truth -----------------------------------------------------------------------------------

def parse_items(spec: str) -> range:
    """`0-299` or `7` as a range of item positions.

    >>> parse_items("0-299")
    range(0, 300)
    """
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec)
    if not m or (m[2] is not None and int(m[2]) < int(m[1])):
        raise UsageError(f"--items {spec!r} is not a range; write FIRST-LAST (both included), e.g. 0-299")
    return range(int(m[1]), int(m[2] or m[1]) + 1)


def check_not_held_out(category: str, items: range) -> None:
    held = BFCL_HELD_OUT.get(category)
    if held and items.start < held.stop and held.start < items.stop:
        raise UsageError(f"items {held.start}-{held.stop - 1} of {category} are held out (the test split); "
                         f"pick items below {held.start}, e.g. --items 0-{held.start - 1}")


def bfcl_examples(category: str, items: range) -> list[Example]:
    """BFCL's ground truth as examples: each parameter at its first allowed value (`reference_calls`)."""
    from training.bfcl import load_category, reference_calls, to_openai_tools

    check_not_held_out(category, items)
    loaded = load_category(category)
    if items.stop > len(loaded):
        raise UsageError(f"{category} has {len(loaded)} items (0-{len(loaded) - 1}); --items {items.start}-"
                         f"{items.stop - 1} goes past the end")
    out = []
    for item in (loaded[i] for i in items):
        calls = [{"type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                 for c in reference_calls(item.possible_answer)]
        request = {"messages": item.messages, "tools": to_openai_tools(item.functions), "tool_choice": "required"}
        out.append(Example(id=item.id, route=f"bfcl:{category}", messages=item.messages, tools=request["tools"],
                           answer={"content": None, "tool_calls": calls}, tool_choice="required",
                           key=input_key(request)))
    return out


# ---- rows ------------------------------------------------------------------------------------------------

def answer_message(answer: dict[str, Any]) -> dict[str, Any]:
    """A stored answer as an OpenAI assistant message."""
    msg: dict[str, Any] = {"role": "assistant", "content": answer.get("content")}
    if answer.get("tool_calls"):
        msg["tool_calls"] = answer["tool_calls"]
    return msg


def turns_of(ex: Example, answer: dict[str, Any] | None = None) -> list[chat_format.Turn]:
    """The turns a local backend renders for this input, plus the answer as the model writes it."""
    messages = [Message.model_validate(m) for m in ex.messages]
    if answer is not None:
        messages.append(Message.model_validate(answer_message(answer)))
    functions = plan_tools(ex.tools, ex.tool_choice, ex.parallel_tool_calls).functions
    return chat_format.to_turns(messages, functions)


def to_hermes(ex: Example) -> dict[str, Any]:
    """A Hermes ShareGPT row: system (with the <tools> section), human, gpt (with <tool_call> blocks), and tool
    results as <tool_response> human turns, exactly what `chat_format.to_turns` renders."""
    turns = turns_of(ex, ex.answer)
    return {"id": ex.id, "route": ex.route,
            "conversations": [{"from": _SHAREGPT_ROLE[t.role], "value": t.text} for t in turns]}


def to_openai(ex: Example) -> dict[str, Any]:
    """An OpenAI fine-tuning row: `messages` ending with the answer, and `tools`."""
    row: dict[str, Any] = {"messages": [*ex.messages, answer_message(ex.answer)]}
    if ex.tools:
        row["tools"] = ex.tools
    if ex.parallel_tool_calls is not None:
        row["parallel_tool_calls"] = ex.parallel_tool_calls
    return row


def to_pair(pair: Pair) -> dict[str, Any]:
    """trl's conversational preference row; every text is written by the Hermes codec."""
    prompt = [{"role": t.role, "content": t.text} for t in turns_of(pair.example)]
    return {"id": pair.example.id, "route": pair.example.route, "why": pair.why, "prompt": prompt,
            "chosen": [{"role": "assistant", "content": _answer_text(pair.example.answer)}],
            "rejected": [{"role": "assistant", "content": _answer_text(pair.rejected)}]}


def _answer_text(answer: dict[str, Any]) -> str:
    calls = [(c["function"]["name"], c["function"].get("arguments")) for c in answer.get("tool_calls") or []]
    return hermes.assistant_text(answer.get("content"), calls)


ROW_WRITERS = {"hermes": to_hermes, "openai": to_openai}


# ---- writing and reading ---------------------------------------------------------------------------------

def write_dataset(out: Path, rows: dict[str, list[dict[str, Any]]], kind: str, manifest: dict[str, Any]) -> None:
    """<split>.jsonl per split, manifest.json, and the same rows as a `datasets.DatasetDict` under hf/.

    In hf/, openai rows keep `messages` and `tools` as JSON strings: their schemas differ row by row, and Arrow
    would otherwise merge them into one struct, adding null keys to every tool's parameters.
    """
    from datasets import Dataset, DatasetDict

    out.mkdir(parents=True, exist_ok=True)
    for name, split_rows in rows.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows)
    (out / MANIFEST).write_text(json.dumps({"kind": kind, **manifest}, indent=2) + "\n", encoding="utf-8")
    arrow = {name: [_arrow_row(r, kind) for r in split_rows] for name, split_rows in rows.items() if split_rows}
    DatasetDict({name: Dataset.from_list(r) for name, r in arrow.items()}).save_to_disk(str(out / "hf"))


def _arrow_row(row: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind != "openai":
        return row
    return {"messages": json.dumps(row["messages"]), "tools": json.dumps(row.get("tools"))}


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShareGptTurn(_Row):
    from_: Literal["system", "human", "gpt"] = Field(alias="from")
    value: str


class HermesRow(_Row):
    id: str
    route: str
    conversations: list[ShareGptTurn]

    @model_validator(mode="after")
    def _ends_with_answer(self) -> HermesRow:
        if not self.conversations or self.conversations[-1].from_ != "gpt":
            raise ValueError("the last turn must be the answer (from: gpt)")
        return self


class OpenAIRow(_Row):
    messages: list[Message]
    tools: list[Tool] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _ends_with_answer(self) -> OpenAIRow:
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("the last message must be the answer (role: assistant)")
        return self


class ChatTurn(_Row):
    role: Literal["system", "user", "assistant"]
    content: str


class PairRow(_Row):
    id: str
    route: str
    why: str
    prompt: list[ChatTurn]
    chosen: list[ChatTurn]
    rejected: list[ChatTurn]


ROW_MODELS: dict[str, type[_Row]] = {"hermes": HermesRow, "openai": OpenAIRow, "pairs": PairRow}


@dataclass(frozen=True)
class LoadedDataset:
    kind: str  # hermes | openai | pairs
    splits: dict[str, list[dict[str, Any]]]
    manifest: dict[str, Any]


def read_dataset(folder: str | Path) -> LoadedDataset:
    """Read and check every row of a dataset folder; the first malformed row raises UsageError with path:line,
    so nothing is trained on a half-good file."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    model = ROW_MODELS[manifest["kind"]]
    files = {name: folder / f"{name}.jsonl" for name in SPLITS}
    splits = {name: _read_rows(path, model) for name, path in files.items() if path.exists()}
    if not splits.get("train"):
        raise UsageError(f"{folder / 'train.jsonl'} is missing or empty; rebuild the dataset with "
                         "`slmswap dataset build` or `slmswap dataset from-bfcl`")
    return LoadedDataset(manifest["kind"], splits, manifest)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{folder} is not a dataset folder (no {MANIFEST}); build one with "
                         "`slmswap dataset build --out DIR`") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} cannot be read ({exc}); rebuild the dataset") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in ROW_MODELS:
        raise UsageError(f"{path}: `kind` must be one of {', '.join(ROW_MODELS)}; rebuild the dataset")
    return manifest


def _read_rows(path: Path, model: type[_Row]) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}; rebuild the dataset") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            model.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UsageError(f"{path}:{number}: {where + ': ' if where else ''}{first['msg']}; fix or remove "
                             "that line (nothing was trained)") from None
        rows.append(json.loads(line))
    return rows
