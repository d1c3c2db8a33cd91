"""What many test files need and should write once: the checkout's root, a subprocess that imports
this checkout's d2merge, and the assertion that a refusal is one line with exit code 2.

Import it as ``from helpers import ...`` (pytest puts tests/ on ``sys.path``, as for ``malformed``).
Paths go through :data:`REPO_ROOT` and :data:`TESTS_DIR`, never ``Path(__file__).parent``: a test
file's own folder says nothing about where the checkout or the drivers beside this module are.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

TESTS_DIR = Path(__file__).resolve().parent  # this module, conftest.py and the drivers (kill_driver.py, ...)
REPO_ROOT = TESTS_DIR.parent
ERROR_PREFIX = "d2merge: error: "


def checkout_env(base: Mapping[str, str] | None = None, *, drop: Iterable[str] = (), **changes: str) -> dict[str, str]:
    """``base`` (this process's environment by default) with this checkout first on PYTHONPATH.

    ``D2MERGE_DEBUG`` and the names in ``drop`` are dropped (a developer's shell may set
    D2MERGE_DEBUG, and it turns the one-line errors the tests check into tracebacks); ``changes``
    are set last.
    """
    dropped = {"D2MERGE_DEBUG", *drop}
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in dropped}
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
