"""One verify column: a merged model against the unmerged one (base + adapter at runtime).

Every kind of MERGED (a merged HF folder, a fresh merge into a temp folder, a GGUF file, an
onnxruntime-genai build) goes through :func:`judge_column`: the weight check, the rounding
floor, the logits and multiple-choice scores, the verdict. What differs between kinds is what
their :class:`MergedModel` says: its label, how it loads, which tensors it stores exactly and
(for exports) its limits.

Memory: the unmerged model runs first, its logits and scores are kept, and it is freed before
any other model opens; each column then opens one model at a time (the floor's, then the
merged one). Each runs one decoder block at a time (``verify.streamed``), so at most one block
is resident; an architecture that cannot be split runs whole (``benchmarks/verify_memory.py``
measures both).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from d2merge.io.adapter import Adapter
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.planning import MergePlan
from d2merge.forward import as_forward, run_jobs
from d2merge.tasks import MCExample, choice_job, predictions
from d2merge.verify.compare import compare_job, mc_result, probe_job
from d2merge.verify.limits import VERIFY_DTYPES, judge, resolve_limits, rounding_floor, top1_flips_p
from d2merge.verify.probes import Probes
from d2merge.verify.results import DtypeResult, RoundingFloor, WeightCheck
from d2merge.verify.weights import WeightChecker, check_weights
from d2merge.options.verify import Thresholds, VerifyOptions

OpenModel = Callable[..., Any]  # (checkpoint, adapter=None, rounding=None, checker=None) -> a d2merge.forward.Forward


@dataclass
class Unmerged:
    """The unmerged model's side of every column: its logits and scores, and its rounded twin for the floor.

    ``open_model`` is how every transformers model of the run opens: block by block where the
    architecture allows (``verify.streamed.open_forward``), else whole.
    """

    base: BaseCheckpoint
    adapter: Adapter
    probes: Probes
    options: VerifyOptions
    open_model: OpenModel
    say: Callable[[str], None]
    examples: Sequence[MCExample] | None = None
    tokenizer: Any = None
    encoded: Any = None
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    scores: list[list[float]] | None = None

    def model(self, rounded_to: torch.dtype | None = None, rewritten: set[str] | None = None) -> Any:
        from d2merge.verify.streamed import Rounding

        rounding = (Rounding(rounded_to, frozenset(rewritten or ()), self.options.seed)
                    if rounded_to is not None else None)
        return self.open_model(self.base, adapter=self.adapter, rounding=rounding)

    def evaluate(self, model: Any, reference: torch.Tensor | None = None
                 ) -> tuple[Any, list[list[float]] | None]:
        """One run of ``model`` over the probes and the MC items: (its probe logits, or their statistics
        against ``reference``; its choice scores). One run, so a block-streamed model reads its weights once."""
        forward = as_forward(model)
        if reference is None:
            probe, probe_result = probe_job(self.probes, self.options.batch_size)
        else:
            probe, probe_result = compare_job(self.probes, reference, self.options.batch_size)
        jobs, scores_result = [probe], None
        if self.examples is not None:
            choices, scores_result = choice_job(forward, self.tokenizer, self.examples,
                                                reduction=self.options.mc_score,
                                                batch_size=self.options.batch_size, encoded=self.encoded)
            jobs.append(choices)
        run_jobs(forward, jobs)
        return probe_result(), None if scores_result is None else scores_result()

    def run(self) -> Unmerged:
        """The unmerged model first, alone; its logits and scores are all that is kept."""
        self.say("running the unmerged model (base + adapter)")
        model = self.model()
        self.logits, self.scores = self.evaluate(model)
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
        floor_logits, rounded_scores = self.evaluate(model, self.logits)
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
    # A folder: its header is checked before loading (a missing tensor then skips the run) and its
    # weights as its run reads them (weight_checker); else weight_check after loading.
    weights_first: bool

    def weight_check(self, merge_plan: MergePlan, model: Any = None) -> WeightCheck: ...

    def load_model(self, checker: WeightChecker | None = None) -> Any: ...


@dataclass(frozen=True)
class MergedFolder:
    """A merged HF folder (the user's, or a temp merge), judged as a merge into its stored dtype.

    transformers fills a missing tensor with random values, so the header is checked first and
    a folder that lacks one is judged without running it. The weight check then runs on each
    tensor as the merged model's run reads it (one read of the merged files for both).
    """

    checkpoint: BaseCheckpoint
    dtype: str
    shown: str | None
    load: OpenModel  # the merged model, block-streamed or whole (a d2merge.forward.Forward)
    say: Callable[[str], None]
    weights_first: bool = True

    @property
    def label(self) -> str:
        return self.dtype

    @property
    def floor_dtype(self) -> str:
        return self.dtype

    def weight_checker(self, merge_plan: MergePlan) -> WeightChecker:
        """The merged folder's header checked against the plan (shapes, missing tensors); nothing read yet."""
        return WeightChecker(merge_plan, self.checkpoint)

    def weight_check(self, merge_plan: MergePlan, model: Any = None) -> WeightCheck:
        self.say(f"checking the merged weights against fp64 ({self.dtype})")
        return WeightCheck(*check_weights(merge_plan, self.checkpoint))

    def finish_check(self, checker: WeightChecker) -> WeightCheck:
        """The check of every planned tensor: those the run read are done, the rest are read now."""
        left = checker.unchecked()
        if left:
            self.say(f"checking the merged weights against fp64 ({self.dtype}): {left} tensor(s) the run did not read")
        return WeightCheck(*checker.finish())

    def load_model(self, checker: WeightChecker | None = None) -> Any:
        if checker is None:
            self.say(f"running the merged model ({self.dtype})")
            return self.load(self.checkpoint)
        self.say(f"running the merged model ({self.dtype}), checking each weight against fp64 as it is read")
        return self.load(self.checkpoint, checker=checker)


@dataclass(frozen=True)
class ExportedModel:
    """A GGUF file or an onnxruntime-genai build as MERGED, through its exporter's verify adapter.

    ``exported`` (``d2merge.export.gguf.for_verify.GGUFForVerify``, ``d2merge.export.onnx_genai.GenaiForVerify``)
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

    def load_model(self, checker: WeightChecker | None = None) -> Any:
        self.say(f"loading {self.exported.path} ({self.label})")
        model = self.exported.load_model()
        self.say(f"running the exported model ({self.label})")
        return model


def judge_column(merged: MergedModel, merge_plan: MergePlan, chosen: Thresholds, unmerged: Unmerged
                 ) -> DtypeResult:
    """The weight check, the floor, the logits and scores of ``merged``, and the verdict against ``chosen``."""
    checker: WeightChecker | None = merged.weight_checker(merge_plan) if merged.weights_first else None  # type: ignore[attr-defined]
    check = None
    logits = mc = floor = None
    if checker is not None and checker.missing:
        check = merged.finish_check(checker)  # type: ignore[attr-defined]
    else:
        floor, rounded_scores = (unmerged.measure_floor(merged.floor_dtype, merge_plan) if merged.floor_dtype
                                 else (None, None))
        model = merged.load_model(checker)
        if checker is None:
            check = merged.weight_check(merge_plan, model)
        logits, merged_scores = unmerged.evaluate(model, unmerged.logits)
        if merged_scores is not None:
            mc = mc_result(unmerged.examples, unmerged.scores, merged_scores, rounded_scores)  # type: ignore[arg-type]
        del model
        gc.collect()
        if checker is not None:
            check = merged.finish_check(checker)  # type: ignore[attr-defined]
    assert check is not None
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
    logits, merged_scores = unmerged.evaluate(model, unmerged.logits)  # one run: probes and MC items
    mc = (mc_result(unmerged.examples, unmerged.scores, merged_scores)  # type: ignore[arg-type]
          if merged_scores is not None else None)
    del model
    gc.collect()
    return DtypeResult(merged.label, merged.shown, thresholds_for(dtype), logits, mc, None, None, None, [], 0, [], [],
                       [], informational=True)


def open_exported(merged: str | Path) -> Any | None:
    """The verify adapter of a GGUF file or an onnxruntime-genai folder, None for a merged HF folder.

    The format that claims the path (``d2merge.export.registry``) opens it: its adapter
    (``d2merge.export.gguf.for_verify.GGUFForVerify``, ``d2merge.export.onnx_genai.GenaiForVerify``) gives the
    column label, loads the model, maps back the exactly stored weights and sets the limits.
    """
    from d2merge.export.registry import exported_for_verify

    return exported_for_verify(merged)
