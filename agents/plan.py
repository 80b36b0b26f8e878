"""The orchestrator's plan protocol: which sub-agents run, with which task, in which ordered steps.

Tasks in one step run in parallel (LangGraph `Send`); each step sees the results of the steps before it.
The schema is kept small and bounded so a small model decodes it under a grammar in few tokens.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SubAgent = Literal["retrieval", "processing", "validation", "formatting"]
SUB_AGENTS: tuple[str, ...] = ("retrieval", "processing", "validation", "formatting")


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent: SubAgent
    task: str = Field(min_length=1, max_length=120)


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[Task] = Field(min_length=1, max_length=3)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sub_agents: list[SubAgent] = Field(min_length=1, max_length=4)
    parallel: bool
    aggregation_strategy: Literal["report", "summary", "table"]
    steps: list[Step] = Field(min_length=1, max_length=4)


def normalise(plan: Plan) -> Plan:
    """Make `sub_agents` and `parallel` agree with the steps (the steps are what runs)."""
    used = list(dict.fromkeys(t.agent for s in plan.steps for t in s.tasks))
    parallel = any(len(s.tasks) > 1 for s in plan.steps)
    return plan.model_copy(update={"sub_agents": used, "parallel": parallel})


def default_plan(query: str) -> Plan:
    """The plan used when the orchestrator's output is unusable: every sub-agent in turn, on the query."""
    task = query.strip()[:120]
    steps = [Step(tasks=[Task(agent=a, task=task)]) for a in SUB_AGENTS]
    return Plan(sub_agents=list(SUB_AGENTS), parallel=False, aggregation_strategy="report", steps=steps)


def task_id(step: int, index: int, agent: str) -> str:
    return f"s{step}.{index}.{agent}"
