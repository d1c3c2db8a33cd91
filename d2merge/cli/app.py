"""The ``d2merge`` group and its entry points: every command module added, errors mapped to one line.

Each command lives in its own module of this package, a thin wrapper whose flags are generated
from the option models (``d2merge.options``); the work is done by the library functions it calls,
so everything is scriptable from Python too. Errors the user can fix are one line on stderr with
exit code 2 (an option's error names its flag); a verification that ran and failed its thresholds
exits 1; a bug in d2merge exits 3; tracebacks appear only with --debug.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import traceback

import click

# Only light modules at import time: `d2merge --help` and flag errors must not wait for torch.
# Each command imports the library it calls (tests/system/test_newcomer.py checks this).
from d2merge.cli.bench import bench_command
from d2merge.cli.combine import combine_command
from d2merge.cli.convert import convert_command
from d2merge.cli.demo import demo_command
from d2merge.cli.export_gguf import export_gguf_command
from d2merge.cli.export_onnx import export_onnx_command
from d2merge.cli.extract import extract_command
from d2merge.cli.inspect import inspect_command
from d2merge.cli.merge import merge_command
from d2merge.cli.merge_many import merge_many_command
from d2merge.cli.push import push_command
from d2merge.cli.session import DEBUG, STARTED
from d2merge.cli.verify import verify_command
from d2merge.console import ConsoleGroup
from d2merge.errors import D2MergeError, VerificationFailed
from d2merge.options.base import OptionError
from d2merge.version import __version__

INTERNAL_ERROR_EXIT = 3  # not 2: a CI job must tell a d2merge bug from a bad input
COMMANDS = (merge_command, inspect_command, demo_command, push_command, export_onnx_command, export_gguf_command,
            bench_command, verify_command, merge_many_command, combine_command, convert_command, extract_command)


@click.group(cls=ConsoleGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="d2merge")
def cli(debug: bool) -> None:
    """Merge low-rank adapters into base weights exactly, prove it, ship it.

    \b
    Typical flow:
      d2merge inspect ./adapter                       # what is in the adapter
      d2merge merge ./base ./adapter -o ./merged --dry-run   # the plan, nothing written
      d2merge merge ./base ./adapter -o ./merged      # streaming fp32 merge
      d2merge verify ./base ./adapter ./merged        # merged vs unmerged, exit 1 on drift
    Exit codes: 0 ok, 1 verification thresholds exceeded, 2 bad input or environment,
    3 a bug in d2merge (please report it with --debug).
    """
    if debug:
        DEBUG["on"] = True


for _command in COMMANDS:
    cli.add_command(_command)


def _one_line(exc: click.ClickException) -> str:
    """click's message, with where to look for the flags a usage error is about."""
    text = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        text += f" (see '{ctx.command_path} --help')"
    return text


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps d2merge's errors to one line and an exit code."""
    STARTED["at"] = time.monotonic()
    if argv is None:
        argv = sys.argv[1:]
    # Decided per call: an earlier in-process call with --debug must not leak into this one.
    DEBUG["on"] = bool(os.environ.get("D2MERGE_DEBUG")) or "--debug" in argv
    try:
        cli.main(args=argv, prog_name="d2merge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("d2merge: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # a bad flag or argument: one line, as every refusal
        click.echo(f"d2merge: error: {_one_line(exc)}", err=True)
        sys.exit(2)
    except D2MergeError as exc:
        if DEBUG["on"]:
            traceback.print_exc()
        # An option's error names the option; here it names the flag that sets it.
        click.echo(f"d2merge: error: {exc.for_cli() if isinstance(exc, OptionError) else exc}", err=True)
        sys.exit(2)
    except VerificationFailed as exc:
        click.echo(f"d2merge: verification failed: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("d2merge: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug in d2merge, not the user's input: its own exit code
        if DEBUG["on"]:
            traceback.print_exc()
        click.echo(
            f"d2merge: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(this is a bug in d2merge, not in your input: please report it with the output of the same "
            "command rerun with --debug)",
            err=True,
        )
        sys.exit(INTERNAL_ERROR_EXIT)
    sys.exit(0)


_PROCESS_EXIT: dict[str, int] = {}


def run() -> None:
    """The process entry point (the ``d2merge`` script, ``python -m d2merge``): :func:`main`, then a fast exit.

    After a command has finished and Python's shutdown has joined its threads and run
    the atexit handlers, the teardown of a process that imported torch (clearing every
    module and collecting its objects) still takes 0.6-0.7 s: 16% of a 1.1B merge
    (docs/speed.md), for nothing a finished command needs, since every output is closed
    and renamed into place before main() returns. So the first atexit handler, which
    runs last, flushes stdout and stderr and ends the process with main()'s exit code.
    Where a handler was registered before it (coverage, a profiler) it would be skipped,
    so then the process ends the ordinary way. :func:`main`, which tests and scripts call
    in-process, never ends the process early.
    """
    count_handlers = getattr(atexit, "_ncallbacks", None)
    if count_handlers is not None and count_handlers() == 0:
        atexit.register(_end_process_now)
    try:
        main()
    except SystemExit as exc:
        _PROCESS_EXIT["code"] = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise


def _end_process_now() -> None:
    code = _PROCESS_EXIT.get("code")
    if code is None:  # main() did not finish: an ordinary exit with whatever Python reports
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout and code == 0:
                code = 120  # what Python itself exits with when stdout cannot be flushed at exit
    os._exit(code)


if __name__ == "__main__":
    run()
