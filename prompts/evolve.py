"""Template evolution: from the error patterns of a route's captured calls, a child template with one corrective
rule per dominant pattern (phrased with its evidence) and up to k worked examples from the route's successful
calls; with a teacher, a reflective rewrite (the teacher reads the failures and the template, as GEPA does).

Pure functions over plain data: `observe` judges one captured call, `evolve` writes the child text (or says why
there is none). Which calls may teach: never an eval call (its output is a measurement) and never a held-out one
(`app.holdout`), so evaluation never scores a template on calls it learned from.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app import hermes
from app.detectors import Finding, detect
from app.errors import UsageError
from app.holdout import is_held_out

EXAMPLES_VAR, TOOLS_VAR = "{{examples}}", "{{tools}}"
RULES_HEADING = "Rules (learned from failing calls):"
EXAMPLES_HEADING = "Worked examples:"
MAX_RULES = 8
GENERALISE_AT = 3
# The evolver's own pattern: a quarter asked for, one month of it queried ("Q4" → month = '2025-10').
_QUARTER = re.compile(r"\bQ([1-4])\b", re.I)
_MONTH_EQ = re.compile(r"month\s*=\s*'(\d{4})-(\d{2})'", re.I)


@dataclass(frozen=True)
class Observation:
    """One captured call, judged: its findings (empty when the output is right as far as the detectors see)."""

    call_id: str
    request: dict[str, Any]
    output: dict[str, Any]
    findings: tuple[Finding, ...]

    @property
    def failed(self) -> bool:
        return bool(self.findings)


@dataclass(frozen=True)
class Rule:
    pattern: str  # a finding type, or "quarter_as_month"
    text: str
    calls: int  # failing calls that showed the pattern


@dataclass(frozen=True)
class Example:
    """A worked example: the user's request and the answer the model should give (Hermes text for calls)."""

    user: str
    answer: str
    call_id: str = ""


@dataclass(frozen=True)
class Evolution:
    text: str | None  # None: nothing to write
    reason: str
    rules: tuple[Rule, ...] = ()
    examples: tuple[Example, ...] = ()
    failures: int = 0
    observed: int = 0
    candidates: tuple[str, ...] = field(default=())  # reflective rewrites (a teacher's), beside `text`


# ---- judging captured calls -------------------------------------------------------------------------------

def may_teach(record: Any) -> bool:
    """Whether a captured call may be learned from: it has an output, is not an eval's and is not held out."""
    return record.response is not None and getattr(record, "source", "graph") != "eval" and not is_held_out(record.id)


def observe(record: Any, template_text: str | None = None) -> Observation:
    """A CallRecord judged by the detectors (on the model's own words when the Router repaired them)."""
    output = dict(record.response or {})
    if isinstance(output.get("raw"), dict):
        output |= output["raw"]
    try:
        findings = detect(output, record.request, template_text)
    except UsageError:
        findings = []  # a request whose schema is broken teaches nothing about the template
    findings += quarter_findings(record.request, output)
    return Observation(record.id, record.request, output, tuple(findings))


def observations(records: Iterable[Any], template_text: str | None = None) -> list[Observation]:
    return [observe(r, template_text) for r in records if may_teach(r)]


def quarter_findings(request: Mapping[str, Any], output: Mapping[str, Any]) -> list[Finding]:
    """A quarter in the user's words answered with one month of it (`month = '2025-10'` for Q4)."""
    asked = _QUARTER.findall(_user_text(request))
    said = _output_text(output)
    found = []
    for quarter in sorted(set(asked)):
        first = 3 * int(quarter) - 2
        for year, month in _MONTH_EQ.findall(said):
            if first <= int(month) <= first + 2:
                found.append(Finding("quarter_as_month", f"Q{quarter} was queried as the single month {year}-{month}",
                                     {"quarter": int(quarter), "year": year, "month": f"{year}-{month}",
                                      "months": [f"{year}-{m:02d}" for m in range(first, first + 3)]}))
                break
    return found


