"""The CI guard on optional test dependencies: a missing one skips its tests locally and fails the run in CI."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.support.requires import require

MISSING = "no_such_module_for_slmswap"
BODIES = {
    "module": f'from tests.support.requires import require\nrequire("{MISSING}")\n\ndef test_other():\n    pass\n',
    "test": f'from tests.support.requires import require\n\ndef test_needs_it():\n    require("{MISSING}")\n',
}


def run_pytest(tmp_path, where: str, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(BODIES[where])
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(ROOT)} | ({"CI": ci} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_probe.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "false"])
@pytest.mark.parametrize("where", ["module", "test"])
def test_a_missing_dependency_skips_without_ci(tmp_path, where, ci):
    out = run_pytest(tmp_path, where, ci=ci)
    assert out.returncode in (0, 5), out.stdout + out.stderr  # 5: the module's only test was skipped with it
    assert "1 skipped" in out.stdout and "failed" not in out.stdout and "error" not in out.stdout
    assert f"needs {MISSING}: pip install no-such-module-for-slmswap" in out.stdout


@pytest.mark.parametrize("where", ["module", "test"])
def test_a_missing_dependency_fails_the_run_in_ci(tmp_path, where):
    out = run_pytest(tmp_path, where, ci="true")
    assert out.returncode in (1, 2), out.stdout + out.stderr  # 2: the module failed to collect
    assert f"CI is set but {MISSING} cannot be imported" in out.stdout and "pip install" in out.stdout
    assert "skipped" not in out.stdout


def test_a_present_dependency_is_returned():
    assert require("json").dumps([1]) == "[1]"
