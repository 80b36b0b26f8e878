"""`slmswap rollout`, `slmswap cost` and `slmswap keys` through the real entry point, on a store the Router filled."""

import asyncio
import json
from pathlib import Path

import pytest

from app.config import load_settings
from app.routing.context import CallContext
from app.routing.router import Router
from app.capture.store import CaptureStore
from app.wire import ChatRequest
from tests.support.scripted import tool
from tests.test_cli import slmswap

TOOLS = [{"type": "function", "function": {"name": "run_sql", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]


@pytest.fixture
def routed(scripted):
    Path("slmswap.toml").write_text('[routes.support]\nteacher = "scripted:t?price_in=10&price_out=10"\n'
                                    'student = "scripted:s?price_in=1&price_out=1"\n')
    scripted("t").default = tool("run_sql", query="SELECT 1")
    return scripted


def calls(n: int, users=("a", "b", "c", "d")) -> None:
    with CaptureStore.open(load_settings().store.url) as store:
        router = Router(load_settings(), store)
        router.states.refresh_s = 0

        async def go():
            for i in range(n):
                req = ChatRequest(model="support", messages=[{"role": "user", "content": f"q{i}"}], tools=TOOLS)
                await router.complete(req, CallContext(route="support", sticky_key=users[i % len(users)]))
            await router.drain()

        asyncio.run(go())


def test_rollout_set_then_status_shows_stage_split_and_success(capsys, routed):
    routed("s").default = tool("run_sql", query="SELECT 1")
    code, out, err = slmswap(capsys, "rollout", "set", "support", "shadow")
    assert code == 0 and "support: stage shadow, student scripted:s, auto" in out, err
    calls(6)
    code, out, _ = slmswap(capsys, "rollout", "status", "--route", "support", "--json")
    [row] = json.loads(out)
    assert (row["stage"], row["student"], row["student_share"]) == ("shadow", "scripted:s", 0.0)
    assert (row["success"]["k"], row["success"]["n"]) == (6, 6)  # six agreeing shadows
    code, out, _ = slmswap(capsys, "rollout", "status")
    assert code == 0 and "support" in out and "100.0% [" in out


def test_rollout_set_refuses_unknown_routes_stages_and_a_missing_student(capsys, scripted):
    Path("slmswap.toml").write_text('[routes.support]\nteacher = "scripted:t"\n')
    code, _, err = slmswap(capsys, "rollout", "set", "nope", "shadow")
    assert code == 2 and "no route is named 'nope'; the routes are: orchestrator" in err
    code, _, err = slmswap(capsys, "rollout", "set", "support", "shadow")
    assert code == 2 and "has no student; give one with --student" in err
    code, _, err = slmswap(capsys, "rollout", "set", "support", "sideways", "--student", "scripted:s")
    assert code == 2 and "unknown stage 'sideways'" in err


def test_cost_reports_spend_against_the_teacher_and_the_saving(capsys, routed):
    routed("s").default = tool("run_sql", query="SELECT 1")
    slmswap(capsys, "rollout", "set", "support", "student")
    calls(4)
    code, out, _ = slmswap(capsys, "cost", "--json")
    [row] = json.loads(out)
    assert row["route"] == "support" and row["calls"] == {"student": 4}
    assert row["saving"] == pytest.approx(0.9)  # the student is priced at a tenth of the teacher
    code, out, _ = slmswap(capsys, "cost", "--since", "yesterday")
    assert code == 2


def test_keys_new_prints_a_key_and_the_hash_to_configure(capsys):
    from app.server.auth import hash_key

    code, out, _ = slmswap(capsys, "keys", "new")
    key = next(line.split()[1] for line in out.splitlines() if line.startswith("key:"))
    assert code == 0 and hash_key(key) in out and "api_keys = [" in out
