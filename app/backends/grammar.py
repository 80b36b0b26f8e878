"""The grammar a request's tools or response_format impose on a local model's output, as llguidance Lark text.

Tool calls use the Hermes format that `chat_format` prompts for: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`, one block per call, with each call's JSON a `name` const plus that function's parameters schema.
The tags are written the way the model's vocabulary spells them (`ToolTags`): text for SmolLM2, one special token
each for Qwen2.5 and Hermes-3, whose tokenizers turn `<tool_call>` into a single token.
Building the text is pure; compiling it into an `llguidance.LLMatcher` happens once per grammar and tokenizer
(`compiled_matcher`), since agents send the same tools on every call. Applying the matcher's token mask to
logits lives in `TokenMask`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import BackendError, MissingDependency, UsageError
from app.hermes import TOOL_CLOSE, TOOL_OPEN
from app.toolplan import ToolPlan, request_plan
from app.wire import ChatRequest

# Compact JSON with the separators json.dumps writes: what Hermes-style training data looks like, and no room
# for a small model to pad with endless whitespace.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
LLGUIDANCE_INSTALL = "pip install llguidance"
NUMBER_LIMIT = 10**18 - 1
# Characters, ~130 tokens of English: a longer free string from a small model is a loop, not an answer.
STRING_LIMIT = 512
STRING_BOUNDED = {"maxLength", "enum", "const", "pattern", "format"}
LITERAL_KEYS = ("const", "enum", "default", "examples")  # their values are data, not schemas

def answer_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for; None for plain text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return tame(schema) if isinstance(schema, dict) else {"type": "object"}
    raise UsageError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'")


def call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON one call of `function` must be: its name, then arguments matching its parameters."""
    params = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": tame(params)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tame(schema: Any) -> Any:
    """A copy of `schema` a small model cannot wander off in: the same valid outputs, minus two runaways.

    Every object that lists `properties` forbids other keys unless it says otherwise (small models invent
    argument names; OpenAI's strict mode forbids them too); objects without `properties` (free-form maps) stay
    open. Numbers without bounds get 18-digit ones: unbounded, a model can write `1000000...` until max_tokens
    and the output no longer parses (Gemma-3-270M does exactly that). Free strings get a length bound for the same
    reason: SmolLM2 repeats `_2024_2024...` inside a SQL string until the call is cut and does not parse.
    """
    if isinstance(schema, list):
        return [tame(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in LITERAL_KEYS else tame(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: tame(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    if schema.get("type") in ("integer", "number"):
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            out["minimum"] = -NUMBER_LIMIT
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            out["maximum"] = NUMBER_LIMIT
    if schema.get("type") == "string" and not STRING_BOUNDED.intersection(schema):
        out["maxLength"] = STRING_LIMIT
    return out


def json_rule(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({"x-guidance": JSON_STYLE, **schema})


@dataclass(frozen=True)
class ToolTags:
    """How one model's vocabulary spells the call tags: the token id of `<tool_call>` / `</tool_call>` where it is
    a single special token, None where the tag is plain text.

    The grammar must match: llguidance treats a special token as a unit apart from text, so a grammar that spells
    `"<tool_call>"` as text rejects the very token the model (and the tokenizer, on the forced path) produces.
    """

    open: int | None = None
    close: int | None = None

    def lark(self) -> tuple[str, str]:
        """Lark for `<tool_call>` + newline and newline + `</tool_call>`: a token reference (`<[151657]>`) where
        the tag is a special token, else one string literal (the grammar SmolLM2's figures were measured with)."""
        opening = f'<[{self.open}]> "\\n"' if self.open is not None else json.dumps(TOOL_OPEN + "\n")
        closing = f'"\\n" <[{self.close}]>' if self.close is not None else json.dumps("\n" + TOOL_CLOSE)
        return opening, closing


TEXT_TAGS = ToolTags()  # the tags spelled as text, as SmolLM2 and Gemma 3 tokenize them


def tool_calls_lark(plan: ToolPlan, answer: dict[str, Any] | None = None, tags: ToolTags = TEXT_TAGS) -> str:
    """Lark for a tool plan; in `auto` the alternative to calls is `answer` JSON or text without any call."""
    schemas = [call_schema(f) for f in plan.functions]
    fn = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    # A newline may end the calls: Qwen2.5-Coder writes "\n" after every </tool_call> and only then its
    # end-of-turn; without it, the one way on is another call, and it repeats calls until max_tokens.
    calls = 'tool_call ("\\n" tool_call)* "\\n"?' if plan.parallel else 'tool_call "\\n"?'
    open_tag, close_tag = tags.lark()
    lines = [
        f"calls: {calls}",
        f"tool_call: {open_tag} fn {close_tag}",
        f"fn: {json_rule(fn)}",
    ]
    if plan.mode != "auto":
        return "\n".join(["start: calls", *lines])
    text = f"answer: {json_rule(answer)}" if answer else "answer: TEXT"
    # TEXT never contains a call marker, so a text answer can never hide a malformed call (a special-token tag
    # cannot appear inside a terminal at all; its spelling as text is excluded here too, since the parser reads it).
    no_call = f"TEXT: /(?s:.+)/ & ~/(?s:.*){TOOL_OPEN}(?s:.*)/"
    return "\n".join(["start: answer | calls", *lines, text, no_call])


def request_lark(req: ChatRequest, tags: ToolTags = TEXT_TAGS) -> str | None:
    """The Lark grammar a request is decoded under, or None when its output is free text.

    `decoding="free"` turns constraints off (to measure a model's raw behaviour); `tags` are the model's.
    """
    if req.decoding == "free":
        return None
    plan = request_plan(req)
    answer = answer_schema(req.response_format)
    if plan.mode != "none":
        return tool_calls_lark(plan, answer, tags)
    if answer is not None:
        return f"start: {json_rule(answer)}"
    return None


# ---- compiling and applying ----------------------------------------------------------------------------

# Values keep their tokenizer alive, so the id() in a key can never be reused by another tokenizer.
_MATCHERS: OrderedDict[tuple[int, str], tuple[Any, Any]] = OrderedDict()
_MATCHERS_LOCK = threading.Lock()
MATCHER_CACHE_SIZE = 128


def grammar_key(lark: str) -> str:
    return hashlib.sha256(lark.encode()).hexdigest()


def compiled_matcher(tokenizer: Any, lark: str) -> Any:
    """A fresh `LLMatcher` for `lark`; the grammar is compiled once per tokenizer and deep-copied after that."""
    key = (id(tokenizer), grammar_key(lark))
    with _MATCHERS_LOCK:
        cached = _MATCHERS.get(key)
        if cached is not None:
            _MATCHERS.move_to_end(key)
            return cached[1].deep_copy()
    template = _compile(tokenizer, lark)
    with _MATCHERS_LOCK:
        _MATCHERS[key] = (tokenizer, template)
        while len(_MATCHERS) > MATCHER_CACHE_SIZE:
            _MATCHERS.popitem(last=False)
    return template.deep_copy()


def _compile(tokenizer: Any, lark: str) -> Any:
    llguidance = import_llguidance()
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    matcher = None if is_error else llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if matcher is None or matcher.is_error():
        problem = messages[0] if is_error else matcher.get_error()
        raise UsageError(f"the request's tools or response_format cannot be turned into a grammar: {problem}")
    return matcher


def import_llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise MissingDependency(f"constrained decoding needs llguidance; run: {LLGUIDANCE_INSTALL}") from None
    return llguidance


class TokenMask:
    """One request's grammar state: which tokens may come next, applied to a logits vector in place."""

    def __init__(self, matcher: Any, n_vocab: int):  # n_vocab: the llguidance tokenizer's vocab_size
        self.matcher = matcher
        self.n_vocab = n_vocab
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> Any:
        """A boolean array over the vocabulary: True where the grammar allows the token next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._raise_on_error()
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.n_vocab].view(bool)

    def apply(self, logits: Any) -> None:
        """Set the logits of every token the grammar forbids to -inf."""
        logits[: self.n_vocab][~self.allowed()] = -np.inf
        logits[self.n_vocab :] = -np.inf  # padding rows some GGUFs carry past the tokenizer's vocabulary

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._raise_on_error()

    def forced(self) -> list[int]:
        """Tokens the grammar forces next (a JSON key, a closing tag): they need no sampling."""
        return self.matcher.compute_ff_tokens()

    @property
    def done(self) -> bool:
        """True when the grammar is complete and nothing but end-of-sequence may follow."""
        return self.matcher.is_stopped()

    def _raise_on_error(self) -> None:
        if self.matcher.is_error():
            raise BackendError(f"constrained decoding failed inside llguidance: {self.matcher.get_error()}")
