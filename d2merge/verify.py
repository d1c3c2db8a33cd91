"""Prove a merge faithful: the merged model against the unmerged one (base + adapter at runtime).

Three checks per output dtype, each able to fail on its own:

- **logits** on probe inputs (seeded random tokens, or the user's prompts):
  max/mean |logit difference|, KL(unmerged || merged), top-1 agreement;
- **merge gap** on a multiple-choice eval set: accuracy merged minus unmerged, in
  percentage points (the metric the D2-LoRA paper reports), and the flipped answers;
- **weights**, tensor by tensor: each merged tensor on disk against an fp64
  recomputation from base + adapter (max abs and ulp error), copied tensors
  bit for bit, plus the method's own figures (``Method.report``).

Both models run in fp32 (the merged weights are upcast exactly from their stored
dtype), so a column measures what storing the merge in that dtype costs, not the
noise of low-precision arithmetic. Memory: the unmerged model runs first, its
logits are kept, and it is freed before any merged model is loaded, so at most
one model is resident (``benchmarks/verify_memory.py`` measures it).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from d2merge import __version__
from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.methods import EMBEDDING
from d2merge.plan import DTYPE_ALIASES, MergePlan, TensorPlan, build_plan
from d2merge.tasks import MCExample, accuracy, choice_scores, load_tokenizer, predictions, read_jsonl

SCHEMA_VERSION = 1
VERIFY_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_LABELS = {v: k for k, v in VERIFY_DTYPES.items()}
# Explicit mantissa bits and smallest normal exponent: what "one ulp" means for each output dtype.
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_NORMAL_EXPONENT = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits for one output dtype (see docs/verify-report.md for how they were chosen)."""

    max_abs_diff: float  # largest |logit difference| on the probes
    max_gap_pp: float  # largest |merge gap| in percentage points on --mc-eval
    min_top1: float  # smallest top-1 agreement on the probes (fraction)
    max_ulp: float  # largest weight error against the fp64 reference, in output-dtype ulps


# Defaults per output dtype, from measurements on correct merges (docs/verify-report.md has the
# table): a trained D2-LoRA adapter on the tiny task base, random adapters of every method on tiny
# Llama and GPT-2, and a D2-LoRA r=16 adapter on a 134M-parameter Llama.
# - max_ulp: a correct merge rounds once, so 16-bit tensors sit within 0.5 ulp of the fp64
#   reference (measured 0.5-0.503); 1 leaves room for the fp32 arithmetic before the cast. fp32
#   outputs carry that arithmetic's own error (measured 3-7 ulps on tiny models, 22 at 134M, growing
#   with the norms' length), hence 256, still far below what one trip through fp16 (up to 4096) or
#   bf16 (up to 65536) leaves.
# - max_abs_diff: measured 5e-6 (fp32), 2.3e-2 to 5.4e-2 (bf16), 2.7e-3 to 5.7e-3 (fp16); about 10x
#   room for deeper models with larger logits.
# - min_top1: rounding every weight flips near-tied argmaxes on random-token probes: measured
#   97.7-99.2% (bf16), 99.6-100% (fp16), 100% (fp32).
# - max_gap_pp: an fp32 merge must flip no answer; 16-bit merges may flip an answer that was a near
#   tie (measured 0 pp on the trained adapter, up to 1 pp on random adapters whose answers are ties).
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(max_abs_diff=1e-3, max_gap_pp=0.0, min_top1=0.99, max_ulp=256.0),
    "bf16": Thresholds(max_abs_diff=0.5, max_gap_pp=1.0, min_top1=0.90, max_ulp=1.0),
    "fp16": Thresholds(max_abs_diff=0.1, max_gap_pp=1.0, min_top1=0.97, max_ulp=1.0),
}


