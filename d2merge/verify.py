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
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from d2merge import __version__
from d2merge.dtypes import FLOAT_DTYPES
from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.plan import DTYPE_ALIASES, MergePlan, TensorPlan, build_plan
from d2merge.tasks import (MCExample, accuracy, choice_scores, encode_choices, load_tokenizer, predictions,
                           read_jsonl)
# The option model and thresholds live in a torch-free module (the CLI's flags come from there).
from d2merge.verify_options import (DEFAULT_THRESHOLDS, Thresholds, VerifyOptions,  # noqa: F401 (re-exported)
                                    option_help, threshold_defaults)

SCHEMA_VERSION = 1
VERIFY_DTYPES: dict[str, torch.dtype] = {n: d.torch_dtype for n, d in FLOAT_DTYPES.items()}
DTYPE_LABELS = {v: k for k, v in VERIFY_DTYPES.items()}
# Explicit mantissa bits and smallest normal exponent: what "one ulp" means for each output dtype.
MANTISSA_BITS = {d.torch_dtype: d.mantissa_bits for d in FLOAT_DTYPES.values()}
MIN_NORMAL_EXPONENT = {d.torch_dtype: d.min_normal_exponent for d in FLOAT_DTYPES.values()}


# fp32 arithmetic alone (the unmerged forward adds x.W0 + x.dW, the merged one computes x.(W0 + dW))
# moves logits by about 1e-6 of their scale; PEFT's own unmerged DoRA forward is 8.8e-4 from its
# merge on SmolLM2 (logits up to about 37, 2.4e-5 of the scale). The floor is never taken below
# this, so fp32 columns allow floor_multiple x 1e-5 x max|logit| = 1e-4 of the scale, the
# tolerance export-onnx uses.
ARITHMETIC_FLOOR_REL = 1e-5
ARITHMETIC_FLOOR_ABS = 1e-5


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

        import os

        path = Path(path)
        temp = path.with_name(f".{path.name}.d2merge-tmp-{os.getpid()}")
        try:
            write_json(temp, self.to_json())
            os.replace(temp, path)  # atomic: a reader never sees half a report
        finally:
            temp.unlink(missing_ok=True)
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
    return Probes(ids, torch.ones_like(ids), {"source": "random", "file": None, "count": count, "length": length,
                                              "seed": seed, "positions": count * length})


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


# Real English for the probes when the base has a tokenizer: random token ids are far from what
# users send (a model's logits on them are flat and near-tied, so rounding flips their argmax far
# more often than on text). Plain, varied, everyday sentences; written here, no download.
PROBE_SENTENCES: tuple[str, ...] = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "She opened the window because the room was too warm.",
    "To make a cup of tea, boil the water and let the leaves steep for three minutes.",
    "The train to London leaves at half past seven every morning.",
    "Water freezes at zero degrees Celsius and boils at one hundred.",
    "My brother plays the guitar, and my sister sings in a choir.",
    "If you mix blue and yellow paint, you get green.",
    "The meeting was moved to Thursday because the manager was ill.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "He forgot his umbrella, so he was soaked by the time he got home.",
    "A week has seven days, and a year has twelve months.",
    "Please send me the report before the end of the day.",
    "The museum is closed on Mondays but open late on Fridays.",
    "Dogs are loyal animals, and many people keep them as pets.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "After the storm, the children went outside to look for rainbows.",
)


def sentence_probes(tokenizer: Any, *, max_length: int) -> Probes:
    """The built-in English sentences, tokenised by the base's tokenizer."""
    probes = prompt_probes(tokenizer, PROBE_SENTENCES, max_length=max_length, source="built-in sentences")
    description = {**probes.description, "source": "sentences", "file": None}
    return Probes(probes.input_ids, probes.attention_mask, description)


