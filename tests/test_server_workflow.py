"""The workflow graph with every node bound to an `openai:` binding that points at the proxy: a LangGraph user's
nodes get the proxy's treatment (capture, routing) through the real openai SDK, end to end over loopback."""

import asyncio
import json
from pathlib import Path

from app.config import WORKFLOW_AGENTS, load_settings
from app.server.routes import create_app
from app.services import Services
from graphs.state import WorkflowContext
from graphs.workflow import graph
from tests.support.http import serve
from tests.support.scripted import tool, tool_then_text


def test_the_workflow_through_the_proxy(tmp_path, monkeypatch, scripted):
    proxy_cfg = tmp_path / "proxy.toml"
    proxy_cfg.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/proxy.db"\n' + "".join(
        f'[routes.{a}]\nteacher = "scripted:{a}"\n' for a in WORKFLOW_AGENTS))
    proxy = Services.from_settings(load_settings(proxy_cfg))
    plan = {"sub_agents": ["retrieval", "formatting"], "parallel": False, "aggregation_strategy": "report",
            "steps": [{"tasks": [{"agent": "retrieval", "task": "fetch"}]},
                      {"tasks": [{"agent": "formatting", "task": "report"}]}]}
    scripted("orchestrator").enqueue(json.dumps(plan))
    scripted("retrieval").default = tool_then_text(
        tool("run_sql", query="SELECT region, SUM(amount) AS total FROM sales GROUP BY region", as_name="by_region"),
        "fetched")
    scripted("formatting").default = tool_then_text(
        tool("report", title="Q4", sections=[{"heading": "Summary", "body": "done"}]), "formatted")
    scripted("aggregate").enqueue("Revenue by region is below.")

    with serve(create_app(proxy.settings, proxy)) as url:
        graph_cfg = tmp_path / "graph.toml"
        graph_cfg.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/graph.db"\n' + "".join(
            f'[routes.{a}]\nteacher = "openai:{a}?base_url={url}/v1&max_retries=0"\n' for a in WORKFLOW_AGENTS))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-not-checked-on-loopback-0000")
        services = Services.from_settings(load_settings(graph_cfg))
        run_id = services.store.start_run("Analyze Q4 sales by region")
        state = asyncio.run(graph.ainvoke({"query": "Analyze Q4 sales by region"},
                                          context=WorkflowContext(services=services, run_id=run_id)))
        graph_calls = services.store.calls_for_run(run_id)
        services.close()
    proxy_calls = proxy.store.list_calls(limit=100)
    proxy.close()

    assert state["answer"].startswith("Revenue by region is below.") and "# Q4" in state["answer"]
    assert all(r["ok"] for r in state["results"].values())
    # Every node call went through the proxy once: captured there as proxy calls, here as the graph's own.
    assert len(graph_calls) == len(proxy_calls) == 6 and all(c.valid for c in graph_calls + proxy_calls)
    assert {c.binding.split(":")[0] for c in graph_calls} == {"openai"}
    assert {c.source for c in proxy_calls} == {"proxy"} and {c.route for c in proxy_calls} == {
        "orchestrator", "retrieval", "formatting", "aggregate"}
    assert Path(tmp_path / "proxy.db").exists()
