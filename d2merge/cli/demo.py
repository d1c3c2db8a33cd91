"""``d2merge demo``: the whole job on a built-in tiny model; its figures come from d2merge.demo_figures."""

from __future__ import annotations

import time

import click

from d2merge.cli.session import STARTED
from d2merge.console import ConsoleCommand
from d2merge.demo_figures import DEMO_SECONDS
from d2merge.demo_figures import MEASURED as DEMO_MEASURED
from d2merge.demo_figures import THREE_COMMANDS
from d2merge.errors import VerificationFailed

DEMO_HELP = f"""Run the whole job on a built-in tiny model: no downloads, sized to the machine's speed.

    Builds a random-init Llama-style base, trains a D2-LoRA adapter on a built-in
    multiple-choice task, merges it, proves the merge against an fp64
    recomputation, verifies merged vs unmerged in fp32 and bf16 (the merge gap
    in percentage points), exports and validates ONNX, and prints a bench table
    and a summary, then the three commands for your own base and adapter.
    Exits 1 if verification fails.

    Measured on the shared 2-core development machine: {DEMO_MEASURED['busy']} with both cores busy
    running the test suite; {DEMO_MEASURED['loaded']} at load average 17-19 from other jobs, {DEMO_MEASURED['overloaded']}
    with two more busy processes on top; 13-20 CPU-seconds each, the rest is waiting for a core.
    A busy machine gets fewer training steps, a faster exporter and a smaller timing
    grid (chosen from the speed the demo measures), past twice its target no ONNX
    export and bench, not a ten times slower demo.
    """


@click.command("demo", cls=ConsoleCommand, help=DEMO_HELP)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to write the demo's models (default: a new temp folder).")
@click.option("--train-steps", type=click.IntRange(1), default=None,
              help="Training steps for the demo adapter. [default: as many of 60-400 as fit 12 s at the pace the "
                   "first steps measure]")
@click.option("--quick", is_flag=True, help="Skip the ONNX export and the bench.")
@click.option("--seconds", type=click.FloatRange(0), default=DEMO_SECONDS, show_default=True,
              help="The demo's target time: the ONNX exporter and the timing grid are chosen to fit what is left "
                   "of it at the measured speed, and past twice the target both are skipped.")
def demo_command(workdir: str | None, train_steps: int | None, quick: bool, seconds: float) -> None:
    # the help is DEMO_HELP: its figures come from d2merge.demo_figures, as README's do
    from d2merge.demo import run_demo

    report = run_demo(workdir, echo=click.echo, train_steps=train_steps, quick=quick, seconds=seconds)
    click.echo(f"\ndemo finished in {time.monotonic() - STARTED['at']:.0f} s: files in {report.workdir}")
    click.echo("\nYour own base and adapter, in three commands:")
    for line in THREE_COMMANDS:
        click.echo("  " + line)
    verdict = report.figures.get("verify")
    if verdict is not None and not verdict.passed:
        raise VerificationFailed("; ".join(verdict.failures()))
