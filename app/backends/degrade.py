"""What an upstream that speaks only part of the protocol is sent instead: pure functions from (request,
capabilities) to the upstream request, from an upstream error to the capability it lacks, and from an invalid
reply to the one corrective retry. The backend (app/backends/openai_compat.py) does the I/O and the learning.

    tool_choice "required" → the one allowed function named, or "auto" + a system note naming the functions
    tool_choice named      → "auto" over that one function + a system note
    json_schema            → json_object with the schema in the system prompt (and as llama.cpp's `schema` key)
    parallel_tool_calls    → false not honoured: the reply keeps its first call

Replies are judged by the ORIGINAL request's rules (`validate_output`); one invalid reply gets one retry with the
validation error fed back, so the Router sees a response to the request it sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from app.toolplan import ToolPlan, request_plan
from app.validation import Verdict, validate_output
from app.wire import ChatRequest, ChatResponse, Message

Gap = Literal["json_schema", "tool_required", "tool_named", "parallel_tool_calls"]
# What each gap is called in logs, errors and binding options.
GAP_NAMES: dict[str, str] = {"json_schema": "response_format json_schema", "tool_required": "tool_choice 'required'",
                             "tool_named": "tool_choice naming a function",
                             "parallel_tool_calls": "parallel_tool_calls false"}
UNSUPPORTED_STATUS = frozenset({400, 422, 500})


@dataclass(frozen=True)
class Capabilities:
    """What an upstream supports: None = unknown (learned from its first refusal), True/False = declared."""

    json_schema: bool | None = None
    tool_required: bool | None = None
    tool_named: bool | None = None
    parallel_tool_calls: bool | None = None

    @classmethod
    def of(cls, options: Any) -> Capabilities:
        """The capabilities a binding's options declare (`supports_*`); what they leave out stays unknown."""
        choices = getattr(options, "supports_tool_choice", None)
        return cls(json_schema=getattr(options, "supports_json_schema", None),
                   tool_required=None if choices is None else "required" in choices,
                   tool_named=None if choices is None else "named" in choices,
                   parallel_tool_calls=getattr(options, "supports_parallel_tool_calls", None))

    def lacking(self, gap: Gap) -> Capabilities:
        return replace(self, **{gap: False})


@dataclass(frozen=True)
class Degraded:
    """The request to send upstream, what was changed to get it, and whether the reply keeps only its first call."""

    upstream: ChatRequest
    changes: tuple[str, ...] = ()
    single_call: bool = False

    @property
    def degraded(self) -> bool:
        return bool(self.changes)


# ---- request → upstream request ------------------------------------------------------------------------

def degrade(req: ChatRequest, caps: Capabilities) -> Degraded:
    """The request an upstream with `caps` can take; the request itself when it lacks nothing it needs."""
    if not req.tools and req.response_format is None:
        return Degraded(req)  # plain text: nothing an upstream could lack (and this runs on every call)
    plan = request_plan(req)
    steps = [s for s in (_tool_step(plan, caps), _format_step(req.response_format, caps)) if s is not None]
    single = plan.mode != "none" and not plan.parallel and caps.parallel_tool_calls is not True
    if not steps:
        return Degraded(req, single_call=single)
    update = {k: v for step in steps for k, v in step.update.items()}
    note = "\n\n".join(step.note for step in steps if step.note)
    upstream = _copy(req, **update, messages=with_system_note(req.messages, note))
    return Degraded(upstream, tuple(step.change for step in steps), single)


@dataclass(frozen=True)
class _Step:
    update: dict[str, Any]  # request fields to replace
    note: str  # what the system prompt must now say instead
    change: str


def _tool_step(plan: ToolPlan, caps: Capabilities) -> _Step | None:
    tools = [_tool(f) for f in plan.functions]
    if plan.mode == "required" and caps.tool_required is False:
        if len(plan.functions) == 1 and caps.tool_named is not False:
            # "required" over one function is exactly that function named.
            return _Step({"tool_choice": _named(plan.names[0]), "tools": tools}, "", "tool_choice required → named")
        return _Step({"tool_choice": "auto", "tools": tools}, _call_note(plan.names), "tool_choice required → auto")
    if plan.mode == "named" and caps.tool_named is False:
        return _Step({"tool_choice": "auto", "tools": tools}, _call_note(plan.names), "tool_choice named → auto")
    return None


