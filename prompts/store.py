"""Template store queries: add, find, render, select and retire a route's templates (rows of the capture store).

    record = add_template(store, "retrieval", "You retrieve. {{examples}}", origin="manual")
    chosen = sample(store, "retrieval", random.Random(run_id))   # Thompson sampling over the live templates
    text = render(chosen.text, {"examples": "User: ...\\nAnswer: ..."})

**Variables** are written `{{name}}` (white space inside allowed: `{{ examples }}`), and only `examples` and
`tools` exist. `{{tools}}` is never free text: it is filled from a request's tools (`render(..., tools=,
tool_choice=)`, `fill_tools`) with exactly the tool section a local backend would otherwise append, and a backend
appends none to a prompt that holds it: the one rule of both is `app.hermes.system_with_tools`.
The syntax cannot clash with the literal JSON the templates hold: JSON never has two opening braces in a row (an
object's first member is a quoted key, so `{` is followed by `"` or `}`), and `}}` alone, which nested JSON does
end with, is not a variable. A `{{word}}` naming anything else is rejected when the template is
added, naming it, so a typo never reaches a model as literal text. `tests/test_templates.py` checks every shipped
template renders to itself.

Templates are never edited in place: a new text is a new row (an identical text on the same route is found by its
content hash and returned instead). Outcome counts are moved by the capture store as calls are recorded.
"""

from __future__ import annotations

import logging
import random
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, get_args

from app import hermes
from app.capture.records import Origin, TemplateRecord, template_hash
from app.config import ProxyConfig, TemplatesConfig
from app.errors import UsageError
from app.toolplan import plan_tools
from prompts import select
from prompts.base import base_templates

log = logging.getLogger("slmswap.templates")

VARIABLES = ("examples", "tools")
_VARIABLE = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")
_ORIGINS = get_args(Origin)
_DEFAULTS = TemplatesConfig()


def variables(text: str) -> list[str]:
    """The variables a template uses, in order of first use; UsageError naming any unknown one."""
    names = list(dict.fromkeys(_VARIABLE.findall(text)))
    unknown = [name for name in names if name not in VARIABLES]
    if unknown:
        raise UsageError(f"unknown template variable {{{{{unknown[0]}}}}}; the variables are "
                         f"{', '.join('{{' + v + '}}' for v in VARIABLES)}")
    return names


def render(template_text: str, variables: Mapping[str, str] | None = None, *, tools: list[dict] | None = None,
           tool_choice: Any = None) -> str:
    """The template with its variables filled: `{{examples}}` from `variables`, `{{tools}}` from the request's
    `tools` and `tool_choice` (`tools_section`); a variable not given renders empty.

    >>> render('Answer as JSON: {"a": {"b": 1}}. {{ examples }}', {"examples": "User: hi"})
    'Answer as JSON: {"a": {"b": 1}}. User: hi'
    """
    given = dict(variables or {})
    if "tools" in given:
        raise UsageError("{{tools}} is filled from the request's tools, not from text: pass render(..., tools=, "
                         "tool_choice=)")
    if unknown := sorted(set(given) - set(VARIABLES)):
        raise UsageError(f"unknown template variable {unknown[0]!r}; the variables are {', '.join(VARIABLES)}")
    given["tools"] = tools_section(tools, tool_choice)

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in VARIABLES:
            raise UsageError(f"unknown template variable {{{{{name}}}}} in the template; the variables are "
                             f"{', '.join(VARIABLES)}")
        return given.get(name, "")

    return _VARIABLE.sub(fill, template_text)


def tools_section(tools: list[dict] | None, tool_choice: Any = None) -> str:
    """What `{{tools}}` stands for in a request with these OpenAI `tools` and `tool_choice`: the Hermes tool section
    of the functions the request lets the model call (`app.hermes.tools_section`), empty without tools."""
    return hermes.tools_section(plan_tools(tools, tool_choice).functions if tools else [])


def fill_tools(template_text: str, tools: list[dict] | None, tool_choice: Any = None) -> str:
    """The template with only `{{tools}}` filled (any white-space form; `{{examples}}` and JSON stay as written),
    for a caller that fills `{{examples}}` its own way (`bench/context_engineering.py`)."""
    section = tools_section(tools, tool_choice)
    return _VARIABLE.sub(lambda m: section if m.group(1) == "tools" else m.group(0), template_text)