def base_positions(config: Mapping[str, Any] | None) -> tuple[int, str] | None:
    """The most positions the base takes (n_positions for GPT-2, max_position_embeddings elsewhere)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def check_probe_positions(config: Mapping[str, Any] | None, probes: Probes, *, location: Path) -> None:
    """A sequence longer than the base's positions would crash the model mid-run (IndexError on GPT-2)."""
    limit = base_positions(config)
    width = int(probes.attention_mask.sum(-1).max()) if probes.attention_mask.numel() else 0
    if limit is not None and width > limit[0]:
        what = ("--probe-length" if probes.description["source"] == "random"
                else f"the longest probe ({probes.description['source']})")
        raise D2MergeError(f"{what} is {width} tokens; the base takes at most {limit[0]} positions "
                           f"({limit[1]} in config.json)", path=location / "config.json",
                           hint=f"use --probe-length {limit[0]} or less")


def check_eval_positions(config: Mapping[str, Any] | None, encoded: Any, *, path: str | Path) -> None:
    """The longest prompt + choice of --mc-eval must fit the base's positions (named by example number)."""
    limit = base_positions(config)
    lengths = encoded.attention_mask.sum(-1)
    if limit is None or not lengths.numel() or int(lengths.max()) <= limit[0]:
        return
    row = int(lengths.argmax())
    raise D2MergeError(f"eval example {int(encoded.example_index[row])} is {int(lengths[row])} tokens with its "
                       f"longest choice; the base takes at most {limit[0]} positions ({limit[1]} in config.json)",
                       path=path, hint="shorten or drop that example")


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
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in a pipe or a CI log.
    for start in tqdm(range(0, probes.input_ids.shape[0], batch_size), desc="probes", unit="batch",
                      disable=None, leave=False):
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


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), computed exactly (no scipy needed)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return float(Fraction(sum(math.comb(n, i) for i in range(k, n + 1)), 2**n))


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact McNemar test: two-sided binomial p of the discordant pairs splitting this unevenly."""
    discordant = right_to_wrong + wrong_to_right
    if discordant == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_tail(max(right_to_wrong, wrong_to_right), discordant))


def flips_vs_rounding(flips: int, rounding_flips: int) -> float:
    """One-sided p that ``flips`` exceeds ``rounding_flips`` by chance when both come at the same rate.

    Two counts of rare events on the same items: given their sum, the first is Binomial(sum, 1/2)
    when the rates are equal (the conditional test for two Poisson rates).
    """
    return binomial_tail(flips, flips + rounding_flips)


def paired_gap_interval(right_to_wrong: int, wrong_to_right: int, examples: int,
                        z: float = 1.959963984540054) -> tuple[float, float]:
    """95% interval of the paired accuracy difference, in pp (Agresti & Min 2005: add 1/2 to each cell).

    The plain Wald interval collapses to [0, 0] when nothing flipped; the added halves keep it
    honest about what a finite eval set can show.
    """
    b, c, n = right_to_wrong + 0.5, wrong_to_right + 0.5, examples + 2.0
    diff = (c - b) / n
    se = math.sqrt(max((b + c) - (c - b) ** 2 / n, 0.0)) / n
    return 100.0 * max(-1.0, diff - z * se), 100.0 * min(1.0, diff + z * se)


def mc_result(examples: Sequence[MCExample], unmerged: Sequence[Sequence[float]],
              merged: Sequence[Sequence[float]], rounded: Sequence[Sequence[float]] | None = None) -> MCResult:
    """Accuracies, the merge gap with its interval and tests, and every example whose answer changed.

    ``rounded``: the scores of the rounding-floor model; its flips against the unmerged model
    are what rounding alone does to these answers.
    """
    pred_u, pred_m = predictions(unmerged), predictions(merged)
    acc_u, acc_m = accuracy(examples, pred_u), accuracy(examples, pred_m)
    flipped = [FlippedAnswer(i, e.answer, u, m) for i, (e, u, m) in enumerate(zip(examples, pred_u, pred_m)) if u != m]
    right_to_wrong = sum(1 for f in flipped if f.unmerged == f.answer)
    wrong_to_right = sum(1 for f in flipped if f.merged == f.answer)
    rounding_flips = flips_p = None
    if rounded is not None:
        rounding_flips = sum(1 for u, r in zip(pred_u, predictions(rounded)) if u != r)
        flips_p = flips_vs_rounding(len(flipped), rounding_flips)
    return MCResult(len(examples), acc_u, acc_m, 100.0 * (acc_m - acc_u), flipped, right_to_wrong, wrong_to_right,
                    paired_gap_interval(right_to_wrong, wrong_to_right, len(examples)),
                    mcnemar_exact(right_to_wrong, wrong_to_right), rounding_flips, flips_p)


@torch.no_grad()
def apply_rounding(model: nn.Module, rewritten: set[str], dtype: torch.dtype, *, seed: int) -> nn.Module:
    """The base weights as a merge into ``dtype`` leaves them, had the adapter been zero.

    Tensors the merge copies are cast to ``dtype`` (what the merged folder holds). Tensors it
    rewrites get one rounding's error: a seeded draw uniform in +-1/2 ulp of ``dtype``, which is
    what rounding to nearest leaves. Casting those instead would cost nothing on a base already
    stored in ``dtype`` (SmolLM2 ships bf16), yet the merge rounds them afresh.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        if name in rewritten:
            step = ulp(param.data, dtype).to(param.dtype)
            param.add_((torch.rand(param.shape, generator=generator, dtype=param.dtype) - 0.5) * step)
        elif dtype != param.dtype:
            param.copy_(param.to(dtype).to(param.dtype))
    return model


