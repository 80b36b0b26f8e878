"""The eval runner end to end on scripted models: scores and summaries to the exact number, every suite kind, the
bad-input cases (before any model call), a model failing mid-run, and the four files it writes."""

import asyncio
import json
import statistics
import struct
from pathlib import Path

import pytest

from app.capture.records import CallRecord
from app.capture.store import CaptureStore
from app.errors import BackendError, UsageError
from app.wire import ChatRequest
from tests.support.requires import require
from tests.support.scripted import tool
from training.evaluate import EvalOptions, build_request, run_eval
from training.suites import HELD_OUT_PERCENT, is_held_out, load_suite

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}, "required": ["x"],
    "additionalProperties": False}}}]


@pytest.fixture
def contexts(monkeypatch):
    """The CallContext of every call the Router answers during the test."""
    from app.routing.router import Router

    seen, original = [], Router.complete

    async def spy(self, req, ctx=None):
        seen.append(ctx)
        return await original(self, req, ctx)

    monkeypatch.setattr(Router, "complete", spy)
    return seen


def line(user, expected, **kw):
    return json.dumps({"messages": [{"role": "user", "content": user}], "expected": expected, **kw})


def write_suite(name, lines):
    Path(name).write_text("\n".join(lines) + "\n")
    return f"jsonl:{name}"


def by_user_text(replies):
    """A scripted model that answers each item by its user message (so concurrency cannot shuffle replies)."""
    return lambda req: replies[req.messages[-1].text()]


def evaluate(suite, *models, **kw):
    return run_eval(EvalOptions(suite, tuple(models), out=kw.pop("out", "out"), **kw))


def rows(out="out"):
    return [json.loads(x) for x in Path(out, "items.jsonl").read_text().splitlines()]


CALL_ITEMS = [line("exact", [{"name": "f", "arguments": {"x": 1, "y": "a"}}], tools=TOOLS),
              line("inexact", [{"name": "f", "arguments": {"x": 1, "y": "a"}}], tools=TOOLS),
              line("text", [{"name": "f", "arguments": {"x": 1}}], tools=TOOLS),
              line("badtype", [{"name": "f", "arguments": {"x": 1}}], tools=TOOLS)]
CALL_REPLIES = {"exact": tool("f", x=1.0, y=" a "), "inexact": tool("f", x=1, y="b"), "text": "I would call f",
                "badtype": tool("f", x="one")}


# ---- scores and summary ---------------------------------------------------------------------------------

async def after(seconds, reply):
    await asyncio.sleep(seconds)
    return reply


def test_forced_outputs_give_exact_numbers(scripted):
    # Two of the four items wait 20 ms (a sleep lasts at least that), so the median latency lies between the groups.
    slow = {"exact", "inexact"}
    scripted("m").default = lambda req: (after(0.02, CALL_REPLIES[text]) if (text := req.messages[-1].text()) in slow
                                         else CALL_REPLIES[text])
    summary = evaluate(write_suite("s.jsonl", CALL_ITEMS), "scripted:m")
    by_id = {r["id"]: r for r in rows()}
    assert list(by_id) == ["line1", "line2", "line3", "line4"]
    assert by_id["line1"]["exact"] and by_id["line1"]["f1"] == 1.0 and by_id["line1"]["valid"]
    assert by_id["line1"]["calls"] == [{"name": "f", "arguments": {"x": 1.0, "y": " a "}}]
    assert not by_id["line2"]["exact"] and by_id["line2"]["f1"] == pytest.approx(2 * 2 / 6)  # f, x match; y not
    # scripted replies use 10 prompt tokens + one per word; an unknown hosted model is priced as gpt-4 ($30/$60)
    assert by_id["line3"] | {"latency_ms": 0} == {
        "id": "line3", "model": "scripted:m", "output": "I would call f", "calls": [], "valid": False,
        "error_type": "wrong_call_count", "exact": False, "f1": 0.0, "latency_ms": 0, "tokens": 14,
        "cost": pytest.approx((10 * 30 + 4 * 60) / 1e6)}
    assert by_id["line4"]["error_type"] == "type_mismatch" and by_id["line4"]["calls"] == []
    assert '<tool_call>\n{"name": "f", "arguments": {"x": "one"}}\n</tool_call>' == by_id["line4"]["output"]
    m = summary["models"]["scripted:m"]
    assert (m["n"], m["valid_rate"], m["exact_rate"]) == (4, 0.5, 0.25)
    assert m["arg_f1"] == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)
    assert m["error_types"] == {"wrong_call_count": 1, "type_mismatch": 1}
    assert m["valid_ci"] == pytest.approx([0.150, 0.850], abs=1e-3)
    assert m["tokens"] == sum(r["tokens"] for r in by_id.values()) and m["failed"] is None
    assert m["p50_latency_ms"] == pytest.approx(statistics.median(r["latency_ms"] for r in by_id.values()))
    assert min(by_id["line1"]["latency_ms"], by_id["line2"]["latency_ms"]) >= 20 and m["p50_latency_ms"] >= 10
    assert m["cost_usd"] == pytest.approx(sum(r["cost"] for r in by_id.values()))
    assert json.loads(Path("out/summary.json").read_text())["models"]["scripted:m"] == m


