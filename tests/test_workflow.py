"""The real graph and tools on a real store; scripted backends force each agent's words."""

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from app.config import load_settings
from app.services import Services
from graphs.state import WorkflowContext
from graphs.workflow import graph
from tests.support.scripted import tool, tool_then_text

AGENTS = ("orchestrator", "retrieval", "processing", "validation", "formatting", "aggregate")


@pytest.fixture
def services():
    lines = [f'[routes.{a}]\nteacher = "scripted:{a}"' for a in AGENTS]
    Path("slmswap.toml").write_text("\n".join(lines) + "\n[workflow]\nmax_retries = 1\nmax_tool_turns = 3\n")
    s = Services.from_settings(load_settings())
    yield s
    s.close()


def plan(*steps):
    agents = list(dict.fromkeys(a for step in steps for a in step))
    return json.dumps({"sub_agents": agents, "parallel": False, "aggregation_strategy": "report",
                       "steps": [{"tasks": [{"agent": a, "task": f"do {a}"} for a in step]} for step in steps]})


REPORT = tool("report", title="Q4", sections=[{"heading": "Summary", "body": "done"}])
CHECK = tool("validate_json_schema", value_json='{"a": 1}', schema_json='{"type": "object"}')


def run(services, query="Analyze Q4 sales by region"):
    run_id = services.store.start_run(query)
    state = asyncio.run(graph.ainvoke({"query": query}, context=WorkflowContext(services=services, run_id=run_id)))
    return state, run_id


def test_plan_steps_tools_and_answer(services, scripted):
    scripted("orchestrator").enqueue(plan(["retrieval"], ["processing", "validation"], ["formatting"]))
    scripted("retrieval").enqueue(
        tool("run_sql", query="SELECT region, SUM(amount) AS total FROM sales GROUP BY region", as_name="by_region"),
        "fetched by_region")
    def processing(req):
        name = next(w for w in req.messages[1].content.replace(":", " ").split() if w.endswith(".by_region"))
        return tool_then_text(tool("top_k", dataset=name, by="total", k=2), "processed")(req)

    scripted("processing").default = processing
    scripted("validation").default = tool_then_text(CHECK, "checked")
    ds = {}

    def formatting(req):
        # The formatting agent sees the dataset retrieval made in an earlier step.
        ds["prompt"] = req.messages[1].content
        name = next(w for w in req.messages[1].content.replace(":", " ").split() if w.endswith(".by_region"))
        return [tool("markdown_table", dataset=name)] if len(req.messages) == 2 else "table done"

    scripted("formatting").default = formatting
    scripted("aggregate").enqueue("Sales by region are in the table.")
    state, run_id = run(services)

    assert state["plan"]["sub_agents"] == ["retrieval", "processing", "validation", "formatting"]
    assert state["plan"]["parallel"] is True
    results = state["results"]
    assert {r["agent"] for r in results.values()} == {"retrieval", "processing", "validation", "formatting"}
    assert all(r["ok"] for r in results.values()), results
    assert "| region" in state["answer"] and state["answer"].startswith("Sales by region")
    calls = services.store.calls_for_run(run_id)
    # one row per model call: plan, then two turns (tool, answer) for each of four sub-agents, then aggregate
    assert len(calls) == 10
    assert {c.agent for c in calls} == set(AGENTS)
    assert all(c.template_id == f"{c.agent}/base@1" for c in calls)
    assert services.store.get_run(run_id).status == "ok"


def test_parallel_tasks_of_a_step_run_concurrently(services, scripted):
    scripted("orchestrator").enqueue(plan(["formatting", "validation"]))
    started, both = [], asyncio.Event()

    def slow(name, call):
        async def wait_for_sibling():
            # Each task's model waits until the other task has started: run one after the other, the first never
            # sees the second (the bound only turns that into a failure instead of a hang).
            started.append(name)
            if len(started) == 2:
                both.set()
            try:
                await asyncio.wait_for(both.wait(), 60)
            except TimeoutError:
                raise TimeoutError(f"{name} ran alone") from None
            return call

        return lambda req: f"{name} done" if any(m.role == "tool" for m in req.messages) else wait_for_sibling()

    scripted("formatting").default = slow("formatting", REPORT)
    scripted("validation").default = slow("validation", CHECK)
    state, _ = run(services)
    assert sorted(started) == ["formatting", "validation"]
    assert len(state["results"]) == 2 and all(r["ok"] for r in state["results"].values())


