"""Run the d2merge CLI in this process and SIGKILL ourselves at a chosen or a random point.

Used by tests/system/test_kill9.py in a subprocess:

    python kill_driver.py replace:N -- CLI ARGS    # killed right after the N-th rename of a d2merge work path
    python kill_driver.py delay:SECONDS -- CLI ARGS  # killed SECONDS after the command starts, wherever it is
    python kill_driver.py call:MODULE:NAME -- CLI ARGS  # killed when MODULE's function NAME is called

"replace:N" reaches the states between the renames of a commit (previous output set aside,
new one not yet in place); "delay" lands anywhere: reading, merging, exporting, validating,
committing. A run that finishes before its kill exits normally; the last stderr line is then
the command's own duration (interpreter start-up and imports excluded).
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def main() -> None:
    point, *rest = sys.argv[1:]
    args = rest[rest.index("--") + 1:]
    import torch

    torch.set_num_threads(1)
    from d2merge.cli import main as cli_main

    kind, _, value = point.partition(":")
    if kind == "replace":
        target, seen = int(value), [0]
        original = os.replace

        def replace(src, dst, *a, **k):  # type: ignore[no-untyped-def]
            original(src, dst, *a, **k)
            if ".d2merge-" in os.fspath(src) + os.fspath(dst):
                seen[0] += 1
                if seen[0] == target:
                    os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace  # type: ignore[assignment]
    elif kind == "call":
        import importlib

        module_name, _, name = value.partition(":")
        module = importlib.import_module(module_name)
        setattr(module, name, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
    elif kind == "delay":
        timer = threading.Timer(float(value), lambda: os.kill(os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    import time

    started = time.perf_counter()
    try:
        cli_main(args)
    finally:  # the command's own duration (imports excluded): what random delays are drawn from
        print(f"kill_driver: command took {time.perf_counter() - started:.3f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
