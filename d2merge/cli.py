"""The `d2merge` command line: parses options and calls the library, nothing more.

Each command lives in this one file as a thin wrapper; the work is done by the
library functions it calls, so everything here is scriptable from Python too.
Errors the user can fix are one line on stderr with exit code 2; a verification
that ran and failed its thresholds exits 1; a bug in d2merge exits 3; tracebacks
appear only with --debug.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys
import traceback
from typing import Any, Callable

import click

# Only light modules at import time: `d2merge --help` and flag errors must not wait for torch.
# Each command imports the library it calls (tests/test_cli_startup.py checks this).
from d2merge import __version__
from d2merge.bench import ALL_VARIANTS as BENCH_VARIANTS
from d2merge.bench import BenchSettings
from d2merge.errors import D2MergeError, VerificationFailed
from d2merge.many.options import ManyOptions
from d2merge.export.formats import FORMATS as EXPORT_FORMATS
from d2merge.options import EXPORTERS, ONNX_DTYPES, MergeOptions, OnnxExportOptions
from d2merge.options import option_help as model_help
from d2merge.verify_options import VerifyOptions, threshold_defaults

_DEBUG = {"on": bool(os.environ.get("D2MERGE_DEBUG"))}
INTERNAL_ERROR_EXIT = 3  # not 2: a CI job must tell a d2merge bug from a bad input


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
    Exit codes: 0 ok, 1 verification thresholds exceeded, 2 bad input or environment,
    3 a bug in d2merge (please report it with --debug).
    """
    if debug:
        _DEBUG["on"] = True


# Commands are defined below this line, one function each, thin over the library.
# (helpers: add new commands directly above the "# end of commands" marker)


def _options_from(dataclass_type: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options generated from a frozen options dataclass: one source for names, defaults, help."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(dataclass_type)):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if f.type in (bool, "bool"):
                if f.default:
                    fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=True, show_default=True,
                                      help=help_text)(fn)
                else:
                    fn = click.option(flag, f.name, is_flag=True, default=False, help=help_text)(fn)
            else:
                # int and float fields keep their type (VerifyOptions has counts); range checks stay in the model
                kind = (click.Choice(f.metadata["choices"]) if "choices" in f.metadata
                        else {"int": int, "float": float}.get(str(f.type), str))
                fn = click.option(flag, f.name, default=f.default, show_default=True, type=kind, help=help_text)(fn)
        return fn

    return decorate


def plan_merge(*args: Any, **kwargs: Any) -> Any:
    """``d2merge.merge.plan``, imported on the first call so that ``d2merge --help`` never loads torch."""
    from d2merge.merge import plan

    return plan(*args, **kwargs)


def _refuse_flags_out_of_context(ctx: click.Context, rules: dict[str, tuple[str, bool, str]]) -> None:
    """A flag given on the command line where it does nothing is an error, never silently ignored.

    ``rules`` maps a parameter to (its flag, whether it applies here, why it does not).
    """
    for name, (flag, applies, why) in rules.items():
        if not applies and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{flag} does nothing here: {why}")


