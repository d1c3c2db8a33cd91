"""``d2merge convert``: an adapter into a plain LoRA (or llama.cpp's LoRA GGUF); flags from ConvertOptions."""

from __future__ import annotations

from typing import Any

import click

from d2merge.cli.flags import options_from
from d2merge.console import ConsoleCommand
from d2merge.options.adapter_ops import ConvertOptions


@click.command("convert", cls=ConsoleCommand)
@click.argument("adapter", metavar="ADAPTER")
@click.option("--base", "base", required=True, metavar="BASE", help="The base model the adapter was trained on.")
@click.option("-o", "--out", "out", type=click.Path(), required=True,
              help="Output: an adapter folder (--to lora) or a .gguf file (--to gguf-lora).")
@options_from(ConvertOptions)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-module report (rank, update rank, retained energy, error) as JSON.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin (pickle) adapter weights (weights_only=True).")
def convert_command(adapter: str, base: str, out: str, report_path: str | None, allow_pickle: bool,
                    **options: Any) -> None:
    """Turn ADAPTER (DoRA, D2-LoRA, Dual LoRA, PiSSA/OLoRA, LoRA) into a plain LoRA servers load.

    \b
    Exact to fp32 rounding at the update's own rank (the default); --rank or --energy
    truncate its SVD and the table says what each module keeps.
    Examples:
      d2merge convert ./dora-adapter --base ./llama -o ./as-lora
      d2merge convert ./d2lora-adapter --base ./llama --rank 64 -o ./as-lora --report cost.json
    """
    from d2merge.export.adapter_outputs import convert

    result = convert(adapter, base, out, ConvertOptions(**options), allow_pickle=allow_pickle, report=report_path)
    click.echo(result.describe())
