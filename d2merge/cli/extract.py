"""``d2merge extract``: a LoRA adapter from TUNED - BASE by a truncated SVD per module; flags from ExtractOptions."""

from __future__ import annotations

from typing import Any

import click

from d2merge.cli.flags import options_from
from d2merge.console import ConsoleCommand
from d2merge.options.adapter_ops import ExtractOptions


@click.command("extract", cls=ConsoleCommand)
@click.argument("base", metavar="BASE")
@click.argument("tuned", metavar="TUNED")
@click.option("-o", "--out", "out", type=click.Path(), required=True,
              help="Output: an adapter folder (--to lora) or a .gguf file (--to gguf-lora).")
@options_from(ExtractOptions)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-module report (rank, update rank, retained energy, error) as JSON.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin (pickle) weights (weights_only=True).")
def extract_command(base: str, tuned: str, out: str, report_path: str | None, allow_pickle: bool,
                    **options: Any) -> None:
    """Extract a LoRA adapter from TUNED - BASE by a truncated SVD per module, one module at a time.

    \b
    Examples:
      d2merge extract ./llama ./llama-finetuned --rank 32 -o ./extracted
      d2merge extract ./llama ./llama-finetuned --energy 0.9 -o ./extracted --report cost.json
      d2merge extract ./llama ./llama-finetuned --rank 32 --to gguf-lora -o ./extracted.gguf
    """
    from d2merge.export.adapter_outputs import extract

    result = extract(base, tuned, out, ExtractOptions(**options), allow_pickle=allow_pickle, report=report_path)
    click.echo(result.describe())