def _user_text(request: Mapping[str, Any]) -> str:
    users = [m for m in request.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    return _text(users[-1].get("content")) if users else ""


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _output_text(output: Mapping[str, Any]) -> str:
    calls = [((c.get("function") or {}).get("name", ""), (c.get("function") or {}).get("arguments"))
             for c in output.get("tool_calls") or [] if isinstance(c, dict)]
    return hermes.assistant_text(_text(output.get("content")), calls) if calls else _text(output.get("content"))


# ---- rules ------------------------------------------------------------------------------------------------

def dominant_rules(failures: list[Observation], max_rules: int = MAX_RULES) -> list[Rule]:
    """One rule per pattern, most frequent first; a pattern whose evidence differs (two renames) gets a rule
    per distinct evidence, counted by the calls that showed it."""
    counted: Counter[str] = Counter()
    kinds: dict[str, str] = {}
    for obs in failures:
        seen = set()
        for f in obs.findings:
            text = rule_text(f, obs.request)
            if text and text not in seen:
                seen.add(text)
                counted[text] += 1
                kinds.setdefault(text, f.error_type)
    counted, kinds = _generalised(counted, kinds)
    ordered = sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))
    return [Rule(kinds[t], t, n) for t, n in ordered[:max_rules]]


GENERIC = {
    "unknown_function": "Call only a function listed in <tools>, with its exact name; never invent a name.",
    "missing_required": "Always give every required parameter of the function you call.",
    "unknown_parameter": "Use only the parameter names the function's signature lists.",
    "type_mismatch": "Give each argument the type its signature says: numbers unquoted, strings quoted.",
    "enum_violation": "Where a parameter lists allowed values (enum), use one of them exactly.",
}


def _generalised(counted: Counter[str], kinds: dict[str, str]) -> tuple[Counter[str], dict[str, str]]:
    """Where a pattern shows different evidence once each in GENERALISE_AT or more calls (`unknown function f`,
    `g`, `h`), those one-off rules become one general rule ("call only listed functions"), counted by their calls;
    evidence seen in several calls keeps its own rule."""
    out, out_kinds = Counter(), {}
    by_kind: dict[str, list[str]] = {}
    for text, kind in kinds.items():
        by_kind.setdefault(kind, []).append(text)
    for kind, texts in by_kind.items():
        once = [t for t in texts if counted[t] == 1]
        general = kind in GENERIC and len(once) >= GENERALISE_AT
        if general:
            out[GENERIC[kind]] += len(once)
            out_kinds[GENERIC[kind]] = kind
        for t in texts:
            if not (general and t in once):
                out[t], out_kinds[t] = counted[t], kind
    return out, out_kinds


def rule_text(f: Finding, request: Mapping[str, Any]) -> str | None:
    """The corrective rule a finding calls for, phrased with its evidence; None when it teaches nothing."""
    ev, calls = f.evidence, bool(request.get("tools"))
    if rename := ev.get("rename"):
        return f"Use parameter `{rename[1]}`, not `{rename[0]}`."
    kind = f.error_type
    if kind == "markdown_fence":
        what = "the <tool_call> block" if calls else "the JSON object"
        return f"Output only {what}, no markdown fences: never write a {ev.get('fence') or '```'} line."
    if kind == "prose_around_json":
        return "Output only the JSON object, no text before or after it." if not calls else \
            "Write each call inside <tool_call></tool_call>, with no text around it."
    if kind == "self_closing_tag":
        return (f"Never write `{ev.get('tag') or '<tool_call ... />'}`: write "
                '<tool_call>{"name": "...", "arguments": {...}}</tool_call>.')
    if kind == "wrong_tag":
        tag = ev.get("tag")
        return (f"Wrap each call in <tool_call></tool_call>, not in `{tag}`." if tag else
                'Wrap each call in <tool_call></tool_call>: <tool_call>{"name": "...", "arguments": {...}}</tool_call>.')
    if kind == "wrong_call_count":
        if ev.get("calls") == 0:
            return ('Always answer with a function call: <tool_call>{"name": "<function>", "arguments": {...}}'
                    "</tool_call> and nothing else. Do not write code, do not explain.")
        if ev.get("parallel") is False:
            return "Make exactly one call per answer."
        return "Make the number of calls the request asks for."
    if kind == "missing_required" and ev.get("missing"):
        return f"Always give the required parameter `{ev['missing']}`" + (f" of `{ev['name']}`." if ev.get("name") else ".")
    if kind == "unknown_parameter" and ev.get("unknown"):
        where = f"`{ev['name']}`" if ev.get("name") else "the schema"
        return f"{where} has no parameter `{ev['unknown']}`; use only the parameters it names."
    if kind == "type_mismatch" and ev.get("expected"):
        value = json.dumps(ev.get("value"), default=str)[:40]
        return f"`{ev.get('path')}` is {_article(ev['expected'])}: never write {value} ({ev.get('found')})."
    if kind == "enum_violation" and ev.get("allowed"):
        allowed = ", ".join(json.dumps(a) for a in ev["allowed"])
        return f"`{ev.get('path')}` must be one of {allowed}."
    if kind == "unknown_function" and ev.get("name"):
        allowed = ", ".join(f"`{a}`" for a in ev.get("allowed") or [])
        return f"There is no function `{ev['name']}`; call only {allowed or 'the functions listed'}."
    if kind == "invalid_json":
        return "Write valid JSON: double-quoted keys and strings, no trailing commas, no comments."
    if kind == "empty_output":
        return "Always answer; never return an empty reply."
    if kind == "copied_example":
        return "The example in these instructions shows the format only: never copy its values, use the task's own."
    if kind == "invented_tool_result":
        return f"Never write a `{ev.get('marker') or '<tool_response>'}` yourself: only tools give results."
    if kind == "repeated_call":
        return f"Never repeat `{ev.get('name')}` with the same arguments; use the result you already have."
    if kind == "cut_at_max_tokens":
        return "Keep the answer short: the call or the JSON first, nothing after it."
    if kind == "quarter_as_month":
        months = ev["months"]
        return (f"Q{ev['quarter']} means months {months[0]} to {months[-1]}: "
                f"month >= '{months[0]}' AND month <= '{months[-1]}', never month = '{ev['month']}' alone.")
    return None


