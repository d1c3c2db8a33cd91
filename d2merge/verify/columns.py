"""One verify column: a merged model against the unmerged one (base + adapter at runtime).

Every kind of MERGED (a merged HF folder, a fresh merge into a temp folder, a GGUF file, an
onnxruntime-genai build) goes through :func:`judge_column`: the weight check, the rounding
floor, the logits and multiple-choice scores, the verdict. What differs between kinds is what
their :class:`MergedModel` says: its label, how it loads, which tensors it stores exactly and
(for exports) its limits.

Memory: the unmerged model runs first, its logits and scores are kept, and it is freed before
any other model loads; each column then loads one model at a time (the floor's, then the
merged one), so at most one model is resident (``benchmarks/verify_memory.py`` measures it).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from d2merge.io.adapter import Adapter
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.plan import MergePlan
from d2merge.tasks import MCExample, choice_scores, predictions
from d2merge.verify.compare import compare_logits, mc_result, probe_logits
from d2merge.verify.limits import VERIFY_DTYPES, apply_rounding, judge, resolve_limits, rounding_floor, top1_flips_p
from d2merge.verify.probes import Probes
from d2merge.verify.results import DtypeResult, RoundingFloor, WeightCheck
from d2merge.verify.weights import check_weights
from d2merge.verify_options import Thresholds, VerifyOptions

LoadModel = Callable[..., nn.Module]  # (location, *, allow_pickle) -> an fp32 transformers model


@dataclass
class Unmerged:
    """The unmerged model's side of every column: its logits and scores, and its rounded twin for the floor.

    ``load_model`` is how every transformers model of the run loads (``d2merge.runtime.load_fp32_model``).
    """

    base: BaseCheckpoint
    adapter: Adapter
    probes: Probes
    options: VerifyOptions
    load_model: LoadModel
    say: Callable[[str], None]
    examples: Sequence[MCExample] | None = None
    tokenizer: Any = None
    encoded: Any = None
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    scores: list[list[float]] | None = None

    def model(self, rounded_to: torch.dtype | None = None, rewritten: set[str] | None = None) -> nn.Module:
        from d2merge.runtime import attach_adapter

        model = self.load_model(self.base.location, allow_pickle=self.options.allow_pickle)
        if rounded_to is not None:
            apply_rounding(model, rewritten or set(), rounded_to, seed=self.options.seed)
        return attach_adapter(model, self.adapter).eval()

    def scores_of(self, model: nn.Module) -> list[list[float]] | None:
        if self.examples is None:
            return None
        return choice_scores(model, self.tokenizer, self.examples, reduction=self.options.mc_score,
                             batch_size=self.options.batch_size, encoded=self.encoded)

    def run(self) -> Unmerged:
        """The unmerged model first, alone; its logits and scores are all that is kept."""
        self.say("running the unmerged model (base + adapter)")
        model = self.model()
        self.logits = probe_logits(model, self.probes, self.options.batch_size)
        self.scores = self.scores_of(model)
        del model  # freed before any merged model is loaded: at most one model is resident
        gc.collect()  # whatever a reference cycle kept goes now, before the next model loads
        return self

    @property
    def max_abs_logit(self) -> float:
        """The largest |logit| of the unmerged model on real probe positions (exports scale limits by it)."""
        return float(self.logits[self.probes.attention_mask.bool()].abs().max())

    def measure_floor(self, dtype: str, merge_plan: MergePlan) -> tuple[RoundingFloor, list[list[float]] | None]:
        self.say(f"measuring the rounding floor ({dtype})")
        model = self.model(VERIFY_DTYPES[dtype], {item.name for item in merge_plan.merged})
        floor_logits = compare_logits(model, self.probes, self.logits, self.options.batch_size)
        rounded_scores = self.scores_of(model)
        del model
        gc.collect()
        floor_flips = None
        if rounded_scores is not None and self.scores is not None:
            floor_flips = sum(1 for u, r in zip(predictions(self.scores), predictions(rounded_scores)) if u != r)
        return rounding_floor(floor_logits, self.logits, self.probes, floor_flips), rounded_scores


class MergedModel(Protocol):
    """What :func:`judge_column` needs of a MERGED, whatever its format."""

    label: str  # the column's name: the dtype of a folder, ``gguf-q8_0``, ``genai-int4``...
    shown: str | None  # the path the report names; None for a temp merge
    floor_dtype: str | None  # the dtype whose rounding floor applies; None: fixed limits (quantized)
    weights_first: bool  # check the weights before loading (a missing tensor then skips the run)

    def weight_check(self, merge_plan: MergePlan, model: Any = None) -> WeightCheck: ...

    def load_model(self) -> Any: ...


@dataclass(frozen=True)
class MergedFolder:
    """A merged HF folder (the user's, or a temp merge), judged as a merge into its stored dtype.

    transformers fills a missing tensor with random values, so the weights are checked first
    and a folder that lacks one is judged without running it.
    """

    checkpoint: BaseCheckpoint
    dtype: str
    shown: str | None
    load: Callable[[], nn.Module]
    say: Callable[[str], None]
    weights_first: bool = True

    @property
    def label(self) -> str:
        return self.dtype

    @property
    def floor_dtype(self) -> str:
        return self.dtype

    def weight_check(self, merge_plan: MergePlan, model: Any = None) -> WeightCheck:
        self.say(f"checking the merged weights against fp64 ({self.dtype})")
        return WeightCheck(*check_weights(merge_plan, self.checkpoint))

    def load_model(self) -> nn.Module:
        self.say(f"running the merged model ({self.dtype})")
        return self.load()


@dataclass(frozen=True)
class ExportedModel:
    """A GGUF file or an onnxruntime-genai build as MERGED, through its exporter's verify adapter.

    ``exported`` (``d2merge.export.gguf.GGUFForVerify``, ``d2merge.export.onnx_genai.GenaiForVerify``)
    loads the model and maps back the tensors it stores exactly; quantized ones are judged by
    the logits only.
    """

    exported: Any
    say: Callable[[str], None]
    weights_first: bool = False  # the stored tensors are read from the loaded model

    @property
    def label(self) -> str:
        return self.exported.label

    @property
    def shown(self) -> str:
        return str(self.exported.path)

    @property
    def floor_dtype(self) -> str | None:
        return self.exported.floor_dtype

    def weight_check(self, merge_plan: MergePlan, model: Any = None) -> WeightCheck:
        weights = self.exported.weights(model)
        if weights is None:  # a fused graph: nothing to compare tensor by tensor
            return WeightCheck([], 0, [], [], [item.name for item in merge_plan.tensors])
        self.say(f"checking the stored weights against fp64 ({self.label})")
        path = self.exported.path
        layers, copied, mismatched, missing = check_weights(
            merge_plan, BaseCheckpoint(path, None, weights, None, (path,)))
        return WeightCheck(layers, copied, mismatched, [n for n in missing if n not in weights.quantized],
                           [n for n in missing if n in weights.quantized])

    def load_model(self) -> Any:
        self.say(f"loading {self.exported.path} ({self.label})")
        model = self.exported.load_model()
        self.say(f"running the exported model ({self.label})")
        return model


def judge_column(merged: MergedModel, merge_plan: MergePlan, chosen: Thresholds, unmerged: Unmerged
                 ) -> DtypeResult:
    """The weight check, the floor, the logits and scores of ``merged``, and the verdict against ``chosen``."""
    check = merged.weight_check(merge_plan) if merged.weights_first else None
    logits = mc = floor = None
    if check is None or not check.missing:
        floor, rounded_scores = (unmerged.measure_floor(merged.floor_dtype, merge_plan) if merged.floor_dtype
                                 else (None, None))
        model = merged.load_model()
        if check is None:
            check = merged.weight_check(merge_plan, model)
        logits = compare_logits(model, unmerged.probes, unmerged.logits, unmerged.options.batch_size)
        merged_scores = unmerged.scores_of(model)
        if merged_scores is not None:
            mc = mc_result(unmerged.examples, unmerged.scores, merged_scores, rounded_scores)  # type: ignore[arg-type]
        del model
        gc.collect()
    limits = resolve_limits(chosen, floor)
    failures = judge(limits, logits, mc, check.layers, check.copied_mismatched, check.missing, floor)
    return DtypeResult(merged.label, merged.shown, chosen, logits, mc, floor, limits, top1_flips_p(logits, floor),
                       check.layers, check.copied_checked, check.copied_mismatched, check.missing, failures,
                       check.not_checked)


def shown_column(merged: MergedModel, dtype: str, unmerged: Unmerged) -> DtypeResult:
    """Logits and scores of a model that is not a merge of BASE + ADAPTER, against the unmerged model, unjudged.

    ``verify --original-base``: the adapter merged into the 16-bit original of a quantized BASE.
    Its weights are not this merge's (no weight check, no floor); its distance from the model
    the adapter was trained on is the figure a QLoRA user needs.
    """
    from d2merge.verify.limits import thresholds_for

    model = merged.load_model()
    logits = compare_logits(model, unmerged.probes, unmerged.logits, unmerged.options.batch_size)
    merged_scores = unmerged.scores_of(model)
    mc = (mc_result(unmerged.examples, unmerged.scores, merged_scores)  # type: ignore[arg-type]
          if merged_scores is not None else None)
    del model
    gc.collect()
    return DtypeResult(merged.label, merged.shown, thresholds_for(dtype), logits, mc, None, None, None, [], 0, [], [],
                       [], informational=True)


def open_exported(merged: str | Path) -> Any | None:
    """The verify adapter of a GGUF file or an onnxruntime-genai folder, None for a merged HF folder.

    The adapter (``d2merge.export.gguf.GGUFForVerify``, ``d2merge.export.onnx_genai.GenaiForVerify``)
    gives the column label, loads the model, maps back the exactly stored weights and sets the limits.
    """
    path = Path(merged)
    if path.is_file() and path.suffix == ".gguf":
        from d2merge.export.gguf import gguf_for_verify

        return gguf_for_verify(path)
    if path.is_dir() and (path / "genai_config.json").is_file():
        from d2merge.export.onnx_genai import genai_for_verify

        return genai_for_verify(path)
    return None
