"""Jobs the proxy runs on a period while it serves (template evolution, `[evolve] every_minutes`).

A job is a plain blocking function run in a worker thread, so the event loop keeps serving; a job that raises is
logged and tried again next period, never taking the server down. With `--workers N` each worker runs its own
schedule: the jobs must be idempotent (evolution stores a child once, by content hash).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("slmswap.schedule")


@dataclass(frozen=True)
class Periodic:
    name: str
    seconds: float
    job: Callable[[], object]


async def run_periodic(periodic: Periodic) -> None:
    """Sleep, run the job in a thread, repeat until cancelled."""
    while True:
        await asyncio.sleep(periodic.seconds)
        try:
            await asyncio.to_thread(periodic.job)
        except Exception:  # noqa: BLE001 - a failed run must not stop the schedule or the server
            log.exception("scheduled %s failed; it runs again in %.0f s", periodic.name, periodic.seconds)
