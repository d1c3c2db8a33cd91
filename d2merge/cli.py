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
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import click

# Only light modules at import time: `d2merge --help` and flag errors must not wait for torch.
# Each command imports the library it calls (tests/test_cli_startup.py checks this).
from d2merge import __version__
from d2merge.adapter_ops.options import CombineOptions, ConvertOptions, ExtractOptions
from d2merge.console import QUIET_HELP, ConsoleGroup, say
from d2merge.bench import ALL_VARIANTS as BENCH_VARIANTS
from d2merge.bench import BenchSettings
from d2merge.demo_figures import DEMO_SECONDS
from d2merge.demo_figures import MEASURED as DEMO_MEASURED
from d2merge.demo_figures import THREE_COMMANDS
from d2merge.errors import D2MergeError, VerificationFailed
from d2merge.many.options import ManyOptions
from d2merge.export.formats import FORMATS as EXPORT_FORMATS
from d2merge.options import EXPORTERS, ONNX_DTYPES, MergeOptions, OnnxExportOptions
from d2merge.options import option_help as model_help
from d2merge.verify_options import VerifyOptions, threshold_defaults

_DEBUG = {"on": bool(os.environ.get("D2MERGE_DEBUG"))}
_STARTED = {"at": time.monotonic()}  # main() resets it: the demo says how long its user waited
INTERNAL_ERROR_EXIT = 3  # not 2: a CI job must tell a d2merge bug from a bad input


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
                        else {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str))
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


INT4_FLAGS = ("int4_block_size", "int4_accuracy_level", "int4_algorithm", "int4_asymmetric")


