"""Secrets never leave the process: the registry and redact_text, the log filter, errors, and two real runs against
a loopback upstream that echoes the key back (a Router call with capture, `slmswap eval` through the CLI), after
which every byte the run wrote is searched for the secrets."""

import asyncio
import base64
import io
import json
import logging
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app import secrets as module
from app.routing.context import CallContext
from app.capture.redact import redact
from app.capture.store import CaptureStore
from app.config import load_settings
from app.errors import BackendError, BindingError
from app.routing.router import Router
from app.secrets import (REDACTED, install_log_redaction, redact_text, register_secret, register_settings,
                         strip_url_credentials)
from app.wire import ChatRequest
from tests.support.http import serve

# Each test uses its own values: the registry is process-wide, so a value another test registered would let a
# missing registration pass unnoticed.
SK_KEY = "sk-proj-echo0123456789abcdefXYZ"
HEX_KEY = "9f3c2b1a8e7d6c5b4a39281706f5e4d3"  # Azure-style: 32 hex, matched by no pattern, only by its value
AZURE_KEY = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
URL_PASSWORD = "hunter2-Pa55word"


# ---- redact_text and the registry (pure) ---------------------------------------------------------------------

def test_registered_values_are_redacted_and_short_ones_ignored():
    register_secret("f00dcafe" * 4)
    register_secret("short")
    register_secret(None)
    text = "error: key " + "f00dcafe" * 4 + " rejected (short is fine)"
    assert redact_text(text) == f"error: key {REDACTED} rejected (short is fine)"


def test_secret_variables_are_registered_with_the_settings(monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "abcdef0123456789abcdef0123456789")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "lf-secret-00112233")
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-public-0011")  # not a secret: stays
    text = "abcdef0123456789abcdef0123456789 lf-secret-00112233 pk-lf-public-0011"
    assert redact_text(text) == text  # set after start-up: not known yet
    register_settings(load_settings())
    assert redact_text(text) == f"{REDACTED} {REDACTED} pk-lf-public-0011"


def test_url_credentials_and_secret_query_params():
    text = ("GET http://bob:s3cr%40t@127.0.0.1:9/v1 and postgresql://u:p@w@db/x, "
            "https://h/v1?api_key=abc123&x=1&KEY=zz;token=t0k openai:m?api_key_env=MY_KEY")
    assert redact_text(text) == (
        f"GET http://{REDACTED}@127.0.0.1:9/v1 and postgresql://{REDACTED}@db/x, "
        f"https://h/v1?api_key={REDACTED}&x=1&KEY={REDACTED};token={REDACTED} openai:m?api_key_env=MY_KEY")


def test_strip_url_credentials():
    assert strip_url_credentials("http://user:pw@127.0.0.1:8000/v1?api_key=abc&x=1") == \
        f"http://127.0.0.1:8000/v1?api_key={REDACTED}&x=1"
    assert strip_url_credentials("https://example.com/v1") == "https://example.com/v1"
    assert strip_url_credentials(None) is None


def test_text_without_secrets_is_returned_as_is():
    text = "SELECT name FROM products WHERE price > 10; the bearer of bad news, see https://example.com/a@b"
    assert redact_text(text) == text  # "@" in a path is no userinfo
    plain = "just a prompt about keys and passwords" * 50
    assert redact_text(plain) is plain


def test_a_secret_with_json_escapes_is_caught_inside_json_text():
    secret = 'pa"ss\\word-0123'
    register_secret(secret)
    assert secret not in redact_text(json.dumps({"e": secret}))
    assert json.dumps(secret)[1:-1] not in redact_text(json.dumps({"e": secret}))
    assert redact({"note": f"x {secret} y"}) == {"note": f"x {REDACTED} y"}


def test_register_settings_covers_bindings_urls_and_langfuse(monkeypatch, tmp_path):
    monkeypatch.setenv("TEAM_KEY", "team-key-value-778899")
    Path("slmswap.toml").write_text(
        '[routes.retrieval]\nteacher = "openai:m?api_key_env=TEAM_KEY"\n'
        '[bindings."openai:n"]\nbase_url = "http://me:url-pass-445566@h/v1"\n'
        '[langfuse]\npublic_key = "pk"\nsecret_key = "lf-config-secret-1122"\n')
    text = "team-key-value-778899 url-pass-445566 lf-config-secret-1122"
    assert redact_text(text) == text  # nothing known yet
    register_settings(load_settings())
    assert redact_text(text) == " ".join([REDACTED] * 3)


