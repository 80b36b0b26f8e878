"""`slmswap studio` end to end: a real `langgraph dev` server on loopback, driven by the real `langgraph_sdk` client.

The server runs the real graph object; `tests/support/studio_graph.py` only registers the scripted backend in the
server process, and the config (handed over as `$SLMSWAP_CONFIG`, as `slmswap studio` does) binds every route to it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from app.capture.store import CaptureStore
from app.errors import ConfigError, UsageError
from app.studio import GRAPH_CONFIG, OFFLINE_ENV, run_studio, server_args
from tests.conftest import ROOT
from tests.support.http import wait_until_up
from tests.support.studio_graph import ANSWER, PLAN

AGENTS = ("orchestrator", "retrieval", "processing", "validation", "formatting", "aggregate")
NODES = {"prompt", "orchestrator", "retrieval", "processing", "validation", "formatting", "aggregate"}
READY_TIMEOUT_S = 45


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLMSWAP_", "LANGFUSE_", "LANGSMITH_", "LANGCHAIN_"))}


def write_project(workdir: Path) -> tuple[Path, Path]:
    """A config binding every route to its script, and a langgraph.json naming the test module's graph."""
    config = workdir / "studio.toml"
    config.write_text("".join(f'[routes.{a}]\nteacher = "scripted:{a}"\n' for a in AGENTS))
    graph_config = workdir / "langgraph.json"
    graph_config.write_text(json.dumps({"dependencies": [str(ROOT)],
                                        "graphs": {"workflow": "tests.support.studio_graph:graph"}}))
    return config, graph_config


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and anything it started (its own process group)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`slmswap studio`'s command line and environment, run in a temp working dir; yields (url, workdir)."""
    workdir = tmp_path_factory.mktemp("studio")
    config, graph_config = write_project(workdir)
    port = free_port()
    argv, env = server_args(port, str(config), graph_config=graph_config, reload=False, base_env=clean_env())
    log = workdir / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ok", proc, "langgraph dev", log.read_text, READY_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}", workdir
    finally:
        stop(proc)


async def stream_nodes(client, thread_id: str, assistant_id: str, query: str) -> list[str]:
    """The node names of a run's `updates` stream, in order."""
    names = []
    async for part in client.runs.stream(thread_id, assistant_id, input={"query": query}, stream_mode="updates"):
        assert part.event != "error", part.data
        if part.event == "updates":
            names += list(part.data)
    return names


def test_studio_serves_the_graph_node_by_node(server):
    from langgraph_sdk import get_client

    url, workdir = server

    async def scenario():
        client = get_client(url=url)
        [assistant] = await client.assistants.search(graph_id="workflow")
        aid = assistant["assistant_id"]
        schemas = await client.assistants.get_schemas(aid)
        graph = await client.assistants.get_graph(aid)
        thread = await client.threads.create()
        names = await stream_nodes(client, thread["thread_id"], aid, "Sales by region")
        state = await client.runs.wait((await client.threads.create())["thread_id"], aid, input={"query": "Sales by region"})
        return schemas, graph, names, state

    schemas, graph, names, state = asyncio.run(scenario())
    # Studio's input form: one `query` text box.
    assert schemas["input_schema"]["properties"] == {"query": {"title": "Query", "type": "string"}}
    assert schemas["input_schema"]["required"] == ["query"]
    assert {n["id"] for n in graph["nodes"]} >= NODES
    # Every node is its own step: plan, step 1 (retrieval), step 2 (processing and validation in parallel), answer.
    assert names[:3] == ["prompt", "orchestrator", "retrieval"]
    assert names[3] == "orchestrator" and sorted(names[4:6]) == ["processing", "validation"]
    assert names[6:] == ["orchestrator", "aggregate"]
    assert state["answer"].startswith(ANSWER) and state["plan"] == PLAN
    assert all(r["ok"] for r in state["results"].values()) and len(state["results"]) == 3
    # The server used the store of its working directory, as the CLI does there.
    store = CaptureStore.open(f"sqlite:///{workdir}/.slmswap/slmswap.db")
    try:
        calls = store.calls_for_run(state["run_id"])
        # the plan, two turns (tool call, answer) per sub-agent, the answer
        assert sorted(c.agent for c in calls) == ["aggregate", "orchestrator", "processing", "processing",
                                                  "retrieval", "retrieval", "validation", "validation"]
        assert store.get_run(state["run_id"]).status == "ok"
    finally:
        store.close()


def test_a_new_query_on_the_same_thread_starts_over(server):
    """Studio sends each new query to the thread that already holds the last run's state."""
    from langgraph_sdk import get_client

    url, _ = server

    async def scenario():
        client = get_client(url=url)
        [assistant] = await client.assistants.search(graph_id="workflow")
        thread = await client.threads.create()
        first = await client.runs.wait(thread["thread_id"], assistant["assistant_id"], input={"query": "Sales by region"})
        names = await stream_nodes(client, thread["thread_id"], assistant["assistant_id"], "Top products")
        return first, names, await client.threads.get_state(thread["thread_id"])

    first, names, second = asyncio.run(scenario())
    assert names.count("orchestrator") == 3 and "retrieval" in names  # planned and ran again, not just aggregated
    assert second["values"]["query"] == "Top products" and second["values"]["run_id"] != first["run_id"]


def test_port_in_use_is_refused_before_starting(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is in use.*--port {port + 1}") as caught:
            run_studio(port, None)
    assert caught.value.exit_code == 2
    assert not (tmp_path / ".langgraph_api").exists()


def test_bad_config_is_refused_before_starting():
    with pytest.raises(ConfigError, match="missing.toml"):
        run_studio(free_port(), "missing.toml")


def test_server_gets_the_absolute_config_and_the_offline_switches(tmp_path):
    Path("slmswap.toml").write_text('default_binding = "scripted:x"\n')
    argv, env = server_args(free_port(), None, base_env={"SLMSWAP_CONFIG": "", "LANGSMITH_TRACING": "true"})
    assert env["SLMSWAP_CONFIG"] == str(tmp_path / "slmswap.toml")
    assert OFFLINE_ENV.items() <= env.items()
    assert argv[argv.index("--config") + 1] == str(GRAPH_CONFIG) and "--no-browser" in argv


def test_langgraph_json_names_the_workflow_graph():
    from langgraph_cli.config import validate_config_file

    import graphs.workflow
    import tests.support.studio_graph

    module, variable = validate_config_file(GRAPH_CONFIG)["graphs"]["workflow"].split(":")
    served = getattr(importlib.import_module(module), variable)
    assert served is graphs.workflow.graph is tests.support.studio_graph.graph