def _push_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The Hub options shared by `push` and `merge --push-to`."""
    options = [
        click.option("--private", is_flag=True,
                     help="Create the repo as private. Only applies when the push creates it; an existing repo "
                          "keeps its visibility."),
        click.option("--revision", metavar="BRANCH", default=None,
                     help="Commit to this branch instead of main (created from main if missing). "
                          "refs/pr/N adds a commit to an open pull request."),
        click.option("--create-pr", is_flag=True,
                     help="Open a pull request against main instead of committing to it (works on repos you can "
                          "only read)."),
        click.option("--commit-message", metavar="TEXT", default=None,
                     help=f"Commit title. [default: Upload merged model with d2merge {__version__}]"),
        click.option("--token", metavar="TOKEN", default=None,
                     help="Hugging Face token with write access. [default: HF_TOKEN, else the `hf auth login` "
                          "cache; prefer those, a --token is visible in the process list]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command("merge")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
@click.option("-o", "--out", "out", type=click.Path(), default=None,
              help="Output folder, or file for --format safetensors/onnx. Required unless --dry-run.")
@click.option("--format", "output_format", type=click.Choice(EXPORT_FORMATS), default="hf", show_default=True,
              help="hf: Hugging Face folder; safetensors: one file with provenance metadata; "
                   "onnx: exported and validated with ONNX Runtime (fp32, or fp16 with --dtype fp16); "
                   "onnx-genai: onnxruntime-genai build, validated with its Generator (see --precision); "
                   "gguf: one .gguf file for llama.cpp, Ollama, LM Studio (see --gguf-type).")
@click.option("--precision", "genai_precision", type=click.Choice(["fp32", "fp16", "int4"]), default="fp32",
              show_default=True, help="With --format onnx-genai: precision of the onnxruntime-genai build.")
@click.option("--gguf-type", default="f16", show_default=True, metavar="TYPE",
              help="With --format gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (2-D weights; norms stay f32).")
@click.option("--modelfile", is_flag=True, help="With --format gguf: also write an Ollama Modelfile beside it.")
@_options_from(MergeOptions)
@click.option("--verify", "run_verify", is_flag=True,
              help="After merging, run `d2merge verify` (default thresholds) and put its table in the model card; "
                   "exit 1 if a threshold is exceeded.")
@click.option("--push-to", metavar="REPO_ID", default=None,
              help="After a successful merge, push the folder to the Hub as REPO_ID (see `d2merge push`).")
@click.option("--require-verify", is_flag=True,
              help="With --push-to: verify first and push only if verification passes.")
@_push_options
@click.option("--dry-run", is_flag=True, help="Print the plan (every changed tensor, rank, scale, shard) and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal).")
@click.pass_context
def merge_command(ctx: click.Context, base: str, adapter: str, out: str | None, output_format: str, genai_precision: str,
                  gguf_type: str, modelfile: bool,
                  run_verify: bool,
                  push_to: str | None, require_verify: bool, private: bool, revision: str | None, create_pr: bool,
                  commit_message: str | None, token: str | None, dry_run: bool, as_json: bool, quiet: bool,
                  **options: Any) -> None:
    """Merge ADAPTER into BASE and write a Hugging Face folder.

    \b
    BASE     a Hugging Face folder (sharded or not), a .safetensors file,
             or a Hub repo id already in the local cache (nothing is downloaded)
    ADAPTER  a PEFT-layout folder: adapter_config.json + adapter_model.safetensors

    The merge streams one tensor at a time (memory does not grow with model
    size), computes in fp32 and casts once to the output dtype. Nothing is
    visible at OUT until every file is written.

    \b
    Examples:
      d2merge merge ./llama-3b ./my-adapter --dry-run
      d2merge merge ./llama-3b ./my-adapter -o ./merged --dtype bf16
      d2merge merge meta-llama/Llama-3.2-3B ./my-adapter -o ./merged --max-shard-size 2GB
      d2merge merge ./llama-3b ./my-adapter -o merged.safetensors --format safetensors
      d2merge merge ./llama-3b ./my-adapter -o ./merged-onnx --format onnx --dtype fp16
    """
    _refuse_flags_out_of_context(ctx, {
        "as_json": ("--json", dry_run, "it prints the --dry-run plan as JSON; add --dry-run"),
        **{name: (flag, push_to is not None, "it applies to the push; add --push-to REPO_ID")
           for name, flag in (("private", "--private"), ("revision", "--revision"), ("create_pr", "--create-pr"),
                              ("commit_message", "--commit-message"), ("token", "--token"))},
        "gguf_type": ("--gguf-type", output_format == "gguf", "it applies to --format gguf"),
        "modelfile": ("--modelfile", output_format == "gguf", "it applies to --format gguf"),
        "genai_precision": ("--precision", output_format == "onnx-genai", "it applies to --format onnx-genai"),
    })
    merge_options = MergeOptions(**options)
    if out is not None and not dry_run and merge_options.hash_sources and output_format in ("hf", "safetensors"):
        # Hash a warm base on the other core while torch imports (io/source_hashes.py; no torch needed).
        from d2merge.io.source_hashes import hash_ahead_of_merge

        hash_ahead_of_merge(base, adapter)
    from d2merge.publish import PushSettings, merge_verify_push

    format_options: dict[str, Any] = {"genai_precision": genai_precision}
    if output_format == "gguf":
        from d2merge.export.gguf import check_gguf_type

        format_options.update(gguf_type=check_gguf_type(gguf_type), gguf_modelfile=modelfile)
    if dry_run:
        merge_plan = plan_merge(base, adapter, merge_options)
        click.echo(json.dumps(merge_plan.summary(), indent=2, default=str) if as_json else merge_plan.describe())
        return
    if out is None:
        raise click.UsageError("missing -o/--out OUT (or use --dry-run to see the plan)")
    # A bar only on a terminal: in a pipe or a log it is noise around the one-line result or error.
    progress = not quiet and sys.stderr.isatty()
    if require_verify and push_to is None:
        raise click.UsageError("--require-verify guards a push: add --push-to REPO_ID (or use --verify)")
    push = None if push_to is None else PushSettings(push_to, private, revision, create_pr, commit_message, token)
    result = merge_verify_push(base, adapter, out, options=merge_options, output_format=output_format,
                               verify=run_verify, push=push, require_verify=require_verify, progress=progress,
                               echo=lambda msg: click.echo(msg, err=True), **format_options)
    click.echo(result.outcome.describe())
    for note in result.outcome.merge.plan.notes:
        if note.startswith("warning: "):  # a merge that may not be what the user meant: one line on stderr
            click.echo(f"d2merge: {note}", err=True)
        else:
            click.echo(f"note: {note}")
    if result.verify is not None:
        click.echo(result.verify.table())
        if not result.verify.passed:
            raise VerificationFailed("; ".join(result.verify.failures())
                                     + (" (nothing was pushed)" if push is not None else ""))
    if result.push is not None:
        from d2merge.hub import format_push

        click.echo(format_push(result.push))


@cli.command("inspect")
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


@cli.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where to write the demo's models (default: a new temp folder).")
@click.option("--train-steps", type=click.IntRange(1), default=400, show_default=True,
              help="Training steps for the demo adapter.")
@click.option("--quick", is_flag=True, help="Skip the ONNX export and the bench.")
def demo_command(workdir: str | None, train_steps: int, quick: bool) -> None:
    """Run the whole job on a built-in tiny model: no downloads, about a minute on 2 cores.

    Builds a random-init Llama-style base, trains a D2-LoRA adapter on a built-in
    multiple-choice task, merges it, proves the merge against an fp64
    recomputation, verifies merged vs unmerged in fp32 and bf16 (the merge gap
    in percentage points), exports and validates ONNX, and prints a bench table.
    Exits 1 if verification fails.
    """
    from d2merge.demo import run_demo

    report = run_demo(workdir, echo=click.echo, train_steps=train_steps, quick=quick)
    click.echo(f"\ndemo finished: files in {report.workdir}")
    verdict = report.figures.get("verify")
    if verdict is not None and not verdict.passed:
        raise VerificationFailed("; ".join(verdict.failures()))


@cli.command("push")
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@_push_options
@click.option("--dry-run", is_flag=True,
              help="Check the folder, then print the files, sizes and model card a push would send. "
                   "Contacts nothing, needs no token.")
def push(folder: str, repo_id: str, private: bool, revision: str | None, create_pr: bool,
         commit_message: str | None, token: str | None, dry_run: bool) -> None:
    """Publish a merged model FOLDER to the Hugging Face Hub as REPO_ID (OWNER/NAME).

    The folder is refused unless it is complete: config.json, every shard its index names,
    untruncated safetensors, no leftover temp files. Exactly its files are sent (hidden files
    are skipped); README.md, if present, becomes the model card. The repo is created if needed.

    \b
    Examples:
      d2merge push ./merged my-user/llama-merged --dry-run      # what would be sent; offline
      d2merge push ./merged my-user/llama-merged --private      # create private, commit to main
      d2merge push ./merged my-org/llama-merged --revision exp-1   # commit to branch exp-1
      d2merge push ./merged someone/llama-merged --create-pr    # propose as a pull request
      HF_TOKEN=hf_... d2merge push ./merged my-user/llama-merged
      HF_ENDPOINT=https://hub.example.com d2merge push ./merged team/llama-merged

    \b
    Token: --token, else HF_TOKEN, else the cached `hf auth login`; it is never printed.
    Endpoint: HF_ENDPOINT (default https://huggingface.co). HF_HUB_OFFLINE=1 refuses to push.
    HF_HUB_DISABLE_PROGRESS_BARS=1 silences the upload progress bars.
    """
    from d2merge.hub import format_push, push_folder

    result = push_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, token=token, dry_run=dry_run)
    click.echo(format_push(result))


@cli.command("export-onnx")
@click.argument("model_dir", metavar="MODEL_DIR", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="A .onnx file, or a folder that receives model.onnx. Written atomically, after validation.")
# --dtype is checked by OnnxExportOptions, not click.Choice, so bf16 gets its one-line reason.
@click.option("--dtype", default=OnnxExportOptions.dtype, show_default=True, metavar="|".join(ONNX_DTYPES),
              help=model_help(OnnxExportOptions, "dtype"))
@click.option("--with-past", is_flag=True, help=model_help(OnnxExportOptions, "with_past"))
@click.option("--opset", type=int, default=OnnxExportOptions.opset, show_default=True,
              help=model_help(OnnxExportOptions, "opset"))
@click.option("--exporter", type=click.Choice(EXPORTERS), default=OnnxExportOptions.exporter, show_default=True,
              help=model_help(OnnxExportOptions, "exporter"))
@click.option("--external-data/--no-external-data", default=None,
              help="Store the weights in a <graph>.onnx.data file next to the graph. [default: only when they exceed "
                   "protobuf's 2 GB limit]")
@click.option("--no-validate", is_flag=True,
              help="Skip the ONNX Runtime vs PyTorch comparison (faster; the file is then unproven).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing graph (and its .data file), or with --runtime genai an output folder "
                   "d2merge wrote, only once the new one is validated.")
@click.option("--atol", type=float, default=None,
              help="Bound on the max |logit difference| at real tokens. [default: fp32 1e-4 of the largest logit, at least "
                   "1e-4; fp16 1% of the largest logit, at least 1e-3]")
@click.option("--runtime", type=click.Choice(["generic", "genai"]), default="generic", show_default=True,
              help="generic: torch.onnx graph for any ONNX Runtime loop. genai: onnxruntime-genai's model builder "
                   "(optimised decoder + genai_config.json, CPU), needs the 'genai' extra; OUT is a folder.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int4"]), default="fp32", show_default=True,
              help="With --runtime genai: fp32 (checked token for token against transformers), fp16, or int4 "
                   "weights (top-1 agreement and logit diff vs fp32 reported and gated).")
@click.pass_context
def export_onnx_command(ctx: click.Context, model_dir: str, out: str, dtype: str, with_past: bool, opset: int,
                        exporter: str, external_data: bool | None, no_validate: bool, atol: float | None,
                        overwrite: bool, runtime: str, precision: str) -> None:
    """Export a merged MODEL_DIR (config.json + safetensors) to ONNX, proven against PyTorch.

    The graph takes input_ids and attention_mask (int64, dynamic batch and
    sequence; left padding is fine) and returns logits. Before the file is
    moved to OUT, ONNX Runtime (CPU) and PyTorch run the same seeded probes
    (batch 2, one row left-padded) and their logits are compared at real
    tokens; above the tolerance nothing is written and the exit code is 2.

    \b
    Examples:
      d2merge export-onnx ./merged -o ./merged-onnx                  # ./merged-onnx/model.onnx
      d2merge export-onnx ./merged -o model.onnx --with-past         # for generation loops
      d2merge export-onnx ./merged -o model-fp16.onnx --dtype fp16   # half the size
      d2merge export-onnx ./merged -o model.onnx --exporter legacy --opset 17
      d2merge export-onnx ./merged -o ./merged-genai --runtime genai --precision int4
    """
    given = [name for name in ("dtype", "with_past", "opset", "exporter", "external_data", "precision")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if runtime == "genai":
        from d2merge.export.onnx_genai import export_genai

        generic_only = [name for name in given if name != "precision"]
        if generic_only:
            raise click.UsageError(f"--{generic_only[0].replace('_', '-')} applies to the generic export; with "
                                   "--runtime genai choose --precision fp32|fp16|int4")
        click.echo(export_genai(model_dir, out, precision=precision, validate=not no_validate, atol=atol,
                                overwrite=overwrite).describe())
        return
    if "precision" in given:
        raise click.UsageError("--precision is for --runtime genai; the generic export takes --dtype fp32|fp16")
    # Every rule known up front is checked here, before torch loads and the export runs.
    settings = OnnxExportOptions(dtype=dtype, with_past=with_past, opset=opset, exporter=exporter)
    from d2merge.export.onnx import export_onnx

    result = export_onnx(model_dir, out, dtype=settings.dtype, with_past=settings.with_past, opset=settings.opset,
                         exporter=settings.exporter, external_data=external_data, validate=not no_validate,
                         atol=atol, overwrite=overwrite)
    click.echo(result.describe())


@cli.command("export-gguf")
@click.argument("merged", metavar="MERGED", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The .gguf file to write (atomically: nothing appears there until it is complete).")
@click.option("--gguf-type", default="f16", show_default=True, metavar="TYPE",
              help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 for 2-D weights; norms and biases stay f32.")
@click.option("--name", default=None, help="general.name in the GGUF. [default: the output file's stem]")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def export_gguf_command(merged: str, out: str, gguf_type: str, name: str | None, modelfile: bool, overwrite: bool,
                        quiet: bool) -> None:
    """Export a merged MERGED folder (Llama, Mistral, Qwen2, Qwen3) to GGUF for llama.cpp, Ollama, LM Studio.

    \b
    Examples:
      d2merge export-gguf ./merged -o model.gguf                   # f16
      d2merge export-gguf ./merged -o model-q8.gguf --gguf-type q8_0 --modelfile
    """
    from d2merge.export.gguf import check_gguf_type, export_gguf

    result = export_gguf(merged, out, gguf_type=check_gguf_type(gguf_type), overwrite=overwrite, name=name,
                         modelfile=modelfile, progress=not quiet and sys.stderr.isatty())
    click.echo(result.describe())


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


@cli.command("bench")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--merged", type=click.Path(exists=True, file_okay=False), default=None,
              help="A merged folder to measure (default: merge into a temp folder, fp32).")
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An ONNX graph without past (default: export the merged model to a temp folder).")
@click.option("--variants", default=None,
              help=f"Which of {', '.join(BENCH_VARIANTS)} to measure. [default: base,unmerged,merged,onnx, "
                   "plus llama_cpp when llama-cpp-python is installed]")
@click.option("--gguf", "gguf_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A GGUF for the llama_cpp variant (default: export the merged model, see --gguf-type).")
@click.option("--gguf-type", default="f16", show_default=True, help="Type of that temp GGUF export.")
@click.option("--genai", "genai_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="An onnxruntime-genai folder for the genai variant (default: build one, see --genai-precision).")
@click.option("--genai-precision", type=click.Choice(["fp32", "fp16", "int4"]), default="int4", show_default=True,
              help="Precision of that temp genai build.")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Prefill batch sizes.")
@click.option("--seq-lens", default="32,128", show_default=True, help="Prefill sequence lengths.")
@click.option("--decode-tokens", default=BenchSettings.decode_tokens, show_default=True, type=click.IntRange(0),
              help="Decode steps (batch 1, KV cache) measured per run; 0 skips decode.")
@click.option("--decode-prompt-len", default=BenchSettings.decode_prompt_len, show_default=True,
              type=click.IntRange(1), help="Prompt tokens prefilled before the measured decode steps.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0), help="Untimed runs per cell.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="Timed runs per cell.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the throughput chart to a PNG (needs the 'plot' extra: matplotlib).")
def bench_command(base: str, adapter: str, merged: str | None, onnx_path: str | None, variants: str | None,
                  gguf_path: str | None, gguf_type: str, genai_path: str | None, genai_precision: str,
                  batch_sizes: str, seq_lens: str, decode_tokens: int, decode_prompt_len: int, warmup: int,
                  repeats: int,
                  json_path: str | None, plot_path: str | None) -> None:
    """Measure throughput and latency: base vs unmerged vs merged vs ONNX Runtime (and llama.cpp, onnxruntime-genai).

    Each variant is loaded, measured and freed in turn. Every cell gets warm-up
    runs and repeated timed runs; the table shows medians, p50/p95 latency and
    the min-max spread, so you can tell a real difference from noise.

    \b
    Examples:
      d2merge bench ./base ./adapter                         # everything, small grid
      d2merge bench ./base ./adapter --merged ./merged --variants merged,unmerged
      d2merge bench ./base ./adapter --batch-sizes 8 --seq-lens 128 --json bench.json --plot bench.png
      d2merge bench ./base ./adapter --variants merged,onnx,llama_cpp,genai --genai-precision int4
    """
    from d2merge.bench import bench as run_bench
    from d2merge.bench import plot_report as plot_bench_report
    from d2merge.bench import save_report as save_bench_report

    settings = BenchSettings(batch_sizes=_int_list(batch_sizes), seq_lens=_int_list(seq_lens),
                             decode_batch_sizes=(1,) if decode_tokens else (), decode_tokens=decode_tokens,
                             decode_prompt_len=decode_prompt_len, warmup=warmup, repeats=repeats)
    chosen = None if variants is None else tuple(v.strip() for v in variants.split(",") if v.strip())
    report = run_bench(base, adapter, merged=merged, onnx=onnx_path, variants=chosen, settings=settings,
                       echo=lambda msg: click.echo(msg, err=True), gguf=gguf_path, gguf_type=gguf_type,
                       genai=genai_path, genai_precision=genai_precision)
    click.echo(report.table())
    if json_path:
        save_bench_report(report, json_path)
    if plot_path:
        plot_bench_report(report, plot_path)



@cli.command("verify")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
@click.argument("merged", metavar="[MERGED]", required=False)
@click.option("--dtypes", default=None, metavar="LIST",
              help="Comma-separated output dtypes (fp32,bf16,fp16) to merge on the fly, one temp folder at a "
                   "time, and compare side by side. Not with MERGED. [default: fp32]")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Probe with these prompts (one per line, tokenised with the base's tokenizer) instead of "
                   "the built-in sentences or random tokens. Their text is never printed.")
@click.option("--mc-eval", type=click.Path(dir_okay=False), default=None,
              help='Multiple-choice JSONL ({"prompt", "choices", "answer"} per line): report accuracy unmerged '
                   "and merged, the merge gap in percentage points and the flipped answers.")
@click.option("--floor-multiple", type=click.FloatRange(0, min_open=True), default=None,
              help="Largest allowed |logit difference| as a multiple of the rounding floor measured on the same "
                   f"probes. [default: {threshold_defaults('floor_multiple')}]")
@click.option("--alpha", type=click.FloatRange(0, 1), default=None,
              help="Level of the paired tests (McNemar on --mc-eval answers; flips against rounding's). "
                   f"[default: {threshold_defaults('alpha')}]")
@click.option("--max-abs-diff", type=click.FloatRange(0), default=None,
              help="A fixed limit on |logit difference| instead of the floor multiple. "
                   f"[default: {threshold_defaults('max_abs_diff')}]")
@click.option("--max-gap-pp", type=click.FloatRange(0), default=None,
              help="Also fail when |merge gap| exceeds this many percentage points. "
                   f"[default: {threshold_defaults('max_gap_pp')}]")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
              help=f"Also fail below this top-1 agreement (0-1). [default: {threshold_defaults('min_top1')}]")
@click.option("--max-ulp", type=click.FloatRange(0), default=None,
              help="Largest allowed weight error, in ulps of the output dtype. "
                   f"[default: {threshold_defaults('max_ulp')}]")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON (schema: docs/verify-report.md).")
@_options_from(VerifyOptions)
def verify_command(base: str, adapter: str, merged: str | None, dtypes: str | None, prompts: str | None,
                   mc_eval: str | None, floor_multiple: float | None, alpha: float | None,
                   max_abs_diff: float | None, max_gap_pp: float | None, min_top1: float | None,
                   max_ulp: float | None, report_path: str | None, **option_values: Any) -> None:
    """Prove a merge faithful: MERGED against BASE + ADAPTER run unmerged.

    Compares logits on probe inputs (max/mean |diff|, KL, top-1 agreement), the
    multiple-choice merge gap with --mc-eval, and every merged tensor against an
    fp64 recomputation (abs and ulp error, plus the method's own figures).
    Without MERGED, merges into a temp folder per --dtypes. MERGED may also be a
    .gguf file (read with transformers' GGUF loader) or an onnxruntime-genai
    folder (logits through its Generator). Only one model is in memory at a
    time. Exit 0: pass; 1: a threshold was exceeded; 2: bad input.

    \b
    Examples:
      d2merge verify ./base ./adapter ./merged
      d2merge verify ./base ./adapter model-q8_0.gguf
      d2merge verify ./base ./adapter --dtypes fp32,bf16 --mc-eval eval.jsonl
      d2merge verify ./base ./adapter ./merged --prompts prompts.txt --report verify.json
    """
    from d2merge.verify import verify

    options = VerifyOptions(**option_values)
    thresholds = {"floor_multiple": floor_multiple, "alpha": alpha, "max_abs_diff": max_abs_diff,
                  "max_gap_pp": max_gap_pp, "min_top1": min_top1, "max_ulp": max_ulp}
    report = verify(base, adapter, merged, dtypes=dtypes, mc_eval=mc_eval, prompts=prompts, thresholds=thresholds,
                    options=options, echo=lambda message: click.echo(message, err=True), report=report_path)
    click.echo(report.table())
    if not report.passed:
        raise VerificationFailed("; ".join(report.failures()))

@cli.command("merge-many")
@click.argument("base", metavar="BASE")
@click.argument("manifest", metavar="MANIFEST", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "outdir", type=click.Path(file_okay=False), default=None,
              help="Folder that receives one output per job (created if missing). Required unless --dry-run.")
@_options_from(ManyOptions)
@click.option("--ray", "ray_address", metavar="auto|local|ADDRESS", default=None,
              help="Run the jobs as Ray tasks: auto (the cluster `ray start` set up), local (start one here), or a "
                   "cluster ADDRESS. Paths must be shared by every node. Needs the 'ray' extra.")
@click.option("--dry-run", is_flag=True, help="Plan and check every job, print the plans, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plans as JSON.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the summary as JSON: per job the output, status, seconds, verify verdict, error.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal).")
def merge_many_command(base: str, manifest: str, outdir: str | None, ray_address: str | None, dry_run: bool,
                       as_json: bool, report_path: str | None, quiet: bool, **options: Any) -> None:
    """Merge every adapter of MANIFEST into BASE, reading the base once: one output per job under OUTDIR.

    \b
    MANIFEST  JSON or YAML: a list of adapter folders (outputs named after them), or
              {defaults: {...}, jobs: [{adapter, name, dtype, format, max_shard_size,
              tied_embeddings, verify}, ...]}; see docs/merge-many.md
    Every job is planned and checked before anything is written; a rerun skips
    jobs whose output is complete with matching provenance and redoes the rest.
    Exit codes: 0 all jobs done, 1 a verification failed, 2 a job could not run.

    \b
    Examples:
      d2merge merge-many ./llama-3b adapters.yaml -o ./merged --dry-run
      d2merge merge-many ./llama-3b adapters.json -o ./merged --dtype bf16 --report report.json
      d2merge merge-many ./llama-3b adapters.yaml -o /shared/merged --ray auto
    """
    from d2merge.many import merge_many

    if outdir is None and not dry_run:
        raise click.UsageError("missing -o/--out OUTDIR (or use --dry-run to see the plans)")
    report = merge_many(base, manifest, outdir or ".", ManyOptions(**options), dry_run=dry_run, ray=ray_address,
                        progress=not quiet and sys.stderr.isatty(), echo=lambda msg: click.echo(msg, err=True))
    if dry_run:
        if as_json:
            click.echo(json.dumps([{**o.to_json(), "plan": o.plan.summary() if o.plan else None}
                                   for o in report.outcomes], indent=2, default=str))
        else:
            for o in report.outcomes:
                click.echo(f"== job {o.name} -> {o.output}: {o.status}" + (f": {o.error}" if o.error else "")
                           + (" (complete, provenance matches)" if o.status == "skipped" else ""))
                if o.plan is not None and o.status != "skipped":
                    click.echo(o.plan.describe())
                click.echo("")
            click.echo(report.table())
    else:
        click.echo(report.table())
    if report_path:
        report.save(report_path)
    if report.exit_code == 2:
        failed = [o for o in report.outcomes if o.status == "failed"]
        not_run = sum(o.status == "not_run" for o in report.outcomes)
        raise D2MergeError(f"{len(failed)} of {len(report.outcomes)} jobs failed"
                           + (f", {not_run} not run (nothing was written; --keep-going runs them)" if not_run else "")
                           + (f"; first: {failed[0].error}" if failed else ""))
    if report.exit_code == 1:
        raise VerificationFailed(", ".join(o.name for o in report.outcomes if o.status == "verify_failed")
                                 + " failed verification")


# end of commands


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps d2merge's errors to one line and an exit code."""
    if argv is None:
        argv = sys.argv[1:]
    # Decided per call: an earlier in-process call with --debug must not leak into this one.
    _DEBUG["on"] = bool(os.environ.get("D2MERGE_DEBUG")) or "--debug" in argv
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
    except Exception as exc:  # a bug in d2merge, not the user's input: its own exit code
        if _DEBUG["on"]:
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
