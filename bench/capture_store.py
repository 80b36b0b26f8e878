"""Micro-bench of the capture store alone: latency one `record()` adds, and calls/s with many recorders.

    .venv/bin/python bench/capture_store.py [--n 3000] [--threads 16] [--tasks 256]

Side by side with the naive way (one SQLAlchemy Core INSERT and COMMIT per call on the caller's thread), on
the same kind of SQLite file. Targets: p50 of a sequential record <= 0.5 ms, >= 5,000 calls/s concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app.capture.engine import open_engine
from app.capture.migrations import migrate
from app.capture.records import CallRecord
from app.capture.schema import calls
from app.capture.store import CaptureStore, _call_row

SYSTEM = "You are the retrieval agent. Pick one tool and call it with exact arguments. " * 12
TOOLS = [{"type": "function", "function": {"name": f"search_{i}", "description": "Search the corpus.",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                          "k": {"type": "integer"}}, "required": ["query"]}}}
         for i in range(3)]


def make_call() -> CallRecord:
    """A call shaped like a sub-agent's: ~1 KB system prompt, three tools, one tool call back."""
    return CallRecord(
        route="retrieval", agent="retrieval", binding="gguf:smollm2-135m", template_id="retrieval/base@1",
        request={"messages": [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": "Find papers on grammar-constrained decoding."}],
                 "tools": TOOLS, "tool_choice": "auto", "response_format": None,
                 "params": {"temperature": 0.0, "max_tokens": 256}},
        response={"content": None, "finish_reason": "tool_calls", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "search_0", "arguments": '{"query": "grammar constrained decoding", "k": 5}'}}]},
        latency_ms=84.0, prompt_tokens=412, completion_tokens=21, cost_usd=0.0, teacher_cost_usd=0.0021)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[int(len(ms) * 0.99) - 1]


def sequential(record: Callable[[CallRecord], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        call = make_call()
        t0 = time.perf_counter()
        record(call)
        out.append(time.perf_counter() - t0)
    return out


def threaded(record: Callable[[CallRecord], None], n: int, threads: int) -> float:
    """calls/s with `threads` threads recording n calls in all."""
    per = n // threads
    workers = [threading.Thread(target=lambda: [record(make_call()) for _ in range(per)]) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per * threads / (time.perf_counter() - t0)


def async_rate(store: CaptureStore, n: int, tasks: int) -> float:
    async def worker(count):
        for _ in range(count):
            await store.arecord(make_call())

    async def main():
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(n // tasks) for _ in range(tasks)))
        return (n // tasks) * tasks / (time.perf_counter() - t0)

    return asyncio.run(main())


def naive_recorder(url: str) -> Callable[[CallRecord], None]:
    """One Core INSERT + COMMIT per call, on the caller's thread (redaction included, for a fair comparison)."""
    engine = open_engine(url)
    migrate(engine)

    def record(call: CallRecord) -> None:
        with engine.begin() as conn:
            conn.execute(calls.insert(), _call_row(call))

    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    store = CaptureStore.open(f"sqlite:///{tmp / 'store.db'}")
    naive = naive_recorder(f"sqlite:///{tmp / 'naive.db'}")
    sequential(store.record, 200)  # warm up both
    sequential(naive, 200)

    s50, s99 = percentiles(sequential(store.record, args.n))
    n50, n99 = percentiles(sequential(naive, args.n))
    commits0 = store._writer.commits
    s_rate = threaded(store.record, args.n * 2, args.threads)
    batch = args.n * 2 / max(1, store._writer.commits - commits0)
    n_rate = threaded(naive, args.n * 2, args.threads)
    a_rate = async_rate(store, args.n * 2, args.tasks)
    store.close()

    print(f"capture store bench, {args.n} calls of ~{len(str(make_call().request)) // 1024 + 1} KB, SQLite WAL")
    print(f"{'':34}{'store':>12}{'naive':>12}{'ratio':>9}")
    print(f"{'sequential p50 latency (ms)':34}{s50:12.3f}{n50:12.3f}{n50 / s50:8.1f}x   target <= 0.5")
    print(f"{'sequential p99 latency (ms)':34}{s99:12.3f}{n99:12.3f}{n99 / s99:8.1f}x")
    print(f"{f'{args.threads} threads (calls/s)':34}{s_rate:12,.0f}{n_rate:12,.0f}{s_rate / n_rate:8.1f}x   "
          f"target >= 5,000; {batch:.1f} calls per commit")
    print(f"{f'{args.tasks} asyncio tasks (calls/s)':34}{a_rate:12,.0f}{'-':>12}")


if __name__ == "__main__":
    main()
