"""Router latency with capture on vs off, over N calls to a scripted instant backend, and the store's throughput.

    .venv/bin/python bench/capture_overhead.py [--calls 2000] [--concurrency 64]

Targets (issue "Foundation"): added p50 latency ≤ 0.5 ms per call; store throughput ≥ 5,000 calls/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.capture.store import CaptureStore  # noqa: E402
from app.config import load_settings  # noqa: E402
from app.routing.context import CallContext  # noqa: E402
from app.routing.router import Router  # noqa: E402
from app.wire import ChatRequest  # noqa: E402
from tests.support.scripted import scripted  # noqa: E402

REQUEST = ChatRequest(model="bench", messages=[{"role": "system", "content": "You are terse."},
                                               {"role": "user", "content": "Say ok."}])
CONTEXT = CallContext(route="bench", run_id="bench", template_id="bench/base@1")


async def sequential(router: Router, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await router.complete(REQUEST, CONTEXT)
        times.append((time.perf_counter() - t) * 1000)
    return times


async def concurrent(router: Router, n: int, width: int) -> float:
    sem = asyncio.Semaphore(width)

    async def one():
        async with sem:
            await router.complete(REQUEST, CONTEXT)

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    scripted("bench").default = "ok"
    import os

    os.environ["SLMSWAP_DEFAULT_BINDING"] = "scripted:bench"
    settings = load_settings()
    with tempfile.TemporaryDirectory() as tmp:
        store = CaptureStore.open(f"sqlite:///{tmp}/bench.db")
        off, on = Router(settings, None), Router(settings, store)
        asyncio.run(sequential(off, 200)), asyncio.run(sequential(on, 200))  # warm up
        # Interleave the two configurations in rounds so drift on a shared machine hits both alike.
        t_off, t_on = [], []
        for _ in range(5):
            t_off += asyncio.run(sequential(off, args.calls // 5))
            t_on += asyncio.run(sequential(on, args.calls // 5))
        tput_off = asyncio.run(concurrent(off, args.calls, args.concurrency))
        tput_on = asyncio.run(concurrent(on, args.calls, args.concurrency))
        rows = len(store.list_calls(limit=10**7))
        store.close()
    p50_off, p50_on = statistics.median(t_off), statistics.median(t_on)
    print(f"calls per configuration: {len(t_on)} sequential, {args.calls} concurrent (width {args.concurrency})")
    print(f"p50 latency  capture off {p50_off:.3f} ms   on {p50_on:.3f} ms   added {p50_on - p50_off:.3f} ms (target <= 0.5)")
    print(f"p95 latency  capture off {statistics.quantiles(t_off, n=20)[18]:.3f} ms   on {statistics.quantiles(t_on, n=20)[18]:.3f} ms")
    print(f"throughput   capture off {tput_off:,.0f} calls/s   on {tput_on:,.0f} calls/s (target >= 5,000)   ratio {tput_on / tput_off:.2f}")
    print(f"rows stored: {rows}")


if __name__ == "__main__":
    main()