def _int4_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The onnxruntime-genai builder's int4 settings, shared by `export-onnx --runtime genai` and
    `merge --format onnx-genai` (the same flags, names and defaults in both)."""
    options = [
        click.option("--int4-block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default=None,
                     help="With --precision int4: values per quantization block. [default: 32]"),
        click.option("--int4-accuracy-level", type=click.IntRange(1, 4), default=None,
                     help="With --precision int4: activations in the int4 MatMul (4 int8, 3 bf16, 2 fp16, 1 fp32). "
                          "[default: 4]"),
        click.option("--int4-algorithm", type=click.Choice(["default", "rtn", "k_quant", "rtn_last", "k_quant_last",
                                                            "k_quant_mixed"]), default=None,
                     help="With --precision int4: the builder's algo_config (k_quant: per-block scale search; _last: "
                          "lm_head at int8; _mixed: also llama.cpp's sensitive layers at int8). [default: "
                          "k_quant_mixed, the lowest KL on SmolLM2; docs/onnx-genai.md]"),
        click.option("--int4-asymmetric", is_flag=True,
                     help="With --precision int4: uint4 with a zero point per block."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _int4_settings(ctx: click.Context, block_size: str | None, accuracy_level: int | None, algorithm: str | None,
                   asymmetric: bool) -> Any:
    """``Int4Options`` from the --int4-* flags given (their defaults for the others); None when none is given."""
    if not any(ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE for name in INT4_FLAGS):
        return None
    from d2merge.export.onnx_genai import Int4Options

    defaults = Int4Options()
    return Int4Options(int(block_size or defaults.block_size), accuracy_level or defaults.accuracy_level,
                       algorithm or defaults.algorithm, not asymmetric)


GGUF_TYPE_HELP = ("f32, f16, bf16, q8_0, q4_0_pure, q4_1_pure, q5_0_pure, q5_1_pure (gguf-py); with the gguf-llama "
                  "extra, llama.cpp's own quantizer: q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, "
                  "iq4_nl, iq4_xs, q4_0, q4_1, q5_0, q5_1 (llama.cpp's per-tensor mix; an f32 temp beside the output). "
                  "Norms stay f32.")
IMATRIX_HELP = ("llama.cpp's importance matrix (llama-imatrix's GGUF or legacy .dat) for the types llama.cpp's "
                "quantizer writes; checked against the model.")


@cli.command("merge")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
@click.option("-o", "--out", "out", type=click.Path(), default=None,
              help="Output folder, or a .safetensors, .onnx or .gguf file (the suffix picks --format). "
                   "Required unless --dry-run.")
@click.option("--format", "output_format", type=click.Choice(EXPORT_FORMATS), default=None,
              help="[default: from OUT's suffix (.gguf, .safetensors, .onnx), else hf] "
                   "hf: Hugging Face folder; safetensors: one file with provenance metadata; "
                   "onnx: exported and validated with ONNX Runtime (fp32, or fp16 with --dtype fp16); "
                   "onnx-genai: onnxruntime-genai build, validated with its Generator (see --precision); "
                   "gguf: one .gguf file for llama.cpp, Ollama, LM Studio (see --gguf-type).")
@click.option("--precision", "genai_precision", type=click.Choice(["fp32", "fp16", "int4"]), default="fp32",
              show_default=True, help="With --format onnx-genai: precision of the onnxruntime-genai build.")
@_int4_options
@click.option("--gguf-type", default="f16", show_default=True, metavar="TYPE", help="With --format gguf: " + GGUF_TYPE_HELP)
@click.option("--imatrix", "imatrix", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="With --format gguf: " + IMATRIX_HELP)
@click.option("--modelfile", is_flag=True,
              help="With --format gguf: also write an Ollama Modelfile beside it, named <stem>.Modelfile.")
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
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.pass_context
def merge_command(ctx: click.Context, base: str, adapter: str, out: str | None, output_format: str | None,
                  genai_precision: str, int4_block_size: str | None, int4_accuracy_level: int | None,
                  int4_algorithm: str | None, int4_asymmetric: bool,
                  gguf_type: str, imatrix: str | None, modelfile: bool,
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
      d2merge merge ./llama-3b ./my-adapter -o merged.safetensors        # one file (from the suffix)
      d2merge merge ./llama-3b ./my-adapter -o model.gguf --gguf-type q8_0
      d2merge merge ./llama-3b ./my-adapter -o ./merged-onnx --format onnx --dtype fp16
      d2merge merge ./llama-3b ./my-adapter -o ./genai --format onnx-genai --precision int4 --int4-block-size 64
    """
    from d2merge.output_names import format_for_output

    output_format = format_for_output(out, output_format)
    _refuse_flags_out_of_context(ctx, {
        "as_json": ("--json", dry_run, "it prints the --dry-run plan as JSON; add --dry-run"),
        **{name: (flag, push_to is not None, "it applies to the push; add --push-to REPO_ID")
           for name, flag in (("private", "--private"), ("revision", "--revision"), ("create_pr", "--create-pr"),
                              ("commit_message", "--commit-message"), ("token", "--token"))},
        "gguf_type": ("--gguf-type", output_format == "gguf", "it applies to --format gguf"),
        "modelfile": ("--modelfile", output_format == "gguf", "it applies to --format gguf"),
        "imatrix": ("--imatrix", output_format == "gguf", "it applies to --format gguf"),
        "genai_precision": ("--precision", output_format == "onnx-genai", "it applies to --format onnx-genai"),
        **{name: (f"--{name.replace('_', '-')}", output_format == "onnx-genai" and genai_precision == "int4",
                  "it applies to --format onnx-genai --precision int4") for name in INT4_FLAGS},
    })
    merge_options = MergeOptions(**options)
    if out is not None and not dry_run and merge_options.hash_sources and output_format in ("hf", "safetensors"):
        # Hash a warm base on the other core while torch imports (io/source_hashes.py; no torch needed).
        from d2merge.io.source_hashes import hash_ahead_of_merge

        hash_ahead_of_merge(base, adapter)
    from d2merge.publish import PushSettings, merge_verify_push

    format_options: dict[str, Any] = {"genai_precision": genai_precision}
    int4 = _int4_settings(ctx, int4_block_size, int4_accuracy_level, int4_algorithm, int4_asymmetric)
    if int4 is not None:
        format_options["genai_int4"] = int4
    if output_format == "gguf":
        from d2merge.export.gguf import check_gguf_type

        format_options.update(gguf_type=check_gguf_type(gguf_type), gguf_modelfile=modelfile, gguf_imatrix=imatrix)
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


