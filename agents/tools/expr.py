"""Arithmetic over a row's columns (`amount / quantity * 100`), parsed with `ast` and walked by hand.

Only numbers, column names, + - * / and parentheses are accepted; anything else (calls, attributes,
`__import__`, `**`) is refused before evaluation, so model-written expressions never reach `eval`. A result
that is not a finite number (an overflow to inf, or inf - inf = nan) is refused, never stored.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from app.errors import ToolError

MAX_LENGTH = 200
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_ALLOWED = "numbers, column names, + - * / and parentheses"


def compile_expression(text: str, columns: list[str]) -> Callable[[dict[str, Any]], float | None]:
    """Check `text` once and return a function of a row; a missing value or division by zero gives None."""
    if len(text) > MAX_LENGTH:
        raise ToolError(f"the expression is longer than {MAX_LENGTH} characters; split it into steps.")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ToolError(f"'{text}' is not an arithmetic expression; use {_ALLOWED}.") from None
    _check(tree, columns)
    return lambda row: _finite(_evaluate(tree, row), text)


def _check(node: ast.AST, columns: list[str]) -> None:
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, columns)
        _check(node.right, columns)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, columns)
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        pass
    elif isinstance(node, ast.Name):
        if node.id not in columns:
            raise ToolError(f"no column '{node.id}' in the expression. Columns: {', '.join(columns)}.")
    else:
        raise ToolError(f"'{ast.unparse(node)}' is not allowed in an expression; use only {_ALLOWED}.")


def _evaluate(node: ast.AST, row: dict[str, Any]) -> float | None:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _number(row.get(node.id), node.id)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, row)
        return None if value is None else _UNARY[type(node.op)](value)
    left, right = _evaluate(node.left, row), _evaluate(node.right, row)
    if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
        return None
    return _BINARY[type(node.op)](left, right)


def _finite(value: float | None, text: str) -> float | None:
    if value is None or math.isfinite(value):
        return value
    raise ToolError(f"'{text}' gives {value}, not a finite number (a value passed 1e308); "
                    "scale the columns down, e.g. divide by 1000 first.")


def _number(value: Any, column: str) -> float | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ToolError(f"column '{column}' holds text ({str(value)[:30]!r}); expressions need numeric columns.")
