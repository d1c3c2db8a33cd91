"""What verify measured, column by column: plain frozen records, no torch, no I/O.

``d2merge.verify.report`` turns them into the JSON report (docs/verify-report.md) and the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from d2merge.options.verify import Thresholds

# Edges of the |logit difference| histogram (``LogitStats.abs_diff_counts``): one bin per decade,
# fixed so that a column and its rounding floor (and two runs) count into the same bins.
# Bin 0 holds values below 1e-8 (exact zeros included), bin i values in [edge[i-1], edge[i]),
# the last bin values of 100 and above.
ABS_DIFF_EDGES: tuple[float, ...] = tuple(10.0 ** e for e in range(-8, 3))


@dataclass(frozen=True)
class LogitStats:
    positions: int
    max_abs_diff: float
    mean_abs_diff: float
    kl_mean: float
    kl_max: float
    top1_agreement: float
    argmax_flips: int
    # Per probe, in probe order: where on the probes the difference sits (the HTML page draws them).
    probe_max_abs_diff: list[float] = field(default_factory=list)
    probe_kl_mean: list[float] = field(default_factory=list)
    probe_top1_agreement: list[float] = field(default_factory=list)
    # How many |logit differences| (every real position x vocabulary entry) fall in each bin of ABS_DIFF_EDGES.
    abs_diff_counts: list[int] = field(default_factory=list)
    # Perplexity of each model on the probes' own next tokens, and merged / unmerged: only for real
    # text (sentences, --prompts), where the next token is what a user's text would have.
    ppl_unmerged: float | None = None
    ppl_merged: float | None = None
    ppl_ratio: float | None = None


@dataclass(frozen=True)
class FlippedAnswer:
    index: int
    answer: int
    unmerged: int
    merged: int


@dataclass(frozen=True)
class MCResult:
    examples: int
    accuracy_unmerged: float
    accuracy_merged: float
    merge_gap_pp: float  # signed: merged minus unmerged
    flipped: list[FlippedAnswer]
    right_to_wrong: int = 0
    wrong_to_right: int = 0
    gap_ci_pp: tuple[float, float] = (0.0, 0.0)  # 95% interval of the gap (Agresti-Min paired interval)
    mcnemar_p: float = 1.0  # exact McNemar: two-sided binomial test of right_to_wrong vs wrong_to_right
    rounding_flips: int | None = None  # answers that one rounding of the base alone flips
    flips_vs_rounding_p: float | None = None  # one-sided: more flips than rounding's, by chance


@dataclass(frozen=True)
class RoundingFloor:
    """What one rounding to the output dtype costs this model on these probes, with no merge at all.

    ``logits`` compares the unmerged model with itself after one rounding of the output dtype
    applied to its base weights; ``max_abs_diff`` is what ``floor_multiple`` multiplies: the
    larger of that and the fp32 arithmetic floor (ARITHMETIC_FLOOR_*).
    """

    logits: LogitStats
    arithmetic: float
    max_abs_diff: float
    mc_flips: int | None


@dataclass(frozen=True)
class Limits:
    """The numbers a column was judged against, resolved from its Thresholds and its floor."""

    max_abs_diff: float
    max_abs_diff_from: str  # "floor" (floor_multiple x floor) or "fixed" (--max-abs-diff)
    max_ulp: float
    alpha: float
    min_top1: float | None
    max_gap_pp: float | None
    max_kl: float | None = None
    max_ppl_ratio: float | None = None

@dataclass(frozen=True)
class LayerCheck:
    tensor: str
    module: str
    max_abs_error: float
    max_ulp_error: float  # in ulps at max(|merged|, |W0|, |dW|): what --max-ulp limits
    max_ulp_error_at_value: float  # in ulps at |merged| itself (informational; large where W0 + dW cancels)
    method: dict[str, float]


@dataclass(frozen=True)
class WeightCheck:
    """The tensor-by-tensor check of one merged model against the plan."""

    layers: list[LayerCheck]
    copied_checked: int
    copied_mismatched: list[str]
    missing: list[str]
    # Tensors an exported MERGED does not store exactly in any dtype: judged by their logits only.
    not_checked: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DtypeResult:
    """One column of the report: a merged model in one output dtype against the unmerged model."""

    dtype: str
    merged: str | None  # the folder checked; None when merged on the fly into a temp folder
    thresholds: Thresholds
    logits: LogitStats | None  # None when tensors are missing and the merged model was not run
    mc: MCResult | None
    floor: RoundingFloor | None
    limits: Limits | None
    top1_flips_p: float | None  # one-sided: more argmax flips than rounding's, by chance
    layers: list[LayerCheck]
    copied_checked: int
    copied_mismatched: list[str]
    missing_tensors: list[str]
    failures: list[str]
    # Tensors of the plan an exported MERGED (GGUF, onnxruntime-genai) does not store exactly in any
    # dtype (quantized blocks, fused graphs): judged by their logits only.
    not_checked: list[str] = field(default_factory=list)
    # A column shown for comparison, never judged: --original-base, the adapter merged into the
    # 16-bit original of a quantized BASE, against the model trained over the quantized one.
    informational: bool = False

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_error(self) -> float:
        return max((layer.max_abs_error for layer in self.layers), default=0.0)

    @property
    def max_ulp_error(self) -> float:
        return max((layer.max_ulp_error for layer in self.layers), default=0.0)

    @property
    def worst_layer(self) -> str | None:
        if not self.layers:
            return None
        return max(self.layers, key=lambda layer: layer.max_ulp_error).tensor


def method_summary(layers: Sequence[LayerCheck]) -> dict[str, float]:
    """The method's figures over all layers: ``*_min`` by min, ``*_max`` and thresholds by max, counts summed."""
    summary: dict[str, float] = {}
    for layer in layers:
        for key, value in layer.method.items():
            if key not in summary:
                summary[key] = value
            elif key.endswith("_min"):
                summary[key] = min(summary[key], value)
            elif key.endswith("_max") or "threshold" in key:
                summary[key] = max(summary[key], value)
            else:
                summary[key] += value
    return summary
