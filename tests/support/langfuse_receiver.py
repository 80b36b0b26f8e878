"""A loopback stand-in for a Langfuse server: decodes the SDK's OTLP spans and answers its REST calls.

Run the code under test inside `langfuse_client(receiver)` (a fresh SDK client pointed here), flush, then assert
on `receiver.spans` (plain dicts) and `receiver.requests`. Shapes follow langfuse 5.2.x (the version pinned).

    with LangfuseReceiver() as receiver, langfuse_client(receiver) as client:
        graph.invoke(inputs, config={"callbacks": [CallbackHandler()]})
        client.flush()
        spans = receiver.wait_for_spans(3)
"""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OTLP_PATH = "/api/public/otel/v1/traces"
PROJECT_ID = "receiver-project"
_METADATA_PREFIX = "langfuse.observation.metadata."


# --- OTLP decoding (pure) ---------------------------------------------------------------------------------------


def decode_otlp(body: bytes, content_type: str = "application/x-protobuf") -> list[dict[str, Any]]:
    """Decode one OTLP/HTTP trace export body (already decompressed) into one plain dict per span."""
    request = ExportTraceServiceRequest()
    if "json" in content_type:
        json_format.Parse(body.decode("utf-8"), request)
    else:
        request.ParseFromString(body)
    return [
        _span_dict(span, resource=_attributes(rs.resource.attributes), scope=ss.scope.name)
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]


def _span_dict(span: Any, *, resource: dict[str, Any], scope: str) -> dict[str, Any]:
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex() or None,
        "name": span.name,
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
        "status_code": span.status.code,
        "attributes": _attributes(span.attributes),
        "resource": resource,
        "scope": scope,
    }


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in key_values}


def any_value(value: Any) -> Any:
    """Turn an OTLP AnyValue into the Python value it holds (JSON strings stay strings)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def observation_metadata(span: dict[str, Any]) -> dict[str, Any]:
    """The span's `langfuse.observation.metadata.<key>` attributes, JSON-decoded (the SDK encodes each value)."""
    return {
        key[len(_METADATA_PREFIX) :]: _json_or_raw(value)
        for key, value in span["attributes"].items()
        if key.startswith(_METADATA_PREFIX)
    }


def _json_or_raw(value: Any) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def _decompress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


