"""What a verify column is judged against: the dtypes' ulps, the rounding floor, the thresholds, the verdict.

The floor is what one rounding to the output dtype costs this model on these probes with no
merge at all (``apply_rounding`` makes that model; ``rounding_floor`` turns its logits into the
floor); ``resolve_limits`` turns a column's Thresholds and floor into numbers, ``judge`` names
every check that fails.
"""

from __future__ import annotations

import zlib
from dataclasses import fields, replace
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from d2merge.dtypes import FLOAT_DTYPES
from d2merge.errors import D2MergeError, escaped, option_error
from d2merge.dtypes import ALIASES as DTYPE_ALIASES
from d2merge.verify.probes import Probes
from d2merge.verify.results import LayerCheck, Limits, LogitStats, MCResult, RoundingFloor
from d2merge.verify.stats import flips_vs_rounding
from d2merge.options.verify import DEFAULT_THRESHOLDS, Thresholds

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


def parse_dtypes(dtypes: str | Sequence[str]) -> tuple[str, ...]:
    """``"fp32,bf16"`` or a sequence, normalised (``bfloat16`` -> ``bf16``), duplicates removed."""
    items = dtypes.split(",") if isinstance(dtypes, str) else list(dtypes)
    names: list[str] = []
    for raw in items:
        key = DTYPE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if key not in VERIFY_DTYPES:
            raise option_error(f"unknown dtype {escaped(repr(raw))} for {{dtypes}}; "
                               f"choose from {', '.join(VERIFY_DTYPES)}")
        if key not in names:
            names.append(key)
    if not names:
        raise option_error("{dtypes} names no dtype")
    return tuple(names)


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at each entry's magnitude (subnormal spacing near zero), in fp64.

    Read from the bits: masking an fp64's sign and mantissa leaves ``2**binade`` (0 for zero),
    which times ``2**-mantissa_bits`` is the spacing, clamped below at the subnormal spacing.
    Four passes where frexp/where/ldexp took eight and two integer temporaries; the values are
    the same powers of two (the weight check and the floor's rounding spend most of their time here).
    Infinities and NaNs get the largest finite binade's spacing, so an infinite or NaN
    difference stays infinite or NaN after the division.
    """
    return ulp_(reference.to(torch.float64, copy=True), dtype)


def ulp_(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`ulp` in place on an fp64 tensor (the weight check's row blocks reuse their temporaries)."""
    low, high = binade_bounds(dtype)
    return binade_(values).clamp_(low, high).mul_(2.0 ** -MANTISSA_BITS[dtype])


def binade_(values: torch.Tensor) -> torch.Tensor:
    """In place on an fp64 tensor: each |x| rounded down to a power of two (0 for zero, inf for inf and NaN).

    ``ulp(x) = clamp(binade(x), *binade_bounds(dtype)) * 2**-mantissa_bits``; monotone in |x|,
    so the ulp of a maximum is the maximum of the binades, clamped and scaled once.
    """
    values.view(torch.int64).bitwise_and_(_FP64_EXPONENT_BITS)  # the sign and mantissa bits cleared
    return values


def binade_into(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`binade_` of fp64 ``values`` written into ``out`` (same shape), in one pass instead of a copy and one."""
    torch.bitwise_and(values.view(torch.int64), _FP64_EXPONENT_BITS, out=out.view(torch.int64))
    return out


def binade_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """The smallest binade ``dtype`` spaces as a normal number (its subnormals share it) and the largest finite."""
    if dtype not in MANTISSA_BITS:
        raise D2MergeError(f"no ulp defined for {dtype}")
    return 2.0 ** MIN_NORMAL_EXPONENT[dtype], 2.0 ** 1023


_FP64_EXPONENT_BITS = 0x7FF0000000000000


@torch.no_grad()
def apply_rounding(model: nn.Module, rewritten: set[str], dtype: torch.dtype, *, seed: int) -> nn.Module:
    """The base weights as a merge into ``dtype`` leaves them, had the adapter been zero.

    Tensors the merge copies are cast to ``dtype`` (what the merged folder holds). Tensors it
    rewrites get one rounding's error: a seeded draw uniform in +-1/2 ulp of ``dtype``, which is
    what rounding to nearest leaves. Casting those instead would cost nothing on a base already
    stored in ``dtype`` (SmolLM2 ships bf16), yet the merge rounds them afresh.
    """
    for name, param in model.named_parameters():
        round_parameter(name, param, rewritten, dtype, seed=seed)
    return model


@torch.no_grad()
def round_parameter(name: str, param: torch.Tensor, rewritten: set[str], dtype: torch.dtype, *, seed: int) -> None:
    """``apply_rounding`` for one parameter, in place.

    Each rewritten tensor's draw is seeded by (seed, its name), not by its place in one
    sequence of draws: the block-streamed models (``verify.streamed``) round each block when it
    loads, and must draw what the whole model draws.
    """
    if not param.is_floating_point() or param.is_meta:
        return
    if name in rewritten:
        data = param.data if param.data.is_contiguous() else param.data.contiguous()
        _add_rounding_error_(data.view(-1), rounding_levels(f"{seed}:{name}", data.numel()), dtype)
        if data is not param.data:
            param.data.copy_(data)
    elif dtype != param.dtype:
        param.copy_(param.to(dtype).to(param.dtype))


def rounding_levels(key: str, count: int) -> torch.Tensor:
    """``count`` seeded draws uniform on the 256 int8 levels -128..127 (the floor's rounding error in 1/256 ulp).

    numpy's PCG64 raw stream (stable across numpy versions), eight levels per 64-bit draw: 13x
    faster than ``torch.rand``, whose one draw per entry was most of the floor's rounding at 7B.
    256 levels centred in +-1/2 ulp have rounding to nearest's mean (0) and, to 1 part in 65536,
    its variance (1/12 ulp^2).
    """
    raw = np.random.PCG64(zlib.crc32(key.encode())).random_raw((count + 7) // 8)
    return torch.from_numpy(raw).view(torch.int8)[:count]


# Entries per block of the floor's rounding: its fp32 passes over 1 MB buffers stay in the CPU's
# cache (1.3x faster than 16 MB blocks on the 7B's matrices; 256 KB ones were slower again).
ROUNDING_BLOCK_ENTRIES = 1 << 18
_FP32_EXPONENT_BITS = 0x7F800000


def _add_rounding_error_(values: torch.Tensor, levels: torch.Tensor, dtype: torch.dtype) -> None:
    """``values += (levels + 1/2) / 256 * ulp(values, dtype)`` in place, a block at a time.

    On fp32 values the ulp is read from their own bits (the exponent field, a power of two,
    clamped below at ``dtype``'s subnormal spacing and scaled by ``2**-mantissa_bits``): the
    same powers of two :func:`ulp` computes in fp64 (tested), without its fp64 passes.
    Other dtypes take :func:`ulp` itself. The two block buffers are reused: fresh memory is
    page-faulted in at the cost of a pass.
    """
    low, scale = 2.0 ** MIN_NORMAL_EXPONENT[dtype], 2.0 ** -MANTISSA_BITS[dtype]
    fp32 = values.dtype == torch.float32
    # (k + 1/2) * 2**-8 * ulp is an fp32 number (no underflow) when the smallest ulp of ``dtype`` is
    # at least 2**-140: bf16's and fp16's are; fp32's own (2**-149) is not, and keeps the old order
    exact_products = low * scale >= 2.0 ** -140
    size = min(ROUNDING_BLOCK_ENTRIES, values.numel())
    spacing = torch.empty(size, dtype=torch.float32, device=values.device)
    draws = torch.empty(size, dtype=values.dtype, device=values.device)
    for start in range(0, values.numel(), ROUNDING_BLOCK_ENTRIES):
        block = values[start: start + ROUNDING_BLOCK_ENTRIES]
        draw = draws[: block.numel()]
        draw.copy_(levels[start: start + ROUNDING_BLOCK_ENTRIES]).add_(0.5)  # exact: k + 1/2
        if fp32:
            step = spacing[: block.numel()]
            torch.bitwise_and(block.view(torch.int32), _FP32_EXPONENT_BITS, out=step.view(torch.int32))
            step.clamp_(min=low).mul_(scale)  # inf and NaN keep an infinite spacing, as ulp()'s does in fp32
            if exact_products:
                # values + 2**-8 * (k + 1/2) * ulp in one pass, not three: every product is exact, so
                # whatever order addcmul multiplies in, the same bits (tested)
                block.addcmul_(draw, step, value=1.0 / 256)
            else:
                block.add_(draw.mul_(1.0 / 256).mul_(step))
        else:
            block.add_(draw.mul_(1.0 / 256).mul_(ulp(block, dtype).to(values.dtype)))


def rounding_floor(logits: LogitStats, reference: torch.Tensor, probes: Probes, mc_flips: int | None
                   ) -> RoundingFloor:
    """The floor a column's logit difference is judged against: rounding's, or fp32 arithmetic's if larger."""
    real = probes.attention_mask.bool()
    scale = float(reference[real].abs().max()) if real.any() else 0.0
    arithmetic = max(ARITHMETIC_FLOOR_ABS, ARITHMETIC_FLOOR_REL * scale)
    return RoundingFloor(logits, arithmetic, max(logits.max_abs_diff, arithmetic), mc_flips)


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
    return Limits(max_abs, source, thresholds.max_ulp, thresholds.alpha, thresholds.min_top1, thresholds.max_gap_pp,
                  thresholds.max_kl, thresholds.max_ppl_ratio)


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
    if logits is not None and limits.max_kl is not None and not logits.kl_mean <= limits.max_kl:
        failures.append(f"KL check: mean KL(unmerged || merged) {logits.kl_mean:.3g} > {limits.max_kl:g} (--max-kl)")
    if logits is not None and limits.max_ppl_ratio is not None:
        if logits.ppl_ratio is None:
            failures.append("perplexity check: no real text to measure it on (--prompts FILE, or the built-in "
                            "sentences; not --probe-source random) (--max-ppl-ratio)")
        elif not logits.ppl_ratio <= limits.max_ppl_ratio:
            failures.append(f"perplexity check: merged / unmerged {logits.ppl_ratio:.4g} > {limits.max_ppl_ratio:g} "
                            "(--max-ppl-ratio)")
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