def test_tool_error_is_fed_back_and_the_loop_goes_on(services, scripted):
    scripted("orchestrator").enqueue(plan(["retrieval"]))
    scripted("retrieval").enqueue(tool("run_sql", query="DELETE FROM orders"), tool("run_sql", query="SELECT 1 AS one"), "done")
    state, _ = run(services)
    [result] = state["results"].values()
    assert result["ok"] and result["attempts"] == 1
    assert [c["ok"] for c in result["tool_calls"]] == [False, True]
    req = scripted("retrieval").requests[1]
    assert "error" in req.messages[-1].text().lower()


def test_failed_subagent_is_retried_then_reported(services, scripted):
    scripted("orchestrator").enqueue(plan(["retrieval"]))
    scripted("retrieval").default = tool("no_such_tool")  # invalid every time
    state, run_id = run(services)
    [result] = state["results"].values()
    assert not result["ok"] and result["attempts"] == 2
    assert "unknown_function" in result["error"]
    assert "Not completed" in state["answer"] and "retrieval" in state["answer"]
    retry_prompt = scripted("retrieval").requests[1].messages[-1].text()
    assert "failed" in retry_prompt and "unknown_function" in retry_prompt


def test_unusable_plan_falls_back_to_default_plan(services, scripted):
    scripted("orchestrator").enqueue("I think we should look at the data")
    state, run_id = run(services)
    assert [s["tasks"][0]["agent"] for s in state["plan"]["steps"]] == ["retrieval", "processing", "validation", "formatting"]
    assert "default plan" in state["answer"]
    [plan_call] = [c for c in services.store.calls_for_run(run_id) if c.agent == "orchestrator"]
    assert not plan_call.valid


def test_prompt_node_selects_among_the_stores_live_templates(services, scripted):
    from prompts.store import add_template, ensure_base, retire

    custom = add_template(services.store, "retrieval", "Custom retrieval prompt", origin="manual")
    retire(services.store, ensure_base(services.store, "retrieval").id, "a test wants the custom one")
    scripted("orchestrator").enqueue(plan(["retrieval"]))
    state, run_id = run(services)
    assert state["templates"]["retrieval"] == {"id": custom.id, "text": "Custom retrieval prompt"}
    assert scripted("retrieval").requests[0].messages[0].content == "Custom retrieval prompt"
    assert state["templates"]["processing"]["id"] == "processing/base@1"


def test_backend_error_fails_the_task_not_the_run(services, scripted):
    from app.errors import BackendError

    scripted("orchestrator").enqueue(plan(["retrieval"], ["formatting"]))
    scripted("retrieval").default = BackendError("azure:gpt-4o failed (HTTP 503): overloaded")
    scripted("formatting").default = tool_then_text(REPORT, "formatted")
    state, run_id = run(services)
    assert not state["results"]["s0.0.retrieval"]["ok"]
    assert "HTTP 503" in state["answer"] and state["results"]["s1.0.formatting"]["ok"]


def test_answer_collapses_a_small_models_repeated_lines():
    from agents.orchestrator import collapse_repeats

    assert collapse_repeats("Sales: 5 rows\nSales: 5 rows\n\nNorth leads.\nSales: 5 rows") == "Sales: 5 rows\n\nNorth leads."


def test_without_a_formatting_step_the_answer_shows_the_last_dataset(services, scripted):
    scripted("orchestrator").enqueue(plan(["retrieval"]))
    scripted("retrieval").default = tool_then_text(
        tool("run_sql", query="SELECT name AS region FROM regions ORDER BY name", as_name="regions"), "got regions")
    state, _ = run(services)
    assert "regions:" in state["answer"] and "| region |" in state["answer"] and "| West |" in state["answer"]


def test_a_model_call_that_raises_any_slmswap_error_fails_the_task_not_the_run(services, scripted):
    from app.errors import UsageError

    scripted("orchestrator").enqueue(plan(["retrieval"], ["formatting"]))
    scripted("retrieval").default = UsageError("the request has no messages; send at least one")
    scripted("formatting").default = tool_then_text(REPORT, "formatted")
    state, run_id = run(services)
    retrieval = state["results"]["s0.0.retrieval"]
    assert not retrieval["ok"] and retrieval["attempts"] == 2 and "no messages" in retrieval["error"]
    assert state["results"]["s1.0.formatting"]["ok"]
    assert "Not completed" in state["answer"] and "no messages" in state["answer"]
    assert services.store.get_run(run_id).status == "ok"