def _article(type_name: Any) -> str:
    name = "/".join(type_name) if isinstance(type_name, list) else str(type_name)
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


# ---- examples ---------------------------------------------------------------------------------------------

def example_of(obs: Observation) -> Example | None:
    """A successful call as a worked example; None when it has no user text or no answer."""
    user, answer = _user_text(obs.request).strip(), _output_text(obs.output).strip()
    return Example(user, answer, obs.call_id) if user and answer else None


def pick_examples(successes: list[Observation], k: int) -> list[Example]:
    """Up to k examples, short ones first, one per function called where there are several."""
    examples = [e for e in (example_of(o) for o in successes) if e is not None]
    examples.sort(key=lambda e: (len(e.user) + len(e.answer), e.call_id))
    chosen, names = [], set()
    for e in examples:
        name = _called(e.answer)
        if name in names:
            continue
        names.add(name)
        chosen.append(e)
        if len(chosen) == k:
            return chosen
    return chosen + [e for e in examples if e not in chosen][:k - len(chosen)]


def _called(answer: str) -> str:
    m = re.search(r'"name"\s*:\s*"([^"]+)"', answer)
    return m.group(1) if m else answer[:40]


def render_examples(examples: Iterable[Example]) -> str:
    """Examples as the text `{{examples}}` stands for (empty when there are none)."""
    blocks = [f"User: {e.user}\nAnswer: {e.answer}" for e in examples]
    return f"{EXAMPLES_HEADING}\n" + "\n\n".join(blocks) if blocks else ""


def fill_examples(text: str, examples: Iterable[Example]) -> str:
    """The template with `{{examples}}` replaced (only that variable; JSON braces stay as they are)."""
    return text.replace(EXAMPLES_VAR, render_examples(examples))


# ---- the child ----------------------------------------------------------------------------------------------

