"""The `d2merge` command line: parses options and calls the library, nothing more.

Each command lives in this one file as a thin wrapper; the work is done by the
library functions it calls, so everything here is scriptable from Python too.
Errors the user can fix are one line on stderr with exit code 2; a verification
that ran and failed its thresholds exits 1; tracebacks appear only with --debug.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from d2merge import __version__
from d2merge.errors import D2MergeError, VerificationFailed

_DEBUG = {"on": bool(os.environ.get("D2MERGE_DEBUG"))}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    Exit codes: 0 ok, 1 verification thresholds exceeded, 2 bad input or environment.
    """
    if debug:
        _DEBUG["on"] = True


# Commands are defined below this line, one function each, thin over the library.
# (helpers: add new commands directly above the "# end of commands" marker)

# end of commands


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps d2merge's errors to one line and an exit code."""
    if argv is None:
        argv = sys.argv[1:]
    if "--debug" in argv:
        _DEBUG["on"] = True
    try:
        cli.main(args=argv, prog_name="d2merge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("d2merge: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except D2MergeError as exc:
        if _DEBUG["on"]:
            traceback.print_exc()
        click.echo(f"d2merge: error: {exc}", err=True)
        sys.exit(2)
    except VerificationFailed as exc:
        click.echo(f"d2merge: verification failed: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("d2merge: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug in d2merge: still one line unless --debug
        if _DEBUG["on"]:
            traceback.print_exc()
        else:
            click.echo(
                f"d2merge: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
                "(rerun with --debug for the traceback)",
                err=True,
            )
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