@dataclass(frozen=True)
class VerifyOptions:
    """Every verify setting in one place; the CLI's flags and help text are read from these fields."""

    num_probes: int = field(default=8, metadata={"help": "Random probe sequences when no --prompts are given."})
    probe_length: int = field(default=32, metadata={
        "help": "Tokens per random probe; also the most tokens kept of each --prompts line."})
    seed: int = field(default=0, metadata={"help": "Seed of the random probe tokens."})
    mc_score: str = field(default="sum", metadata={
        "help": "How a choice is scored: summed or per-token mean log-likelihood of its tokens.",
        "choices": ("sum", "mean")})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    tied_embeddings: str = field(default="untie", metadata={
        "help": "The --tied-embeddings policy the merge used (needed to recompute it).",
        "choices": ("untie", "tie", "error")})
    allow_pickle: bool = field(default=False, metadata={"help": "Allow .bin (pickle) weights. Only for trusted files."})

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise D2MergeError(f"invalid {f.name} {getattr(self, f.name)!r}; choose one of {', '.join(choices)}")
        for name in ("num_probes", "probe_length", "batch_size"):
            if getattr(self, name) < 1:
                raise D2MergeError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def option_help(name: str) -> str:
    """The help text of a VerifyOptions field (the CLI reads its flags' help from here)."""
    return next(f.metadata.get("help", "") for f in fields(VerifyOptions) if f.name == name)


def threshold_defaults(name: str) -> str:
    """``fp32 0.001, bf16 0.25, fp16 0.05``: a threshold's per-dtype defaults, for help texts."""
    return ", ".join(f"{dtype} {getattr(limits, name):g}" for dtype, limits in DEFAULT_THRESHOLDS.items())


# ----- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitStats:
    positions: int
    max_abs_diff: float
    mean_abs_diff: float
    kl_mean: float
    kl_max: float
    top1_agreement: float
    argmax_flips: int


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


@dataclass(frozen=True)
class LayerCheck:
    tensor: str
    module: str
    max_abs_error: float
    max_ulp_error: float  # in ulps at max(|merged|, |W0|, |dW|): what --max-ulp limits
    max_ulp_error_at_value: float  # in ulps at |merged| itself (informational; large where W0 + dW cancels)
    method: dict[str, float]


@dataclass(frozen=True)
class DtypeResult:
    """One column of the report: a merged model in one output dtype against the unmerged model."""

    dtype: str
    merged: str | None  # the folder checked; None when merged on the fly into a temp folder
    thresholds: Thresholds
    logits: LogitStats | None  # None when tensors are missing and the merged model was not run
    mc: MCResult | None
    layers: list[LayerCheck]
    copied_checked: int
    copied_mismatched: list[str]
    missing_tensors: list[str]
    failures: list[str]

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


