"""The orchestrator: plans the sub-agents' work, and aggregates their results into the answer."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from agents.plan import Plan, default_plan, normalise

PLAN_TOKENS = 512


async def make_plan(query: str, template: dict[str, str], services: Any, run_id: str | None) -> tuple[Plan, str | None]:
    """The orchestrator model's plan, or the default plan and the reason when its output is unusable."""
    # A plan is bounded JSON (at most 4 steps of 3 short tasks); give it room whatever the per-call default.
    model = services.chat_model("orchestrator", template["id"], run_id, max_tokens=max(PLAN_TOKENS, services.settings.workflow.max_tokens))
    structured = model.with_structured_output(Plan, include_raw=True)
    out = await structured.ainvoke([SystemMessage(template["text"]), HumanMessage(query)])
    if out["parsed"] is not None:
        return normalise(out["parsed"]), None
    info = out["raw"].response_metadata.get("slmswap") or {}
    reason = f"{info.get('error_type') or 'invalid plan'}: {info.get('error_detail') or out['parsing_error']}"
    return default_plan(query), f"the orchestrator's plan was unusable ({reason}); ran the default plan"


async def aggregate(state: dict[str, Any], template: dict[str, str], services: Any) -> str:
    """The final answer: the model's summary of the results, the formatted output, and any failures reported."""
    results = list((state.get("results") or {}).values())
    model = services.chat_model("aggregate", template["id"], state.get("run_id"))
    summary = await model.ainvoke([SystemMessage(template["text"]),
                                   HumanMessage(f"User request: {state['query']}\n\nResults:\n{results_text(results)}")])
    return compose_answer(summary.content if isinstance(summary.content, str) else "", results, state.get("plan_note"))


def results_text(results: list[dict[str, Any]]) -> str:
    return "\n".join(f"- {r['agent']} ({r['task']}): {'ok' if r['ok'] else 'FAILED'}: "
                     f"{(r['output'] or r['error'] or '')[:600]}" for r in results) or "(no results)"


def compose_answer(summary: str, results: list[dict[str, Any]], plan_note: str | None) -> str:
    """Summary first; then what formatting produced; then every failure, so none goes unreported."""
    parts = [summary.strip() or "No summary was produced."]
    for r in results:
        if r["agent"] == "formatting" and r["ok"]:
            parts += r.get("artifacts") or ([r["output"].strip()] if r["output"] else [])
    failures = [r for r in results if not r["ok"]]
    if failures:
        parts.append("Not completed:\n" + "\n".join(
            f"- {r['agent']} ({r['task']}): failed after {r['attempts']} attempt(s): {r['error']}" for r in failures))
    if plan_note:
        parts.append(f"Note: {plan_note}")
    return "\n\n".join(parts)
