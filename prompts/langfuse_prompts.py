"""Langfuse prompt management: each route's live templates as the versions of one Langfuse text prompt, and back.

A route's prompt is named `slmswap/<route>` (a Langfuse folder) and tagged `slmswap`. Push gives the route's best
template the label `production` and its other live templates `candidate`, `candidate-2`, … (a Langfuse label sits
on one version only, so several candidates need several labels). Every version's config carries the template id,
route and origin. A template already on Langfuse as a version with the same text is relabelled, never uploaded
again, so a second push changes nothing. Langfuse's API cannot take a label off a version: when a route has fewer
candidates than at the last push, the labels left over are moved onto the `production` version, so no retired
template keeps one.

Pull fetches every labelled version first (`production`, `candidate*`) and only then adds them to the store, as
origin `langfuse` (a text already in the store is found by its content hash and not added twice). A Langfuse that
fails midway therefore adds nothing.

    report = push_prompts(settings, store, route=None)      # every route with live templates
    report = pull_prompts(settings, store, route="retrieval")
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.config import Settings
from app.errors import UsageError
from app.langfuse_rest import LangfuseNotFound, rest_client, rest_errors

FOLDER = "slmswap/"
TAG = "slmswap"
PRODUCTION = "production"
CANDIDATE = re.compile(r"candidate(-\d+)?")


class TemplateLike(Protocol):
    """What push reads of a template row (prompts/store.py's TemplateRecord has it)."""

    id: str
    text: str
    origin: str


def prompt_name(route: str) -> str:
    """The Langfuse prompt of a route. Langfuse refuses '|' in a name.

    >>> prompt_name("retrieval")
    'slmswap/retrieval'
    """
    if not route or "|" in route:
        raise UsageError(f"route {route!r} cannot name a Langfuse prompt (empty, or holds '|')")
    return FOLDER + route


def candidate_label(rank: int) -> str:
    """`candidate` for the first non-best live template, `candidate-2` for the second, …"""
    return "candidate" if rank == 1 else f"candidate-{rank}"


def is_pulled_label(label: str) -> bool:
    return label == PRODUCTION or CANDIDATE.fullmatch(label) is not None


# ---- push: what to send (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteVersion:
    version: int
    text: str
    labels: tuple[str, ...]
    config: dict[str, Any]


@dataclass(frozen=True)
class Step:
    """One request of a push: create a version of `template`, or add labels to an existing `version`."""

    template: TemplateLike
    labels: tuple[str, ...]
    version: int | None = None  # None: create

    @property
    def creates(self) -> bool:
        return self.version is None


def wanted_labels(best: TemplateLike, live: Sequence[TemplateLike]) -> list[tuple[TemplateLike, tuple[str, ...]]]:
    """`production` for the best, `candidate`, `candidate-2`, … for the other live templates in the order given."""
    others = [t for t in live if t.id != best.id]
    return [(best, (PRODUCTION,)), *((t, (candidate_label(n),)) for n, t in enumerate(others, start=1))]


def push_steps(route: str, best: TemplateLike, live: Sequence[TemplateLike],
               remote: Sequence[RemoteVersion]) -> list[Step]:
    """The creates and relabels that make the route's Langfuse prompt match its live templates; [] when it does."""
    wanted = wanted_labels(best, live)
    given = {label for _, labels in wanted for label in labels}
    leftover = sorted({label for v in remote for label in v.labels if is_pulled_label(label)} - given)
    steps = []
    for template, labels in wanted:
        if template.id == best.id:
            labels = (*labels, *leftover)
        same = [v for v in remote if v.text == template.text]
        if not same:
            steps.append(Step(template, labels))
            continue
        newest = max(same, key=lambda v: v.version)
        if set(labels) - set(newest.labels):
            steps.append(Step(template, labels, newest.version))
    return steps


def version_config(route: str, template: TemplateLike) -> dict[str, Any]:
    return {"template_id": template.id, "route": route, "origin": template.origin, "source": "slmswap"}


# ---- push: against Langfuse ------------------------------------------------------------------------------

@dataclass
class PushReport:
    host: str
    created: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)  # (route, template id, labels)
    relabelled: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # routes already in sync


