"""The four sub-agents as one node function each: a task in, a result and any new datasets out.

Every sub-agent is the same tool-calling loop with its own template and tools; a failed attempt (invalid output,
an unresolved tool error, or a model call that raised) is retried with the error fed back, up to
`workflow.max_retries` times. `task_prompt` is the one bound on what earlier results put into the next prompt.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from agents.bounds import ANSWER_ERROR_CHARS, PROMPT_CHARS, PROMPT_DATASET_CHARS, PROMPT_RESULT_CHARS, clip
from agents.loop import LoopOutcome, run_tool_loop
from agents.tools import TOOLS_BY_AGENT, ToolContext, ensure_sales_db
from app.errors import SETUP_ERRORS, SlmSwapError

PREVIEW_ROWS = 3


async def run_subagent(payload: dict[str, Any], services: Any) -> dict[str, Any]:
    """Run one task (a LangGraph `Send` payload); returns the partial state: its result and new datasets."""
    agent, tid = payload["agent"], payload["task_id"]
    template = payload["templates"][agent]
    wf = services.settings.workflow
    known = dict(payload.get("datasets") or {})
    ctx = ToolContext(db_path=await asyncio.to_thread(ensure_sales_db, Path(wf.data_db)), datasets=dict(known))
    model = services.chat_model(agent, template["id"], payload.get("run_id"))
    messages = [SystemMessage(template["text"]), HumanMessage(task_prompt(payload, known))]
    attempts, outcome = 0, None
    while attempts <= wf.max_retries:
        attempts += 1
        try:
            outcome = await run_tool_loop(model, messages, TOOLS_BY_AGENT[agent], ctx, wf.max_tool_turns)
        except SETUP_ERRORS:
            raise
        except SlmSwapError as exc:  # the model call failed: this task fails, the run goes on and reports it
            outcome = LoopOutcome(False, "", clip(str(exc), ANSWER_ERROR_CHARS, "error"))
        if outcome.ok:
            break
        messages.append(HumanMessage(f"That attempt failed: {outcome.error}\nFix the problem and try again."))
    new = {f"{tid}.{name}": rows for name, rows in ctx.datasets.items() if name not in known}
    result = {"task_id": tid, "agent": agent, "task": payload["task"], "ok": outcome.ok, "output": outcome.output,
              "error": outcome.error, "attempts": attempts, "tool_calls": outcome.tool_calls,
              "artifacts": outcome.artifacts,
              "datasets": list(new), "template_id": template["id"]}
    return {"results": {tid: result}, "datasets": new}


def task_prompt(payload: dict[str, Any], datasets: dict[str, list[dict]]) -> str:
    """The user turn a sub-agent sees: the request, its task, earlier results, and the datasets it may use.
    Every part is cut to its own bound (so one huge result cannot crowd out the rest), then the whole."""
    parts = [f"User request: {payload['query']}", f"Your task: {payload['task']}"]
    earlier = [r for r in (payload.get("results") or {}).values()]
    if earlier:
        parts.append("Results of earlier steps:\n" + "\n".join(
            f"- {r['agent']}: {'ok' if r['ok'] else 'FAILED'}: "
            f"{clip(r['output'] or r['error'] or '', PROMPT_RESULT_CHARS, 'result')}" for r in earlier))
    if datasets:
        parts.append("Datasets you can use:\n" + "\n".join(
            clip(_describe(n, rows), PROMPT_DATASET_CHARS, "description") for n, rows in datasets.items()))
    return clip("\n\n".join(parts), PROMPT_CHARS, "prompt")


def _describe(name: str, rows: list[dict]) -> str:
    columns = list(rows[0]) if rows else []
    preview = json.dumps(rows[:PREVIEW_ROWS], default=str)
    return f"- {name}: {len(rows)} rows, columns {columns}, first rows {preview}"
