"""The real workflow graph for a `langgraph dev` server under test, with every agent's words scripted in that process.

A test's langgraph.json names this module's `graph`, the very object `graphs.workflow` builds; importing it here
registers the scripted backend in the server, where the test's config binds each route to `scripted:<agent>`.
"""

from __future__ import annotations

import json

from graphs.workflow import graph
from tests.support.scripted import scripted, tool, tool_then_text

PLAN = {"sub_agents": ["retrieval", "processing", "validation"], "parallel": True, "aggregation_strategy": "report",
        "steps": [{"tasks": [{"agent": "retrieval", "task": "fetch sales by region"}]},
                  {"tasks": [{"agent": "processing", "task": "total per region"},
                             {"agent": "validation", "task": "check the totals"}]}]}
ANSWER = "Scripted answer: the West region sold most."

FIRST_TOOL = {  # each sub-agent must call one of its tools on its first turn
    "retrieval": tool("run_sql", query="SELECT name FROM regions", as_name="regions"),
    "processing": tool("top_k", dataset="s0.0.retrieval.regions", by="name", k=2),
    "validation": tool("validate_json_schema", value_json="{}", schema_json='{"type": "object"}'),
    "formatting": tool("report", title="t"),
}


scripted("orchestrator").default = json.dumps(PLAN)
for _agent in FIRST_TOOL:
    scripted(_agent).default = tool_then_text(FIRST_TOOL[_agent], f"{_agent} done")
scripted("aggregate").default = ANSWER

__all__ = ["graph", "PLAN", "ANSWER"]
