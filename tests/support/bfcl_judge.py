"""BFCL's own AST checker, loaded alone so tests can compare our metrics with the leaderboard's verdicts.

`ast_checker.py` imports `bfcl_eval.constants.model_config`, which imports every model handler (anthropic,
mistral, qwen-agent, ...). The checker only asks that module whether a model writes dots in function names as
underscores, so we load the file under a private name with that one module stubbed for the duration of the
import; nothing named `bfcl_eval.*` is left patched in sys.modules.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from app.validation import ParsedCall

_MODEL_CONFIG = "bfcl_eval.constants.model_config"
MODEL_NAME = "slm-swap"  # any name: the stub says it keeps BFCL's dotted function names


class _NoUnderscoreToDot(dict):
    def __missing__(self, model_name: str) -> Any:
        return types.SimpleNamespace(underscore_to_dot=False)


@contextmanager
def _stubbed_model_config() -> Iterator[None]:
    stub = types.ModuleType(_MODEL_CONFIG)
    stub.MODEL_CONFIG_MAPPING = _NoUnderscoreToDot()
    saved = sys.modules.get(_MODEL_CONFIG)
    sys.modules[_MODEL_CONFIG] = stub
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(_MODEL_CONFIG, None)
        else:
            sys.modules[_MODEL_CONFIG] = saved


@cache
def _checker_module() -> types.ModuleType:
    spec = importlib.util.find_spec("bfcl_eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "eval_checker" / "ast_eval" / "ast_checker.py"
    module_spec = importlib.util.spec_from_file_location("_bfcl_ast_checker", path)
    module = importlib.util.module_from_spec(module_spec)
    with _stubbed_model_config():
        module_spec.loader.exec_module(module)
    return module


def bfcl_ast_check(functions: list[dict], model_output_calls: Sequence[ParsedCall | dict],
                   possible_answer: list[dict], category: str) -> bool:
    """BFCL's verdict on decoded calls: ParsedCall objects or BFCL's own [{name: {param: value}}] items."""
    checker = _checker_module()
    from bfcl_eval.constants.enums import Language  # light: a plain Enum module

    language = Language.JAVASCRIPT if "javascript" in category else (
        Language.JAVA if "java" in category else Language.PYTHON)
    output = [{c.name: dict(c.arguments)} if isinstance(c, ParsedCall) else c for c in model_output_calls]
    result = checker.ast_checker(functions, output, possible_answer, language, category, MODEL_NAME)
    return bool(result["valid"])