@dataclass(frozen=True)
class VerifyReport:
    """Everything verify measured; ``to_json`` follows docs/verify-report.md (schema_version 1)."""

    base: str
    adapter: str
    method: str
    probes: dict[str, Any]
    mc_eval: str | None
    options: VerifyOptions
    results: list[DtypeResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[str]:
        return [f"{r.dtype}: {f}" for r in self.results for f in r.failures]

    def result(self, dtype: str) -> DtypeResult:
        for r in self.results:
            if r.dtype == dtype:
                return r
        raise KeyError(dtype)

    def to_json(self) -> dict[str, Any]:
        results = []
        for r in self.results:
            item = asdict(r)
            item.update(passed=r.passed, max_abs_error=r.max_abs_error, max_ulp_error=r.max_ulp_error,
                        worst_layer=r.worst_layer, method_summary=method_summary(r.layers))
            results.append(item)
        return {"schema_version": SCHEMA_VERSION, "d2merge_version": __version__, "passed": self.passed,
                "base": self.base, "adapter": self.adapter, "method": self.method, "probes": dict(self.probes),
                "mc_eval": self.mc_eval, "options": asdict(self.options), "results": results}

    def table(self) -> str:
        return format_report(self)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` (sorted keys) to ``path``."""
        from d2merge.io.output import write_json

        path = Path(path)
        write_json(path, self.to_json())
        return path


# ----- probes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probes:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: dict[str, Any]


def random_probes(vocab_size: int, *, count: int, length: int, seed: int) -> Probes:
    """Seeded uniform random token ids: reproducible and independent of any tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (count, length), generator=generator)
    return Probes(ids, torch.ones_like(ids), {"source": "random", "count": count, "length": length, "seed": seed,
                                              "positions": count * length})


def prompt_probes(tokenizer: Any, prompts: Sequence[str], *, max_length: int, source: str) -> Probes:
    """The user's prompts, tokenised by the base's tokenizer, right-padded with an attention mask."""
    encoded = [list(tokenizer(p)["input_ids"])[:max_length] for p in prompts]
    encoded = [ids for ids in encoded if ids]
    if not encoded:
        raise D2MergeError("the prompts tokenise to nothing", path=source)
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return Probes(ids, mask, {"source": "prompts", "file": source, "count": len(encoded), "length": width,
                              "seed": None, "positions": int(mask.sum())})


def read_prompts(path: str | Path) -> list[str]:
    from d2merge.io.checkpoint import read_text

    path = Path(path)
    lines = read_text(path, "prompts file").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise D2MergeError("prompts file has no non-empty line", path=path)
    return prompts


def load_base_tokenizer(base: BaseCheckpoint, why: str) -> Any:
    tokenizer = load_tokenizer(base.folder) if base.folder is not None else None
    if tokenizer is None:
        raise D2MergeError(f"{why} needs the base's tokenizer, and the base has none", path=base.location,
                           hint="use a base folder with tokenizer files")
    return tokenizer


# ----- model passes ---------------------------------------------------------------------------


def _batches(probes: Probes, batch_size: int) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    for start in range(0, probes.input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        yield rows, probes.input_ids[rows], probes.attention_mask[rows]


def load_fp32_model(location: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """A transformers model from ``location`` with every weight upcast to fp32, at one model's memory.

    Asking transformers for fp32 from a 16-bit file converts from a memory map that stays
    mapped until the whole file is loaded: 1.5x the fp32 model at the peak. Loading in the
    stored dtype instead maps the file without reading it; each weight is then read afresh
    and upcast one at a time, so the mapped pages are never touched.
    """
    from d2merge.runtime import load_base_model

    checkpoint = open_base(location, allow_pickle=allow_pickle)
    names = checkpoint.tensors.keys()
    floats = [checkpoint.tensors.info(n)[0] for n in names if checkpoint.tensors.info(n)[0].is_floating_point]
    stored = max(set(floats), key=floats.count) if floats else torch.float32
    if stored not in DTYPE_LABELS:
        stored = torch.float32
    model = load_base_model(checkpoint.location, dtype=stored)
    if stored != torch.float32:
        known = set(names)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.is_floating_point() and param.dtype != torch.float32:
                    source = checkpoint.tensors.read(name) if name in known else param.data
                    param.data = source.to(torch.float32)
        model.float()
    return model


@torch.no_grad()
def probe_logits(model: nn.Module, probes: Probes, batch_size: int) -> torch.Tensor:
    """fp32 logits of every probe (padded positions included; the mask says which are real)."""
    out = []
    for _, ids, mask in _batches(probes, batch_size):
        out.append(model(input_ids=ids, attention_mask=mask).logits.float())
    return torch.cat(out)


@torch.no_grad()
def compare_logits(model: nn.Module, probes: Probes, reference: torch.Tensor, batch_size: int) -> LogitStats:
    """Run ``model`` batch by batch and compare with the unmerged logits on real positions only.

    Statistics are taken one sequence at a time: a whole batch of fp32 log-softmaxes over a
    large vocabulary would cost more memory than the rest of verify besides the model.
    """
    max_abs, sum_abs, count, kl_sum, kl_max, agree = 0.0, 0.0, 0, 0.0, 0.0, 0
    for rows, ids, mask in _batches(probes, batch_size):
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row in range(logits.shape[0]):
            real = mask[row].bool()
            merged = logits[row][real].float()
            unmerged = reference[rows.start + row][real]
            diff = (unmerged - merged).abs_()
            max_abs = max(max_abs, float(diff.max()))
            sum_abs += float(diff.sum(dtype=torch.float64))
            count += diff.numel()
            del diff
            log_u, log_m = torch.log_softmax(unmerged, -1), torch.log_softmax(merged, -1)
            kl = (log_u.exp() * (log_u - log_m)).sum(-1).clamp_min(0)
            kl_sum += float(kl.sum(dtype=torch.float64))
            kl_max = max(kl_max, float(kl.max()))
            agree += int((unmerged.argmax(-1) == merged.argmax(-1)).sum())
        del logits
    positions = probes.description["positions"]
    return LogitStats(positions=positions, max_abs_diff=max_abs, mean_abs_diff=sum_abs / max(count, 1),
                      kl_mean=kl_sum / max(positions, 1), kl_max=kl_max, top1_agreement=agree / max(positions, 1),
                      argmax_flips=positions - agree)


def mc_result(examples: Sequence[MCExample], unmerged: Sequence[Sequence[float]],
              merged: Sequence[Sequence[float]]) -> MCResult:
    """Accuracies, the merge gap in percentage points, and every example whose chosen answer changed."""
    pred_u, pred_m = predictions(unmerged), predictions(merged)
    acc_u, acc_m = accuracy(examples, pred_u), accuracy(examples, pred_m)
    flipped = [FlippedAnswer(i, e.answer, u, m) for i, (e, u, m) in enumerate(zip(examples, pred_u, pred_m)) if u != m]
    return MCResult(len(examples), acc_u, acc_m, 100.0 * (acc_m - acc_u), flipped)


# ----- weights --------------------------------------------------------------------------------


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at each entry's magnitude (subnormal spacing near zero)."""
    if dtype not in MANTISSA_BITS:
        raise D2MergeError(f"no ulp defined for {dtype}")
    _, exponent = torch.frexp(reference.double())
    # frexp gives |x| = m * 2**e with m in [0.5, 1): the binade's exponent is e - 1.
    binade = torch.where(reference == 0, torch.full_like(exponent, MIN_NORMAL_EXPONENT[dtype]),
                         (exponent - 1).clamp_min(MIN_NORMAL_EXPONENT[dtype]))
    return torch.ldexp(torch.ones_like(reference, dtype=torch.float64), binade - MANTISSA_BITS[dtype])


def weight_error(stored: torch.Tensor, reference: torch.Tensor, terms: torch.Tensor | None = None
                 ) -> tuple[float, float, float]:
    """Errors of ``stored`` against an fp64 reference: (max abs, max ulp at the terms' scale, max ulp at the value).

    ``terms`` is the magnitude of what the merge adds per entry (``max(|W0|, |dW|, rms(dW))``).
    Where W0 and dW cancel, the result is tiny but carries the absolute rounding
    error of its terms; measured in ulps of the tiny result, every correct fp32
    merge would show thousands of ulps (5e3 on a random tiny adapter), so the
    thresholded figure measures in ulps of ``max(|reference|, terms)``.
    """
    diff = (stored.double() - reference.double()).abs()
    if diff.numel() == 0:
        return 0.0, 0.0, 0.0
    at_value = float((diff / ulp(reference, stored.dtype)).max())
    scale = reference.double().abs() if terms is None else torch.maximum(reference.double().abs(), terms.double())
    return float(diff.max()), float((diff / ulp(scale, stored.dtype)).max()), at_value


def reference_merge(merge_plan: MergePlan, item: TensorPlan
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The merged tensor recomputed in fp64 from base + adapter, the terms' magnitude, the method's report."""
    adapter = merge_plan.adapter
    method, settings = adapter.method, item.settings
    assert settings is not None and item.module is not None
    w0 = merge_plan.base_weight(item).double()
    factors = {k: v.double() for k, v in adapter.factors(item.module).items()}
    reference = method.merged_weight(w0, factors, settings, compute_dtype=torch.float64)
    transposed = settings.fan_in_fan_out or settings.layer_kind == EMBEDDING
    update = method.update(factors, settings)
    update = (update.T if transposed else update).abs()
    if update.shape != w0.shape:  # trainable token rows: the update is whole rows, at most this large
        update = update.amax().expand(w0.shape)
    # Entries of a low-rank product are sums of r products about rms(dW) in size; where they
    # cancel, the fp32 result keeps an absolute error of eps * rms(dW), so that is the floor.
    floor = torch.sqrt(torch.mean(update.square())) if update.numel() else torch.zeros((), dtype=update.dtype)
    terms = torch.maximum(torch.maximum(w0.abs(), update), floor)
    figures = method.report(w0.T if transposed else w0, factors, settings)
    return reference, terms, {k: float(v) for k, v in figures.items()}


def check_weights(merge_plan: MergePlan, merged: BaseCheckpoint
                  ) -> tuple[list[LayerCheck], int, list[str], list[str]]:
    """Every planned tensor of the merged folder: merged ones against fp64, copied ones bit for bit.

    Returns (per-layer checks, copied tensors checked, copied tensors that differ, missing tensors).
    """
    from d2merge.merge import compute_tensor

    stored_names = set(merged.tensors.keys())
    layers: list[LayerCheck] = []
    copied, mismatched, missing = 0, [], []
    for item in merge_plan.tensors:
        if item.name not in stored_names:
            missing.append(item.name)
            continue
        dtype, shape = merged.tensors.info(item.name)
        if tuple(shape) != tuple(item.shape):
            raise D2MergeError(f"merged tensor has shape {list(shape)}, the merge plan says {list(item.shape)}",
                               path=merged.tensors.file_of(item.name), tensor=item.name,
                               hint="is MERGED a merge of this base and adapter?")
        stored = merged.tensors.read(item.name)
        if item.action == "merge":
            reference, terms, figures = reference_merge(merge_plan, item)
            abs_error, ulp_error, ulp_at_value = weight_error(stored, reference, terms)
            layers.append(LayerCheck(item.name, str(item.module), abs_error, ulp_error, ulp_at_value, figures))
        else:
            expected = compute_tensor(merge_plan, item).to(dtype)
            copied += 1
            if not torch.equal(stored, expected):
                mismatched.append(item.name)
    return layers, copied, mismatched, missing


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


# ----- thresholds -----------------------------------------------------------------------------


def thresholds_for(dtype: str, overrides: Mapping[str, float | None] | None = None) -> Thresholds:
    """The dtype's default thresholds with the user's overrides (``None`` keeps a default)."""
    chosen = DEFAULT_THRESHOLDS[dtype]
    if overrides:
        known = {f.name for f in fields(Thresholds)}
        unknown = set(overrides) - known
        if unknown:
            raise D2MergeError(f"unknown threshold(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        chosen = replace(chosen, **{k: float(v) for k, v in overrides.items() if v is not None})
    return chosen


def judge(limits: Thresholds, logits: LogitStats | None, mc: MCResult | None, layers: Sequence[LayerCheck],
          copied_mismatched: Sequence[str], missing: Sequence[str]) -> list[str]:
    """One message per exceeded threshold or structural defect; empty means the column passes."""
    failures = []
    if missing:
        failures.append(f"{len(missing)} tensor(s) of the merge plan are missing from the merged folder "
                        f"(first: {missing[0]})")
    if copied_mismatched:
        failures.append(f"{len(copied_mismatched)} tensor(s) the adapter does not touch differ from the base "
                        f"(first: {copied_mismatched[0]})")
    worst = max(layers, key=lambda layer: layer.max_ulp_error, default=None)
    if worst is not None and not worst.max_ulp_error <= limits.max_ulp:
        failures.append(f"weight error {worst.max_ulp_error:.3g} ulp in {worst.tensor} > {limits.max_ulp:g} "
                        "(--max-ulp)")
    if logits is not None and not logits.max_abs_diff <= limits.max_abs_diff:
        failures.append(f"max |logit diff| {logits.max_abs_diff:.3g} > {limits.max_abs_diff:g} (--max-abs-diff)")
    if logits is not None and not logits.top1_agreement >= limits.min_top1:
        failures.append(f"top-1 agreement {100 * logits.top1_agreement:.2f}% < {100 * limits.min_top1:.2f}% "
                        "(--min-top1)")
    if mc is not None and not abs(mc.merge_gap_pp) <= limits.max_gap_pp + 1e-9:
        failures.append(f"merge gap {mc.merge_gap_pp:+.2f} pp exceeds {limits.max_gap_pp:g} pp "
                        f"({len(mc.flipped)} answer(s) flipped) (--max-gap-pp)")
    return failures


# ----- the verify run -------------------------------------------------------------------------


def parse_dtypes(dtypes: str | Sequence[str]) -> tuple[str, ...]:
    """``"fp32,bf16"`` or a sequence, normalised (``bfloat16`` -> ``bf16``), duplicates removed."""
    items = dtypes.split(",") if isinstance(dtypes, str) else list(dtypes)
    names: list[str] = []
    for raw in items:
        key = DTYPE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if key not in VERIFY_DTYPES:
            raise D2MergeError(f"unknown dtype {raw!r} for --dtypes; choose from {', '.join(VERIFY_DTYPES)}")
        if key not in names:
            names.append(key)
    if not names:
        raise D2MergeError("--dtypes names no dtype")
    return tuple(names)


def stored_dtype(merge_plan: MergePlan, merged: BaseCheckpoint) -> str:
    """The output dtype of a merged folder, read from its first adapted tensor."""
    names = set(merged.tensors.keys())
    for item in merge_plan.merged:
        if item.name in names:
            dtype = merged.tensors.info(item.name)[0]
            if dtype not in DTYPE_LABELS:
                raise D2MergeError(f"merged tensor has dtype {dtype}; verify checks fp32, bf16 and fp16",
                                   path=merged.tensors.file_of(item.name), tensor=item.name)
            return DTYPE_LABELS[dtype]
    raise D2MergeError("the merged folder holds none of the tensors this adapter changes", path=merged.location,
                       hint="is MERGED a merge of this base and adapter?")


def verify(base: str | Path, adapter: str | Path, merged: str | Path | None = None, *,
           dtypes: str | Sequence[str] | None = None, mc_eval: str | Path | None = None,
           prompts: str | Path | None = None, thresholds: Mapping[str, float | None] | None = None,
           options: VerifyOptions | None = None, echo: Callable[[str], None] | None = None,
           **overrides: Any) -> VerifyReport:
    """Compare base + adapter (unmerged) with ``merged``, or with fresh merges in each of ``dtypes``.

    Without ``merged``, each dtype (default fp32) is merged into a temp folder, checked and
    deleted. ``thresholds`` overrides the per-dtype defaults (keys: Thresholds fields) for every
    column. Keyword ``overrides`` are VerifyOptions fields: ``verify(base, adapter, num_probes=16)``.
    ``echo`` receives one line per stage (the CLI sends them to stderr).
    """
    from d2merge.merge import merge
    from d2merge.runtime import attach_adapter

    options = replace(options or VerifyOptions(), **overrides) if overrides else (options or VerifyOptions())
    say = echo or (lambda message: None)
    if merged is not None and dtypes is not None:
        raise D2MergeError("--dtypes merges on the fly; it cannot be combined with a MERGED folder",
                           hint="drop MERGED to compare fresh merges per dtype, or drop --dtypes")
    base_ckpt = open_base(base, allow_pickle=options.allow_pickle)
    adapter_obj: Adapter = load_adapter(adapter, allow_pickle=options.allow_pickle)
    examples = read_jsonl(mc_eval) if mc_eval is not None else None
    tokenizer = None
    if examples is not None or prompts is not None:
        tokenizer = load_base_tokenizer(base_ckpt, "--mc-eval" if examples is not None else "--prompts")
    vocab_size = int((base_ckpt.config or {}).get("vocab_size") or 0)
    if prompts is not None:
        probes = prompt_probes(tokenizer, read_prompts(prompts), max_length=options.probe_length, source=str(prompts))
    else:
        if vocab_size < 1:
            raise D2MergeError("the base's config.json has no vocab_size for random probes", path=base_ckpt.location,
                               hint="pass --prompts FILE")
        probes = random_probes(vocab_size, count=options.num_probes, length=options.probe_length, seed=options.seed)

    if merged is not None:
        merged_ckpt = open_base(merged, allow_pickle=options.allow_pickle)
        probe_plan = build_plan(base_ckpt, adapter_obj, tied_embeddings=options.tied_embeddings)
        columns: list[tuple[str, Path | None]] = [(stored_dtype(probe_plan, merged_ckpt), merged_ckpt.location)]
    else:
        columns = [(name, None) for name in parse_dtypes(dtypes or ("fp32",))]

    # The unmerged model first, alone; its logits and scores are all that is kept.
    say("running the unmerged model (base + adapter)")
    model = attach_adapter(load_fp32_model(base_ckpt.location, allow_pickle=options.allow_pickle), adapter_obj).eval()
    reference_logits = probe_logits(model, probes, options.batch_size)
    unmerged_scores = (choice_scores(model, tokenizer, examples, reduction=options.mc_score,
                                     batch_size=options.batch_size) if examples is not None else None)
    del model  # freed before any merged model is loaded: at most one model is resident
    gc.collect()  # whatever a reference cycle kept goes now, before the next model loads

    results = []
    temp_root = Path(tempfile.mkdtemp(prefix="d2merge-verify-")) if merged is None else None
    try:
        for dtype, folder in columns:
            if folder is None:
                assert temp_root is not None
                say(f"merging into a temp folder ({dtype})")
                folder = merge(base_ckpt, adapter_obj, temp_root / dtype, dtype=dtype, hash_sources=False,
                               tied_embeddings=options.tied_embeddings).output
            merged_ckpt = open_base(folder, allow_pickle=options.allow_pickle)
            merge_plan = build_plan(base_ckpt, adapter_obj, dtype=dtype, tied_embeddings=options.tied_embeddings)
            say(f"checking the merged weights against fp64 ({dtype})")
            layers, copied, mismatched, missing = check_weights(merge_plan, merged_ckpt)
            limits = thresholds_for(dtype, thresholds)
            if missing:
                # transformers would fill a missing tensor with random values: judge without running it.
                logits, mc = None, None
            else:
                say(f"running the merged model ({dtype})")
                model = load_fp32_model(folder, allow_pickle=options.allow_pickle)
                logits = compare_logits(model, probes, reference_logits, options.batch_size)
                mc = None
                if examples is not None:
                    merged_scores = choice_scores(model, tokenizer, examples, reduction=options.mc_score,
                                                  batch_size=options.batch_size)
                    mc = mc_result(examples, unmerged_scores, merged_scores)  # type: ignore[arg-type]
                del model
                gc.collect()
            failures = judge(limits, logits, mc, layers, mismatched, missing)
            results.append(DtypeResult(dtype, None if merged is None else str(folder), limits, logits, mc, layers,
                                       copied, mismatched, missing, failures))
            if temp_root is not None:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
    return VerifyReport(base=str(base_ckpt.location), adapter=str(adapter_obj.path), method=adapter_obj.method.name,
                        probes=probes.description, mc_eval=None if mc_eval is None else str(mc_eval),
                        options=options, results=results)


# ----- tables ---------------------------------------------------------------------------------


def _fmt_sci(value: float) -> str:
    return f"{value:.2e}"


def _fmt_pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(widths[0]) if i == 0 else str(cell).rjust(widths[i])
                       for i, cell in enumerate(row)) for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def format_report(report: VerifyReport) -> str:
    """The full readable report: one column per output dtype, then any failures."""
    results = report.results
    probes = report.probes
    if probes["source"] == "random":
        probe_text = f"{probes['count']} random sequences x {probes['length']} tokens (seed {probes['seed']})"
    else:
        probe_text = f"{probes['count']} prompts from {probes['file']}"
    head = [f"base     {report.base}", f"adapter  {report.adapter}  ({report.method})",
            f"probes   {probe_text}, {probes['positions']} positions"]
    if report.mc_eval is not None:
        count = next((r.mc.examples for r in results if r.mc is not None), 0)
        head.append(f"mc-eval  {report.mc_eval} ({count} examples, score {report.options.mc_score})")
    rows: list[list[str]] = []

    def row(label: str, cells: list[str]) -> None:
        rows.append([label, *cells])

    row("max |logit diff|", [_fmt_sci(r.logits.max_abs_diff) if r.logits else "-" for r in results])
    row("mean |logit diff|", [_fmt_sci(r.logits.mean_abs_diff) if r.logits else "-" for r in results])
    row("KL mean (unmerged||merged)", [_fmt_sci(r.logits.kl_mean) if r.logits else "-" for r in results])
    row("KL max", [_fmt_sci(r.logits.kl_max) if r.logits else "-" for r in results])
    row("top-1 agreement", [_fmt_pct(r.logits.top1_agreement) if r.logits else "-" for r in results])
    row("argmax flips", [str(r.logits.argmax_flips) if r.logits else "-" for r in results])
    if any(r.mc is not None for r in results):
        row("MC accuracy unmerged", [_fmt_pct(r.mc.accuracy_unmerged) if r.mc else "-" for r in results])
        row("MC accuracy merged", [_fmt_pct(r.mc.accuracy_merged) if r.mc else "-" for r in results])
        row("merge gap (pp)", [f"{r.mc.merge_gap_pp:+.2f}" if r.mc else "-" for r in results])
        row("answers flipped", [str(len(r.mc.flipped)) if r.mc else "-" for r in results])
    row("merged tensors checked", [f"{len(r.layers)}" for r in results])
    row("max weight abs error", [_fmt_sci(r.max_abs_error) for r in results])
    row("max weight error (ulp)", [f"{r.max_ulp_error:.3g}" for r in results])
    row("copied tensors exact", [f"{r.copied_checked - len(r.copied_mismatched)}/{r.copied_checked}" for r in results])
    summaries = [method_summary(r.layers) for r in results]
    for key in dict.fromkeys(k for s in summaries for k in s):
        row(f"{report.method}: {key}", [f"{s[key]:.6g}" if key in s else "-" for s in summaries])
    row("limits: max |logit diff|", [f"{r.thresholds.max_abs_diff:g}" for r in results])
    row("limits: min top-1", [_fmt_pct(r.thresholds.min_top1) for r in results])
    row("limits: max |gap| (pp)", [f"{r.thresholds.max_gap_pp:g}" for r in results])
    row("limits: max ulp", [f"{r.thresholds.max_ulp:g}" for r in results])
    row("result", ["PASS" if r.passed else "FAIL" for r in results])
    text = "\n".join(head) + "\n\n" + _table(["", *[r.dtype for r in results]], rows)
    flips = [(r.dtype, r.mc.flipped) for r in results if r.mc is not None and r.mc.flipped]
    if flips:
        text += "\n\nflipped answers (example: unmerged choice -> merged choice, right answer):"
        for dtype, flipped in flips:
            shown = ", ".join(f"#{f.index} {f.unmerged}->{f.merged} ({f.answer})" for f in flipped[:8])
            more = f" and {len(flipped) - 8} more" if len(flipped) > 8 else ""
            text += f"\n  {dtype}: {shown}{more}"
    failures = report.failures()
    if failures:
        text += "\n\nfailures:\n" + "\n".join(f"  {f}" for f in failures)
    return text


def format_gap_table(reports: VerifyReport | Sequence[VerifyReport]) -> str:
    """The merge-gap summary the demo prints: one column per output dtype, across one or more reports."""
    if isinstance(reports, VerifyReport):
        reports = [reports]
    results = [r for report in reports for r in report.results]
    if not results:
        return "(no results)"
    rows = []
    if any(r.mc is not None for r in results):
        rows.append(["accuracy unmerged", *[_fmt_pct(r.mc.accuracy_unmerged) if r.mc else "-" for r in results]])
        rows.append(["accuracy merged", *[_fmt_pct(r.mc.accuracy_merged) if r.mc else "-" for r in results]])
        rows.append(["merge gap (pp)", *[f"{r.mc.merge_gap_pp:+.2f}" if r.mc else "-" for r in results]])
        rows.append(["answers flipped", *[str(len(r.mc.flipped)) if r.mc else "-" for r in results]])
    rows.append(["max |logit diff|", *[_fmt_sci(r.logits.max_abs_diff) if r.logits else "-" for r in results]])
    rows.append(["top-1 agreement", *[_fmt_pct(r.logits.top1_agreement) if r.logits else "-" for r in results]])
    rows.append(["max weight error (ulp)", *[f"{r.max_ulp_error:.3g}" for r in results]])
    rows.append(["result", *["PASS" if r.passed else "FAIL" for r in results]])
    return _table(["", *[r.dtype for r in results]], rows)
