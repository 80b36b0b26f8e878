"""The tool protocol of the sub-agents: a ToolSpec pairs a pydantic argument model with a function over a
per-run ToolContext, and run_tool turns any bad call from a model into an `error: ...` result it can read.

Every tool returns a short text for the model (`content`); tools that build a table store it in
`ctx.datasets` and name it, and formatting tools also return the full text they produced (`artifact`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from agents.bounds import TOOL_RESULT_CHARS, clip
from app.errors import ToolError

MAX_CONTENT_CHARS = TOOL_RESULT_CHARS  # what run_tool lets into the next prompt (and so into the capture)
Row = dict[str, Any]


class Args(BaseModel):
    """Base of every tool's arguments: unknown keys are an error the model is told about."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ToolContext:
    """What the tools of one run share: the database and a workspace of named tables."""

    db_path: Path
    datasets: dict[str, list[Row]] = field(default_factory=dict)
    row_limit: int = 200


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    content: str  # what goes back to the model: short, previews truncated
    dataset: str | None = None  # the name of the dataset this call created
    artifact: str | None = None  # the full text a formatting tool produced (content may be cut)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    args: type[BaseModel]
    fn: Callable[[ToolContext, Any], ToolResult]

    def parameters(self) -> dict[str, Any]:
        """The arguments as a plain JSON schema: refs inlined, no titles, optional fields not nullable."""
        raw = self.args.model_json_schema()
        return _clean(raw, raw.get("$defs", {}))

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters()},
        }

    def signature(self) -> str:
        """`name(a: string, b?: integer)`: how the tool is called, for error messages."""
        params = self.parameters()
        required = set(params.get("required", []))
        parts = [
            f"{key}{'' if key in required else '?'}: {_type_name(prop)}"
            for key, prop in params.get("properties", {}).items()
        ]
        return f"{self.name}({', '.join(parts)})"


def tool(args: type[BaseModel]) -> Callable[[Callable[[ToolContext, Any], ToolResult]], ToolSpec]:
    """Decorator: the function's name is the tool's name, its docstring the description the model reads."""

    def wrap(fn: Callable[[ToolContext, Any], ToolResult]) -> ToolSpec:
        description = " ".join((fn.__doc__ or "").split())
        return ToolSpec(name=fn.__name__, description=description, args=args, fn=fn)

    return wrap


def run_tool(tools: Sequence[ToolSpec], name: str, arguments: str | dict[str, Any] | None,
             ctx: ToolContext) -> ToolResult:
    """Run one tool call from a model. Bad input never raises: it comes back as `ok=False, "error: ..."`.

    Example: `run_tool(RETRIEVAL_TOOLS, "run_sql", '{"query": "SELECT * FROM sales"}', ctx).content`
    """
    spec = next((t for t in tools if t.name == name), None)
    if spec is None:
        return _error(f"unknown tool '{name}'. Call one of: {', '.join(t.name for t in tools)}.")
    try:
        args = spec.args.model_validate(_parse_arguments(arguments, spec))
    except ValidationError as exc:
        return _error(f"bad arguments for {spec.name}: {_explain(exc)}. Call it as {spec.signature()}.")
    except ToolError as exc:
        return _error(str(exc))
    try:
        return _truncate(spec.fn(ctx, args))
    except ToolError as exc:
        return _error(str(exc))
    except sqlite3.Error as exc:
        return _error(f"the database refused the query: {exc}. Fix the SQL and call {spec.name} again.")


def _parse_arguments(arguments: str | dict[str, Any] | None, spec: ToolSpec) -> dict[str, Any]:
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ToolError(f"the arguments are not valid JSON ({exc.msg} at char {exc.pos}); send one JSON "
                            f"object with the arguments of {spec.signature()}.") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"the arguments must be a JSON object, not {type(arguments).__name__}; send one JSON "
                        f"object with the arguments of {spec.signature()}.")
    return arguments


def _explain(exc: ValidationError) -> str:
    """One short clause per pydantic error, naming the field and what it expects."""
    clauses = []
    for err in exc.errors()[:4]:
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        if err["type"] == "missing":
            clauses.append(f"'{where}' is required")
        elif err["type"] == "extra_forbidden":
            clauses.append(f"'{where}' is not an argument")
        else:
            clauses.append(f"'{where}': {err['msg']} (got {json.dumps(err.get('input'), default=str)[:40]})")
    return "; ".join(clauses)


def _error(message: str) -> ToolResult:
    return _truncate(ToolResult(ok=False, content=f"error: {message}"))


def _truncate(result: ToolResult) -> ToolResult:
    """The one bound on what a tool's result puts into the model's next prompt (and so into the capture)."""
    if len(result.content) <= MAX_CONTENT_CHARS:
        return result
    return ToolResult(result.ok, clip(result.content, MAX_CONTENT_CHARS, "tool result"), result.dataset,
                      result.artifact)


def _clean(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_clean(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _clean({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    node = _drop_null_branch(node)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "default" and value is None):
            continue
        # property names are data, not schema keywords: clean each property's schema, keep the names
        out[key] = {k: _clean(v, defs) for k, v in value.items()} if key == "properties" else _clean(value, defs)
    return out


def _drop_null_branch(node: dict[str, Any]) -> dict[str, Any]:
    """`X | None = None` means "may be left out" to the model: schema X, not anyOf [X, null]."""
    branches = node.get("anyOf")
    if not branches:
        return node
    kept = [b for b in branches if b.get("type") != "null"]
    if len(kept) == len(branches):
        return node
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    return {**kept[0], **rest} if len(kept) == 1 else {**rest, "anyOf": kept}


def _type_name(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "|".join(json.dumps(v) for v in prop["enum"])
    if "anyOf" in prop:
        return "|".join(_type_name(b) for b in prop["anyOf"])
    if prop.get("type") == "array":
        item = prop.get("items", {})
        inner = "{" + ", ".join(item.get("properties", {})) + "}" if item.get("type") == "object" else _type_name(item)
        return f"list of {inner}"
    return str(prop.get("type", "any"))