def push_route(langfuse: Any, host: str, route: str, best: TemplateLike, live: Sequence[TemplateLike],
               report: PushReport) -> None:
    """Bring one route's Langfuse prompt in line with its templates (reads its versions, then sends the steps)."""
    name = prompt_name(route)
    remote = remote_versions(langfuse, host, name)
    steps = push_steps(route, best, live, remote)
    after = "run push again: what was sent is found on Langfuse and not sent twice"
    for step in steps:
        with rest_errors(host, f"pushing template {step.template.id} to prompt {name!r}", after):
            if step.creates:
                langfuse.create_prompt(name=name, prompt=step.template.text, labels=list(step.labels), tags=[TAG],
                                       type="text", config=version_config(route, step.template),
                                       commit_message=f"slmswap: {step.template.id}")
            else:
                langfuse.update_prompt(name=name, version=step.version, new_labels=list(step.labels))
        (report.created if step.creates else report.relabelled).append((route, step.template.id, step.labels))
    if not steps:
        report.unchanged.append(route)


def remote_versions(langfuse: Any, host: str, name: str) -> list[RemoteVersion]:
    """Every version of prompt `name` on Langfuse ([] when there is none yet)."""
    with rest_errors(host, f"listing versions of prompt {name!r}"):
        metas = langfuse.api.prompts.list(name=name).data
    versions = sorted({v for meta in metas if meta.name == name for v in meta.versions})
    found = []
    for version in versions:
        prompt = _get(langfuse, host, name, version=version)
        if isinstance(prompt.prompt, str):  # a text prompt (a chat prompt's is a list of messages)
            found.append(RemoteVersion(version, prompt.prompt, tuple(prompt.labels), _config(prompt)))
    return found


def _get(langfuse: Any, host: str, name: str, **which: Any) -> Any:
    shown = ", ".join(f"{k} {v}" for k, v in which.items())
    with rest_errors(host, f"reading prompt {name!r} ({shown})"):
        # cache_ttl_seconds=0: always the server's state, never the SDK's process cache
        return langfuse.get_prompt(name, cache_ttl_seconds=0, max_retries=0, **which)


# ---- pull: fetch everything first ------------------------------------------------------------------------

@dataclass(frozen=True)
class PulledPrompt:
    route: str
    name: str
    version: int
    labels: tuple[str, ...]
    text: str
    config: dict[str, Any]

    @property
    def template_id(self) -> str | None:
        value = self.config.get("template_id")
        return value if isinstance(value, str) else None


def fetch_prompts(langfuse: Any, host: str, route: str | None = None) -> list[PulledPrompt]:
    """Every `production` / `candidate*` version of the routes' prompts (one route, or every `slmswap/` prompt)."""
    names = [prompt_name(route)] if route else _all_names(langfuse, host)
    pulled = []
    for name in names:
        with rest_errors(host, f"listing prompt {name!r}"):
            metas = [m for m in langfuse.api.prompts.list(name=name).data if m.name == name]
        if route and not metas:
            raise LangfuseNotFound(f"Langfuse at {host} has no prompt {name!r}; push it first with "
                                   f"`slmswap templates push --route {route}`")
        seen: set[int] = set()
        for label in sorted({label for m in metas for label in m.labels if is_pulled_label(label)}):
            prompt = _get(langfuse, host, name, label=label)
            if not isinstance(prompt.prompt, str) or prompt.version in seen:
                continue
            seen.add(prompt.version)
            config = _config(prompt)
            pulled.append(PulledPrompt(_route_of(name, config), name, prompt.version, tuple(prompt.labels),
                                       prompt.prompt, config))
    return pulled


def _config(prompt: Any) -> dict[str, Any]:
    return dict(prompt.config) if isinstance(prompt.config, dict) else {}


