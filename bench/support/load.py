"""A closed-loop HTTP/1.1 load generator on loopback: N keep-alive connections, each sending the next request as
soon as the last answer is read, with every request's latency measured.

Raw asyncio streams (uvloop when installed) instead of an HTTP client library: a generic client's per-request cost
would be measured with every target, and at high concurrency it saturates before the servers do.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Target:
    """Where a request goes: one POST with a fixed body and headers, the same bytes every time."""

    name: str
    port: int
    path: str = "/v1/chat/completions"
    body: dict = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def raw(self) -> bytes:
        payload = json.dumps(self.body).encode()
        lines = [f"POST {self.path} HTTP/1.1", f"host: 127.0.0.1:{self.port}", "content-type: application/json",
                 f"content-length: {len(payload)}", *(f"{k}: {v}" for k, v in self.headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@dataclass
class Run:
    """One measurement: latencies (ms) of the answered requests, failures, and the wall time they took."""

    target: str
    concurrency: int
    latencies: list[float]
    failures: dict[str, int]
    seconds: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """The q-th percentile (0-100) of the latencies, by linear interpolation."""
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=1000, method="inclusive")[min(998, round(q * 10) - 1)]


class Connection:
    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def send(self, raw: bytes) -> int:
        """Send one request and read its whole answer; returns the status. Reopens when the server closed."""
        if self.writer is None:
            await self.open()
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            await self._chunks()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1])

    async def _chunks(self) -> None:
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await self.reader.readexactly(size + 2)
            if size == 0:
                return

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def drive(target: Target, concurrency: int, requests: int, max_seconds: float) -> Run:
    """Send `requests` requests over `concurrency` connections, stopping early at `max_seconds`."""
    raw = target.raw()
    conns = [Connection(target.port) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))  # connection set-up is not part of any latency
    latencies: list[float] = []
    failures: dict[str, int] = {}
    left = requests
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker(conn: Connection) -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            t = time.perf_counter()
            try:
                status = await conn.send(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                await conn.close()
                continue
            if status == 200:
                latencies.append((time.perf_counter() - t) * 1000)
            else:
                failures[f"HTTP {status}"] = failures.get(f"HTTP {status}", 0) + 1

    await asyncio.gather(*(worker(c) for c in conns))
    seconds = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in conns))
    return Run(target.name, concurrency, latencies, failures, seconds)


def event_loop_policy() -> str:
    """Install uvloop's policy when it is there (a cheaper client); returns which loop the generator runs on."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
