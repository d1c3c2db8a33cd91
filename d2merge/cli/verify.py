"""``d2merge verify``: merged against base + adapter run unmerged; flags from VerifyOptions and ThresholdOptions."""

from __future__ import annotations

from typing import Any

import click

from d2merge.cli.flags import float_list, options_from, refuse_flags_out_of_context, values_of
from d2merge.cli.merge import what_to_merge
from d2merge.console import ConsoleCommand, say
from d2merge.errors import VerificationFailed
from d2merge.options.adapter_ops import MixOptions
from d2merge.options.verify import ThresholdOptions, VerifyOptions


@click.command("verify", cls=ConsoleCommand)
@click.argument("base", metavar="BASE")
@click.argument("inputs", metavar="ADAPTER... [MERGED]", nargs=-1, required=True)
@click.option("--dtypes", default=None, metavar="LIST",
              help="Comma-separated output dtypes (fp32,bf16,fp16) to merge on the fly, one temp folder at a "
                   "time, and compare side by side. Not with MERGED. [default: fp32]")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Probe with these prompts (one per line, tokenised with the base's tokenizer) instead of "
                   "the built-in sentences or random tokens. Their text is never printed.")
@click.option("--mc-eval", type=click.Path(dir_okay=False), default=None,
              help='Multiple-choice JSONL ({"prompt", "choices", "answer"} per line): report accuracy unmerged '
                   "and merged, the merge gap in percentage points and the flipped answers.")
@options_from(ThresholdOptions)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON (schema: docs/verify-report.md).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as one self-contained HTML page (verdict, floors, per-layer weight error, "
                   "logit distributions, flips, provenance; docs/html-reports.md).")
@options_from(VerifyOptions)
@options_from(MixOptions)
@click.pass_context
def verify_command(ctx: click.Context, base: str, inputs: tuple[str, ...], dtypes: str | None, prompts: str | None,
                   mc_eval: str | None, report_path: str | None, html_path: str | None, **values: Any) -> None:
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
      d2merge verify ./base ./math ./code-dora ./merged --weights 0.7,0.5     # a merge of several adapters
    """
    refuse_flags_out_of_context(ctx, (MixOptions,), values)
    mix = MixOptions(**values_of(MixOptions, values))
    count = 1 if mix.weights is None else len(float_list(mix.weights, "--weights"))
    if len(inputs) not in (count, count + 1):
        raise click.UsageError(f"expected {count} ADAPTER(s){' (one per --weights value)' if mix.weights else ''} "
                               f"and at most one MERGED, got {len(inputs)} path(s)"
                               + ("" if mix.weights else "; several adapters need --weights w1,w2,..."))
    adapter = what_to_merge(inputs[:count], mix)
    merged = inputs[count] if len(inputs) > count else None
    thresholds = ThresholdOptions(**values_of(ThresholdOptions, values))  # ranges refused before torch loads
    options = VerifyOptions(**values_of(VerifyOptions, values))
    from d2merge.verify import verify

    report = verify(base, adapter, merged, dtypes=dtypes, mc_eval=mc_eval, prompts=prompts,
                    thresholds=thresholds.values(), options=options, echo=say, report=report_path, html=html_path)
    click.echo(report.table(failures=False))  # the failures are the final line's, printed once
    if not report.passed:
        raise VerificationFailed("; ".join(report.failures()))
