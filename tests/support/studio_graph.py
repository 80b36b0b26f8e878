"""The real workflow graph for a `langgraph dev` server under test, with every agent's words scripted in that process.

A test's langgraph.json names this module's `graph`, the very object `graphs.workflow` builds; importing it here
registers the scripted backend in the server, where the test's config binds each route to `scripted:<agent>`.
"""

from __future__ import annotations

import json

from graphs.workflow import graph
from tests.support.scripted import scripted

PLAN = {"sub_agents": ["retrieval", "processing", "validation"], "parallel": True, "aggregation_strategy": "report",
        "steps": [{"tasks": [{"agent": "retrieval", "task": "fetch sales by region"}]},
                  {"tasks": [{"agent": "processing", "task": "total per region"},
                             {"agent": "validation", "task": "check the totals"}]}]}
ANSWER = "Scripted answer: the West region sold most."

scripted("orchestrator").default = json.dumps(PLAN)
for _agent in ("retrieval", "processing", "validation", "formatting"):
    scripted(_agent).default = f"{_agent} done"
scripted("aggregate").default = ANSWER

__all__ = ["graph", "PLAN", "ANSWER"]
