"""The cheapest OpenAI-compatible upstream we can serve: one pre-encoded chat completion for every request.

    python bench/support/canned.py PORT [DELAY_S]

A raw ASGI callable (no framework) under uvicorn with httptools/uvloop when installed and no access log, so the
upstream costs as little as possible and the benchmark measures the proxy in front of it. DELAY_S > 0 makes a slow
upstream (a busy student): each answer waits that long, without using the CPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys

COMPLETION = {
    "id": "chatcmpl-canned", "object": "chat.completion", "created": 1764633600, "model": "canned",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}
BODY = json.dumps(COMPLETION, separators=(",", ":")).encode()
START = {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]}
RESPONSE = {"type": "http.response.body", "body": BODY}


def make_app(delay_s: float = 0.0):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):  # the request body is not needed, only consumed
            pass
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        await send(START)
        await send(RESPONSE)

    return app


def main() -> None:
    import uvicorn

    port, delay = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    fast = {"loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            "http": "httptools" if importlib.util.find_spec("httptools") else "h11"}
    uvicorn.run(make_app(delay), host="127.0.0.1", port=port, access_log=False, lifespan="off",
                log_level="warning", **fast)


if __name__ == "__main__":
    main()
