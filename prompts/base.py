"""Base templates: the versioned system prompts that ship as files in `prompts/templates/`, one per agent.

Each file opens with a front matter block (`id`, `agent`; nothing else) whose `id` is stable across releases:
`<agent>/base@<version>`. A new wording gets a new version, so captured calls always name the text they used.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from app.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"


class BaseTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    agent: str
    text: str


def parse_template(source: str, origin: str = "<string>") -> BaseTemplate:
    """Parse `---\\nid: ...\\nagent: ...\\n---\\n<text>`; unknown keys are errors."""
    head, sep, body = source.partition("\n---\n")
    if not source.startswith("---\n") or not sep:
        raise ConfigError(f"{origin}: a template starts with a '---' front matter block (id, agent) closed by '---'")
    fields = {}
    for number, line in enumerate(head.splitlines()[1:], start=2):
        key, colon, value = line.partition(":")
        if not colon:
            raise ConfigError(f"{origin}:{number}: expected 'key: value' in the front matter, got {line!r}")
        fields[key.strip()] = value.strip()
    try:
        return BaseTemplate(text=body.strip(), **fields)
    except Exception as exc:
        raise ConfigError(f"{origin}: bad front matter ({exc}); it takes exactly: id, agent") from None


@cache
def base_templates() -> dict[str, BaseTemplate]:
    """Every shipped template, by agent."""
    found = (parse_template(p.read_text(encoding="utf-8"), str(p)) for p in sorted(TEMPLATE_DIR.glob("*.md")))
    return {t.agent: t for t in found}