def rounding_floor(logits: LogitStats, reference: torch.Tensor, probes: Probes, mc_flips: int | None
                   ) -> RoundingFloor:
    """The floor a column's logit difference is judged against: rounding's, or fp32 arithmetic's if larger."""
    real = probes.attention_mask.bool()
    scale = float(reference[real].abs().max()) if real.any() else 0.0
    arithmetic = max(ARITHMETIC_FLOOR_ABS, ARITHMETIC_FLOOR_REL * scale)
    return RoundingFloor(logits, arithmetic, max(logits.max_abs_diff, arithmetic), mc_flips)


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
    transposed = settings.transposed
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
    from tqdm.auto import tqdm

    from d2merge.engine import compute_tensor

    stored_names = set(merged.tensors.keys())
    layers: list[LayerCheck] = []
    copied, mismatched, missing = 0, [], []
    for item in tqdm(merge_plan.tensors, desc="weights vs fp64", unit="tensor", disable=None, leave=False):
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


def resolve_limits(thresholds: Thresholds, floor: RoundingFloor | None) -> Limits:
    """The column's numeric limits: a fixed --max-abs-diff if given, else floor_multiple x the floor."""
    if thresholds.max_abs_diff is not None:
        max_abs, source = thresholds.max_abs_diff, "fixed"
    elif floor is not None:
        max_abs, source = thresholds.floor_multiple * floor.max_abs_diff, "floor"
    else:
        max_abs, source = 0.0, "not run"
    return Limits(max_abs, source, thresholds.max_ulp, thresholds.alpha, thresholds.min_top1, thresholds.max_gap_pp)


def top1_flips_p(logits: LogitStats | None, floor: RoundingFloor | None) -> float | None:
    """One-sided p that the merged model's argmax flips exceed rounding's by chance."""
    if logits is None or floor is None:
        return None
    return flips_vs_rounding(logits.argmax_flips, floor.logits.argmax_flips)