def test_tool_choice_is_required_when_calls_are_expected_and_auto_otherwise(scripted):
    scripted("m").default = "no call needed"
    items = [line("a", [], tools=TOOLS), line("b", [{"name": "f", "arguments": {"x": 1}}], tools=TOOLS)]
    summary = evaluate(write_suite("s.jsonl", items), "scripted:m")
    assert [r.tool_choice for r in scripted("m").requests] == ["auto", "required"]
    assert [(r["valid"], r["exact"]) for r in rows()] == [(True, True), (False, False)]
    assert summary["models"]["scripted:m"]["exact_rate"] == 0.5


def test_json_and_text_items(scripted):
    fmt = {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}
    items = [line("j1", {"a": 1, "b": [1, 2]}, response_format=fmt), line("j2", {"a": 1, "b": 2}, response_format=fmt),
             line("j3", {"a": 1}, response_format=fmt), line("t1", "Paris  is nice"), line("t2", "Rome")]
    scripted("m").default = by_user_text({"j1": '{"b": [1.0, 2], "a": 1}', "j2": '{"a": 1, "b": 3}',
                                          "j3": "```json\n{\"a\": 1}\n```", "t1": " Paris is\nnice", "t2": "Milan"})
    evaluate(write_suite("s.jsonl", items), "scripted:m")
    got = [(r["valid"], r["exact"], round(r["f1"], 3), r["error_type"]) for r in rows()]
    assert got == [(True, True, 1.0, None), (True, False, 0.5, None), (False, False, 0.0, "markdown_fence"),
                   (True, True, 1.0, None), (True, False, 0.0, None)]


def test_bfcl_items_are_scored_by_bfcls_rule(scripted):
    require("bfcl_eval")
    # simple_python_0: calculate_triangle_area(base=10, height=5, unit optional); BFCL ignores case and spaces.
    # simple_python_1: math.factorial(number=5), its dotted name kept.
    scripted("m").enqueue(tool("calculate_triangle_area", base=10, height=5, unit="Units"),
                          tool("math.factorial", number=6))
    summary = evaluate("bfcl:simple_python", "scripted:m", limit=2, concurrency=1)
    first, second = rows()
    assert first["exact"] and not second["exact"] and second["valid"]
    req = scripted("m").requests[0]
    assert req.tool_choice == "required" and req.temperature == 0.0 and req.decoding == "constrained"
    assert req.parallel_tool_calls is False  # one call expected; a repeated call is not BFCL-exact
    assert req.tools[0].function.name == "calculate_triangle_area"
    assert req.tools[0].function.parameters["additionalProperties"] is False
    assert scripted("m").requests[1].tools[0].function.name == "math.factorial"
    assert second["calls"] == [{"name": "math.factorial", "arguments": {"number": 6}}] and second["f1"] == 0.5
    assert summary["suite"] == "bfcl:simple_python" and summary["models"]["scripted:m"]["exact_rate"] == 0.5
    assert summary["notes"] == []


