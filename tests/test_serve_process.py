"""`slmswap serve` as real processes: start-up checks, kill -9 under load, and two workers sharing route state."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from app.capture.store import CaptureStore
from tests.conftest import ROOT
from tests.support.faults import Faults
from tests.support.http import free_port, serve, wait_until_up

CLI = "from app.cli import main; main()"


def start(workdir: Path, port: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CLI, "serve", "--port", str(port), *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    wait_until_up(f"http://127.0.0.1:{port}/healthz", proc, "slmswap serve", proc.stdout.read)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def upstream():
    faults = Faults()
    with serve(faults.app()) as url:
        yield url
        faults.stopping.set()


def config(tmp_path: Path, upstream: str, extra: str = "", store_url: str | None = None) -> Path:
    (tmp_path / "slmswap.toml").write_text(f'''[store]
url = "{store_url or f'sqlite:///{tmp_path}/calls.db'}"

[routes.support]
teacher = "openai:big?base_url={upstream}/v1&max_retries=0"
student = "openai:small?base_url={upstream}/v1&max_retries=0"
{extra}''')
    return tmp_path


def test_serving_off_loopback_without_keys_is_refused(tmp_path, upstream):
    proc = start(config(tmp_path, upstream), free_port(), "--host", "0.0.0.0")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "refusing to serve on 0.0.0.0 without API keys" in out


def test_kill_9_under_load_loses_no_call_whose_answer_was_received(tmp_path, upstream):
    port = free_port()
    proc = start(config(tmp_path, upstream), port)
    received, enough, lock = [], threading.Event(), threading.Lock()

    def load(worker: int) -> None:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        for i in range(500):
            try:
                raw = c.chat.completions.with_raw_response.create(
                    model="support", messages=[{"role": "user", "content": f"w{worker} q{i}"}])
            except (openai.APIConnectionError, openai.APIStatusError):
                return  # the server is gone
            with lock:
                received.append(raw.headers["x-slmswap-call-id"])
                if len(received) >= 30:
                    enough.set()

    try:
        wait_ready(proc, port)
        workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for t in workers:
            t.start()
        assert enough.wait(300)
        os.killpg(proc.pid, signal.SIGKILL)  # while four clients have requests in flight
        for t in workers:
            t.join(60)
    finally:
        stop(proc)
    with CaptureStore.open(f"sqlite:///{tmp_path}/calls.db") as store:
        stored = {c.id for c in store.list_calls(limit=5000)}
    assert len(received) >= 30 and set(received) <= stored  # capture is durable before the response is sent


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_stage_set_through_one_process_is_obeyed_by_another(tmp_path, upstream, request, db):
    """Two serving processes on one store: `slmswap rollout set` from a third is obeyed by both."""
    store_url = request.getfixturevalue("postgres_url") if db == "postgresql" else None
    workdir = config(tmp_path, upstream, store_url=store_url)
    ports = [free_port(), free_port()]
    procs = [start(workdir, p) for p in ports]
    try:
        for proc, port in zip(procs, ports):
            wait_ready(proc, port)

        def roles():
            out = []
            for port in ports:
                raw = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) \
                    .chat.completions.with_raw_response.create(model="support", messages=[{"role": "user", "content": "q"}])
                out.append(raw.headers["x-slmswap-binding"])
            return out

        assert roles() == ["openai:big", "openai:big"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        moved = subprocess.run([sys.executable, "-c", CLI, "rollout", "set", "support", "student"], cwd=workdir,
                               env=env, capture_output=True, text=True, timeout=120)
        assert moved.returncode == 0, moved.stderr
        # Each process re-reads the route state at most every 0.5 s: poll until both obey (bounded).
        for _ in range(100):
            if roles() == ["openai:small", "openai:small"]:
                break
            time.sleep(0.1)
        assert roles() == ["openai:small", "openai:small"]
    finally:
        for proc in procs:
            stop(proc)
