"""Optional test dependencies: a missing one skips its tests locally, but fails the run in CI (`CI` set), so a
green CI never means every real-model test was skipped."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

INSTALL = {
    "llama_cpp": "make install (builds llama-cpp-python)",
    "bfcl_eval": "pip install --no-deps bfcl-eval",
    "transformers": "pip install -e '.[train]'",
    "psycopg": "pip install -e '.[postgres]'",
}


def require(module: str) -> ModuleType:
    """The imported module; without it, skip (fail when CI is set). Works at module level and inside tests."""
    fix = INSTALL.get(module, f"pip install {module.replace('_', '-')}")
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"CI is set but {module} cannot be imported ({exc}); install it: {fix}", pytrace=False)
    return pytest.importorskip(module, reason=f"needs {module}: {fix}")