def test_errors_are_redacted_when_raised():
    exc = BindingError("bad options in binding 'openai:m?base_url=http://u:zz-0011223344@h/v1'")
    assert "zz-0011223344" not in str(exc) and f"http://{REDACTED}@h/v1" in str(exc)
    assert str(BackendError("HTTP 401: Bearer abcdefghij0123456789")) == f"HTTP 401: {REDACTED}"


# ---- logging ----------------------------------------------------------------------------------------------

@pytest.fixture
def log_redaction():
    factory = logging.getLogRecordFactory()
    install_log_redaction()
    yield
    logging.setLogRecordFactory(factory)
    module._installed = False


def test_log_records_of_any_logger_are_redacted(log_redaction):
    register_secret("log-secret-00998877")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # added after install: still sees redacted records
    child = logging.getLogger("slmswap.test.child")
    child.addHandler(handler)
    child.setLevel(logging.INFO)
    try:
        child.info("upstream said %s", "bad key log-secret-00998877")
        try:
            raise ValueError("echo log-secret-00998877 sk-abcdefghijklmnop1234")
        except ValueError:
            child.exception("call failed for http://a:log-pass-1234@h/v1")
    finally:
        child.removeHandler(handler)
    written = stream.getvalue()
    assert "upstream said bad key [redacted]" in written and "ValueError: echo [redacted] [redacted]" in written
    assert "log-secret-00998877" not in written and "log-pass-1234" not in written and "sk-abcdef" not in written


# ---- a real upstream that echoes the key ----------------------------------------------------------------------

def echoing_upstream(seen: list) -> FastAPI:
    """An OpenAI-shaped server that answers 401 with the credential it was sent, except for model "echo-ok",
    which answers 200 and repeats the key in its content."""
    app = FastAPI()

    def key_of(request: Request) -> str:
        auth = request.headers.get("authorization") or ""
        return request.headers.get("api-key") or auth.removeprefix("Bearer ").removeprefix("Basic ")

    def answer(body: dict, key: str, auth: str):
        seen.append(key)
        if body.get("model") == "echo-ok":
            message = {"role": "assistant", "content": f"you sent {key} ({auth})"}
            return {"id": "c1", "object": "chat.completion", "created": 1, "model": "echo-ok",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}
        return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}. Header was: {auth}",
                                       "type": "invalid_request_error", "code": "invalid_api_key"}}, status_code=401)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return answer(await request.json(), key_of(request), request.headers.get("authorization") or "")

    @app.post("/openai/deployments/{deployment}/chat/completions")
    async def azure(deployment: str, request: Request):
        return answer(await request.json(), key_of(request), request.headers.get("api-key") or "")

    return app


def secret_forms(*secrets: str) -> list[bytes]:
    forms = []
    for s in secrets:
        forms += [s.encode(), json.dumps(s).encode(), base64.b64encode(s.encode())]
    return forms


def assert_nowhere(blobs: dict[str, bytes], *secrets: str) -> None:
    for name, blob in blobs.items():
        for form in secret_forms(*secrets):
            assert form not in blob, f"{form!r} found in {name}"


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def chat(content: str = "hello") -> ChatRequest:
    return ChatRequest(model="retrieval", messages=[{"role": "user", "content": content}], decoding="free")


CTX = CallContext(route="retrieval", run_id="run-secrets")


