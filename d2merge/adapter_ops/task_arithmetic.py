"""PEFT 0.21's combination rules (``peft.utils.merge_utils``) on tensors, reproduced, not imported.

Why our own: PEFT applies them inside a live ``PeftModel`` (the base loaded, every adapter
injected); here they run on one module's factors at a time, read from disk, so the memory
is one module's. The arithmetic follows PEFT operation by operation (same stacking, same
order of products and sums, fp32), so the deterministic types equal PEFT's to fp32
rounding. The random ones (DARE) draw their masks from a ``torch.Generator`` the caller
seeds, so a run is reproducible; PEFT draws from torch's global generator after its new
adapter's own random init, a sequence no caller can line up with (docs/adapter-ops.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from d2merge.options.adapter_ops import COMBINATIONS, RANDOM, SIGN_METHODS, WITH_DENSITY, WITH_SIGN

# Combinations applied to A and B separately: PEFT requires equal ranks for them.
FACTORWISE = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
# Combinations applied to the full updates, then factored by a truncated SVD.
ON_UPDATES = tuple(c for c in COMBINATIONS if c.endswith("svd"))
__all__ = ["COMBINATIONS", "FACTORWISE", "ON_UPDATES", "RANDOM", "SIGN_METHODS", "WITH_DENSITY", "WITH_SIGN",
           "combine_tensors", "combine_factors", "concatenate_factors", "combine_updates"]


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest magnitudes set to zero (PEFT's rule)."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    kept = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices
    mask[kept] = 1
    return tensor * mask.reshape(tensor.shape)


def keep_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each value kept with probability ``density`` and the kept ones divided by it (PEFT's rule)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' elected sign per value: of the weighted-free sum ("total") or of the sign count ("frequency")."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the tasks that agree with the elected sign (at least one in the divisor)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def combine_tensors(tensors: Sequence[torch.Tensor], weights: torch.Tensor, combination: str, *,
                    density: float = 1.0, sign_method: str = "total",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """One combined tensor from same-shaped task tensors, by ``combination`` without its ``_svd`` suffix.

    ``weights`` is a 1-D tensor, one per task tensor; PEFT passes the weights times the
    adapters' scales (their square roots, signed on A only, for the factor-wise types).
    """
    kind = combination.removesuffix("_svd")
    if kind in ("svd", "linear"):
        return _weighted(torch.stack(list(tensors), dim=0), weights).sum(dim=0)
    if kind in ("ties", "magnitude_prune"):
        stacked = torch.stack([keep_largest(t, density) for t in tensors], dim=0)
    elif kind in ("dare_ties", "dare_linear"):
        stacked = torch.stack([keep_random(t, density, generator) for t in tensors], dim=0)
    else:
        raise ValueError(f"unknown combination {combination!r}")
    if kind in ("magnitude_prune", "dare_linear"):
        return _weighted(stacked, weights).sum(dim=0)
    mask = majority_sign_mask(stacked, sign_method)
    return disjoint_mean(_weighted(stacked, weights), mask)


def combine_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                    scales: Sequence[float], combination: str, *, density: float = 1.0,
                    sign_method: str = "total", generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one module from each adapter's (A, B), for the factor-wise types (PEFT's rule).

    Each adapter's weight times its scale is split as a square root on A (with the sign)
    and on B, so that for ``linear`` with one adapter B @ A is its scaled update; A's
    and B's are then combined separately, A's first (the order DARE draws its masks in).
    """
    weights_a, weights_b = [], []
    for weight, scale in zip(weights, scales):
        product = weight * scale
        weights_a.append(math.sqrt(abs(product)) * (1 if product >= 0 else -1))
        weights_b.append(math.sqrt(abs(product)))
    a = combine_tensors([f[0] for f in factors], torch.tensor(weights_a), combination, density=density,
                        sign_method=sign_method, generator=generator)
    b = combine_tensors([f[1] for f in factors], torch.tensor(weights_b), combination, density=density,
                        sign_method=sign_method, generator=generator)
    dtype = factors[0][0].dtype
    return a.to(dtype), b.to(dtype)


def concatenate_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                        scales: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat``: A's stacked (each times its weight and scale), B's side by side; exact, rank = sum of ranks."""
    a = torch.cat([f[0] * w * s for f, w, s in zip(factors, weights, scales)], dim=0)
    b = torch.cat([f[1] for f in factors], dim=1)
    return a, b


def combine_updates(updates: Sequence[torch.Tensor], weights: Sequence[float], combination: str, *,
                    density: float = 1.0, sign_method: str = "total",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The combined full update of one module, for the ``*svd`` types (each update already scaled)."""
    return combine_tensors(updates, torch.tensor(list(weights)).to(updates[0].device), combination,
                           density=density, sign_method=sign_method, generator=generator)
