"""Who is calling: the facts a call is captured under, built by the caller that knows them and passed beside the
request, never read from it (a proxy client could otherwise write its own run id, template id or source)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from app.capture.records import Source


@dataclass(frozen=True)
class CallContext:
    """`CallContext(route="retrieval", run_id=..., template_id="retrieval/base@1")` for a graph node;
    the proxy builds one from the request's route, its `user` / session header and its authenticated key."""

    route: str
    run_id: str | None = None
    agent: str | None = None  # defaults to the route
    template_id: str | None = None
    source: Source = "graph"
    sticky_key: str | None = None  # what keeps a conversation on one model during a rollout
    capture: bool = True
    caller: str | None = None  # the hash of the proxy key that authenticated the call

    @property
    def agent_name(self) -> str:
        return self.agent or self.route

    def but(self, **changes) -> CallContext:
        if all(getattr(self, k) == v for k, v in changes.items()):
            return self  # frozen: the same context serves (replace() is a measurable share of a proxy call)
        return replace(self, **changes)
