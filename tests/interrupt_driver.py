"""Run `d2merge merge` through the CLI in this process and signal ourselves at a chosen point.

Used by tests/system/test_interrupt.py in a subprocess:

    python interrupt_driver.py REPORT SIGNAL POINT [POINT ...] -- MERGE ARGS (without -o)

Each POINT is ``tensor:N`` (right after the N-th tensor of the run was written to its shard)
or ``commit`` (every file written into the temp folder, just before it is renamed into place).
For POINT number i the merge writes to ``<i>/out`` under the current directory. SIGNAL is
``KILL`` (the process dies at the first point, as with `kill -9` or the OOM killer) or ``INT``
(Ctrl-C: every point runs in turn, each a fresh merge in this process).

Before signalling, one JSON line goes to REPORT: the point, this pid, and the temp folder's
listing at that moment (the test checks what existed when the signal came); after an INT run,
another line with the exit code the CLI gave. The hooks wrap the writer's public methods, so
the driver reaches the points through whatever path the CLI takes to the engine.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def main() -> None:
    report_path, signal_name, *rest = sys.argv[1:]
    split = rest.index("--")
    points, merge_args = rest[:split], rest[split + 1:]
    sig = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}[signal_name]
    # A test run started in the background (nohup, `&` in a script) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: Ctrl-C in a terminal is what is emulated here.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from d2merge.cli import main as cli_main
    from d2merge.io.output import TEMP_MARKER, AtomicFolder
    from d2merge.io.safetensors_file import StreamingWriter

    state = {"point": "", "written": 0, "out": Path()}

    def report(**fields: object) -> None:
        with open(report_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(fields) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def fire() -> None:
        out = state["out"]
        temps = sorted(out.parent.glob(f".{out.name}{TEMP_MARKER}*"))
        listing = sorted(p.name for p in temps[0].iterdir()) if temps else None
        report(point=state["point"], pid=os.getpid(), temp=temps[0].name if temps else None, listing=listing)
        os.kill(os.getpid(), sig)

    original_write, original_copy, original_end, original_commit = (
        StreamingWriter.write, StreamingWriter.copy_from, StreamingWriter.end, AtomicFolder.commit)

    def counted(original):  # type: ignore[no-untyped-def]
        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = original(self, *args, **kwargs)
            state["written"] += 1
            if state["point"] == f"tensor:{state['written']}":
                fire()
            return result
        return wrapper

    def commit(self):  # type: ignore[no-untyped-def]
        if state["point"] == "commit":
            fire()
        return original_commit(self)

    StreamingWriter.write = counted(original_write)  # type: ignore[method-assign]
    StreamingWriter.copy_from = counted(original_copy)  # type: ignore[method-assign]
    StreamingWriter.end = counted(original_end)  # type: ignore[method-assign]  # merged row by row, and casts
    AtomicFolder.commit = commit  # type: ignore[method-assign]

    for i, point in enumerate(points):
        out = Path(str(i)) / "out"
        out.parent.mkdir()
        state.update(point=point, written=0, out=out.absolute())
        try:
            cli_main([*merge_args, "-o", str(out)])
        except SystemExit as exc:
            report(point=point, exit=exc.code)


if __name__ == "__main__":
    main()
