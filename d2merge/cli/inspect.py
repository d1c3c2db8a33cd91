"""``d2merge inspect``: what an adapter holds."""

from __future__ import annotations

import json

import click

from d2merge.console import ConsoleCommand


@click.command("inspect", cls=ConsoleCommand)
@click.argument("adapter", metavar="ADAPTER")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (pickle, loaded with weights_only=True).")
@click.option("--base", "base", default=None, metavar="BASE",
              help="Base model (only its config.json is read) to resolve target_parameters: which parameter, "
                   "how many experts and ||dW|| for each.")
def inspect_command(adapter: str, as_json: bool, allow_pickle: bool, base: str | None) -> None:
    """Show what an adapter holds: method, ranks, targets, parameter count, per-module ||dW||.

    \b
    Example:
      d2merge inspect ./my-adapter
      d2merge inspect ./moe-adapter --base ./mixtral
    """
    from d2merge.adapter_info import inspect_adapter

    info = inspect_adapter(adapter, allow_pickle=allow_pickle, base=base)
    click.echo(json.dumps(info.to_json(), indent=2) if as_json else info.table())
