"""The orchestrator: plans the sub-agents' work, and aggregates their results into the answer."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from agents.bounds import ANSWER_ERROR_CHARS, ANSWER_PART_CHARS, SUMMARY_RESULT_CHARS, clip
from agents.plan import Plan, default_plan, normalise
from agents.tools.formatting import render_table
from agents.tools.tables import columns_of
from app.errors import SETUP_ERRORS, SlmSwapError

PLAN_TOKENS = 512
SUMMARY_PENALTY = 0.5
TABLE_ROWS = 20


async def make_plan(query: str, template: dict[str, str], services: Any, run_id: str | None) -> tuple[Plan, str | None]:
    """The orchestrator model's plan, or the default plan and the reason when its output is unusable."""
    # A plan is bounded JSON (at most 4 steps of 3 short tasks); give it room whatever the per-call default.
    model = services.chat_model("orchestrator", template["id"], run_id, max_tokens=max(PLAN_TOKENS, services.settings.workflow.max_tokens))
    structured = model.with_structured_output(Plan, include_raw=True)
    try:
        out = await structured.ainvoke([SystemMessage(template["text"]), HumanMessage(query)])
    except SETUP_ERRORS:
        raise
    except SlmSwapError as exc:  # the model failed: the run goes on with the default plan and says why
        return default_plan(query), f"the orchestrator's model failed ({exc}); ran the default plan"
    if out["parsed"] is not None:
        return normalise(out["parsed"]), None
    info = out["raw"].response_metadata.get("slmswap") or {}
    reason = f"{info.get('error_type') or 'invalid plan'}: {info.get('error_detail') or out['parsing_error']}"
    return default_plan(query), f"the orchestrator's plan was unusable ({reason}); ran the default plan"


async def aggregate(state: dict[str, Any], template: dict[str, str], services: Any) -> str:
    """The final answer: the model's summary of the results, the formatted output, and any failures reported."""
    results = list((state.get("results") or {}).values())
    # A mild frequency penalty: small models otherwise repeat their last sentence until max_tokens.
    model = services.chat_model("aggregate", template["id"], state.get("run_id")).bind(frequency_penalty=SUMMARY_PENALTY)
    notes = [state["plan_note"]] if state.get("plan_note") else []
    try:
        summary = await model.ainvoke([SystemMessage(template["text"]),
                                       HumanMessage(f"User request: {state['query']}\n\nResults:\n{results_text(results)}")])
        text = summary.content if isinstance(summary.content, str) else ""
    except SETUP_ERRORS:
        raise
    except SlmSwapError as exc:  # no summary, but the results and the failures are still the answer
        text, notes = "", [*notes, f"the summary's model failed ({exc})"]
    return compose_answer(text, results, "; ".join(notes) or None, state.get("datasets") or {})


def results_text(results: list[dict[str, Any]]) -> str:
    return "\n".join(f"- {r['agent']} ({r['task']}): {'ok' if r['ok'] else 'FAILED'}: "
                     f"{clip(r['output'] or r['error'] or '', SUMMARY_RESULT_CHARS, 'result')}"
                     for r in results) or "(no results)"


def compose_answer(summary: str, results: list[dict[str, Any]], plan_note: str | None,
                   datasets: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """Summary first; then what formatting produced (or, without it, the last dataset as a table); then every
    failure, so none goes unreported. The one bound on what tool results put into the answer (and so the store):
    each part is cut on its own, so a huge output never hides the failures listed after it."""
    parts = [collapse_repeats(summary.strip()) or "No summary was produced."]
    formatted = []
    for r in results:
        if r["agent"] == "formatting" and r["ok"]:
            formatted += r.get("artifacts") or ([r["output"].strip()] if r["output"] else [])
    parts += [clip(part, ANSWER_PART_CHARS, "output") for part in formatted or final_table(results, datasets or {})]
    failures = [r for r in results if not r["ok"]]
    if failures:
        parts.append("Not completed:\n" + "\n".join(
            f"- {r['agent']} ({r['task']}): failed after {r['attempts']} attempt(s): "
            f"{clip(r['error'] or '', ANSWER_ERROR_CHARS, 'error')}" for r in failures))
    if plan_note:
        parts.append(f"Note: {plan_note}")
    return "\n\n".join(parts)


def final_table(results: list[dict[str, Any]], datasets: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The newest dataset of the latest successful task, as a markdown table (empty when there is none)."""
    for r in sorted(results, key=lambda r: r["task_id"], reverse=True):
        names = [n for n in r.get("datasets") or [] if datasets.get(n)]
        if r["ok"] and names:
            rows = datasets[names[-1]]
            return [f"{names[-1].rsplit('.', 1)[-1]}:\n\n" + render_table(rows, columns_of(rows), TABLE_ROWS)]
    return []


def collapse_repeats(text: str) -> str:
    """Drop lines that repeat an earlier non-blank line: a small model's loop shows once, not forty times."""
    seen: set[str] = set()
    kept = []
    for line in text.splitlines():
        key = line.strip()
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(line)
    return "\n".join(kept).strip()