def test_bfcl_held_out_items_are_flagged_and_dots_kept(scripted):
    require("bfcl_eval")
    scripted("m").default = "no"
    summary = evaluate("bfcl:simple_python", "scripted:m", offset=298, limit=3)
    assert [r["id"] for r in rows()] == ["simple_python_298", "simple_python_299", "simple_python_300"]
    assert "held-out items 300-399" in summary["notes"][0]
    assert "held-out" in Path("out/report.md").read_text()
    dotted = load_suite("bfcl:simple_python").items
    assert any("." in t["function"]["name"] for item in dotted for t in item.tools)


def test_free_decoding_reaches_the_backend_and_nothing_is_captured(scripted):
    scripted("m").default = by_user_text(CALL_REPLIES)
    evaluate(write_suite("s.jsonl", CALL_ITEMS[:1]), "scripted:m", decoding="free", max_tokens=40)
    req = scripted("m").requests[0]
    assert req.decoding == "free" and req.max_tokens == 40
    assert not Path(".slmswap/slmswap.db").exists()


def test_template_becomes_the_system_prompt(scripted, contexts):
    from prompts.base import base_templates

    scripted("m").default = by_user_text(CALL_REPLIES)
    items = [json.dumps({"messages": [{"role": "system", "content": "old"}, {"role": "user", "content": "exact"}],
                         "tools": TOOLS, "expected": [{"name": "f", "arguments": {"x": 1, "y": "a"}}]})]
    evaluate(write_suite("s.jsonl", items), "scripted:m", template="retrieval/base@1")
    req = scripted("m").requests[0]
    assert [m.role for m in req.messages] == ["system", "user"]
    assert req.messages[0].content == base_templates()["retrieval"].text
    assert contexts[0].template_id == "retrieval/base@1" and contexts[0].source == "eval"


def test_two_models_report_the_gap_to_the_first(scripted):
    scripted("big").default = by_user_text({**CALL_REPLIES, "inexact": CALL_REPLIES["exact"]})
    scripted("small").default = by_user_text(CALL_REPLIES)
    summary = evaluate(write_suite("s.jsonl", CALL_ITEMS[:2]), "scripted:big", "scripted:small")
    assert summary["reference"] == "scripted:big" and list(summary["models"]) == ["scripted:big", "scripted:small"]
    assert summary["gaps"]["scripted:small"]["exact_rate"] == -0.5
    assert summary["gaps"]["scripted:small"]["valid_rate"] == 0.0
    report = Path("out/report.md").read_text()
    assert "Gap to the reference `scripted:big`" in report and "-50.0 pts" in report
    assert [r["model"] for r in rows()] == ["scripted:big"] * 2 + ["scripted:small"] * 2


# ---- the files ------------------------------------------------------------------------------------------

def test_the_four_files_and_their_keys(scripted):
    scripted("m").default = by_user_text(CALL_REPLIES)
    evaluate(write_suite("s.jsonl", CALL_ITEMS), "scripted:m", out="deep/er/out")
    out = Path("deep/er/out")
    assert sorted(p.name for p in out.iterdir()) == ["items.jsonl", "report.md", "report.png", "summary.json"]
    for row in rows(out):
        assert list(row) == ["id", "model", "output", "calls", "valid", "error_type", "exact", "f1", "latency_ms",
                             "tokens", "cost"]
    summary = json.loads((out / "summary.json").read_text())
    assert {"suite", "models"} <= set(summary)
    assert {"n", "valid_rate", "exact_rate", "arg_f1", "p50_latency_ms", "tokens", "cost_usd", "error_types",
            "valid_ci", "exact_ci"} <= set(summary["models"]["scripted:m"])
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 800 and height > 400
    from matplotlib.image import imread

    pixels = imread(out / "report.png")
    assert pixels.std() > 0.05  # not a blank canvas
    report = (out / "report.md").read_text()
    assert "| `scripted:m` | 4 | 50.0% [15, 85] | 25.0% [5, 70]" in report
    assert "| `scripted:m` | wrong_call_count | 1 |" in report and "report.png" in report


