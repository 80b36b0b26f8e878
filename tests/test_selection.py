"""Selection: Thompson sampling, best and retirement as pure functions (prompts/select.py), then over a real store."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from app.capture.records import template_hash
from app.capture.store import CaptureStore
from app.config import TemplatesConfig
from app.errors import UsageError
from prompts import select
from prompts import store as ts
from prompts.select import Arm


def test_thompson_prefers_the_better_arm_and_still_explores():
    rng = random.Random(7)
    arms = [Arm("good", 30, 10), Arm("bad", 10, 30), Arm("new", 0, 0)]
    picks = Counter(select.thompson(arms, rng) for _ in range(2000))
    assert picks["good"] > picks["new"] > picks["bad"]
    assert picks["new"] > 100  # an untried template keeps being tried
    assert select.thompson([], rng) is None


def test_thompson_is_repeatable_with_a_seed():
    arms = [Arm("a", 3, 3), Arm("b", 3, 3), Arm("c", 3, 3)]
    first = [select.thompson(arms, random.Random(s)) for s in range(50)]
    assert first == [select.thompson(arms, random.Random(s)) for s in range(50)]
    assert len(set(first)) == 3


def test_best_is_the_highest_posterior_mean_with_enough_trials():
    arms = [Arm("many", 70, 30), Arm("few-perfect", 5, 0), Arm("lots-worse", 600, 400)]
    assert select.best(arms, min_trials=20) == "many"  # 71/102 beats 601/1002; 5 trials are not enough
    assert select.best(arms, min_trials=1) == "few-perfect"  # 6/7
    assert select.best(arms, min_trials=2000) is None
    assert Arm("x", 0, 0).mean == 0.5 and Arm("x", 8, 0).mean == 0.9


def test_prob_best_sums_to_one_and_orders_the_arms():
    chances = select.prob_best([Arm("a", 50, 50), Arm("b", 60, 40), Arm("c", 5, 95)], random.Random(1), 4000)
    assert sum(chances.values()) == pytest.approx(1.0)
    assert chances["b"] > chances["a"] > chances["c"] and chances["c"] < 0.001


def test_to_retire_needs_trials_and_never_retires_the_leader():
    rng = random.Random(3)
    arms = [Arm("leader", 80, 20), Arm("loser", 20, 80), Arm("young-loser", 0, 5)]
    assert set(select.to_retire(arms, 20, 0.05, rng)) == {"loser"}  # young-loser has 5 < 20 trials
    assert select.to_retire([Arm("only", 0, 100)], 20, 0.05, rng) == {}
    tied = [Arm("a", 0, 100), Arm("b", 0, 100)]
    assert len(select.to_retire(tied, 20, 0.6, rng)) == 1  # one of two equals goes; the other always stays
    assert select.to_retire(arms, 20, 0.0, rng) == {}  # retire_below 0: never


# ---- over the store ---------------------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    with CaptureStore.open(f"sqlite:///{tmp_path / 'c.db'}") as opened:
        yield opened


def counted(store, route, text, successes, failures):
    row = ts.add_template(store, route, text)
    for ok in [True] * successes + [False] * failures:
        store.count_template_outcome(row.id, success=ok)
    return store.get_template(row.id)


def test_best_sample_and_retire_over_a_route(store):
    good = counted(store, "retrieval", "Good prompt.", 40, 10)
    bad = counted(store, "retrieval", "Bad prompt.", 5, 45)
    young = counted(store, "retrieval", "Young prompt.", 1, 1)
    counted(store, "processing", "Other route.", 100, 0)
    assert ts.best(store, "retrieval", min_trials=20).id == good.id
    assert ts.best(store, "retrieval", min_trials=100) is None
    assert ts.best(store, "retrieval").id == good.id  # the [templates] min_trials default (20)
    picks = Counter(ts.sample(store, "retrieval", random.Random(i)).id for i in range(300))
    assert set(picks) <= {good.id, bad.id, young.id} and picks[good.id] > picks[bad.id]

    retired = ts.retire_losers(store, "retrieval", random.Random(0), TemplatesConfig(min_trials=20, retire_below=0.05))
    assert [t.id for t in retired] == [bad.id] and "probability of being best" in retired[0].retired_reason
    assert {t.id for t in ts.live_templates(store, "retrieval")} == {good.id, young.id}
    assert ts.sample(store, "nobody", random.Random(0)) is None and ts.best(store, "nobody") is None


def test_choose_registers_the_base_file_and_samples(store):
    chosen = ts.choose(store, "retrieval", random.Random(0))
    assert chosen.id == "retrieval/base@1" and chosen.origin == "base"
    assert ts.choose(store, "not-an-agent", random.Random(0)) is None
    custom = ts.add_template(store, "not-an-agent", "A proxy route's prompt.")
    assert ts.choose(store, "not-an-agent", random.Random(0)) == custom


# ---- outcomes move the counts: a real graph run and a real proxy ---------------------------------------------------

def counts(store, template_id):
    row = store.get_template(template_id)
    return row.successes, row.failures


def test_a_graph_run_counts_every_captured_call_on_its_template(tmp_path, scripted):
    import asyncio
    import json
    from pathlib import Path

    from app.config import load_settings
    from app.services import Services
    from graphs.state import WorkflowContext
    from graphs.workflow import AGENTS, graph
    from tests.support.scripted import tool, tool_then_text

    Path("slmswap.toml").write_text("\n".join(f'[routes.{a}]\nteacher = "scripted:{a}"' for a in AGENTS)
                                    + "\n[workflow]\nmax_retries = 1\nmax_tool_turns = 3\n")
    services = Services.from_settings(load_settings())
    try:
        scripted("orchestrator").enqueue(json.dumps({
            "sub_agents": ["retrieval"], "parallel": False, "aggregation_strategy": "report",
            "steps": [{"tasks": [{"agent": "retrieval", "task": "fetch"}]}]}))
        # retrieval must call a tool: plain text first is an invalid answer (a failure), then it does it right.
        scripted("retrieval").enqueue("I would run a query")
        scripted("retrieval").default = tool_then_text(tool("run_sql", query="SELECT 1 AS x", as_name="one"), "done")
        scripted("aggregate").enqueue("All done.")
        run_id = services.store.start_run("q")
        state = asyncio.run(graph.ainvoke({"query": "q"}, context=WorkflowContext(services=services, run_id=run_id)))
        assert state["answer"]
        calls = services.store.calls_for_run(run_id)
        by_template: dict[str, list[bool]] = {}
        for call in calls:
            by_template.setdefault(call.template_id, []).append(call.valid)
        assert "retrieval/base@1" in by_template and False in by_template["retrieval/base@1"]
        for template_id, valids in by_template.items():
            assert counts(services.store, template_id) == (valids.count(True), valids.count(False)), template_id
    finally:
        services.close()


@pytest.fixture
def proxy_with(scripted):
    """Start the proxy `slmswap serve` runs (its composition root, `app.server.app_factory`, under real uvicorn) on
    a config with route `support`; returns (url, services)."""
    from contextlib import ExitStack
    from pathlib import Path

    from app.server import app_factory
    from tests.support.http import serve

    stack = ExitStack()

    def start(managed: bool = False, extra: str = ""):
        Path("slmswap.toml").write_text(f'default_binding = "scripted:teacher"\n\n[routes.support]\n'
                                        f'teacher = "scripted:teacher"\nmanaged_prompt = {str(managed).lower()}\n'
                                        + extra)
        app = app_factory()
        url = stack.enter_context(serve(app))
        return url, app.state.proxy.services

    yield start
    stack.close()


TOOLS = [{"type": "function", "function": {"name": "run_sql", "description": "Run one SELECT.", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]


def ask(client, system, model="support", **kw):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hi"}]
    return client.chat.completions.with_raw_response.create(model=model, messages=messages, **kw)


def test_proxy_calls_count_per_system_prompt_fingerprint(proxy_with, scripted):
    import httpx
    import openai

    url, services = proxy_with(managed=False)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    scripted("teacher").enqueue("hello", "text where a tool call was required", "hello again", "fine", "no prompt")
    raws = [ask(client, "You are a support bot."),
            ask(client, "You are a support bot.", tools=TOOLS, tool_choice="required"),  # invalid: a failure
            ask(client, "  You are a   support bot.\n")]  # the same prompt, white space aside: the same fingerprint
    other = ask(client, "You are a different bot.")
    services.store.flush()  # a proxy call is durable (journaled) when answered; its counts move at the commit
    [first, second] = store_rows = services.store.list_templates("support")
    assert (first.origin, first.text, second.origin) == ("base", "You are a support bot.", "manual")
    assert counts(services.store, first.id) == (2, 1) and counts(services.store, second.id) == (1, 0)
    call = services.store.get_call(other.headers["x-slmswap-call-id"])
    assert call.template_id == second.id and call.request["messages"][0]["content"] == "You are a different bot."
    assert len(store_rows) == 2
    # Every response names the template its call counted on; a call without a system prompt counts on none.
    assert [r.headers["x-slmswap-template"] for r in raws] == [first.id] * 3
    assert other.headers["x-slmswap-template"] == second.id
    bare = ask(client, None)
    assert "x-slmswap-template" not in bare.headers and bare.headers["x-slmswap-call-id"]

    # Negative feedback on a counted success moves it to a failure, once.
    for _ in range(2):
        assert httpx.post(f"{url}/v1/feedback", json={"call_id": call.id, "success": False}).status_code == 200
    assert counts(services.store, second.id) == (0, 1)


def test_managed_prompt_replaces_the_clients_system_prompt_with_the_selected_template(proxy_with, scripted):
    import openai

    from app import hermes

    url, services = proxy_with(managed=True)
    chosen = ts.add_template(services.store, "support", "Be brief.\n\n{{tools}}\n\nOne call only.", origin="manual")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    scripted("teacher").default = "ok"
    raw = ask(client, None, tools=TOOLS)  # no system prompt of its own: the template is put first
    sent = scripted("teacher").requests[-1].messages
    # {{tools}} is the tool section the local backends would otherwise append (app.hermes.system_with_tools)
    section = hermes.tools_prompt([TOOLS[0]["function"]])
    assert (sent[0].role, sent[0].content) == ("system", f"Be brief.\n\n{section}\n\nOne call only.")
    services.store.flush()
    assert services.store.get_call(raw.headers["x-slmswap-call-id"]).template_id == chosen.id
    assert raw.headers["x-slmswap-template"] == chosen.id
    assert counts(services.store, chosen.id) == (1, 0)

    mine = ask(client, "The client's own prompt.")  # registered (a candidate), and replaced by the sampled template
    own = services.store.template_by_hash("support", template_hash("The client's own prompt."))
    sent = scripted("teacher").requests[-1].messages
    assert own is not None and [m.role for m in sent] == ["system", "user"]
    services.store.flush()
    used = services.store.list_calls(agent="support", limit=1)[0].template_id
    assert sent[0].content == ts.render(services.store.get_template(used).text)  # no tools: {{tools}} is empty
    assert mine.headers["x-slmswap-template"] == used
    assert sum(t.trials for t in services.store.list_templates("support")) == 2


def test_a_streamed_proxy_call_counts_too(proxy_with, scripted):
    import openai

    url, services = proxy_with(managed=False)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    scripted("teacher").default = "streamed answer"
    raw = client.chat.completions.with_raw_response.create(model="support", stream=True, messages=[
        {"role": "system", "content": "Stream politely."}, {"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices).strip() == "streamed answer"
    services.store.flush()
    [row] = services.store.list_templates("support")
    assert (row.text, counts(services.store, row.id)) == ("Stream politely.", (1, 0))
    assert raw.headers["x-slmswap-template"] == row.id


def test_the_template_header_of_a_route_name_a_client_wrote_is_percent_encoded(proxy_with, scripted):
    from urllib.parse import unquote

    import openai

    url, services = proxy_with(extra="\n[proxy]\nopen_routes = true\n")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    raw = ask(client, "Réponds en français.", model="поддержка")  # a route made on first use, named by the client
    stored = services.store.get_call(raw.headers["x-slmswap-call-id"]).template_id
    assert stored.startswith("поддержка/") and raw.headers["x-slmswap-template"].isascii()
    assert unquote(raw.headers["x-slmswap-template"]) == stored


def test_client_system_prompts_past_the_bound_share_the_routes_overflow_row(proxy_with, scripted):
    import openai

    url, services = proxy_with(managed=True, extra="\n[proxy]\nmax_prompts_per_route = 2\n")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    scripted("teacher").default = "ok"
    for i in range(5):
        ask(client, f"Client prompt number {i}.")
    services.store.flush()
    rows = {t.id: t for t in services.store.list_templates("support")}
    assert len(rows) == 3 and rows[ts.overflow_id("support")].status == "retired"  # 2 prompts + the overflow row
    assert sorted(t.text for t in rows.values() if t.live) == ["Client prompt number 0.", "Client prompt number 1."]
    # Managed: the template sent is a live one, never the overflow row (its text is for no model).
    sent = [r.messages[0].content for r in scripted("teacher").requests]
    assert set(sent) <= {"Client prompt number 0.", "Client prompt number 1."}
    assert sum(t.trials for t in rows.values()) == 5
    # Unmanaged, the calls of prompts past the bound count on the overflow row, and their headers say so.
    url, services = proxy_with(managed=False, extra="\n[proxy]\nmax_prompts_per_route = 2\n")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    heads = [ask(client, f"Another client's prompt {i}.").headers["x-slmswap-template"] for i in range(3)]
    services.store.flush()
    assert heads == [ts.overflow_id("support")] * 3  # the route (shared store) is full already
    assert counts(services.store, ts.overflow_id("support")) == (3, 0)
    assert len(services.store.list_templates("support")) == 3


def test_proxy_prompts_bound_the_table_and_the_memory(store, caplog):
    import logging

    prompts = ts.ProxyPrompts(store, random.Random(0), max_prompts=3)
    prompts.CACHE_SIZE = 4
    with caplog.at_level(logging.WARNING, logger="slmswap.templates"):
        ids = [prompts.fingerprint("support", f"Prompt {i}.") for i in range(40)]
    kept = [t for t in store.list_templates("support") if t.id != ts.overflow_id("support")]
    assert [t.text for t in kept] == ["Prompt 0.", "Prompt 1.", "Prompt 2."]
    assert ids[:3] == [t.id for t in kept] and set(ids[3:]) == {ts.overflow_id("support")}
    assert len(store.list_templates("support")) == 4 and len(prompts._known) == 4
    warned = [r for r in caplog.records if "max_prompts_per_route" in r.getMessage()]
    assert len(warned) == 1 and "'support'" in warned[0].getMessage()
    assert prompts.fingerprint("support", "Prompt 1.") == kept[1].id  # evicted from memory, found in the store
    assert prompts.fingerprint("other", "Prompt 0.") != ts.overflow_id("other")  # the bound is per route
    # Another worker on the same store sees the route full, and an unknown {{variable}} still counts nowhere.
    again = ts.ProxyPrompts(store, max_prompts=3)
    assert again.fingerprint("support", "A new one.") == ts.overflow_id("support")
    assert again.fingerprint("support", "Use {{shots}}.") is None
    with pytest.raises(UsageError, match="at least 1"):
        ts.ProxyPrompts(store, max_prompts=0)
