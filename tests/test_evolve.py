"""Template evolution: rules phrased with their evidence, worked examples only from calls that may teach, nothing
written without failures, the reflective rewrite through the Router (scripted teacher), and the CLI on a real store."""

import json
from datetime import UTC, datetime, timedelta

import typer
from typer.testing import CliRunner

from app.capture.records import CallRecord
from app.capture.store import CaptureStore
from app.holdout import is_held_out
from prompts.cli_evolve import evolve_route, register
from prompts.store import add_template
from prompts.evolve import (EXAMPLES_VAR, GENERIC, RULES_HEADING, evolve, fill_examples, observations,
                            parse_reflection, reflection_messages)

SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "n": {"type": "integer"}}, "required": ["query"]}}}
SQL = {"type": "function", "function": {"name": "run_sql", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
T0 = datetime(2026, 12, 1, tzinfo=UTC)
_ids = (f"{i:032x}" for i in range(10_000))


def call_id(held_out=False):
    return next(i for i in _ids if is_held_out(i) == held_out)


def hermes(name, arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def record(content, user="find fjords", tools=(SEARCH,), *, source="graph", held_out=False, template_id="r/base@1",
           route="r", n=0):
    request = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": user}],
               "tools": list(tools), "tool_choice": "required", "response_format": None, "params": {}}
    return CallRecord(route=route, agent=route, binding="gguf:smollm2-135m", request=request,
                      response={"content": content, "tool_calls": None, "finish_reason": "stop"},
                      id=call_id(held_out), source=source, template_id=template_id,
                      created_at=T0 + timedelta(seconds=n))


RENAMED = hermes("search", {"q": "fjords"})
FENCED = '```json\n{"name": "search", "arguments": {"query": "fjords"}}\n```'
SELF_CLOSING = '<tool_call name="search"/>'
GOOD = hermes("search", {"query": "fjords"})


def rules_of(records, parent="Call the search tool."):
    return [r.text for r in evolve(parent, observations(records, parent), k=0).rules]


def test_each_pattern_becomes_one_rule_phrased_with_its_evidence():
    rules = rules_of([record(RENAMED), record(FENCED), record(SELF_CLOSING)])
    assert "Use parameter `query`, not `q`." in rules
    assert any("no markdown fences" in r and "```json" in r for r in rules)
    assert any(r.startswith('Never write `<tool_call name="search"/>`') for r in rules)


def test_rules_are_ordered_by_how_many_calls_showed_them_and_counted_once_per_call():
    result = evolve("p", observations([record(FENCED, n=i) for i in range(3)] + [record(RENAMED, n=9)]), k=0)
    assert result.rules[0].pattern == "markdown_fence" and result.rules[0].calls == 3
    assert [r.calls for r in result.rules if r.pattern == "missing_required"] == [1]


def test_q4_queried_as_one_month_gives_the_quarter_rule():
    q4 = record(hermes("run_sql", {"query": "SELECT region, SUM(amount) FROM sales WHERE month = '2025-10'"}),
                user="Analyze Q4 sales by region", tools=(SQL,))
    assert any(r.startswith("Q4 means months 2025-10 to 2025-12") for r in rules_of([q4]))
    right = record(hermes("run_sql", {"query": "SELECT 1 FROM sales WHERE month >= '2025-10'"}),
                   user="Analyze Q4 sales by region", tools=(SQL,))
    assert evolve("p", observations([right])).text is None


def test_child_keeps_its_parent_adds_rules_and_examples_only_from_calls_that_may_teach():
    teach = record(hermes("search", {"query": "lakes", "n": 2}), user="two lakes please", n=1)
    eval_call = record(hermes("search", {"query": "EVAL"}), user="eval question", source="eval", n=2)
    held = record(hermes("search", {"query": "HELD"}), user="held question", held_out=True, n=3)
    observed = observations([record(FENCED), teach, eval_call, held])
    result = evolve("Call the search tool.", observed, k=3)
    assert result.text.startswith("Call the search tool.\n\n" + RULES_HEADING)
    # With tools_first the tool list goes before the rules, so the rules are what the model reads last.
    placed = evolve("Call the search tool.", observed, k=3, tools_first=True).text
    assert placed.startswith("Call the search tool.\n\n{{tools}}\n\n" + RULES_HEADING)
    assert "two lakes please" in result.text and '"n": 2' in result.text
    assert "EVAL" not in result.text and "HELD" not in result.text
    assert [e.call_id for e in result.examples] == [teach.id]


def test_no_failures_means_nothing_written_and_it_says_so():
    result = evolve("p", observations([record(GOOD)]))
    assert result.text is None and "nothing written" in result.reason
    assert evolve("p", []).text is None
    only_eval = observations([record(FENCED, source="eval"), record(FENCED, held_out=True)])
    assert only_eval == [] and "no captured calls" in evolve("p", only_eval).reason


def test_a_rule_the_parent_already_holds_is_not_added_again():
    child = evolve("p", observations([record(RENAMED)]), k=0).text
    again = evolve(child, observations([record(RENAMED)]), k=0)
    assert again.text is None and "already" in again.reason


def test_dynamic_child_holds_the_examples_variable_filled_per_request():
    child = evolve("p", observations([record(FENCED), record(GOOD, n=1)]), dynamic=True).text
    assert child.count(EXAMPLES_VAR) == 1 and "Worked examples" not in child
    assert "{" not in fill_examples("x " + EXAMPLES_VAR, []).replace("x ", "")


def test_reflection_reads_failures_and_template_and_parses_the_proposal():
    failing = observations([record(FENCED)])
    messages = reflection_messages("Call the search tool.", failing)
    assert "Call the search tool." in messages[1]["content"] and "```json" in messages[1]["content"]
    assert parse_reflection("Sure!\n<prompt>\nNew prompt.\n</prompt>", "old") == "New prompt."
    assert parse_reflection("<prompt>old</prompt>", "old") is None and parse_reflection("", "old") is None


def test_reflective_rewrite_runs_through_the_router_with_a_scripted_teacher(tmp_path, scripted):
    teacher = scripted("teacher").enqueue("<prompt>Call search with `query`. Output the call only.</prompt>")
    with CaptureStore.open(f"sqlite:///{tmp_path / 'c.db'}") as store:
        add_template(store, "r", "Call the search tool.", origin="base", template_id="r/base@1")
        for i, content in enumerate([FENCED, RENAMED, GOOD]):
            store.record(record(content, n=i))
        outcome = evolve_route(store, "r", k=1, teacher="scripted:teacher")
        texts = {t.id: t for t in store.list_templates("r")}
    assert len(outcome.written) == 2 and outcome.evolution.candidates
    assert "```json" in teacher.requests[0].messages[1].text()
    proposal = texts[outcome.written[1]]
    assert proposal.text == "Call search with `query`. Output the call only." and proposal.origin == "evolved"
    assert proposal.parent_id == "r/base@1" and proposal.status == "live"  # for selection to try


def test_cli_writes_a_child_once_and_says_when_there_is_nothing_to_learn(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    (tmp_path / "slmswap.toml").write_text(f'[store]\nurl = "{url}"\n')
    with CaptureStore.open(url) as store:
        add_template(store, "r", "Call the search tool.", origin="base", template_id="r/base@1")
        add_template(store, "ok", "Call it.", origin="base", template_id="ok/base@1")
        store.record(record(FENCED))
        store.record(record(GOOD, route="ok", template_id="ok/base@1", n=1))
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a group of one command would run it without its name
    runner = CliRunner()
    first = runner.invoke(app, ["evolve", "--config", str(tmp_path / "slmswap.toml")])
    assert first.exit_code == 0, first.output
    assert "no markdown fences" in first.output and "wrote r/" in first.output
    assert "ok (from ok/base@1): none of the 1 calls failed: nothing to learn, nothing written" in first.output
    second = runner.invoke(app, ["evolve", "-r", "r", "--json", "--config", str(tmp_path / "slmswap.toml")])
    data = json.loads(second.output)
    with CaptureStore.open(url) as store:
        evolved = [t for t in store.list_templates("r") if t.origin == "evolved"]
    assert len(evolved) == 1 and data["written"] == [evolved[0].id]  # the same child is not stored twice


def test_one_pattern_with_different_evidence_in_every_call_becomes_one_general_rule():
    wrong = [record(hermes(name, {"query": "x"}), n=i) for i, name in enumerate(["find", "lookup", "fetch"])]
    result = evolve("p", observations(wrong), k=0)
    assert [(r.text, r.calls) for r in result.rules] == [(GENERIC["unknown_function"], 3)]
    few = evolve("p", observations(wrong[:2]), k=0)
    assert {r.text for r in few.rules} == {"There is no function `find`; call only `search`.",
                                          "There is no function `lookup`; call only `search`."}


def test_serve_schedule_is_off_by_default_and_runs_evolution_when_configured(tmp_path):
    import asyncio
    import threading

    from app.config import load_settings
    from app.server import scheduled_jobs
    from app.server.schedule import Periodic, run_periodic

    url = f"sqlite:///{tmp_path / 'c.db'}"
    (tmp_path / "slmswap.toml").write_text(f'[store]\nurl = "{url}"\n')
    assert scheduled_jobs(load_settings(tmp_path / "slmswap.toml"), None) == ()
    (tmp_path / "slmswap.toml").write_text(f'[store]\nurl = "{url}"\n[evolve]\nevery_minutes = 0.5\nexamples = 0\n')
    settings = load_settings(tmp_path / "slmswap.toml")
    (job,) = scheduled_jobs(settings, None)
    assert job.seconds == 30
    with CaptureStore.open(url) as store:
        add_template(store, "r", "Call the search tool.", origin="base", template_id="r/base@1")
        store.record(record(FENCED))
    (outcome,) = job.job()
    assert outcome.written and "no markdown fences" in outcome.evolution.rules[0].text

    ran, calls = threading.Event(), []

    def flaky():  # the first run fails: the schedule logs it and goes on
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        ran.set()

    async def serve_a_while():
        task = asyncio.create_task(run_periodic(Periodic("t", 0, flaky)))
        await asyncio.to_thread(ran.wait, 60)
        task.cancel()

    asyncio.run(serve_a_while())
    assert ran.is_set() and len(calls) >= 2


def test_general_rule_replaces_one_off_evidence_but_keeps_evidence_seen_twice():
    names = ["find", "lookup", "fetch", "get", "get"]
    result = evolve("p", observations([record(hermes(n, {"query": "x"}), n=i) for i, n in enumerate(names)]), k=0)
    assert [(r.text, r.calls) for r in result.rules] == [(GENERIC["unknown_function"], 3),
                                                         ("There is no function `get`; call only `search`.", 2)]


def test_an_evolved_parent_grows_its_rule_list_in_place():
    child = evolve("p", observations([record(FENCED)]), dynamic=True, tools_first=True).text
    grandchild = evolve(child, observations([record(RENAMED)]), dynamic=True, tools_first=True).text
    assert grandchild.count(RULES_HEADING) == 1 and grandchild.count(EXAMPLES_VAR) == 1
    rules = grandchild.split(RULES_HEADING)[1].split(EXAMPLES_VAR)[0]
    assert "no markdown fences" in rules and "Use parameter `query`, not `q`." in rules
    assert grandchild.index("{{tools}}") < grandchild.index(RULES_HEADING) < grandchild.index(EXAMPLES_VAR)