def test_router_capture_keeps_no_echoed_key(tmp_path, monkeypatch, capfd):
    seen = []
    monkeypatch.setenv("MY_SK_KEY", SK_KEY)
    monkeypatch.setenv("MY_HEX_KEY", HEX_KEY)  # a custom api_key_env: known only once the backend reads it
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    errors = []
    with serve(echoing_upstream(seen)) as url:
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", url)
        bindings = [f"openai:gpt-x?base_url={url}/v1&api_key_env=MY_SK_KEY",
                    f"openai:gpt-x?base_url={url}/v1&api_key_env=MY_HEX_KEY", "azure:prod",
                    f"openai:echo-ok?base_url={url}/v1&api_key_env=MY_HEX_KEY"]
        store = CaptureStore.open(f"sqlite:///{store_dir}/calls.db")
        try:
            for binding in bindings:
                monkeypatch.setenv("SLMSWAP_DEFAULT_BINDING", binding)
                router = Router(load_settings(), store)
                try:
                    resp = asyncio.run(router.complete(chat(), CTX))
                    errors.append(resp.message.content)
                except BackendError as exc:
                    errors.append(str(exc))
            calls = store.list_calls(run_id="run-secrets")
        finally:
            store.close()
    assert seen == [SK_KEY, HEX_KEY, AZURE_KEY, HEX_KEY]  # the upstream did get (and echo) each key
    assert len(calls) == 4 and [c.valid for c in calls].count(False) == 3
    assert all("HTTP 401" in e and "Incorrect API key provided: [redacted]" in e for e in errors[:3]), errors
    # The caller gets the model's words as they are; only what leaves the process is redacted.
    answer = errors.pop()
    [ok] = [c for c in calls if c.valid]
    assert answer == f"you sent {HEX_KEY} (Bearer {HEX_KEY})"
    assert ok.response["content"] == f"you sent {REDACTED} (Bearer {REDACTED})"
    out = capfd.readouterr()
    blobs = files_under(store_dir) | {"errors": "\n".join(errors).encode(), "stdout": out.out.encode(),
                                      "stderr": out.err.encode(),
                                      "rows": repr(calls).encode()}
    assert_nowhere(blobs, SK_KEY, HEX_KEY, AZURE_KEY)


def test_eval_writes_no_key_and_no_url_password(tmp_path, monkeypatch, capsys):
    from app.cli import main

    seen = []
    eval_key = "sk-eval-0123456789abcdefghij"
    monkeypatch.setenv("OPENAI_API_KEY", eval_key)
    Path("suite.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                               "expected": "ok"}) + "\n")
    with serve(echoing_upstream(seen)) as url:
        host = url.removeprefix("http://")
        models = [f"openai:echo-ok?base_url=http://user:{URL_PASSWORD}@{host}/v1",
                  f"openai:gpt-x?base_url=http://user:{URL_PASSWORD}@{host}/v1"]
        argv = ["slmswap", "eval", "--suite", "jsonl:suite.jsonl", "--out", "evalout"]
        for model in models:
            argv += ["--model", model]
        old, sys.argv = sys.argv, argv
        try:
            with pytest.raises(SystemExit) as exit_info:
                main()
        finally:
            sys.argv = old
    out = capsys.readouterr()
    assert exit_info.value.code == 1, out.err
    # both models reached the upstream, which echoed the URL's credentials (httpx sends them as Basic auth)
    assert seen == [base64.b64encode(f"user:{URL_PASSWORD}".encode()).decode()] * 2
    summary = json.loads(Path("evalout/summary.json").read_text())
    shown = [f"openai:{m}?base_url=http://{REDACTED}@{host}/v1" for m in ("echo-ok", "gpt-x")]
    assert list(summary["models"]) == shown and "HTTP 401" in summary["failed"][shown[1]]
    assert shown[0].replace("[", "\\[") not in out.out and shown[0] in out.out  # the table shows the marker
    assert "HTTP 401" in out.err
    blobs = files_under(tmp_path / "evalout") | {"stdout": out.out.encode(), "stderr": out.err.encode()}
    assert set(blobs) >= {str(tmp_path / "evalout" / f) for f in ("items.jsonl", "summary.json", "report.md")}
    assert_nowhere(blobs, eval_key, URL_PASSWORD, f"user:{URL_PASSWORD}")


def test_langfuse_mask_redacts_span_data():
    from app.capture.redact import langfuse_mask

    register_secret("lf-span-secret-5566")
    data = {"messages": [{"role": "user", "content": "key lf-span-secret-5566"}], "headers": {"api-key": "x"}}
    assert langfuse_mask(data=data) == {"messages": [{"role": "user", "content": f"key {REDACTED}"}],
                                        "headers": {"api-key": REDACTED}}
