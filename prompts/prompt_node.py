"""The prompt node's logic: for each agent, the template this run uses, picked by Thompson sampling among the
route's live templates in the store (`prompts/store.py`), or the shipped base file when there is no store.

Base templates are registered in the store on first use, so every captured call's template id names a stored row
and its outcomes move that row's counts.
"""

from __future__ import annotations

import random
from typing import Any

from app.config import TemplatesConfig
from prompts import store as template_store
from prompts.base import base_templates


def current_templates(store: Any | None, agents: list[str], *, rng: random.Random | None = None,
                      config: TemplatesConfig | None = None) -> dict[str, dict[str, str]]:
    """`{agent: {"id", "text"}}` for each agent, sampled once per run (pass `random.Random(run_id)` to make the
    draw repeatable). The text has its variables rendered (empty until dynamic examples fill `{{examples}}`)."""
    rng = rng or random.Random()
    config = config or TemplatesConfig()
    bases = base_templates()
    chosen = {}
    for agent in agents:
        record = template_store.choose(store, agent, rng, config) if store is not None else None
        if record is not None:
            chosen[agent] = {"id": record.id, "text": template_store.render(record.text)}
        elif agent in bases:
            chosen[agent] = {"id": bases[agent].id, "text": template_store.render(bases[agent].text)}
    return chosen
