"""``d2merge combine``: adapters into one plain LoRA, as PEFT's add_weighted_adapter; flags from CombineOptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from d2merge.cli.flags import float_list, options_from, refuse_flags_out_of_context
from d2merge.console import ConsoleCommand
from d2merge.options.adapter_ops import CombineOptions


@click.command("combine", cls=ConsoleCommand)
@click.argument("adapters", metavar="ADAPTER...", nargs=-1, required=True)
@click.option("-o", "--out", "out", type=click.Path(), required=True,
              help="Output: an adapter folder (--to lora) or a .gguf file (--to gguf-lora, which needs --base).")
@click.option("--weights", "weights", required=True, metavar="W1,W2,...",
              help="One weight per adapter, in order (negative subtracts an adapter's effect).")
@click.option("--base", "base", default=None, metavar="BASE",
              help="The base model: needed for DoRA, D2-LoRA, Dual LoRA and PiSSA/OLoRA inputs, whose updates "
                   "depend on it, and for --to gguf-lora.")
@options_from(CombineOptions)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-module report (rank, retained energy) as JSON.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin (pickle) adapter weights (weights_only=True).")
@click.pass_context
def combine_command(ctx: click.Context, adapters: tuple[str, ...], out: str, weights: str, base: str | None, report_path: str | None,
                    allow_pickle: bool, **options: Any) -> None:
    """Combine ADAPTERs into one plain LoRA adapter (or its llama.cpp GGUF), as PEFT's add_weighted_adapter does.

    \b
    Examples:
      d2merge combine ./math ./code --weights 0.6,0.4 --combination linear -o ./both
      d2merge combine ./math ./code --weights 1,1 --combination ties_svd --density 0.5 --svd-rank 16 -o ./both
      d2merge combine ./dora-a ./d2lora-b --base ./llama --weights 1,1 --combination svd --svd-rank 32 -o ./both
      d2merge combine ./math ./code --base ./llama --weights 1,1 --combination cat --to gguf-lora -o ./both.gguf
    """
    refuse_flags_out_of_context(ctx, (CombineOptions,), options)  # --seed 0 with linear too: given is given
    from d2merge.export.adapter_outputs import combine

    parsed = float_list(weights, "--weights")
    result = combine(list(adapters), out, parsed, CombineOptions(**options), base=base, allow_pickle=allow_pickle)
    click.echo(result.describe())
    if report_path:
        from d2merge.io.output import write_json

        write_json(Path(report_path), {"out": str(result.out), "combination": result.combination,
                                       "weights": list(result.weights),
                                       "modules": [m.to_json() for m in result.modules]})