def add_template(store: Any, route: str, text: str, *, parent: str | None = None, origin: str = "manual",
                 template_id: str | None = None) -> TemplateRecord:
    """Add a live template to a route, or return the route's existing one with the same text.

    `origin` is base, evolved, manual or langfuse; `parent` the id of the template it was derived from. The id is
    `<route>/<origin>-<first 10 hex of the content hash>` unless given.
    """
    if not route:
        raise UsageError("a template belongs to a route; give its name")
    if origin not in _ORIGINS:
        raise UsageError(f"a template's origin is one of {', '.join(_ORIGINS)}, not {origin!r}")
    if not text.strip():
        raise UsageError(f"the new template for route {route!r} is empty; give it the system prompt's text")
    variables(text)
    if parent is not None and store.get_template(parent) is None:
        raise UsageError(f"parent template {parent!r} does not exist; see `slmswap templates list`")
    digest = template_hash(text)
    record = TemplateRecord(id=template_id or f"{route}/{origin}-{digest[:10]}", route=route, text=text,
                            origin=origin, parent_id=parent, content_hash=digest)  # type: ignore[arg-type]
    return store.add_template(record)


def live_templates(store: Any, route: str) -> list[TemplateRecord]:
    """The route's live templates, oldest first."""
    return store.list_templates(route, status="live")


def get_template(store: Any, template_id: str) -> TemplateRecord:
    """The template with this id; UsageError naming the fix when there is none."""
    found = store.get_template(template_id)
    if found is None:
        raise UsageError(f"no template has id {template_id!r}; see `slmswap templates list`")
    return found


def retire(store: Any, template_id: str, reason: str) -> TemplateRecord:
    """Stop selecting a template (its row and counts stay)."""
    get_template(store, template_id)
    return store.set_template_status(template_id, "retired", reason)


def best(store: Any, route: str, min_trials: int | None = None) -> TemplateRecord | None:
    """The live template with the highest posterior mean among those with `min_trials` outcomes (default: the
    `[templates] min_trials` default), or None while none has enough."""
    live = live_templates(store, route)
    chosen = select.best(_arms(live), _DEFAULTS.min_trials if min_trials is None else min_trials)
    return next((t for t in live if t.id == chosen), None)


def sample(store: Any, route: str, rng: random.Random) -> TemplateRecord | None:
    """One Thompson-sampling pick among the route's live templates, on Beta(successes + 1, failures + 1)."""
    live = live_templates(store, route)
    chosen = select.thompson(_arms(live), rng)
    return next((t for t in live if t.id == chosen), None)


def retire_losers(store: Any, route: str, rng: random.Random,
                  config: TemplatesConfig = _DEFAULTS) -> list[TemplateRecord]:
    """Retire the route's live templates whose probability of being best (seeded Monte Carlo) is under
    `config.retire_below` once they have `config.min_trials` outcomes; returns the retired rows."""
    live = live_templates(store, route)
    losers = select.to_retire(_arms(live), config.min_trials, config.retire_below, rng, config.draws)
    return [retire(store, template_id, f"probability of being best {chance:.3f} < {config.retire_below} "
                                       f"after {_trials(live, template_id)} trials")
            for template_id, chance in sorted(losers.items())]


def ensure_base(store: Any, route: str) -> TemplateRecord | None:
    """The route's shipped base template as a stored row (added on first use); None for a route without one."""
    base = base_templates().get(route)
    if base is None:
        return None
    found = store.template_by_hash(route, template_hash(base.text))
    return found or add_template(store, route, base.text, origin="base", template_id=base.id)


def choose(store: Any, route: str, rng: random.Random, config: TemplatesConfig = _DEFAULTS) -> TemplateRecord | None:
    """What a run uses on a route: retire the losers, then sample among the live templates (the base file's
    template is registered first, so a route with a base file always has a row to sample)."""
    base = ensure_base(store, route)
    retire_losers(store, route, rng, config)
    return sample(store, route, rng) or base


def _arms(templates: list[TemplateRecord]) -> list[select.Arm]:
    return [select.Arm(t.id, max(t.successes, 0), max(t.failures, 0)) for t in templates]


