"""The prompt node's logic: each agent's current template, from the store when one is active there, else the base file.

Base templates are registered in the store on first use, so every captured call's template id names a stored row.
"""

from __future__ import annotations

from typing import Any

from prompts.base import BaseTemplate, base_templates


def current_templates(store: Any | None, agents: list[str]) -> dict[str, dict[str, str]]:
    """`{agent: {"id", "text"}}` for each agent: the store's active template, or the shipped base one."""
    bases = base_templates()
    chosen = {}
    for agent in agents:
        active = store.active_template(agent) if store is not None else None
        if active is None and store is not None and agent in bases:
            active = _register_base(store, bases[agent])
        chosen[agent] = {"id": active.id, "text": active.text} if active else _as_dict(bases[agent])
    return chosen


def _register_base(store: Any, base: BaseTemplate):
    from app.capture.records import TemplateRecord

    version = int(base.id.rsplit("@", 1)[-1]) if "@" in base.id else 1
    record = TemplateRecord(id=base.id, agent=base.agent, version=version, parent_id=None, origin="base",
                            text=base.text, active=True)
    store.upsert_template(record)
    return record


def _as_dict(base: BaseTemplate) -> dict[str, str]:
    return {"id": base.id, "text": base.text}
