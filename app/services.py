"""Services: what a run needs, built once from settings: the capture store, the Router, chat models per route."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.routing.router import Router


@dataclass
class Services:
    settings: Settings
    router: Router
    store: Any | None = None  # CaptureStore

    @classmethod
    def from_settings(cls, settings: Settings, capture: bool = True) -> "Services":
        """Open the store first (a bad path fails here, before any model loads), then the Router over it."""
        store = None
        if capture:
            from app.capture.redact import configure_patterns
            from app.capture.store import CaptureStore

            configure_patterns(settings.capture.redact_patterns)
            store = CaptureStore.open(settings.store.url)
        return cls(settings=settings, router=Router(settings, store), store=store)

    def chat_model(self, route: str, template_id: str | None = None, run_id: str | None = None,
                   max_tokens: int | None = None):
        """A LangChain chat model bound to `route`, carrying the template and run ids on every call."""
        from app.chat_model import RouterChatModel

        wf = self.settings.workflow
        return RouterChatModel(router=self.router, route=route, template_id=template_id, run_id=run_id,
                               max_tokens=max_tokens or wf.max_tokens, temperature=wf.temperature)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
