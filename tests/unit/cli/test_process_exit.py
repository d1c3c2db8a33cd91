"""The command line's process exit (d2merge.cli.run): no teardown after a finished command, nothing lost.

``run()`` ends the process from the last atexit handler, so what must still happen
(stdout and stderr flushed, handlers registered during the command run, the exit
code kept) is checked in a real interpreter, and so is the case where it must not
take the fast path (a handler registered before it would be skipped).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import checkout_env

# A stand-in main(): registers a handler mid-command, writes more than any pipe buffer holds
# without a final flush, and exits 7. The module-level object says whether Python tore the
# modules down (its __del__ runs when __main__'s globals are cleared).
DRIVER = """
import atexit, os, sys
import d2merge.cli.app as cli

class Teardown:
    def __del__(self):
        os.write(2, b"teardown ran\\n")

marker = Teardown()

def stand_in_main():
    atexit.register(lambda: os.write(2, b"late handler ran\\n"))
    sys.stdout.write("x" * 1_000_000)
    sys.stdout.write("end")  # small: stays in the buffer until something flushes it
    sys.stderr.write("last line, unflushed")
    sys.exit(7)

if sys.argv[1] == "registered-before":
    atexit.register(lambda: os.write(2, b"early handler ran\\n"))
cli.main = stand_in_main
cli.run()
"""


def run_driver(mode: str) -> subprocess.CompletedProcess[str]:
    env = checkout_env()
    env.pop("PYTHONUNBUFFERED", None)  # buffered stdout, as in a user's pipe: the flush at exit is what is tested
    return subprocess.run([sys.executable, "-c", DRIVER, mode], capture_output=True, text=True, env=env, timeout=60)


def test_finished_command_skips_teardown_and_loses_nothing() -> None:
    proc = run_driver("fast")
    assert proc.returncode == 7
    assert proc.stdout == "x" * 1_000_000 + "end"
    assert "late handler ran" in proc.stderr  # atexit handlers registered during the command still run
    assert "last line, unflushed" in proc.stderr
    assert "teardown ran" not in proc.stderr


def test_handler_registered_before_run_keeps_the_ordinary_exit() -> None:
    proc = run_driver("registered-before")
    assert proc.returncode == 7
    assert proc.stdout == "x" * 1_000_000 + "end"
    assert "late handler ran" in proc.stderr and "early handler ran" in proc.stderr
    assert "teardown ran" in proc.stderr


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["merge", "no-such-base", "no-such-adapter", "-o", "x"], 2)])
def test_python_dash_m_d2merge_exit_codes(argv: list[str], code: int, tmp_path: Path) -> None:
    env = checkout_env()
    env.pop("D2MERGE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "d2merge", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == code, proc.stderr
    if code == 0:
        assert proc.stdout.startswith("d2merge, version")
    else:
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("d2merge: error:")
        assert not (tmp_path / "x").exists()
