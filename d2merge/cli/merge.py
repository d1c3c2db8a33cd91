"""``d2merge merge``: flags from MergeOptions, MergeRunOptions and PushOptions; one call into publish."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from d2merge.cli.flags import float_list, options_from, refuse_flags_out_of_context, values_of
from d2merge.console import QUIET_HELP, ConsoleCommand, say
from d2merge.errors import VerificationFailed
from d2merge.options.adapter_ops import MixOptions
from d2merge.options.merge import MergeOptions, MergeRunOptions
from d2merge.options.push import PushOptions

# The models whose fields are merge's flags; their applies_with rules hold across all of them
# (a push setting applies only with MergeRunOptions' push_to).
MODELS = (MergeOptions, MergeRunOptions, PushOptions, MixOptions)


def what_to_merge(adapters: tuple[str, ...], mix: MixOptions) -> Any:
    """One adapter path, or an AdapterMix of several (adapter_ops/mix.py) with their weights and combination."""
    if mix.weights is None and mix.combination is None and len(adapters) == 1:
        return adapters[0]
    from d2merge.adapter_ops.mix import mix_for

    weights = None if mix.weights is None else float_list(mix.weights, "--weights")
    return mix_for(adapters, weights, mix.combine_options())


def plan_merge(*args: Any, **kwargs: Any) -> Any:
    """``d2merge.api.plan``, imported on the first call so that ``d2merge --help`` never loads torch."""
    from d2merge.api import plan

    return plan(*args, **kwargs)


@click.command("merge", cls=ConsoleCommand)
@click.argument("base", metavar="BASE")
@click.argument("adapters", metavar="ADAPTER...", nargs=-1, required=True)
@click.option("-o", "--out", "out", type=click.Path(), default=None,
              help="Output folder, or a .safetensors, .onnx or .gguf file (the suffix picks --format). "
                   "Required unless --dry-run.")
@options_from(MergeRunOptions, only=("format", "genai_precision", "int4_block_size", "int4_accuracy_level",
                                     "int4_algorithm", "int4_asymmetric", "gguf_type", "gguf_imatrix",
                                     "gguf_modelfile"))
@options_from(MergeOptions)
@options_from(MergeRunOptions, only=("verify", "push_to", "require_verify"))
@options_from(PushOptions)
@options_from(MergeRunOptions, only=("dry_run", "as_json"))
@options_from(MixOptions)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.pass_context
def merge_command(ctx: click.Context, base: str, adapters: tuple[str, ...], out: str | None, quiet: bool,
                  **values: Any) -> None:
    """Merge ADAPTER into BASE and write a Hugging Face folder.

    \b
    BASE     a Hugging Face folder (sharded or not), a .safetensors file,
             or a Hub repo id already in the local cache (nothing is downloaded)
    ADAPTER  a PEFT-layout folder: adapter_config.json + adapter_model.safetensors;
             several with --weights merge in one pass (docs/adapter-ops.md)

    The merge streams one tensor at a time (memory does not grow with model
    size), computes in fp32 and casts once to the output dtype. Nothing is
    visible at OUT until every file is written.

    \b
    Examples:
      d2merge merge ./llama-3b ./my-adapter --dry-run
      d2merge merge ./llama-3b ./my-adapter -o ./merged --dtype bf16
      d2merge merge meta-llama/Llama-3.2-3B ./my-adapter -o ./merged --max-shard-size 2GB
      d2merge merge ./llama-3b ./my-adapter -o merged.safetensors        # one file (from the suffix)
      d2merge merge ./llama-3b ./my-adapter -o model.gguf --gguf-type q8_0
      d2merge merge ./llama-3b ./my-adapter -o ./merged-onnx --format onnx --dtype fp16
      d2merge merge ./llama-3b ./my-adapter -o ./genai --format onnx-genai --precision int4 --int4-block-size 64
      d2merge merge ./llama-3b ./math ./code-dora -o ./merged --weights 0.7,0.5
    """
    from d2merge.output_names import format_for_output

    values["format"] = format_for_output(out, values["format"])
    refuse_flags_out_of_context(ctx, MODELS, values)
    merge_options = MergeOptions(**values_of(MergeOptions, values))
    run = MergeRunOptions(**values_of(MergeRunOptions, values))
    push_options = PushOptions(**values_of(PushOptions, values))
    adapter = what_to_merge(adapters, MixOptions(**values_of(MixOptions, values)))
    if out is not None and not run.dry_run and merge_options.hash_sources and run.format in ("hf", "safetensors") \
            and isinstance(adapter, str):
        # Hash a warm base on the other core while torch imports (io/source_hashes.py; no torch needed).
        from d2merge.io.source_hashes import hash_ahead_of_merge

        hash_ahead_of_merge(base, adapter)
    from d2merge.publish import PushSettings, merge_verify_push

    format_options: dict[str, Any] = {"genai_precision": run.genai_precision}
    if run.int4_given:
        from d2merge.export.onnx_genai import Int4Options

        defaults = Int4Options()
        format_options["genai_int4"] = Int4Options(run.int4_block_size or defaults.block_size,
                                                   run.int4_accuracy_level or defaults.accuracy_level,
                                                   run.int4_algorithm or defaults.algorithm, not run.int4_asymmetric)
    if run.format == "gguf":
        from d2merge.export.gguf.file_types import check_gguf_type

        format_options.update(gguf_type=check_gguf_type(run.gguf_type), gguf_modelfile=run.gguf_modelfile,
                              gguf_imatrix=run.gguf_imatrix)
    if run.dry_run:
        merge_plan = plan_merge(base, adapter, merge_options)
        click.echo(json.dumps(merge_plan.summary(), indent=2, default=str) if run.as_json else merge_plan.describe())
        return
    if out is None:
        raise click.UsageError("missing -o/--out OUT (or use --dry-run to see the plan)")
    # A bar only on a terminal: in a pipe or a log it is noise around the one-line result or error.
    progress = not quiet and sys.stderr.isatty()
    push = None if run.push_to is None else PushSettings(run.push_to, **push_options.values())
    result = merge_verify_push(base, adapter, out, options=merge_options, output_format=run.format,
                               verify=run.verify, push=push, require_verify=run.require_verify, progress=progress,
                               echo=say, **format_options)
    click.echo(result.outcome.describe())
    for note in result.outcome.merge.plan.notes:
        if note.startswith("warning: "):  # a merge that may not be what the user meant: one line on stderr
            click.echo(f"d2merge: {note}", err=True)
        else:
            click.echo(f"note: {note}")
    if result.verify is not None:
        click.echo(result.verify.table(failures=False))  # the failures are the final line's, printed once
        if not result.verify.passed:
            raise VerificationFailed("; ".join(result.verify.failures())
                                     + (" (nothing was pushed)" if push is not None else ""))
    if result.push is not None:
        from d2merge.hub import format_push

        click.echo(format_push(result.push))