@cli.command("demo", help=DEMO_HELP)
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
    click.echo(f"\ndemo finished in {time.monotonic() - _STARTED['at']:.0f} s: files in {report.workdir}")
    click.echo("\nYour own base and adapter, in three commands:")
    for line in THREE_COMMANDS:
        click.echo("  " + line)
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
@_int4_options
@click.pass_context
def export_onnx_command(ctx: click.Context, model_dir: str, out: str, dtype: str, with_past: bool, opset: int,
                        exporter: str, external_data: bool | None, no_validate: bool, atol: float | None,
                        overwrite: bool, runtime: str, precision: str, int4_block_size: str | None,
                        int4_accuracy_level: int | None, int4_algorithm: str | None, int4_asymmetric: bool) -> None:
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
    int4_flags = INT4_FLAGS
    given = [name for name in ("dtype", "with_past", "opset", "exporter", "external_data", "precision", *int4_flags)
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if runtime == "genai":
        from d2merge.export.onnx_genai import export_genai

        generic_only = [name for name in given if name != "precision" and name not in int4_flags]
        if generic_only:
            raise click.UsageError(f"--{generic_only[0].replace('_', '-')} applies to the generic export; with "
                                   "--runtime genai choose --precision fp32|fp16|int4")
        int4 = _int4_settings(ctx, int4_block_size, int4_accuracy_level, int4_algorithm, int4_asymmetric)
        click.echo(export_genai(model_dir, out, precision=precision, validate=not no_validate, atol=atol,
                                overwrite=overwrite, int4=int4).describe())
        return
    if any(name in given for name in int4_flags):
        raise click.UsageError("--int4-* options are for --runtime genai --precision int4")
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
@click.option("--gguf-type", default="f16", show_default=True, metavar="TYPE", help=GGUF_TYPE_HELP)
@click.option("--imatrix", "imatrix", type=click.Path(dir_okay=False), default=None, metavar="FILE", help=IMATRIX_HELP)
@click.option("--name", default=None, help="general.name in the GGUF. [default: the output file's stem]")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
def export_gguf_command(merged: str, out: str, gguf_type: str, imatrix: str | None, name: str | None,
                        modelfile: bool, overwrite: bool, quiet: bool) -> None:
    """Export a merged MERGED folder (Llama, Mistral, Qwen2, Qwen3) to GGUF for llama.cpp, Ollama, LM Studio.

    \b
    Examples:
      d2merge export-gguf ./merged -o model.gguf                   # f16
      d2merge export-gguf ./merged -o model-q8.gguf --gguf-type q8_0 --modelfile
      d2merge export-gguf ./merged -o model-q4km.gguf --gguf-type q4_k_m     # llama.cpp's quantizer
    """
    from d2merge.export.gguf import check_gguf_type, export_gguf

    result = export_gguf(merged, out, gguf_type=check_gguf_type(gguf_type), overwrite=overwrite, name=name,
                         modelfile=modelfile, progress=not quiet, imatrix=imatrix)
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
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as one self-contained HTML page (charts, spread, ratios).")
def bench_command(base: str, adapter: str, merged: str | None, onnx_path: str | None, variants: str | None,
                  gguf_path: str | None, gguf_type: str, genai_path: str | None, genai_precision: str,
                  batch_sizes: str, seq_lens: str, decode_tokens: int, decode_prompt_len: int, warmup: int,
                  repeats: int,
                  json_path: str | None, plot_path: str | None, html_path: str | None) -> None:
    """Measure throughput and latency: base vs unmerged vs merged vs ONNX Runtime (and llama.cpp, onnxruntime-genai).

    Each variant is loaded, measured and freed in turn. Every cell gets warm-up
    runs and repeated timed runs; the table shows medians, p50/p95 latency and
    the min-max spread, so you can tell a real difference from noise.

    \b
    Examples:
      d2merge bench ./base ./adapter                         # everything, small grid
      d2merge bench ./base ./adapter --merged ./merged --variants merged,unmerged
      d2merge bench ./base ./adapter --batch-sizes 8 --seq-lens 128 --json bench.json --html bench.html
      d2merge bench ./base ./adapter --variants merged,onnx,llama_cpp,genai --genai-precision int4
    """
    from d2merge.output_names import check_report_file

    for option, path in (("--json", json_path), ("--plot", plot_path)):
        check_report_file(path, option)  # before minutes of measuring, not after
    from d2merge.bench import bench as run_bench
    from d2merge.bench import plot_report as plot_bench_report
    from d2merge.bench import save_report as save_bench_report
    from d2merge.io.output import check_output_location

    if html_path:  # before the measurements: a page is never lost to a bad path at the end
        html_path = str(check_output_location(Path(html_path), (), overwrite=True, is_file=True))
    settings = BenchSettings(batch_sizes=_int_list(batch_sizes), seq_lens=_int_list(seq_lens),
                             decode_batch_sizes=(1,) if decode_tokens else (), decode_tokens=decode_tokens,
                             decode_prompt_len=decode_prompt_len, warmup=warmup, repeats=repeats)
    chosen = None if variants is None else tuple(v.strip() for v in variants.split(",") if v.strip())
    report = run_bench(base, adapter, merged=merged, onnx=onnx_path, variants=chosen, settings=settings,
                       echo=say, gguf=gguf_path, gguf_type=gguf_type,
                       genai=genai_path, genai_precision=genai_precision)
    click.echo(report.table())
    if json_path:
        save_bench_report(report, json_path)
    if plot_path:
        plot_bench_report(report, plot_path)
    if html_path:
        from d2merge.reports.bench_page import write_bench_page

        write_bench_page(report, html_path)



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
@click.option("--max-kl", type=click.FloatRange(0), default=None,
              help="Also fail above this mean KL(unmerged || merged) per position. [default: per quantized type, "
                   "docs/gguf.md; none for fp32/bf16/fp16]")
@click.option("--max-ppl-ratio", type=click.FloatRange(0), default=None,
              help="Also fail above this perplexity ratio merged / unmerged on real text. [default: per quantized "
                   "type, docs/gguf.md; none for fp32/bf16/fp16]")
@click.option("--max-ulp", type=click.FloatRange(0), default=None,
              help="Largest allowed weight error, in ulps of the output dtype. "
                   f"[default: {threshold_defaults('max_ulp')}]")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON (schema: docs/verify-report.md).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as one self-contained HTML page (verdict, floors, per-layer weight error, "
                   "logit distributions, flips, provenance; docs/html-reports.md).")
@_options_from(VerifyOptions)
def verify_command(base: str, adapter: str, merged: str | None, dtypes: str | None, prompts: str | None,
                   mc_eval: str | None, floor_multiple: float | None, alpha: float | None,
                   max_abs_diff: float | None, max_gap_pp: float | None, min_top1: float | None,
                   max_kl: float | None, max_ppl_ratio: float | None,
                   max_ulp: float | None, report_path: str | None, html_path: str | None,
                   **option_values: Any) -> None:
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
      d2merge verify ./base ./adapter ./merged --prompts prompts.txt --report verify.json --html verify.html
    """
    from d2merge.verify import verify

    options = VerifyOptions(**option_values)
    thresholds = {"floor_multiple": floor_multiple, "alpha": alpha, "max_abs_diff": max_abs_diff,
                  "max_gap_pp": max_gap_pp, "min_top1": min_top1, "max_ulp": max_ulp, "max_kl": max_kl,
                  "max_ppl_ratio": max_ppl_ratio}
    report = verify(base, adapter, merged, dtypes=dtypes, mc_eval=mc_eval, prompts=prompts, thresholds=thresholds,
                    options=options, echo=say, report=report_path, html=html_path)
    click.echo(report.table(failures=False))  # the failures are the final line's, printed once
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
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
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
    from d2merge.output_names import check_report_file

    check_report_file(report_path, "--report")  # before the merges, not after them
    from d2merge.many import merge_many

    if outdir is None and not dry_run:
        raise click.UsageError("missing -o/--out OUTDIR (or use --dry-run to see the plans)")
    report = merge_many(base, manifest, outdir or ".", ManyOptions(**options), dry_run=dry_run, ray=ray_address,
                        progress=not quiet and sys.stderr.isatty(), echo=say)
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


@cli.command("combine")
@click.argument("adapters", metavar="ADAPTER...", nargs=-1, required=True)
@click.option("-o", "--out", "out", type=click.Path(), required=True, help="Output adapter folder (plain PEFT LoRA).")
@click.option("--weights", "weights", required=True, metavar="W1,W2,...",
              help="One weight per adapter, in order (negative subtracts an adapter's effect).")
@click.option("--base", "base", default=None, metavar="BASE",
              help="The base model: needed for DoRA, D2-LoRA, Dual LoRA and PiSSA/OLoRA inputs, whose updates "
                   "depend on it.")
@_options_from(CombineOptions)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-module report (rank, retained energy) as JSON.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin (pickle) adapter weights (weights_only=True).")
def combine_command(adapters: tuple[str, ...], out: str, weights: str, base: str | None, report_path: str | None,
                    allow_pickle: bool, **options: Any) -> None:
    """Combine ADAPTERs into one plain LoRA adapter, as PEFT's add_weighted_adapter does.

    \b
    Examples:
      d2merge combine ./math ./code --weights 0.6,0.4 --combination linear -o ./both
      d2merge combine ./math ./code --weights 1,1 --combination ties_svd --density 0.5 --svd-rank 16 -o ./both
      d2merge combine ./dora-a ./d2lora-b --base ./llama --weights 1,1 --combination svd --svd-rank 32 -o ./both
    """
    from d2merge.adapter_ops.combine import combine

    parsed = _float_list(weights, "--weights")
    result = combine(list(adapters), out, parsed, CombineOptions(**options), base=base, allow_pickle=allow_pickle)
    click.echo(result.describe())
    if report_path:
        from pathlib import Path

        from d2merge.io.output import write_json

        write_json(Path(report_path), {"out": str(result.out), "combination": result.combination,
                                       "weights": list(result.weights),
                                       "modules": [m.to_json() for m in result.modules]})


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=flag) from None


@cli.command("convert")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--base", "base", required=True, metavar="BASE", help="The base model the adapter was trained on.")
@click.option("-o", "--out", "out", type=click.Path(), required=True,
              help="Output: an adapter folder (--to lora) or a .gguf file (--to gguf-lora).")
@_options_from(ConvertOptions)
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
    opts = ConvertOptions(**options)
    if opts.to == "gguf-lora":
        from d2merge.export.gguf_lora import convert_to_gguf_lora

        result = convert_to_gguf_lora(adapter, base, out, opts, allow_pickle=allow_pickle, report=report_path)
    else:
        from d2merge.adapter_ops.convert import convert_to_lora

        result = convert_to_lora(adapter, base, out, opts, allow_pickle=allow_pickle, report=report_path)
    click.echo(result.describe())


@cli.command("extract")
@click.argument("base", metavar="BASE")
@click.argument("tuned", metavar="TUNED")
@click.option("-o", "--out", "out", type=click.Path(), required=True, help="Output adapter folder (plain PEFT LoRA).")
@_options_from(ExtractOptions)
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
    """
    from d2merge.adapter_ops.extract import extract

    result = extract(base, tuned, out, ExtractOptions(**options), allow_pickle=allow_pickle, report=report_path)
    click.echo(result.describe())


# end of commands


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps d2merge's errors to one line and an exit code."""
    _STARTED["at"] = time.monotonic()
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
