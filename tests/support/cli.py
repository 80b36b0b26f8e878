"""Run `slmswap` in-process through its real entry point (`app.cli.main`, so errors print and exit as for a user)."""

from __future__ import annotations

import sys


def slmswap(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `slmswap ARGS...`."""
    from app.cli import main

    old, sys.argv = sys.argv, ["slmswap", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err
