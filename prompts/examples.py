"""Dynamic examples (dynamic in-context learning): per request, the k captured successful calls of the route most
similar to the current input fill the template's `{{examples}}`.

Similarity is BM25 over the user's words (bm25s: sparse matrices, no model download). An index is built per route
on first use and rebuilt only when calls were added since (a rebuild over a few thousand short texts takes
milliseconds, cheaper than keeping a mutable index consistent).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prompts.evolve import Example, example_of, fill_examples, may_teach, observe


class ExampleIndex:
    """Examples of one route, searchable by the user's words."""

    def __init__(self, examples: Iterable[Example] = ()) -> None:
        self._examples: list[Example] = []
        self._ids: set[str] = set()
        self._retriever: Any = None
        self._indexed = 0
        self._lock = threading.Lock()
        self.add(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def add(self, examples: Iterable[Example]) -> int:
        """Add examples (an id already held is skipped); the index is rebuilt on the next search. Returns how many."""
        added = 0
        with self._lock:
            for e in examples:
                if e.call_id and e.call_id in self._ids:
                    continue
                self._ids.add(e.call_id)
                self._examples.append(e)
                added += 1
        return added

    def nearest(self, query: str, k: int, exclude: str | None = None) -> list[Example]:
        """The k examples whose user text is most like `query`, best first (fewer when fewer match or exist);
        `exclude` names a call id not to return (the request's own, when it is in the index)."""
        import bm25s

        with self._lock:
            if k <= 0 or not self._examples:
                return []
            if self._indexed != len(self._examples):
                self._retriever = bm25s.BM25()
                self._retriever.index(_tokens([e.user for e in self._examples]), show_progress=False)
                self._indexed = len(self._examples)
            found, scores = self._retriever.retrieve(_tokens([query]), k=min(k + 1, len(self._examples)),
                                                     show_progress=False)
            hits = [self._examples[i] for i, s in zip(found[0], scores[0]) if s > 0]
            return [e for e in hits if not exclude or e.call_id != exclude][:k]


def _tokens(texts: list[str]) -> Any:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


class DynamicExamples:
    """Per-route indexes over a capture store's successful calls, loaded lazily and refreshed cheaply: a refresh
    reads only the newest calls and adds those not yet held."""

    def __init__(self, store: Any, k: int = 2, scan: int = 2000) -> None:
        self.store, self.k, self.scan = store, k, scan
        self._indexes: dict[str, ExampleIndex] = {}

    def index(self, route: str) -> ExampleIndex:
        if route not in self._indexes:
            self._indexes[route] = ExampleIndex()
            self.refresh(route)
        return self._indexes[route]

    def refresh(self, route: str) -> int:
        """Add the route's successful calls captured since the last refresh; returns how many were added."""
        index = self._indexes.setdefault(route, ExampleIndex())
        calls = self.store.list_calls(agent=route, limit=self.scan) if len(index) == 0 else \
            self.store.list_calls(agent=route, limit=max(50, self.scan // 10))
        return index.add(successful_examples(c for c in reversed(calls) if c.route == route))

    def fill(self, route: str, text: str, query: str) -> str:
        """The template text with `{{examples}}` filled by the k calls most like `query`."""
        return fill_examples(text, self.index(route).nearest(query, self.k))


def as_turns(examples: Iterable[Example]) -> list[dict[str, str]]:
    """Examples as earlier conversation turns (user, then the assistant's answer), the form a small model copies
    most readily: put them between the system message and the current user turn."""
    return [turn for e in examples for turn in ({"role": "user", "content": e.user},
                                                {"role": "assistant", "content": e.answer})]


def with_example_turns(messages: list[dict[str, Any]], examples: Iterable[Example]) -> list[dict[str, Any]]:
    """The messages with the examples as turns just before the first user message."""
    at = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages))
    return [*messages[:at], *as_turns(examples), *messages[at:]]


def successful_examples(records: Iterable[Any]) -> list[Example]:
    """Examples from the captured calls that may teach (no eval, no held-out call) and were right."""
    found = []
    for r in records:
        if not (may_teach(r) and r.valid):
            continue
        obs = observe(r)
        if not obs.failed and (e := example_of(obs)) is not None:
            found.append(e)
    return found