def _format_step(fmt: dict[str, Any] | None, caps: Capabilities) -> _Step | None:
    if (fmt or {}).get("type") != "json_schema" or caps.json_schema is not False:
        return None
    schema = (fmt.get("json_schema") or {}).get("schema") or {}
    # `schema` beside json_object is llama-cpp-python's (and Anyscale's) extension: there it becomes a grammar.
    note = "Reply with one JSON object, and nothing else, that matches this JSON Schema:\n" + json.dumps(
        schema, sort_keys=True)
    return _Step({"response_format": {"type": "json_object", "schema": schema}}, note,
                 "response_format json_schema → json_object")


def with_system_note(messages: list[Message], note: str) -> list[Message]:
    """The messages with `note` appended to the first system message (or in a new one at the front)."""
    if not note:
        return list(messages)
    out = list(messages)
    for i, m in enumerate(out):
        if m.role in ("system", "developer"):
            out[i] = m.model_copy(update={"content": f"{m.text()}\n\n{note}".strip()})
            return out
    return [Message(role="system", content=note), *out]


def _call_note(names: tuple[str, ...]) -> str:
    if len(names) == 1:
        return f"Answer with a call of the function {names[0]}, not with a message."
    return f"Answer with a call of one of these functions, not with a message: {', '.join(names)}."


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": function}


# ---- upstream error → the capability it lacks ----------------------------------------------------------

def unsupported(req: ChatRequest, status: int, message: str) -> Gap | None:
    """The capability an upstream's error says it lacks for this request, or None for any other error.

    Recognised: 400/422/500 whose message names `json_schema`/`response_format` (llama-cpp-python: "Input should
    be 'text' or 'json_object'") or `tool_choice`, and llama-cpp-python's bare `assert tool_choice == "auto"`
    (HTTP 500 with an empty message) when the request's tool_choice is not auto.
    """
    if status not in UNSUPPORTED_STATUS:
        return None
    text = message.lower()
    if (req.response_format or {}).get("type") == "json_schema" and ("json_schema" in text
                                                                      or "response_format" in text):
        return "json_schema"
    mode = request_plan(req).mode
    if mode in ("required", "named"):
        bare_assert = status == 500 and (not text.strip() or text.strip() == "assertionerror")
        if bare_assert or "tool_choice" in text:
            return "tool_required" if mode == "required" else "tool_named"
    return None


# ---- reply → what the original request gets ------------------------------------------------------------

def verdict(req: ChatRequest, resp: ChatResponse) -> Verdict:
    """The reply judged by the original request's rules."""
    message = resp.message
    return validate_output(content=message.content, tool_calls=[c.model_dump() for c in message.tool_calls or []],
                           tools=req.tool_dicts(), tool_choice=req.tool_choice,
                           response_format=req.response_format, parallel_tool_calls=req.parallel_tool_calls)


def first_call_only(resp: ChatResponse) -> ChatResponse:
    """The reply with only its first tool call (for an upstream that ignored `parallel_tool_calls: false`)."""
    calls = resp.message.tool_calls or []
    if len(calls) <= 1:
        return resp
    message = resp.message.model_copy(update={"tool_calls": calls[:1]})
    return resp.model_copy(update={"choices": [resp.choices[0].model_copy(update={"message": message})]})


def corrective(req: ChatRequest, resp: ChatResponse, judged: Verdict, caps: Capabilities) -> ChatRequest:
    """The one retry of an invalid degraded reply: the reply and its validation error fed back as a user message.

    A call that was required is then forced by name where the upstream takes a named tool_choice: the function
    the reply mentioned, else the first one allowed.
    """
    said = _as_text(resp)
    feedback = (f"Your reply was not valid ({judged.error_type}: {judged.detail}). Reply again, correcting it; "
                "answer only with what was asked for.")
    messages = [*req.messages, Message(role="assistant", content=said or "(an empty reply)"),
                Message(role="user", content=feedback)]
    update: dict[str, Any] = {"messages": messages}
    plan = request_plan(req)
    if plan.mode == "required" and caps.tool_named is not False:
        mentioned = [n for n in plan.names if n in said]
        update["tool_choice"] = _named((mentioned or list(plan.names))[0])
    return _copy(req, **update)


def _copy(req: ChatRequest, **update: Any) -> ChatRequest:
    # Validated again (not model_copy), so tools and messages given as dicts become wire types.
    return ChatRequest.model_validate({**req.model_dump(exclude_none=True), **update})


def _as_text(resp: ChatResponse) -> str:
    """The reply as plain text (calls written out), so the retry needs no tool-result messages after it."""
    message = resp.message
    calls = [f"{c.function.name}({c.function.arguments})" for c in message.tool_calls or []]
    return "\n".join(filter(None, [message.content or "", *calls])).strip()