def test_a_rerun_replaces_the_items_file(scripted):
    scripted("m").default = by_user_text(CALL_REPLIES)
    suite = write_suite("s.jsonl", CALL_ITEMS)
    evaluate(suite, "scripted:m")
    evaluate(suite, "scripted:m", limit=1)
    assert len(rows()) == 1


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suite, message", [
    ("nonsense", "bfcl:<category>, captured:<agent>, jsonl:<path>, workflow:<path>"),
    ("foo:bar", "bfcl:<category>"),
    ("bfcl:simple_pyton", "simple_python"),
    ("bfcl:simple_java", "Python rule only"),
    ("jsonl:missing.jsonl", "cannot read suite file missing.jsonl"),
])
def test_unknown_suites_list_the_choices(scripted, suite, message):
    if suite.startswith("bfcl"):
        require("bfcl_eval")
    with pytest.raises(UsageError, match=message) as exc:
        evaluate(suite, "scripted:m")
    assert exc.value.exit_code == 2 and not scripted("m").requests and not Path("out").exists()


@pytest.mark.parametrize("bad, message", [
    ("{not json", "s.jsonl:3: "),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), r"s.jsonl:3: expected: Field required"),
    (line("x", [], tool=TOOLS), r"s.jsonl:3: tool: Extra inputs"),
    (line("x", [{"arguments": {}}], tools=TOOLS), r"s.jsonl:3: with tools, `expected` is a list"),
    (line("x", {"a": 1}), r"s.jsonl:3: without tools .* `expected` is the answer text"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}], "expected": "y"}), r"s.jsonl:3: messages.0.role"),
])
def test_a_malformed_jsonl_line_names_path_and_line_before_any_call(scripted, bad, message):
    suite = write_suite("s.jsonl", [CALL_ITEMS[0], "", bad, CALL_ITEMS[1]])
    with pytest.raises(UsageError, match=message):
        evaluate(suite, "scripted:m")
    assert not scripted("m").requests


@pytest.mark.parametrize("kw, message", [
    ({"limit": 0}, "--limit must be at least 1"), ({"limit": -3}, "--limit must be at least 1"),
    ({"offset": -1}, "--offset must be 0 or more"), ({"offset": 4}, "none from offset 4"),
    ({"decoding": "loose"}, "--decoding must be one of constrained, free"),
    ({"template": "nope@1"}, "no template has id 'nope@1'; known ids: aggregate/base@1"),
])
def test_bad_options_exit_2_before_any_call(scripted, kw, message):
    with pytest.raises(UsageError, match=message) as exc:
        evaluate(write_suite("s.jsonl", CALL_ITEMS), "scripted:m", **kw)
    assert exc.value.exit_code == 2 and not scripted("m").requests


def test_bad_models_exit_2_before_any_call(scripted):
    suite = write_suite("s.jsonl", CALL_ITEMS)
    with pytest.raises(UsageError, match="given twice"):
        evaluate(suite, "scripted:m", "scripted:m")
    with pytest.raises(UsageError, match="unknown binding kind|kind"):
        evaluate(suite, "scripted:m", "nokind:x")
    with pytest.raises(UsageError, match="at least one model"):
        evaluate(suite)
    assert not scripted("m").requests


# ---- failure mid-run ------------------------------------------------------------------------------------