def judge(limits: Limits, logits: LogitStats | None, mc: MCResult | None, layers: Sequence[LayerCheck],
          copied_mismatched: Sequence[str], missing: Sequence[str], floor: RoundingFloor | None = None
          ) -> list[str]:
    """One message per failed check or structural defect, naming the flag that sets it; empty means pass."""
    failures = []
    if missing:
        failures.append(f"{len(missing)} tensor(s) of the merge plan are missing from the merged folder "
                        f"(first: {missing[0]})")
    if copied_mismatched:
        failures.append(f"{len(copied_mismatched)} tensor(s) the adapter does not touch differ from the base "
                        f"(first: {copied_mismatched[0]})")
    worst = max(layers, key=lambda layer: layer.max_ulp_error, default=None)
    if worst is not None and not worst.max_ulp_error <= limits.max_ulp:
        failures.append(f"weight check: error {worst.max_ulp_error:.3g} ulp in {worst.tensor} > {limits.max_ulp:g} "
                        "(--max-ulp)")
    if logits is not None and not logits.max_abs_diff <= limits.max_abs_diff:
        if limits.max_abs_diff_from == "floor" and floor is not None:
            failures.append(f"logit check: max |logit diff| {logits.max_abs_diff:.3g} > {limits.max_abs_diff:.3g} "
                            f"= {limits.max_abs_diff / floor.max_abs_diff:g} x rounding floor "
                            f"{floor.max_abs_diff:.3g} (--floor-multiple)")
        else:
            failures.append(f"logit check: max |logit diff| {logits.max_abs_diff:.3g} > {limits.max_abs_diff:g} "
                            "(--max-abs-diff)")
    p = top1_flips_p(logits, floor)
    if logits is not None and floor is not None and p is not None and p < limits.alpha:
        failures.append(f"top-1 check: {logits.argmax_flips} argmax flips on the probes against "
                        f"{floor.logits.argmax_flips} from rounding alone (binomial p={p:.2g} < {limits.alpha:g}) "
                        "(--alpha)")
    if logits is not None and limits.min_top1 is not None and not logits.top1_agreement >= limits.min_top1:
        failures.append(f"top-1 check: agreement {100 * logits.top1_agreement:.2f}% < "
                        f"{100 * limits.min_top1:.2f}% (--min-top1)")
    if mc is not None:
        low, high = mc.gap_ci_pp
        if mc.mcnemar_p < limits.alpha:
            failures.append(f"merge gap check: {mc.merge_gap_pp:+.2f} pp (95% CI {low:+.2f} to {high:+.2f}), "
                            f"{mc.right_to_wrong} right->wrong vs {mc.wrong_to_right} wrong->right, "
                            f"McNemar exact p={mc.mcnemar_p:.2g} < {limits.alpha:g} (--alpha)")
        if mc.flips_vs_rounding_p is not None and mc.flips_vs_rounding_p < limits.alpha:
            failures.append(f"merge gap check: {len(mc.flipped)} answers flipped against {mc.rounding_flips} "
                            f"from rounding alone (binomial p={mc.flips_vs_rounding_p:.2g} < {limits.alpha:g}) "
                            "(--alpha)")
        if limits.max_gap_pp is not None and not abs(mc.merge_gap_pp) <= limits.max_gap_pp + 1e-9:
            failures.append(f"merge gap check: {mc.merge_gap_pp:+.2f} pp exceeds {limits.max_gap_pp:g} pp "
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
           report: str | Path | None = None, **overrides: Any) -> VerifyReport:
    """Compare base + adapter (unmerged) with ``merged``, or with fresh merges in each of ``dtypes``.

    Without ``merged``, each dtype (default fp32) is merged into a temp folder, checked and
    deleted. ``thresholds`` overrides the per-dtype defaults (keys: Thresholds fields) for every
    column. Keyword ``overrides`` are VerifyOptions fields: ``verify(base, adapter, num_probes=16)``.
    ``echo`` receives one line per stage (the CLI sends them to stderr). ``report``: also write the
    JSON report there; the location is checked before any work starts, so a verdict is never lost.
    """
    from d2merge.io.output import check_output_location
    from d2merge.merge import merge
    from d2merge.io.transformers_folder import refuse_custom_code
    from d2merge.runtime import attach_adapter

    options = replace(options or VerifyOptions(), **overrides) if overrides else (options or VerifyOptions())
    say = echo or (lambda message: None)
    if merged is not None and dtypes is not None:
        raise D2MergeError("--dtypes merges on the fly; it cannot be combined with a MERGED folder",
                           hint="drop MERGED to compare fresh merges per dtype, or drop --dtypes")
    report_path = check_output_location(Path(report), (), overwrite=True, is_file=True) if report else None
    base_ckpt = open_base(base, allow_pickle=options.allow_pickle)
    exported = open_exported(merged) if merged is not None else None  # a GGUF or genai build: no HF folder
    for folder in (base_ckpt.folder, None if merged is None or exported else open_base(merged).folder):
        if folder is not None:  # before any work: transformers loads both folders later
            refuse_custom_code(folder)
    adapter_obj: Adapter = load_adapter(adapter, allow_pickle=options.allow_pickle)
    examples = read_jsonl(mc_eval) if mc_eval is not None else None
    column_names = parse_dtypes(dtypes or ("fp32",)) if merged is None else ()
    for dtype in column_names or ("fp32",):
        thresholds_for(dtype, thresholds)  # an unknown threshold name is refused before any work
    tokenizer = None
    source = options.probe_source
    if examples is not None or prompts is not None or source == "sentences":
        why = "--mc-eval" if examples is not None else "--prompts" if prompts is not None else "sentence probes"
        tokenizer = load_base_tokenizer(base_ckpt, why)
    elif source == "auto" and base_ckpt.folder is not None:
        tokenizer = load_tokenizer(base_ckpt.folder)
    vocab_size = int((base_ckpt.config or {}).get("vocab_size") or 0)
    if prompts is not None:
        probes = prompt_probes(tokenizer, read_prompts(prompts), max_length=options.probe_length, source=str(prompts))
    elif source != "random" and tokenizer is not None:
        probes = sentence_probes(tokenizer, max_length=options.probe_length)
    else:
        if vocab_size < 1:
            raise D2MergeError("the base's config.json has no vocab_size for random probes", path=base_ckpt.location,
                               hint="pass --prompts FILE")
        probes = random_probes(vocab_size, count=options.num_probes, length=options.probe_length, seed=options.seed)
    check_probe_positions(base_ckpt.config, probes, location=base_ckpt.location)
    encoded = None
    if examples is not None:
        encoded = encode_choices(tokenizer, examples)
        check_eval_positions(base_ckpt.config, encoded, path=mc_eval)  # type: ignore[arg-type]

    if exported is not None:
        columns: list[tuple[str, Path | None]] = [(exported.label, Path(merged))]  # type: ignore[arg-type]
    elif merged is not None:
        merged_ckpt = open_base(merged, allow_pickle=options.allow_pickle)
        probe_plan = build_plan(base_ckpt, adapter_obj, tied_embeddings=options.tied_embeddings)
        columns = [(stored_dtype(probe_plan, merged_ckpt), merged_ckpt.location)]
    else:
        columns = [(name, None) for name in column_names]

    def unmerged_model(rounded_to: torch.dtype | None = None, rewritten: set[str] | None = None) -> nn.Module:
        model = load_fp32_model(base_ckpt.location, allow_pickle=options.allow_pickle)
        if rounded_to is not None:
            apply_rounding(model, rewritten or set(), rounded_to, seed=options.seed)
        return attach_adapter(model, adapter_obj).eval()

    def scores_of(model: nn.Module) -> list[list[float]] | None:
        if examples is None:
            return None
        return choice_scores(model, tokenizer, examples, reduction=options.mc_score, batch_size=options.batch_size,
                             encoded=encoded)

    def measure_floor(dtype: str, merge_plan: MergePlan) -> tuple[RoundingFloor, list[list[float]] | None]:
        say(f"measuring the rounding floor ({dtype})")
        model = unmerged_model(VERIFY_DTYPES[dtype], {item.name for item in merge_plan.merged})
        floor_logits = compare_logits(model, probes, reference_logits, options.batch_size)
        rounded_scores = scores_of(model)
        del model
        gc.collect()
        floor_flips = None
        if rounded_scores is not None:
            floor_flips = sum(1 for u, r in zip(predictions(unmerged_scores), predictions(rounded_scores))
                              if u != r)  # type: ignore[arg-type]
        return rounding_floor(floor_logits, reference_logits, probes, floor_flips), rounded_scores

    # The unmerged model first, alone; its logits and scores are all that is kept.
    say("running the unmerged model (base + adapter)")
    model = unmerged_model()
    reference_logits = probe_logits(model, probes, options.batch_size)
    unmerged_scores = scores_of(model)
    del model  # freed before any merged model is loaded: at most one model is resident
    gc.collect()  # whatever a reference cycle kept goes now, before the next model loads

    results = []
    temp_root = Path(tempfile.mkdtemp(prefix="d2merge-verify-")) if merged is None else None
    try:
        for dtype, folder in columns:
            if exported is not None:
                results.append(verify_exported(exported, merge_plan_for=lambda dtype: build_plan(
                    base_ckpt, adapter_obj, dtype=dtype, tied_embeddings=options.tied_embeddings),
                    measure_floor=measure_floor, probes=probes, reference_logits=reference_logits,
                    scores_of=scores_of, examples=examples, unmerged_scores=unmerged_scores,
                    thresholds=thresholds, batch_size=options.batch_size, say=say))
                continue
            if folder is None:
                assert temp_root is not None
                say(f"merging into a temp folder ({dtype})")
                folder = merge(base_ckpt, adapter_obj, temp_root / dtype, dtype=dtype, hash_sources=False,
                               tied_embeddings=options.tied_embeddings).output
            merged_ckpt = open_base(folder, allow_pickle=options.allow_pickle)
            merge_plan = build_plan(base_ckpt, adapter_obj, dtype=dtype, tied_embeddings=options.tied_embeddings)
            say(f"checking the merged weights against fp64 ({dtype})")
            layers, copied, mismatched, missing = check_weights(merge_plan, merged_ckpt)
            chosen = thresholds_for(dtype, thresholds)
            logits = mc = floor = None
            if not missing:
                # transformers would fill a missing tensor with random values: judge without running it.
                floor, rounded_scores = measure_floor(dtype, merge_plan)
                say(f"running the merged model ({dtype})")
                model = load_fp32_model(folder, allow_pickle=options.allow_pickle)
                logits = compare_logits(model, probes, reference_logits, options.batch_size)
                merged_scores = scores_of(model)
                if merged_scores is not None:
                    mc = mc_result(examples, unmerged_scores, merged_scores, rounded_scores)  # type: ignore[arg-type]
                del model
                gc.collect()
            limits = resolve_limits(chosen, floor)
            failures = judge(limits, logits, mc, layers, mismatched, missing, floor)
            results.append(DtypeResult(dtype, None if merged is None else str(folder), chosen, logits, mc, floor,
                                       limits, top1_flips_p(logits, floor), layers, copied, mismatched, missing,
                                       failures))
            if temp_root is not None:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
    result = VerifyReport(base=str(base_ckpt.location), adapter=str(adapter_obj.path), method=adapter_obj.method.name,
                          probes=probes.description, mc_eval=None if mc_eval is None else str(mc_eval),
                          options=options, results=results)
    if report_path is not None:
        result.save(report_path)
    return result


