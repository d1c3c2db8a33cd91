"""Verify's option models and default thresholds: the source of ``d2merge verify``'s flags.

Torch-free, so ``d2merge --help`` and flag errors answer at once; ``d2merge.verify`` does the work
and re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from d2merge.options.base import OptionModel, option, option_like
from d2merge.options.merge import MergeOptions


@dataclass(frozen=True)
class Thresholds:
    """How one output dtype is judged (docs/verify-report.md says how each number was chosen).

    The logit limits come from the model itself: verify measures the **rounding floor** (the
    unmerged model against itself with one rounding of the output dtype applied to the base
    weights, on the same probes) and allows ``floor_multiple`` times it. Flips (argmax on the
    probes, answers on --mc-eval) are judged by exact binomial tests at level ``alpha``. The
    fixed limits (``max_abs_diff``, ``min_top1``, ``max_gap_pp``) are explicit overrides: None
    means "from the floor and the tests".
    """

    floor_multiple: float  # max |logit diff| may reach this multiple of the rounding floor
    alpha: float  # level of the paired tests (McNemar on the answers, flips against rounding's)
    max_ulp: float  # largest weight error against the fp64 reference, in output-dtype ulps
    max_abs_diff: float | None = None  # a fixed logit limit instead of floor_multiple x floor
    min_top1: float | None = None  # a fixed top-1 agreement limit (fraction) on top of the flip test
    max_gap_pp: float | None = None  # a fixed |merge gap| limit in percentage points on top of the tests
    max_kl: float | None = None  # a limit on the mean KL(unmerged || merged) per position (quantized outputs)
    max_ppl_ratio: float | None = None  # a limit on perplexity merged / unmerged on real text (quantized outputs)


# Defaults per output dtype (measurements in docs/verify-report.md):
# - floor_multiple: the max |logit diff| of a correct merge is another draw of the same rounding
#   as the floor; on SmolLM2 with sentence probes the ratio measured 0.75-2.01 for bf16 and fp16
#   (max over positions is a noisy statistic: two draws of one rounding),
#   hence 5: 2.5x room, and every gross fault measured (swapped layers, another task) sits at
#   over 250x. fp32's floor is the arithmetic floor
#   (one fp32 rounding measures 3e-5 there, 10x below it), and 10 x 1e-5 is export-onnx's 1e-4.
# - alpha 0.01: a correct merge flips answers like rounding does and in no preferred direction;
#   each test then fails it with probability at most 1%.
# - max_ulp: a correct merge rounds once, so 16-bit tensors sit within 0.5 ulp of the fp64
#   reference (measured 0.5000-0.5003 on SmolLM2, up to 0.503 at 134M); 0.75 leaves room for the
#   fp32 arithmetic before the cast and still fails a merge that rounds twice: the update rounded
#   and added into the bf16 base measured 0.9995 ulp on SmolLM2, under the former limit of 1. fp32 outputs carry that arithmetic's own error (measured 3-7 ulps on tiny
#   models, 22 at 134M, growing with the norms' length), hence 256, still far below what one trip
#   through fp16 (up to 4096) or bf16 (up to 65536) leaves.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(floor_multiple=10.0, alpha=0.01, max_ulp=256.0),
    "bf16": Thresholds(floor_multiple=5.0, alpha=0.01, max_ulp=0.75),
    "fp16": Thresholds(floor_multiple=5.0, alpha=0.01, max_ulp=0.75),
}


def threshold_defaults(name: str) -> str:
    """``fp32 10, bf16 5, fp16 5``: a threshold's per-dtype defaults, for help texts."""
    values = {dtype: getattr(limits, name) for dtype, limits in DEFAULT_THRESHOLDS.items()}
    if all(v is None for v in values.values()):
        return "none (from the rounding floor and the tests)"
    return ", ".join(f"{dtype} {value:g}" for dtype, value in values.items())


@dataclass(frozen=True)
class VerifyOptions(OptionModel):
    """Every verify setting in one place; the CLI's flags and help text are read from these fields."""

    what: ClassVar[str] = "verify option"

    probe_source: str = option("auto", choices=("auto", "sentences", "random"),
                               help="Probe inputs without --prompts: built-in English sentences (needs the base's "
                                    "tokenizer), seeded random tokens, or auto (sentences when the base has a "
                                    "tokenizer).")
    num_probes: int = option(8, min=1, help="Random probe sequences (random probes only).")
    probe_length: int = option(32, min=1, help="Tokens per random probe; also the most tokens kept of each sentence "
                                               "or --prompts line.")
    seed: int = option(0, help="Seed of the random probe tokens and of the rounding floor's draw.")
    mc_score: str = option("sum", choices=("sum", "mean"),
                           help="How a choice is scored: summed or per-token mean log-likelihood of its tokens.")
    batch_size: int = option(8, min=1, help="Sequences per forward pass.")
    tied_embeddings: str = option_like(MergeOptions, "tied_embeddings",
                                       help="The --tied-embeddings policy the merge used (needed to recompute it).")
    original_base: str | None = option(None,
                                       help="With a quantized BASE (QLoRA): also merge the adapter into this 16-bit "
                                            "original and show, in one more column that is never judged, how far that "
                                            "model is from the one trained (docs/qlora.md).")
    allow_pickle: bool = option(False, help="Allow .bin (pickle) weights. Only for trusted files.")
    max_activation_memory: int = option(1024, min=1,
                                        help="MiB of hidden states kept between decoder blocks (models run one block "
                                             "at a time); inputs beyond it run in further passes over the weights.")
    device: str = option_like(MergeOptions, "device",
                              help="Where the blocks run: cpu, or cuda (one block of GPU memory at a time).")


@dataclass(frozen=True)
class ThresholdOptions(OptionModel):
    """verify's limits as flags: each None means "the output dtype's default" (:data:`DEFAULT_THRESHOLDS`)."""

    what: ClassVar[str] = "verify threshold"

    floor_multiple: float | None = option(None, min=0, min_open=True,
                                          help="Largest allowed |logit difference| as a multiple of the rounding floor "
                                               "measured on the same probes.",
                                          default_help=threshold_defaults("floor_multiple"))
    alpha: float | None = option(None, min=0, max=1,
                                 help="Level of the paired tests (McNemar on --mc-eval answers; flips against "
                                      "rounding's).", default_help=threshold_defaults("alpha"))
    max_abs_diff: float | None = option(None, min=0, help="A fixed limit on |logit difference| instead of the floor "
                                                          "multiple.", default_help=threshold_defaults("max_abs_diff"))
    max_gap_pp: float | None = option(None, min=0, help="Also fail when |merge gap| exceeds this many percentage "
                                                        "points.", default_help=threshold_defaults("max_gap_pp"))
    min_top1: float | None = option(None, min=0, max=1, help="Also fail below this top-1 agreement (0-1).",
                                    default_help=threshold_defaults("min_top1"))
    max_kl: float | None = option(None, min=0, help="Also fail above this mean KL(unmerged || merged) per position.",
                                  default_help="per quantized type, docs/gguf.md; none for fp32/bf16/fp16")
    max_ppl_ratio: float | None = option(None, min=0, help="Also fail above this perplexity ratio merged / unmerged "
                                                           "on real text.",
                                         default_help="per quantized type, docs/gguf.md; none for fp32/bf16/fp16")
    max_ulp: float | None = option(None, min=0, help="Largest allowed weight error, in ulps of the output dtype.",
                                   default_help=threshold_defaults("max_ulp"))