def _all_names(langfuse: Any, host: str) -> list[str]:
    names, page = [], 1
    while True:
        with rest_errors(host, f"listing prompts (page {page})"):
            listing = langfuse.api.prompts.list(page=page, limit=100)
        names += [m.name for m in listing.data if m.name.startswith(FOLDER)]
        if listing.meta.total_pages <= page:
            return sorted(set(names))
        page += 1


def _route_of(name: str, config: dict[str, Any]) -> str:
    route = config.get("route")
    return route if isinstance(route, str) and route else name[len(FOLDER):]


# ---- the template store (prompts/store.py, helper H6's API) ----------------------------------------------

class TemplateStore(Protocol):
    """The store functions this module uses, as prompts/store.py defines them."""

    def live_templates(self, store: Any, route: str) -> list[Any]: ...

    def best(self, store: Any, route: str) -> Any | None: ...

    def add_template(self, store: Any, route: str, text: str, *, parent: str | None = None,
                     origin: str = "manual") -> Any: ...


def _templates() -> Any:
    from prompts import store as templates

    return templates


def known_routes(settings: Settings, store: Any) -> list[str]:
    """Routes that may have templates: the shipped base templates' agents, the configured routes, and every route
    with a template row in the store."""
    from prompts.base import base_templates

    stored = {t.route for t in store.list_templates()}
    return sorted(set(base_templates()) | set(settings.routes) | stored)


def production_template(templates: Any, store: Any, route: str, live: Sequence[Any]) -> Any:
    """The route's best template; the oldest live one while none has enough trials to be best."""
    chosen = templates.best(store, route)
    return chosen if chosen is not None else live[0]


def push_prompts(settings: Settings, store: Any, route: str | None = None, *,
                 routes: Iterable[str] | None = None) -> PushReport:
    """Create or update the Langfuse prompt of `route` (or of each route in `routes`)."""
    templates = _templates()
    chosen = [route] if route else sorted(set(routes or ()))
    plans = []
    for name in chosen:
        templates.ensure_base(store, name)  # a route with a base file has its row before it is pushed
        live = list(templates.live_templates(store, name))
        if not live:
            if route:
                raise UsageError(f"route {route!r} has no live templates; see `slmswap templates list`")
            continue
        plans.append((name, production_template(templates, store, name, live), live))
    if not plans:
        raise UsageError("no route has live templates to push; see `slmswap templates list`")
    langfuse, host = rest_client(settings)
    report = PushReport(host)
    for name, best, live in plans:
        push_route(langfuse, host, name, best, live, report)
    return report


@dataclass
class PullReport:
    host: str
    added: list[tuple[str, str, int]] = field(default_factory=list)  # (route, new template id, Langfuse version)
    present: list[tuple[str, str, int]] = field(default_factory=list)  # already in the store (same content)


def pull_prompts(settings: Settings, store: Any, route: str | None = None) -> PullReport:
    """Import the labelled versions of the routes' Langfuse prompts as templates of origin `langfuse`."""
    langfuse, host = rest_client(settings)
    pulled = fetch_prompts(langfuse, host, route)  # everything fetched before anything is written
    return import_prompts(_templates(), store, pulled, host)


def import_prompts(templates: Any, store: Any, pulled: Sequence[PulledPrompt], host: str) -> PullReport:
    report = PullReport(host)
    for prompt in pulled:  # every text checked before the first row is written: one bad version adds nothing
        templates.variables(prompt.text)
    known = {p.route: {t.id: t for t in templates.live_templates(store, p.route)} for p in pulled}
    for prompt in pulled:
        same = [t for t in known[prompt.route].values() if t.text == prompt.text]
        if same:
            report.present.append((prompt.route, same[0].id, prompt.version))
            continue
        parent = prompt.template_id if prompt.template_id in known[prompt.route] else None
        record = templates.add_template(store, prompt.route, prompt.text, parent=parent, origin="langfuse")
        known[prompt.route][record.id] = record
        target = report.added if record.origin == "langfuse" else report.present
        target.append((prompt.route, record.id, prompt.version))
    return report