def test_a_model_failing_mid_run_keeps_its_items_and_the_next_model_runs(scripted):
    scripted("flaky").enqueue(CALL_REPLIES["exact"], CALL_REPLIES["inexact"], RuntimeError("server went away"))
    scripted("fine").default = by_user_text(CALL_REPLIES)
    with pytest.raises(BackendError, match="scripted:flaky failed after 2 items: on item line3: scripted:flaky "
                                           "failed: RuntimeError: server went away") as exc:
        evaluate(write_suite("s.jsonl", CALL_ITEMS), "scripted:flaky", "scripted:fine", concurrency=1)
    assert exc.value.exit_code == 1 and "out" in str(exc.value)
    assert [(r["model"], r["id"]) for r in rows()] == [("scripted:flaky", "line1"), ("scripted:flaky", "line2")] + [
        ("scripted:fine", f"line{i}") for i in range(1, 5)]
    summary = json.loads(Path("out/summary.json").read_text())
    assert summary["failed"] == {"scripted:flaky": "on item line3: scripted:flaky failed: RuntimeError: server went away"}
    assert summary["models"]["scripted:flaky"]["n"] == 2 and summary["models"]["scripted:flaky"]["exact_rate"] == 0.5
    assert summary["models"]["scripted:fine"]["failed"] is None
    assert "## Failures" in Path("out/report.md").read_text() and Path("out/report.png").exists()
    assert len(scripted("flaky").requests) == 3  # it stopped at the failure


def test_concurrent_items_all_run_and_stay_in_item_order(scripted):
    async def slow(req):
        await asyncio.sleep(0.05)
        return CALL_REPLIES[req.messages[-1].text()]

    scripted("m").default = slow
    items = CALL_ITEMS * 5
    evaluate(write_suite("s.jsonl", items), "scripted:m", concurrency=8)
    assert [r["id"] for r in rows()] == [f"line{i}" for i in range(1, 21)]


# ---- captured and workflow suites -----------------------------------------------------------------------

def _captured(store, i, agent="retrieval", binding="gguf:smollm2-135m", **kw):
    call = CallRecord(id=f"{i:032x}", route=agent, agent=agent, binding=binding,
                      request={"messages": [{"role": "user", "content": f"q{i}"}], "tools": TOOLS},
                      response={"content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
                          "name": "f", "arguments": json.dumps({"x": i})}}], "finish_reason": "tool_calls"}, **kw)
    store.record(call)
    return call.id


def test_captured_suite_uses_the_held_out_teacher_calls(scripted):
    with CaptureStore.open("sqlite:///.slmswap/slmswap.db") as store:
        ids = [_captured(store, i) for i in range(40)]
        _captured(store, 100, binding="scripted:student")  # a student's answer is no reference
        _captured(store, 101, source="eval")
        _captured(store, 102, valid=False)
    held = [i for i in ids if is_held_out(i)]
    assert 0 < len(held) < len(ids) and len(held) == pytest.approx(len(ids) * HELD_OUT_PERCENT / 100, abs=6)
    scripted("s").default = lambda req: tool("f", x=int(req.messages[-1].text()[1:]) % 2)
    summary = evaluate("captured:retrieval", "scripted:s")
    got = rows()
    assert [r["id"] for r in got] == held
    assert all(r["exact"] == (int(r["id"], 16) < 2) for r in got)
    assert summary["models"]["scripted:s"]["n"] == len(held)
    with pytest.raises(UsageError, match="agents with calls: retrieval"):
        evaluate("captured:formatting", "scripted:s")


def _workflow_model(req: ChatRequest):
    """One scripted model answers every agent of the graph (eval binds every route to the model under test)."""
    query = req.messages[-1].text()
    if req.model == "orchestrator":
        agent = "retrieval" if "region" in query else "formatting"
        return json.dumps({"sub_agents": [agent], "parallel": False, "aggregation_strategy": "report",
                           "steps": [{"tasks": [{"agent": agent, "task": "do it"}]}]})
    if req.model == "aggregate":
        return "North leads the regions."
    if any(m.role == "tool" for m in req.messages):
        return "done"
    if req.model == "retrieval":
        return tool("run_sql", query="SELECT 1 AS one")
    return tool("report", title="Q4", sections=[{"heading": "Summary", "body": "done"}])


