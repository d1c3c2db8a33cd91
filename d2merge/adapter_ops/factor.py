"""One module's full update as low-rank factors: the truncated SVD, its rank rule and its cost.

By Eckart-Young the rank-k truncated SVD is the best rank-k approximation in the Frobenius
norm, so the energy it keeps, sum(s[:k]^2) / sum(s^2), says exactly what a rank costs:
the relative error of the update is sqrt(1 - energy). The full (not randomized) SVD is
used so that this figure is exact, not an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# fp32's unit roundoff: singular values below s_max * max(m, n) * EPS are rounding noise
# (numpy's matrix_rank rule), so the update's rank is the count above it.
FP32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class FactorReport:
    """What factoring one module kept: its rank, the update's numerical rank, energy and error."""

    module: str
    shape: tuple[int, int]
    rank: int
    full_rank: int  # the update's numerical rank (singular values above fp32 noise)
    energy: float  # fraction of ||dW||_F^2 kept
    relative_error: float  # ||dW - B @ A||_F / ||dW||_F, measured (= sqrt(1 - energy) up to rounding)
    update_norm: float

    def to_json(self) -> dict[str, object]:
        return {"module": self.module, "shape": list(self.shape), "rank": self.rank, "update_rank": self.full_rank,
                "retained_energy": self.energy, "relative_error": self.relative_error,
                "update_norm": self.update_norm}


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values stand above fp32 rounding noise (numpy.linalg.matrix_rank's tolerance)."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    tolerance = float(singular_values[0]) * max(shape) * FP32_EPS
    return int((singular_values > tolerance).sum())


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The least rank whose truncated SVD keeps at least ``energy`` of ||dW||_F^2."""
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(squares, 0) / total
    # The last entry is 1 up to rounding; never ask for more than the matrix has.
    return min(int((kept < energy - 1e-12).sum()) + 1, singular_values.numel())


def factor_update(update: torch.Tensor, module: str, *, rank: int | None = None, energy: float | None = None,
                  randomized: bool = False) -> tuple[torch.Tensor, torch.Tensor, FactorReport]:
    """(A, B, report) with B @ A the truncated SVD of ``update`` (out, in), fp32.

    Rank: ``rank`` (capped by the update's numerical rank: more would only add noise),
    else the least rank keeping ``energy``, else the numerical rank (exact to fp32
    rounding). The singular values are split as square roots on both factors, so A and
    B have the same scale, which keeps fp16/bf16 serving of the factors in range.

    ``randomized`` (with ``rank`` only): a randomized range finder (Halko et al.; torch's
    ``svd_lowrank``, 8 extra columns, 2 power iterations) instead of the full SVD, tens of
    times faster on large modules. Its factors are U_k U_k^T dW, an orthogonal projection,
    so the error it reports (measured, ||dW - B @ A||) is exact and the energy kept is
    1 - error^2. The update's numerical rank is then unknown (reported as -1).
    """
    if randomized and rank is not None and (rank + 8) * 2 < min(update.shape):
        return _randomized(update.float(), module, rank)
    u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
    full = numerical_rank(s, tuple(update.shape))
    if rank is not None:
        k = min(rank, full)
    elif energy is not None:
        k = min(rank_for_energy(s, energy), full) if full else 0
    else:
        k = full
    k = max(k, 1)  # a zero update still needs one (zero) factor row to be a module
    root = s[:k].sqrt()
    b = u[:, :k] * root[None, :]
    a = root[:, None] * vh[:k]
    squares = s.double() ** 2
    total = float(squares.sum())
    kept = float(squares[:k].sum()) / total if total else 1.0
    report = FactorReport(module, (int(update.shape[0]), int(update.shape[1])), k, full, kept,
                          measured_error(update, a, b), math.sqrt(total))
    return a.contiguous(), b.contiguous(), report


def measured_error(update: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """||dW - B @ A||_F / ||dW||_F, measured (sqrt(1 - energy) cancels badly when the energy is near 1)."""
    norm = float(torch.linalg.vector_norm(update, dtype=torch.float64))
    if norm == 0.0:
        return 0.0
    residual = torch.addmm(update.float(), b, a, alpha=-1.0)
    return float(torch.linalg.vector_norm(residual, dtype=torch.float64)) / norm


def _randomized(update: torch.Tensor, module: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, FactorReport]:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # svd_lowrank draws from the global generator: fixed, so a run is reproducible
    try:
        u, s, v = torch.svd_lowrank(update, q=rank + 8, niter=2)
    finally:
        torch.random.set_rng_state(generator_state)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root[None, :]
    a = root[:, None] * v[:, :rank].T
    total = float(torch.linalg.vector_norm(update, dtype=torch.float64) ** 2)
    error = measured_error(update, a, b)
    report = FactorReport(module, (int(update.shape[0]), int(update.shape[1])), rank, -1, 1.0 - error ** 2,
                          error, math.sqrt(total))
    return a.contiguous(), b.contiguous(), report


def peft_svd_factors(update: torch.Tensor, rank: int, clamp: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's ``add_weighted_adapter`` SVD step: B = U_k diag(S_k), A = Vh_k, optionally clamped; and the energy kept.

    ``clamp`` is a quantile of all the values of both factors: every value is clamped to
    [-q, q] (kohya-ss's svd_merge_lora rule, which PEFT follows).
    """
    # full_matrices as PEFT's default: the clamp's quantile sees the factors' signs, so the
    # same LAPACK call keeps them the same as PEFT's.
    u, s, vh = torch.linalg.svd(update, full_matrices=True)
    b = u[:, :rank] @ torch.diag(s[:rank])
    a = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b = b.clamp(-high, high)
        a = a.clamp(-high, high)
    squares = s.double() ** 2
    total = float(squares.sum())
    return a, b, (float(squares[:rank].sum()) / total if total else 1.0)