# --- REST fake: the subset of the public API the SDK calls, kept in memory -----------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    page, limit = int(query.get("page", 1)), int(query.get("limit", 50))
    total_pages = max(1, -(-len(items) // limit))
    chunk = items[(page - 1) * limit : page * limit]
    meta = {"page": page, "limit": limit, "totalItems": len(items), "totalPages": total_pages}
    return {"data": chunk, "meta": meta}


class RestFake:
    """Projects, datasets, dataset items, prompts (with labels) and scores, shaped like `langfuse.api` models."""

    def __init__(self) -> None:
        self.datasets: dict[str, dict[str, Any]] = {}
        self.items: dict[str, dict[str, Any]] = {}
        self.prompts: dict[str, list[dict[str, Any]]] = {}
        self.scores: list[dict[str, Any]] = []
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., tuple[int, Any]]]] = [
            ("GET", re.compile(r"/api/public/health"), self.health),
            ("GET", re.compile(r"/api/public/projects"), self.projects),
            ("POST", re.compile(r"/api/public/v2/datasets"), self.create_dataset),
            ("GET", re.compile(r"/api/public/v2/datasets"), self.list_datasets),
            ("GET", re.compile(r"/api/public/v2/datasets/(?P<name>[^/]+)"), self.get_dataset),
            ("POST", re.compile(r"/api/public/dataset-items"), self.create_item),
            ("GET", re.compile(r"/api/public/dataset-items"), self.list_items),
            ("GET", re.compile(r"/api/public/dataset-items/(?P<id>[^/]+)"), self.get_item),
            ("POST", re.compile(r"/api/public/v2/prompts"), self.create_prompt),
            ("GET", re.compile(r"/api/public/v2/prompts"), self.list_prompts),
            ("GET", re.compile(r"/api/public/v2/prompts/(?P<name>[^/]+)"), self.get_prompt),
            ("PATCH", re.compile(r"/api/public/v2/prompts/(?P<name>[^/]+)/versions/(?P<v>\d+)"), self.label_prompt),
            ("POST", re.compile(r"/api/public/scores"), self.create_scores),
        ]

    def answer(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        for route_method, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if route_method == method and match:
                params = {k: unquote(v) for k, v in match.groupdict().items()}
                return handler(query=query, body=body, **params)
        return 404, {"message": f"LangfuseReceiver does not model {method} {path}; add a route in RestFake"}

    def health(self, **_: Any) -> tuple[int, Any]:
        return 200, {"status": "OK", "version": "receiver"}

    def projects(self, **_: Any) -> tuple[int, Any]:
        org = {"id": "receiver-org", "name": "receiver"}
        return 200, {"data": [{"id": PROJECT_ID, "name": "receiver", "organization": org, "metadata": {}}]}

    def create_dataset(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        name = body["name"]
        old = self.datasets.get(name, {"id": uuid.uuid4().hex, "createdAt": _now()})
        self.datasets[name] = {
            **old,
            "name": name,
            "description": body.get("description"),
            "metadata": body.get("metadata"),
            "projectId": PROJECT_ID,
            "updatedAt": _now(),
        }
        return 200, self.datasets[name]

    def list_datasets(self, query: dict[str, str], **_: Any) -> tuple[int, Any]:
        return 200, _page(list(self.datasets.values()), query)

    def get_dataset(self, name: str, **_: Any) -> tuple[int, Any]:
        if name not in self.datasets:
            return 404, {"message": f"Dataset {name} not found"}
        return 200, self.datasets[name]

    def create_item(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        dataset = self.datasets.get(body["datasetName"])
        if dataset is None:
            return 404, {"message": f"Dataset {body['datasetName']} not found"}
        item_id = body.get("id") or uuid.uuid4().hex
        self.items[item_id] = {
            "id": item_id,
            "status": body.get("status") or "ACTIVE",
            "input": body.get("input"),
            "expectedOutput": body.get("expectedOutput"),
            "metadata": body.get("metadata"),
            "sourceTraceId": body.get("sourceTraceId"),
            "sourceObservationId": body.get("sourceObservationId"),
            "datasetId": dataset["id"],
            "datasetName": dataset["name"],
            "createdAt": self.items.get(item_id, {}).get("createdAt", _now()),
            "updatedAt": _now(),
            "mediaReferences": [],
        }
        return 200, self.items[item_id]

    def list_items(self, query: dict[str, str], **_: Any) -> tuple[int, Any]:
        name = query.get("datasetName")
        items = [item for item in self.items.values() if name is None or item["datasetName"] == name]
        return 200, _page(items, query)

    def get_item(self, id: str, **_: Any) -> tuple[int, Any]:
        if id not in self.items:
            return 404, {"message": f"Dataset item {id} not found"}
        return 200, self.items[id]

    def create_prompt(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        versions = self.prompts.setdefault(body["name"], [])
        labels = [*body.get("labels", []), "latest"]
        self._take_labels(versions, labels)
        prompt = {
            "type": body.get("type", "text"),
            "name": body["name"],
            "prompt": body["prompt"],
            "version": len(versions) + 1,
            "config": body.get("config") or {},
            "labels": labels,
            "tags": body.get("tags") or [],
            "commitMessage": body.get("commitMessage"),
        }
        versions.append(prompt)
        return 200, prompt

    def list_prompts(self, query: dict[str, str], **_: Any) -> tuple[int, Any]:
        """PromptMeta per prompt name (`name`, `label` and `tag` filter exactly, as the server's do)."""
        metas = []
        for name, versions in self.prompts.items():
            if "label" in query:
                versions = [p for p in versions if query["label"] in p["labels"]]
            if "tag" in query:
                versions = [p for p in versions if query["tag"] in p["tags"]]
            if not versions or query.get("name", name) != name:
                continue
            metas.append({"name": name, "type": versions[-1]["type"], "versions": [p["version"] for p in versions],
                          "labels": sorted({label for p in versions for label in p["labels"]}),
                          "tags": versions[-1]["tags"], "lastUpdatedAt": _now(), "lastConfig": versions[-1]["config"]})
        return 200, _page(metas, query)

    def get_prompt(self, name: str, query: dict[str, str], **_: Any) -> tuple[int, Any]:
        versions = self.prompts.get(name, [])
        if "version" in query:
            found = [p for p in versions if p["version"] == int(query["version"])]
        else:
            found = [p for p in versions if query.get("label", "production") in p["labels"]]
        if not found:
            return 404, {"message": f"Prompt not found: {name} {query}"}
        return 200, found[0]

    def label_prompt(self, name: str, v: str, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        versions = self.prompts.get(name, [])
        if not 1 <= int(v) <= len(versions):
            return 404, {"message": f"Prompt version not found: {name} v{v}"}
        self._take_labels(versions, body.get("newLabels", []))
        prompt = versions[int(v) - 1]
        prompt["labels"] = sorted({*prompt["labels"], *body.get("newLabels", [])})
        return 200, prompt

    @staticmethod
    def _take_labels(versions: list[dict[str, Any]], labels: list[str]) -> None:
        # Langfuse keeps each label on one version only, so a new holder takes it from the old one.
        for prompt in versions:
            prompt["labels"] = [label for label in prompt["labels"] if label not in labels]

    def create_scores(self, body: Any, **_: Any) -> tuple[int, Any]:
        self.scores.extend(body if isinstance(body, list) else [body])
        return 202, {"message": "Accepted"}


# --- HTTP server -------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:
        self.server.receiver._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the receiver records requests itself; stderr noise would hide the SDK's own warnings


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: "LangfuseReceiver"


class LangfuseReceiver:
    """A real HTTP server on 127.0.0.1 (free port, own thread) that records what the Langfuse SDK sends."""

    def __init__(self) -> None:
        self.rest = RestFake()
        self._spans: list[dict[str, Any]] = []
        self._requests: list[dict[str, Any]] = []
        self._failure: tuple[int, float | None] | None = None
        self._fail_after: tuple[int, int] | None = None  # (requests still answered, then this status)
        self._changed = threading.Condition()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self
        # A short poll interval keeps close() at ~50 ms instead of the default 0.5 s.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def spans(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self._spans)

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self._requests)

    def env(self, public_key: str = "pk-lf-receiver", secret_key: str = "sk-lf-receiver") -> dict[str, str]:
        """Environment that points a fresh Langfuse client at this receiver."""
        return {
            "LANGFUSE_BASE_URL": self.url,
            "LANGFUSE_PUBLIC_KEY": public_key,
            "LANGFUSE_SECRET_KEY": secret_key,
            "LANGFUSE_TRACING_ENABLED": "true",
        }

    def fail_with(self, status: int | None, retry_after: float | None = None) -> None:
        """Answer every request with `status` (e.g. 401, 503) and a JSON error body; None restores normal service.

        `retry_after` adds a Retry-After header, which the OTLP exporter honours instead of its 1, 2, 4 s backoff.
        """
        self._failure = None if status is None else (status, retry_after)

    def fail_after(self, n: int, status: int) -> None:
        """Answer the next `n` requests normally, then every later one with `status`: a server failing midway."""
        with self._changed:
            self._fail_after = (n, status)

    def wait_for_spans(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least `n` spans arrived; return them all, or fail the test naming what did arrive."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._spans) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [span["name"] for span in self._spans]
                    raise AssertionError(f"expected {n} spans within {timeout}s, got {len(names)}: {names}")
                self._changed.wait(left)
            return list(self._spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "LangfuseReceiver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        body = _decompress(raw, handler.headers.get("Content-Encoding", "").lower())
        is_otlp = parts.path == OTLP_PATH
        record = {
            "method": handler.command,
            "path": parts.path,
            "query": {k: v[-1] for k, v in parse_qs(parts.query).items()},
            "headers": _redacted(dict(handler.headers.items())),
            "body": None if is_otlp else _json_body(body),
        }
        self._count_down()
        if self._failure is not None:
            status, headers, payload = _failure_reply(*self._failure)
        elif is_otlp:
            status, headers, payload = self._accept_spans(body, handler.headers.get("Content-Type", ""))
        else:
            status, headers, payload = self._rest_reply(record)
        with self._changed:
            self._requests.append({**record, "status": status})
            self._changed.notify_all()
        _respond(handler, status, headers, payload)

    def _count_down(self) -> None:
        with self._changed:
            if self._fail_after is not None:
                left, status = self._fail_after
                self._fail_after = (left - 1, status) if left > 0 else None
                if left <= 0:
                    self._failure = (status, None)

    def _accept_spans(self, body: bytes, content_type: str) -> tuple[int, dict[str, str], bytes]:
        spans = decode_otlp(body, content_type)
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()
        return 200, {"Content-Type": "application/x-protobuf"}, ExportTraceServiceResponse().SerializeToString()

    def _rest_reply(self, record: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        with self._changed:
            status, answer = self.rest.answer(record["method"], record["path"], record["query"], record["body"])
        return status, {"Content-Type": "application/json"}, json.dumps(answer).encode()


def _failure_reply(status: int, retry_after: float | None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return status, headers, json.dumps({"message": f"LangfuseReceiver simulates HTTP {status}"}).encode()


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None  # a binary upload; only its headers are worth recording


def _redacted(headers: dict[str, str]) -> dict[str, str]:
    return {k: "REDACTED" if k.lower() == "authorization" else v for k, v in headers.items()}


def _respond(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], payload: bytes) -> None:
    handler.send_response(status)
    for key, value in {"Content-Type": "application/json", **headers}.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


@contextmanager
def langfuse_client(receiver: LangfuseReceiver, **kwargs: Any) -> Iterator[Any]:
    """A fresh `langfuse.Langfuse` wired to `receiver` (env set for the block), fully torn down afterwards.

    The SDK keeps one client per public key per process and registers its span processor on the *global*
    OpenTelemetry TracerProvider, where `LangfuseResourceManager.reset()` does not remove it; so the client gets
    a private TracerProvider here and both are shut down on exit. `CallbackHandler()` inside the block finds it.
    """
    from langfuse import Langfuse
    from langfuse._client.resource_manager import LangfuseResourceManager
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    saved = {key: os.environ.get(key) for key in receiver.env()}
    os.environ.update(receiver.env())
    LangfuseResourceManager.reset()
    try:
        yield Langfuse(tracer_provider=provider, **kwargs)
    finally:
        LangfuseResourceManager.reset()
        provider.shutdown()
        _restore_env(saved)


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