def test_workflow_suite_measures_routing_and_success(scripted, contexts):
    Path("wf.jsonl").write_text("\n".join([
        json.dumps({"id": "q1", "query": "Sales by region", "agents": ["retrieval"], "check": {"contains": "north"}}),
        json.dumps({"query": "A report", "agents": ["retrieval", "formatting"], "check": {"contains": "south"}}),
    ]))
    scripted("wf").default = _workflow_model
    summary = evaluate("workflow:wf.jsonl", "scripted:wf")
    q1, q2 = rows()
    assert (q1["id"], q1["agents"], q1["routed"], q1["exact"], q1["f1"]) == ("q1", ["retrieval"], True, True, 1.0)
    assert (q2["id"], q2["agents"], q2["routed"], q2["exact"], q2["f1"]) == ("line2", ["formatting"], False, False, 0.5)
    assert q1["valid"] and q1["tokens"] > 0 and "North leads" in q1["output"]
    m = summary["models"]["scripted:wf"]
    assert (m["routing_accuracy"], m["workflow_success"], m["exact_rate"], m["arg_f1"]) == (0.5, 0.5, 0.5, 0.75)
    assert contexts and {c.source for c in contexts} == {"eval"}
    assert not Path(".slmswap/slmswap.db").exists()
    assert "routing" in Path("out/report.md").read_text()


@pytest.mark.parametrize("bad, message", [
    ({"query": "q", "agents": ["retreival"], "check": {"contains": "x"}}, "wf.jsonl:1: `agents` must name"),
    ({"query": "q", "agents": ["retrieval"], "check": {"contain": "x"}}, "wf.jsonl:1: bad `check`"),
    ({"query": "q", "agents": ["retrieval"], "check": {"regex": "("}}, "wf.jsonl:1: bad `check`"),
    ({"query": " ", "agents": ["retrieval"], "check": {"contains": "x"}}, "wf.jsonl:1: `query` is empty"),
])
def test_bad_workflow_lines(scripted, bad, message):
    Path("wf.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(UsageError, match=message):
        evaluate("workflow:wf.jsonl", "scripted:wf")


def test_a_template_does_not_apply_to_workflows(scripted):
    Path("wf.jsonl").write_text(json.dumps({"query": "q", "agents": ["retrieval"], "check": {"contains": "x"}}))
    with pytest.raises(UsageError, match="--template applies to"):
        evaluate("workflow:wf.jsonl", "scripted:wf", template="retrieval/base@1")


# ---- requests (pure) ------------------------------------------------------------------------------------

def test_build_request_keeps_tools_and_marks_the_call():
    item = load_suite(write_suite("s.jsonl", CALL_ITEMS[:1])).items[0]
    req = build_request(item, "free", 64)
    assert req.model == "eval" and req.tool_dicts() == TOOLS and req.tool_choice == "required"
    assert (req.decoding, req.max_tokens, req.temperature, req.metadata) == ("free", 64, 0.0, None)


# ---- the command ----------------------------------------------------------------------------------------

def _cli(capsys, *args):
    import sys

    from app import cli

    if not any(c.name == "eval" for c in cli.app.registered_commands):
        pytest.skip("`slmswap eval` is not registered in app/cli.py yet")
    old, sys.argv = sys.argv, ["slmswap", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    return code, capsys.readouterr()


def test_cli_writes_the_files_and_exits_2_on_bad_input(capsys, scripted):
    scripted("m").default = by_user_text(CALL_REPLIES)
    suite = write_suite("s.jsonl", CALL_ITEMS)
    code, io = _cli(capsys, "eval", "--suite", suite, "--model", "scripted:m", "--out", "o")
    assert code == 0, io.err
    assert "scripted:m" in io.out and sorted(p.name for p in Path("o").iterdir())[0] == "items.jsonl"
    for bad in (["--limit", "0"], ["--offset", "-1"], ["--suite", "nope:x"]):
        code, io = _cli(capsys, "eval", "--suite", suite, "--model", "scripted:m", *bad)
        assert code == 2, (bad, io.err)
    scripted("f").default = RuntimeError("down")
    code, io = _cli(capsys, "eval", "--suite", suite, "--model", "scripted:f", "--out", "o")
    assert code == 1 and "scripted:f failed after 0 items" in io.err
