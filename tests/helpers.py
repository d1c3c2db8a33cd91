"""What many test files need and should write once: the checkout's root, a subprocess that imports
this checkout's d2merge, and the assertion that a refusal is one line with exit code 2.

Import it as ``from helpers import ...`` (pytest puts tests/ on ``sys.path``, as for ``malformed``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
ERROR_PREFIX = "d2merge: error: "


def checkout_env(base: Mapping[str, str] | None = None, **changes: str) -> dict[str, str]:
    """``base`` (this process's environment by default) with this checkout first on PYTHONPATH.

    ``D2MERGE_DEBUG`` is dropped (a developer's shell may set it, and it turns the one-line errors
    the tests check into tracebacks); ``changes`` are set last.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != "D2MERGE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(changes)
    return env


def run_python(args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path = REPO_ROOT,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh interpreter that imports this checkout (stdout and stderr captured as text)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=dict(env) if env is not None else checkout_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    """A refusal as the user sees it: exit 2, one ``d2merge: error:`` line on stderr naming each needle,
    no traceback anywhere. Returns the line."""
    assert code == 2, f"exit code {code}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr must be one line, got {err!r}"
    assert lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in out + err, out + err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]
