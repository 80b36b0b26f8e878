"""The sub-agents' tool-calling loop: call the model, run the tools it asks for, feed results back, bounded turns.

A tool given bad arguments returns an error text to the model and the loop goes on; only an invalid model output,
or a loop that ends on an unresolved tool error, counts as a failure (which the caller may retry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.runnables import RunnableLambda

from agents.tools import ToolContext, run_tool


@dataclass
class LoopOutcome:
    ok: bool
    output: str
    error: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)  # full outputs of formatting tools, for the user


async def run_tool_loop(model: Any, messages: list[BaseMessage], tools: list, ctx: ToolContext,
                        max_turns: int) -> LoopOutcome:
    """Run up to `max_turns` model turns; `messages` is extended in place with the conversation."""
    schemas = [t.openai_schema() for t in tools]
    calls: list[dict[str, Any]] = []
    artifacts: list[str] = []
    last_error: str | None = None
    for turn in range(max_turns):
        # The first turn must use a tool (every sub-agent works through its tools); later turns may answer.
        # One call per turn: a small model asked for parallel calls repeats its first one until max_tokens.
        ai = await model.bind_tools(schemas, tool_choice="required" if turn == 0 else "auto",
                                    parallel_tool_calls=False).ainvoke(messages)
        messages.append(ai)
        if problem := invalid_output(ai):
            return LoopOutcome(False, _text(ai), problem, calls, artifacts)
        if not ai.tool_calls:
            return LoopOutcome(last_error is None, _text(ai), last_error, calls, artifacts)
        for call in ai.tool_calls:
            result = await _execute(tools, call, ctx)
            calls.append({"name": call["name"], "args": call["args"], "ok": result.ok})
            messages.append(ToolMessage(result.content, tool_call_id=call["id"], name=call["name"]))
            last_error = None if result.ok else result.content
            if result.ok and result.artifact:
                artifacts.append(result.artifact)
    return await _final_answer(model, messages, schemas, calls, artifacts, last_error)


async def _final_answer(model, messages, schemas, calls, artifacts, last_error) -> LoopOutcome:
    """Turns are used up: ask once more for a plain answer, with tools off."""
    ai = await model.bind_tools(schemas, tool_choice="none").ainvoke(messages)
    messages.append(ai)
    problem = invalid_output(ai)
    return LoopOutcome(problem is None and last_error is None, _text(ai), problem or last_error, calls, artifacts)


async def _execute(tools: list, call: dict, ctx: ToolContext):
    # A named runnable, so callbacks (Langfuse) show each tool execution as its own span under the agent.
    runnable = RunnableLambda(lambda args: run_tool(tools, call["name"], args, ctx), name=call["name"])
    return await runnable.ainvoke(call["args"], {"run_name": call["name"], "tags": ["tool"]})


def invalid_output(ai: AIMessage) -> str | None:
    """The Router's verdict on this model output, as an error text, or None when it was valid."""
    info = ai.response_metadata.get("slmswap") or {}
    if info.get("valid", True) and not ai.invalid_tool_calls:
        return None
    return f"invalid output ({info.get('error_type') or 'invalid_json'}): {info.get('error_detail') or ''}".strip()


def _text(ai: AIMessage) -> str:
    return ai.content if isinstance(ai.content, str) else str(ai.content)