def test_a_huge_cell_is_bounded_in_the_next_prompt_the_answer_and_the_store(services, scripted):
    from agents import bounds

    # 40 cells of 900,000 characters each (under SQLite's value limit, so the query runs): 36 MB before.
    scripted("orchestrator").enqueue(plan(["retrieval"], ["formatting"]))
    scripted("retrieval").default = tool_then_text(
        tool("run_sql", query="SELECT region, hex(randomblob(450000)) AS big FROM sales LIMIT 40", as_name="big"), "fetched")
    scripted("formatting").default = tool_then_text(tool("to_csv", dataset="big"), "formatted")
    scripted("aggregate").enqueue("Here is the CSV.")
    state, run_id = run(services)
    assert all(r["ok"] for r in state["results"].values()), state["results"]
    rows = state["datasets"]["s0.0.retrieval.big"]
    assert len(rows) == 40 and all(r["big"].endswith("[cut: cell was 900,000 characters; showing the first 2,000]")
                                  for r in rows)

    prompt = scripted("formatting").requests[0].messages[1].content
    assert "s0.0.retrieval.big: 40 rows" in prompt and "[cut: description was" in prompt
    assert len(prompt) < 2_000
    tool_turn = scripted("formatting").requests[1].messages[-1].text()
    assert len(tool_turn) < bounds.TOOL_RESULT_CHARS + 100 and "[cut: tool result was" in tool_turn

    answer = state["answer"]
    assert answer.startswith("Here is the CSV.") and "region,big\n" in answer
    assert "[cut: output was" in answer and len(answer) < bounds.ANSWER_PART_CHARS + 200

    services.store.calls_for_run(run_id)  # flushes the batched capture writes
    with sqlite3.connect(".slmswap/slmswap.db") as conn:
        [(calls, largest_call)] = conn.execute(
            "SELECT count(*), max(length(request) + length(coalesce(response, ''))) FROM calls WHERE run_id = ?",
            (run_id,)).fetchall()
        [(answer_size,)] = conn.execute("SELECT length(answer) FROM runs WHERE id = ?", (run_id,)).fetchall()
    assert calls == 6 and largest_call < 20_000
    assert answer_size == len(answer)


def test_a_failing_orchestrator_or_summary_model_does_not_end_the_run(services, scripted):
    """The planner's model failing gives the default plan; the summary's failing still gives the results."""
    from app.errors import BadReply

    scripted("orchestrator").default = BadReply("openai:planner replied with no choices")
    scripted("aggregate").default = RuntimeError("engine on fire")  # not even our error: the Router maps it
    scripted("retrieval").default = tool_then_text(tool("run_sql", query="SELECT 1 AS x"), "fetched")
    scripted("processing").default = "nothing to process"
    scripted("validation").default = tool_then_text(CHECK, "checked")
    scripted("formatting").default = tool_then_text(REPORT, "formatted")
    state, run_id = run(services)
    assert [s["tasks"][0]["agent"] for s in state["plan"]["steps"]] == ["retrieval", "processing", "validation", "formatting"]
    answer = state["answer"]
    assert "the orchestrator's model failed (openai:planner replied with no choices); ran the default plan" in answer
    assert "the summary's model failed (scripted:aggregate failed: RuntimeError: engine on fire)" in answer
    assert "# Q4" in answer  # the formatting step's report is still the answer
    calls = services.store.calls_for_run(run_id)
    assert [(c.valid, c.error_type) for c in calls if c.agent in ("orchestrator", "aggregate")] == [
        (False, "backend_error"), (False, "backend_error")]


def test_a_setup_error_stops_the_run_instead_of_failing_every_task(services, scripted):
    """A missing model file or key would fail every call alike: the run stops with that one message."""
    from app.errors import MissingDependency

    scripted("orchestrator").enqueue(plan(["retrieval"], ["formatting"]))
    scripted("retrieval").default = MissingDependency("GGUF model file not found: /nope.gguf")
    with pytest.raises(MissingDependency, match="/nope.gguf"):
        run(services)