def evolve(parent_text: str, observed: list[Observation], k: int = 2, dynamic: bool = False,
           max_rules: int = MAX_RULES, tools_first: bool = False) -> Evolution:
    """The child of `parent_text`: its text plus the rules the failures call for (those it does not hold yet)
    and up to k worked examples from the successes (or `{{examples}}`, filled per request, with `dynamic`).
    With `tools_first` and calls that had tools, `{{tools}}` goes before the rules (needs a renderer that fills
    it, such as the template store's `render`; the backend then does not append the tool list again).

    >>> evolve("Call the tool.", []).reason
    'no captured calls to learn from: nothing written'
    """
    failures = [o for o in observed if o.failed]
    if not observed:
        return Evolution(None, "no captured calls to learn from: nothing written")
    if not failures:
        return Evolution(None, f"none of the {len(observed)} calls failed: nothing to learn, nothing written",
                         observed=len(observed))
    rules = [r for r in dominant_rules(failures, max_rules) if r.text not in parent_text]
    examples = [] if dynamic else pick_examples([o for o in observed if not o.failed], k)
    if not rules and not examples and (not dynamic or EXAMPLES_VAR in parent_text):
        return Evolution(None, f"{len(failures)} calls failed, but with no pattern the template does not already "
                               "correct: nothing written", failures=len(failures), observed=len(observed))
    tools_first = tools_first and any(o.request.get("tools") for o in observed)
    text = child_text(parent_text, rules, examples, dynamic, tools_first)
    reason = f"{len(rules)} rules from {len(failures)} failing of {len(observed)} calls, {len(examples)} examples"
    return Evolution(text, reason, tuple(rules), tuple(examples), len(failures), len(observed))


def child_text(parent_text: str, rules: list[Rule], examples: list[Example], dynamic: bool = False,
               tools_first: bool = False) -> str:
    """Parent, rules, examples. With `tools_first` (the calls had tools) the tool list (`{{tools}}`) is placed
    before the rules: a small model follows what it read last, and the list would otherwise close the prompt."""
    lines = [f"- {r.text}" for r in rules]
    if rules and RULES_HEADING in parent_text:  # an evolved parent: its rule list grows in place
        parent_text, lines = _extend_rules(parent_text, lines), []
    parts = [parent_text.rstrip()]
    if tools_first and TOOLS_VAR not in parent_text:
        parts.append(TOOLS_VAR)
    if lines:
        parts.append(RULES_HEADING + "\n" + "\n".join(lines))
    if dynamic and EXAMPLES_VAR not in parent_text:
        parts.append(EXAMPLES_VAR)
    elif examples:
        parts.append(render_examples(examples))
    return "\n\n".join(parts)


def _extend_rules(text: str, lines: list[str]) -> str:
    """The text with `lines` added at the end of the list under RULES_HEADING."""
    head, _, rest = text.partition(RULES_HEADING + "\n")
    listed = rest.split("\n")
    end = next((i for i, line in enumerate(listed) if not line.startswith("- ")), len(listed))
    return head + RULES_HEADING + "\n" + "\n".join(listed[:end] + lines + listed[end:])


# ---- reflective rewrite (a teacher) -------------------------------------------------------------------------

Ask = Callable[[list[dict[str, Any]]], Awaitable[str]]
REFLECT_SYSTEM = (
    "You improve the system prompt of a small language model. You are given the current prompt and calls where "
    "the model failed with it: what it was asked, what it answered and what was wrong. Write a better system "
    "prompt that prevents these failures without naming the test cases. Keep every instruction of the current "
    "prompt that is still right and any {{examples}} or {{tools}} variable it holds. Reply with the new prompt "
    "only, between <prompt> and </prompt>.")


def reflection_messages(parent_text: str, failures: list[Observation], limit: int = 5) -> list[dict[str, Any]]:
    cases = []
    for i, obs in enumerate(failures[:limit], 1):
        problems = "; ".join(f.detail for f in obs.findings)[:400]
        cases.append(f"Case {i}\nAsked: {_user_text(obs.request)[:400]}\nAnswered: {_output_text(obs.output)[:400]}"
                     f"\nWrong: {problems}")
    user = f"Current prompt:\n<prompt>\n{parent_text}\n</prompt>\n\nFailures:\n\n" + "\n\n".join(cases)
    return [{"role": "system", "content": REFLECT_SYSTEM}, {"role": "user", "content": user}]


def parse_reflection(reply: str, parent_text: str) -> str | None:
    """The proposed prompt from a teacher's reply; None when it proposes nothing new."""
    m = re.search(r"<prompt>\s*(.*?)\s*(?:</prompt>|\Z)", reply or "", re.S)
    text = (m.group(1) if m else (reply or "")).strip()
    return text if text and text != parent_text.strip() else None


async def reflect(parent_text: str, failures: list[Observation], ask: Ask) -> str | None:
    """A teacher's rewrite of the template from its failures (None without failures or when nothing new)."""
    if not failures:
        return None
    return parse_reflection(await ask(reflection_messages(parent_text, failures)), parent_text)