def _trials(templates: list[TemplateRecord], template_id: str) -> int:
    return next(t.trials for t in templates if t.id == template_id)


class ProxyPrompts:
    """The proxy's side of templates (`app.server.routes.Prompts`): a client owns its system prompt, so each new
    system prompt of a route becomes a template, found again by its fingerprint (the content hash of the normalised
    text); the route's first one is its base. With `managed_prompt` the selected template replaces it.

    A route registers at most `max_prompts` templates this way (`[proxy] max_prompts_per_route`); the system
    prompts it sees past that count on the route's one overflow row (`<route>/overflow`: retired, so never
    selected), logged once per route, and the fingerprints this process remembers are bounded too (`CACHE_SIZE`,
    least recently used first out). Worker processes check the bound each on its own, so N workers may pass it by
    at most N - 1 rows."""

    CACHE_SIZE = 4096

    def __init__(self, store: Any, rng: random.Random | None = None,
                 max_prompts: int = ProxyConfig().max_prompts_per_route):
        if max_prompts < 1:
            raise UsageError(f"[proxy] max_prompts_per_route must be at least 1, not {max_prompts}")
        self.store, self.max_prompts = store, max_prompts
        self.rng = rng or random.Random()
        self._known: OrderedDict[tuple[str, str], str | None] = OrderedDict()  # (route, fingerprint) -> template id
        self._full: set[str] = set()  # routes at the bound (rows are never deleted: a full route stays full)

    def for_proxy(self, route: str, system: str | None, managed: bool, tools: list[dict] | None = None,
                  tool_choice: Any = None) -> tuple[str | None, str | None]:
        """(the template id the call counts on, the system text to send instead, or None to keep the client's)."""
        own = self.fingerprint(route, system) if system and system.strip() else None
        if not managed:
            return own, None
        chosen = sample(self.store, route, self.rng)
        if chosen is None:
            return own, None
        return chosen.id, render(chosen.text, tools=tools, tool_choice=tool_choice)

    def known(self, route: str, system: str | None, managed: bool) -> tuple[str | None, str | None] | None:
        """`for_proxy`'s answer when no store access is needed (the request path's fast case), else None."""
        if managed:
            return None
        if not system or not system.strip():
            return None, None
        key = (route, template_hash(system))
        try:  # each OrderedDict operation is atomic; a worker thread may evict the key between them
            template_id = self._known[key]
            self._known.move_to_end(key)
        except KeyError:
            return None
        return template_id, None

    def fingerprint(self, route: str, system: str) -> str | None:
        """The id of the template this system prompt is (added on first sight, or the route's overflow row past
        the bound); None for a text holding an unknown `{{variable}}`, which could never be rendered, so its calls
        go uncounted."""
        key = (route, template_hash(system))
        if key in self._known:
            self._known.move_to_end(key)
            return self._known[key]
        found = self.store.template_by_hash(*key)
        template_id = found.id if found is not None else self._register(route, system)
        self._known[key] = template_id
        if len(self._known) > self.CACHE_SIZE:
            self._known.popitem(last=False)
        return template_id

    def _register(self, route: str, system: str) -> str | None:
        try:
            variables(system)
        except UsageError:
            return None
        if route not in self._full:
            registered = [t for t in self.store.list_templates(route) if t.id != overflow_id(route)]
            if len(registered) < self.max_prompts:
                return add_template(self.store, route, system, origin="manual" if registered else "base").id
            self._full.add(route)
            log.warning("route %r holds %d templates, [proxy] max_prompts_per_route; calls with system prompts it has "
                        "not seen now count on %s", route, len(registered), overflow_id(route))
        return self._overflow(route).id

    def _overflow(self, route: str) -> TemplateRecord:
        found = self.store.get_template(overflow_id(route))
        if found is not None:
            return found
        text = (f"(The system prompts route {route} saw past [proxy] max_prompts_per_route; their calls count on "
                "this row, which is never sent to a model.)")
        return self.store.add_template(TemplateRecord(
            id=overflow_id(route), route=route, text=text, origin="manual", status="retired",
            retired_reason="overflow: counts the calls of client system prompts past [proxy] max_prompts_per_route"))


def overflow_id(route: str) -> str:
    """The id of the row a route's client system prompts past the bound count on."""
    return f"{route}/overflow"
