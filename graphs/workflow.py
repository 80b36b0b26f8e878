"""The five-agent workflow: prompt → orchestrator → sub-agents (steps in order, tasks of a step in parallel) → aggregate.

`graph` is what `langgraph.json` names for LangGraph Studio; the CLI invokes the same object with its own services
in the run context.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Send

from agents.orchestrator import aggregate, make_plan
from agents.plan import SUB_AGENTS, Plan, task_id
from agents.subagent import run_subagent
from graphs.state import SubAgentInput, WorkflowContext, WorkflowInput, WorkflowState
from prompts.prompt_node import current_templates

AGENTS = ["orchestrator", *SUB_AGENTS, "aggregate"]

# What a new query resets on a thread that already ran one (None clears the merged dicts).
FRESH = {"plan": None, "plan_note": None, "step": 0, "results": None, "datasets": None, "answer": None}

_default: Any = None
_default_lock = threading.Lock()


async def services_of(runtime: Runtime[WorkflowContext] | None) -> Any:
    """The run's services, or the process default (built once from the config; Studio's case)."""
    ctx = runtime.context if runtime is not None else None
    if ctx is not None and getattr(ctx, "services", None) is not None:
        return ctx.services
    # Building them reads files and opens the store: off the event loop, which `langgraph dev` forbids blocking.
    return await asyncio.to_thread(default_services)


def default_services() -> Any:
    global _default
    with _default_lock:
        if _default is None:
            from app.config import load_settings
            from app.services import Services

            _default = Services.from_settings(load_settings())
        return _default


async def prompt(state: WorkflowState, runtime: Runtime[WorkflowContext]) -> dict:
    services = await services_of(runtime)
    query = state["query"]
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the query is empty; give the workflow a question to work on")
    # Never the thread's earlier run: Studio sends each new query to the same thread, with the last run's state.
    run_id = runtime.context.run_id if runtime.context else None
    if run_id is None and services.store is not None:
        run_id = await asyncio.to_thread(services.store.start_run, query)
    # Selection per run: Thompson sampling per agent, seeded by the run id so a run's draw can be replayed.
    rng = random.Random(run_id) if run_id else random.Random()
    templates = await asyncio.to_thread(current_templates, services.store, AGENTS, rng=rng,
                                        config=services.settings.templates)
    return {"run_id": run_id, "templates": templates, **FRESH}


async def orchestrator(state: WorkflowState, runtime: Runtime[WorkflowContext]) -> dict:
    """First visit: plan. Later visits (after each step): advance to the next step."""
    if state.get("plan"):
        return {"step": state["step"] + 1}
    services = await services_of(runtime)
    plan, note = await make_plan(state["query"], state["templates"]["orchestrator"], services, state.get("run_id"))
    return {"plan": plan.model_dump(), "plan_note": note, "step": 0, "results": {}, "datasets": {}}


def dispatch(state: WorkflowState) -> list[Send] | str:
    """Send the current step's tasks to their sub-agents, or go to aggregation when the steps are done."""
    steps = Plan.model_validate(state["plan"]).steps
    if state["step"] >= len(steps):
        return "aggregate"
    return [Send(t.agent, SubAgentInput(
        task_id=task_id(state["step"], i, t.agent), agent=t.agent, task=t.task, query=state["query"],
        run_id=state.get("run_id"), templates=state["templates"], results=state.get("results") or {},
        datasets=state.get("datasets") or {},
    )) for i, t in enumerate(steps[state["step"]].tasks)]


def _subagent_node(agent: str):
    async def node(payload: SubAgentInput, runtime: Runtime[WorkflowContext]) -> dict:
        return await run_subagent(dict(payload), await services_of(runtime))

    node.__name__ = agent
    return node


async def aggregate_node(state: WorkflowState, runtime: Runtime[WorkflowContext]) -> dict:
    services = await services_of(runtime)
    answer = await aggregate(dict(state), state["templates"]["aggregate"], services)
    if services.store is not None and state.get("run_id"):
        await asyncio.to_thread(services.store.finish_run, state["run_id"], "ok", answer=answer)
    return {"answer": answer}


def build_graph():
    builder = StateGraph(WorkflowState, context_schema=WorkflowContext, input_schema=WorkflowInput)
    builder.add_node("prompt", prompt)
    builder.add_node("orchestrator", orchestrator)
    for agent in SUB_AGENTS:
        builder.add_node(agent, _subagent_node(agent), input_schema=SubAgentInput)
        builder.add_edge(agent, "orchestrator")
    builder.add_node("aggregate", aggregate_node)
    builder.add_edge(START, "prompt")
    builder.add_edge("prompt", "orchestrator")
    builder.add_conditional_edges("orchestrator", dispatch, [*SUB_AGENTS, "aggregate"])
    builder.add_edge("aggregate", END)
    return builder.compile(name="slm-swap workflow")


graph = build_graph()