# ----- exported models (GGUF, onnxruntime-genai) as MERGED -------------------------------------


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


def verify_exported(exported: Any, *, merge_plan_for: Callable[[str], MergePlan],
                    measure_floor: Callable[[str, MergePlan], tuple[RoundingFloor, Any]], probes: Probes,
                    reference_logits: torch.Tensor, scores_of: Callable[[Any], Any],
                    examples: Sequence[MCExample] | None, unmerged_scores: Any,
                    thresholds: Mapping[str, float | None] | None, batch_size: int,
                    say: Callable[[str], None]) -> DtypeResult:
    """One column for an exported model: its logits (and MC scores), and its exactly stored weights.

    An export stored in fp32/fp16/bf16 is judged like a merged folder of that dtype (the same
    rounding floor); a quantized one against the fixed limits its exporter measured.
    """
    label, floor_dtype = exported.label, exported.floor_dtype
    # fp32: each expected tensor is then cast once to the dtype the file stores it in (norms stay
    # f32 in an f16 GGUF), as the exporter did.
    merge_plan = merge_plan_for("fp32")
    real = probes.attention_mask.bool()
    chosen = exported.thresholds(float(reference_logits[real].abs().max()))
    if thresholds:
        thresholds_for("fp32", thresholds)  # the same refusal of unknown names
        chosen = replace(chosen, **{k: float(v) for k, v in thresholds.items() if v is not None})
    floor, rounded_scores = measure_floor(floor_dtype, merge_plan) if floor_dtype else (None, None)
    say(f"loading {exported.path} ({label})")
    model = exported.load_model()
    layers: list[LayerCheck] = []
    copied, mismatched, missing = 0, [], []
    weights = exported.weights(model)
    if weights is not None:
        say(f"checking the stored weights against fp64 ({label})")
        layers, copied, mismatched, missing = check_weights(
            merge_plan, BaseCheckpoint(exported.path, None, weights, None, (exported.path,)))
        not_checked = [name for name in missing if name in weights.quantized]
        missing = [name for name in missing if name not in weights.quantized]
    else:
        not_checked = [item.name for item in merge_plan.tensors]
    say(f"running the exported model ({label})")
    logits = compare_logits(model, probes, reference_logits, batch_size)
    merged_scores = scores_of(model)
    mc = None
    if merged_scores is not None:
        mc = mc_result(examples, unmerged_scores, merged_scores, rounded_scores)  # type: ignore[arg-type]
    del model
    gc.collect()
    limits = resolve_limits(chosen, floor)
    failures = judge(limits, logits, mc, layers, mismatched, missing, floor)
    return DtypeResult(label, str(exported.path), chosen, logits, mc, floor, limits, top1_flips_p(logits, floor),
                       layers, copied, mismatched, missing, failures, not_checked)


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
    elif probes["source"] == "sentences":
        probe_text = f"{probes['count']} built-in English sentences"
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

    def floor_cell(r: DtypeResult, text: Callable[[RoundingFloor], str]) -> str:
        return text(r.floor) if r.floor is not None else "-"

    row("max |logit diff|", [_fmt_sci(r.logits.max_abs_diff) if r.logits else "-" for r in results])
    row("  rounding floor", [floor_cell(r, lambda f: _fmt_sci(f.max_abs_diff)) for r in results])
    row("  limit", [f"{_fmt_sci(r.limits.max_abs_diff)} ({r.limits.max_abs_diff_from})" if r.limits else "-"
                    for r in results])
    row("mean |logit diff|", [_fmt_sci(r.logits.mean_abs_diff) if r.logits else "-" for r in results])
    row("  rounding floor", [floor_cell(r, lambda f: _fmt_sci(f.logits.mean_abs_diff)) for r in results])
    row("KL mean (unmerged||merged)", [_fmt_sci(r.logits.kl_mean) if r.logits else "-" for r in results])
    row("  rounding floor", [floor_cell(r, lambda f: _fmt_sci(f.logits.kl_mean)) for r in results])
    row("KL max", [_fmt_sci(r.logits.kl_max) if r.logits else "-" for r in results])
    row("top-1 agreement", [_fmt_pct(r.logits.top1_agreement) if r.logits else "-" for r in results])
    row("argmax flips", [str(r.logits.argmax_flips) if r.logits else "-" for r in results])
    row("  rounding floor", [floor_cell(r, lambda f: str(f.logits.argmax_flips)) for r in results])
    row("  p (more than rounding)", [f"{r.top1_flips_p:.3g}" if r.top1_flips_p is not None else "-"
                                     for r in results])
    if any(r.mc is not None for r in results):
        row("MC accuracy unmerged", [_fmt_pct(r.mc.accuracy_unmerged) if r.mc else "-" for r in results])
        row("MC accuracy merged", [_fmt_pct(r.mc.accuracy_merged) if r.mc else "-" for r in results])
        row("merge gap (pp)", [f"{r.mc.merge_gap_pp:+.2f}" if r.mc else "-" for r in results])
        row("  95% CI (pp)", [f"{r.mc.gap_ci_pp[0]:+.2f} to {r.mc.gap_ci_pp[1]:+.2f}" if r.mc else "-"
                              for r in results])
        row("  right->wrong / wrong->right", [f"{r.mc.right_to_wrong} / {r.mc.wrong_to_right}" if r.mc else "-"
                                              for r in results])
        row("  McNemar exact p", [f"{r.mc.mcnemar_p:.3g}" if r.mc else "-" for r in results])
        row("answers flipped", [str(len(r.mc.flipped)) if r.mc else "-" for r in results])
        row("  rounding floor", [str(r.mc.rounding_flips) if r.mc and r.mc.rounding_flips is not None else "-"
                                 for r in results])
        row("  p (more than rounding)", [f"{r.mc.flips_vs_rounding_p:.3g}"
                                         if r.mc and r.mc.flips_vs_rounding_p is not None else "-" for r in results])
    row("merged tensors checked", [f"{len(r.layers)}" for r in results])
    row("max weight abs error", [_fmt_sci(r.max_abs_error) for r in results])
    row("max weight error (ulp)", [f"{r.max_ulp_error:.3g}" for r in results])
    row("copied tensors exact", [f"{r.copied_checked - len(r.copied_mismatched)}/{r.copied_checked}" for r in results])
    if any(r.not_checked for r in results):
        row("tensors by logits only", [str(len(r.not_checked)) for r in results])
    summaries = [method_summary(r.layers) for r in results]
    for key in dict.fromkeys(k for s in summaries for k in s):
        row(f"{report.method}: {key}", [f"{s[key]:.6g}" if key in s else "-" for s in summaries])
    row("limits: floor multiple", [f"{r.thresholds.floor_multiple:g}" for r in results])
    row("limits: test level (alpha)", [f"{r.thresholds.alpha:g}" for r in results])
    row("limits: max ulp", [f"{r.thresholds.max_ulp:g}" for r in results])
    if any(r.thresholds.min_top1 is not None for r in results):
        row("limits: min top-1", [_fmt_pct(r.thresholds.min_top1) if r.thresholds.min_top1 is not None else "-"
                                  for r in results])
    if any(r.thresholds.max_gap_pp is not None for r in results):
        row("limits: max |gap| (pp)", [f"{r.thresholds.max_gap_pp:g}" if r.thresholds.max_gap_pp is not None
                                       else "-" for r in results])
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
        rows.append(["  95% CI (pp)", *[f"{r.mc.gap_ci_pp[0]:+.2f} to {r.mc.gap_ci_pp[1]:+.2f}" if r.mc else "-"
                                        for r in results]])
        rows.append(["answers flipped", *[str(len(r.mc.flipped)) if r.mc else "-" for r in results]])
    rows.append(["max |logit diff|", *[_fmt_sci(r.logits.max_abs_diff) if r.logits else "-" for r in results]])
    rows.append(["  rounding floor", *[_fmt_sci(r.floor.max_abs_diff) if r.floor else "-" for r in results]])
    rows.append(["top-1 agreement", *[_fmt_pct(r.logits.top1_agreement) if r.logits else "-" for r in results]])
    rows.append(["max weight error (ulp)", *[f"{r.max_ulp_error:.3g}" for r in results]])
    rows.append(["result", *["PASS" if r.passed else "FAIL" for r in results]])
    return _table(["", *[r.dtype for r in results]], rows)
