"""A minimal HTTP/1.1 keep-alive client on asyncio streams: the one POST a non-streamed chat completion needs.

Why not the `openai` SDK or httpx for this one request: in front of a fast upstream the SDK's request transform
and httpx/httpcore's per-request bookkeeping (its pool polls every pooled socket on each request) cost several
times what the proxy itself does (measured in bench/proxy.py; see README, "Numbers"). This client does only what a
chat completions POST needs: one connection pool per event loop (last used first, idle connections dropped when
the server has closed them), Content-Length and chunked bodies, `connection: close`, TLS for https, one overall
timeout, and one resend when a reused idle connection turns out to have been closed by the server before it
answered anything (what httpx does too). Anything else (HTTP proxies, streaming) stays with the SDK, which is
still what `app/backends/openai_compat.py` uses there.

Errors are plain: `TimeoutError`, or `ConnectionFailed` for everything that left no HTTP answer. The backend maps
them, and statuses >= 400, into the openai SDK's exception types so its one `_boundary` and the retries see the
same exceptions whichever path made the call.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024  # asyncio's default stream limit: a bigger header block is a broken server
MAX_IDLE = 256  # idle connections kept per pool; more are closed


class ConnectionFailed(Exception):
    """No HTTP answer: could not connect, the connection broke, or what came back was not HTTP/1.x."""


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    content: bytes


class _Conn:
    __slots__ = ("reader", "writer", "used")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.used = reader, writer, False

    def close(self) -> None:
        self.writer.close()


class HTTP1Pool:
    """Keep-alive connections to one origin; `post()` sends one request and reads the whole answer."""

    def __init__(self, base_url: str, timeout: float):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default else f"{host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.origin = f"{parts.scheme}://{self.authority}"
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._ssl = ssl.create_default_context() if self.tls else None

    def url(self, path: str) -> str:
        return self.origin + self.prefix + path

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        """POST `body` to prefix + `path` (which may carry a query). TimeoutError after `timeout` seconds in all."""
        head = [f"POST {self.prefix}{path} HTTP/1.1", f"host: {self.authority}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        async with asyncio.timeout(self.timeout):
            while True:
                conn = await self._checkout()
                reused = conn.used
                try:
                    reply, keep = await self._exchange(conn, raw)
                except _Stale:
                    conn.close()
                    if reused:  # the server closed an idle connection before reading our request: send it again
                        continue
                    raise ConnectionFailed("the server closed the connection without answering") from None
                except BaseException:  # a timeout, a cancellation, a broken answer: the connection is unusable
                    conn.close()
                    raise
                if keep and len(self._idle) < MAX_IDLE:
                    conn.used = True
                    self._idle.append(conn)
                else:
                    conn.close()
                return reply

    def close(self) -> None:
        """Close the idle connections (those in use close when their request ends)."""
        while self._idle:
            self._idle.pop().close()

    async def _checkout(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl,
                                                           limit=MAX_HEADER_BYTES)
        except OSError as exc:
            raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from exc
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, raw: bytes) -> tuple[Reply, bool]:
        reader = conn.reader
        try:
            conn.writer.write(raw)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _Stale from None
                raise ConnectionFailed("the server closed the connection in the middle of its answer") from None
            status, headers, version = _parse_head(head)
            while 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
                status, headers, version = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            keep = headers.get("connection", "").lower() != "close" and (
                version == "HTTP/1.1" or headers.get("connection", "").lower() == "keep-alive")
            if status in (204, 304):
                return Reply(status, headers, b""), keep
            if headers.get("transfer-encoding", "").lower() == "chunked":
                content = await _chunks(reader)
            elif "content-length" in headers:
                content = await reader.readexactly(int(headers["content-length"]))
            else:  # the body ends when the server closes the connection
                content, keep = await reader.read(), False
            return Reply(status, headers, content), keep
        except (ConnectionResetError, BrokenPipeError) as exc:
            if not conn.used:
                raise ConnectionFailed(f"{type(exc).__name__}: {exc}") from exc
            raise _Stale from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise ConnectionFailed(f"the answer is not HTTP/1.1 the client can read ({type(exc).__name__}: "
                                   f"{str(exc)[:200]})") from exc


class _Stale(Exception):
    """A reused connection the server had closed: nothing was answered, the request may be sent again."""


def _parse_head(head: bytes) -> tuple[int, dict[str, str], str]:
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, code, *_ = status_line.split(" ", 2)
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(code), headers, version


async def _chunks(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
