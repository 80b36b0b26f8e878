"""Every upstream fault becomes one clear, captured error (or a normalised reply), through the real openai SDK."""

import asyncio

import pytest

from app.backends.base import BACKENDS, register_backend
from app.capture.store import CaptureStore
from app.config import load_settings
from app.errors import BackendError, BadReply, BindingError, UpstreamTimeout
from app.routing.router import Router
from app.wire import ChatRequest, ChatResponse
from tests.support.faults import Faults
from tests.support.http import serve


@pytest.fixture
def faults():
    f = Faults()
    with serve(f.app()) as url:
        f.url = url
        yield f
        f.stopping.set()


@pytest.fixture
def make_router(tmp_path, monkeypatch):
    stores = []

    def make(binding: str) -> Router:
        BACKENDS.clear()
        monkeypatch.setenv("SLMSWAP_DEFAULT_BINDING", binding)
        store = CaptureStore.open(f"sqlite:///{tmp_path}/calls-{len(stores)}.db")
        stores.append(store)
        return Router(load_settings(), store)

    yield make
    for store in stores:
        store.close()
    BACKENDS.clear()


def ask(content: str = "ping", **kw) -> ChatRequest:
    return ChatRequest(model="retrieval", messages=[{"role": "user", "content": content}], **kw)


def binding(faults, **opts) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"base_url": f"{faults.url}/v1", "max_retries": 0, **opts}.items())
    return f"openai:m1?{query}"


@pytest.mark.parametrize("behaviour, message", [
    ("malformed_json", "replied with a body that is not JSON (content-type application/json)"),
    ("html", "replied with a body that is not JSON (content-type text/html"),
    ("no_choices", "replied with no choices"),
])
def test_a_wrong_shaped_reply_is_one_clear_captured_error(faults, make_router, behaviour, message):
    router = make_router(binding(faults))
    faults.enqueue(behaviour)
    with pytest.raises(BadReply) as caught:
        asyncio.run(router.complete(ask()))
    text = str(caught.value)
    assert text.startswith("openai:m1 ") and message in text and "\n" not in text
    [row] = router.store.list_calls()
    assert (row.valid, row.error_type, row.binding) == (False, "backend_error", "openai:m1")
    assert message in row.error_detail


@pytest.mark.parametrize("behaviour", ["no_usage", "null_usage"])
def test_missing_usage_is_recorded_as_unknown_not_a_crash(faults, make_router, behaviour):
    router = make_router(binding(faults))
    faults.enqueue(behaviour)
    resp = asyncio.run(router.complete(ask()))
    assert resp.message.content == "pong" and not resp.usage.known
    [row] = router.store.list_calls()
    assert row.valid and row.response["usage"] == "unknown" and row.prompt_tokens == 0


def test_reported_usage_is_known(faults, make_router):
    router = make_router(binding(faults))
    resp = asyncio.run(router.complete(ask()))
    assert resp.usage.known and resp.usage.total_tokens == 6
    assert "usage" not in router.store.list_calls()[0].response


@pytest.mark.parametrize("reason, expected", [
    ("function_call", "tool_calls"), ("end_turn", "stop"), ("max_tokens", "length"), ("something_new", "stop"),
])
def test_finish_reasons_outside_the_four_are_normalised(faults, make_router, reason, expected):
    router = make_router(binding(faults))
    faults.enqueue(f"finish:{reason}")
    assert asyncio.run(router.complete(ask())).choices[0].finish_reason == expected


def test_retryable_status_is_retried_honouring_retry_after(faults, make_router):
    router = make_router(binding(faults, max_retries=2))
    faults.enqueue("status:429:retry-after=0", "status:503:retry-after=0")
    assert asyncio.run(router.complete(ask())).message.content == "pong"
    assert len(faults.seen) == 3  # two failures, then the answer: our retries, not the SDK's on top
    assert len(router.store.list_calls()) == 1


def test_retries_are_bounded_and_the_last_status_is_reported(faults, make_router):
    router = make_router(binding(faults, max_retries=1))
    faults.enqueue("status:500:retry-after=0", "status:500:retry-after=0", "ok")
    with pytest.raises(BackendError, match=r"openai:m1 failed \(HTTP 500\): status 500 on purpose"):
        asyncio.run(router.complete(ask()))
    assert len(faults.seen) == 2


def test_a_client_error_is_not_retried(faults, make_router):
    router = make_router(binding(faults, max_retries=3))
    faults.enqueue("status:400")
    with pytest.raises(BackendError, match="HTTP 400"):
        asyncio.run(router.complete(ask()))
    assert len(faults.seen) == 1


def test_a_stalled_upstream_times_out_after_the_binding_timeout(faults, make_router):
    router = make_router(binding(faults, timeout=0.5, max_retries=2))
    faults.enqueue("stall")
    with pytest.raises(UpstreamTimeout, match=r"openai:m1 timed out after 0.5 s"):
        asyncio.run(router.complete(ask()))
    assert len(faults.seen) == 1  # a timeout is not retried
    [row] = router.store.list_calls()
    assert row.error_type == "timeout" and "timed out after 0.5 s" in row.error_detail


def test_connection_refused_names_the_server(make_router):
    from tests.support.http import free_port

    router = make_router(f"openai:m1?base_url=http://127.0.0.1:{free_port()}/v1&max_retries=0")
    with pytest.raises(BackendError, match=r"connection failed.*is the server at http://127.0.0.1:\d+/v1 running"):
        asyncio.run(router.complete(ask()))


def test_client_stream_options_are_not_passed_twice(faults, make_router):
    router = make_router(binding(faults))

    async def collect():
        return [c async for c in router.stream(ask(stream_options={"include_usage": True}))]

    faults.enqueue("html")  # a stream from a server that does not speak SSE: no chunk at all
    with pytest.raises(BadReply, match="ended its stream without sending a chunk"):
        asyncio.run(collect())
    assert faults.seen[0]["body"]["stream_options"] == {"include_usage": True}


class _Hang:
    """A backend that waits until it is cancelled (a client that went away)."""

    def __init__(self, binding) -> None:
        self.binding = binding
        self.started = asyncio.Event()

    async def complete(self, req):
        self.started.set()
        await asyncio.Event().wait()

    async def stream(self, req):
        yield ChatResponse(choices=[])  # never reached in these tests
        await asyncio.Event().wait()


def test_a_cancelled_call_is_captured_as_aborted_and_the_cancellation_propagates(make_router):
    from app.bindings import BindingOptions, register_kind

    register_kind("hang", BindingOptions)
    register_backend("hang", _Hang, pricing="local")
    router = make_router("hang:x")

    async def main():
        task = asyncio.create_task(router.complete(ask()))
        backend = router.backends.get(router.route("retrieval").teacher)
        await backend.started.wait()  # deterministic: the call is in flight before we cancel it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    router.store.flush()  # an aborted call is queued for the next commit, not waited for
    [row] = router.store.list_calls()
    assert (row.valid, row.error_type) == (False, "aborted")


def test_an_unknown_binding_kind_is_an_error_not_gpt4_prices():
    from app.backends.base import pricing_of
    from app.bindings import BindingOptions, parse_binding, register_kind
    from app.cost import cost_usd

    register_kind("mystery", BindingOptions)
    with pytest.raises(BindingError, match="no backend is registered for binding kind 'mystery'"):
        cost_usd(parse_binding("mystery:x"), 1000, 1000)
    assert pricing_of("gguf") == "local" and pricing_of("azure") == "hosted"
    assert cost_usd(parse_binding("gguf:smollm2-135m"), 10**6, 10**6) == 0.0
