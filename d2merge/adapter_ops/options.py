"""The options of ``combine``, ``convert`` and ``extract``: the CLI's flags, defaults and help; no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from d2merge.errors import D2MergeError

# Kept here (torch-free) for the CLI's choices; d2merge.adapter_ops.task_arithmetic holds the math.
COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
WITH_DENSITY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                "magnitude_prune", "magnitude_prune_svd")
WITH_SIGN = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
RANDOM = ("dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd")
SIGN_METHODS = ("total", "frequency")
CONVERT_TARGETS = ("lora", "gguf-lora")
SVD_KINDS = ("full", "randomized")
SVD_HELP = ("full: the exact truncated SVD. randomized (with --rank): a randomized range finder, much faster on "
            "large modules; the error it reports is still exact (its factors are a projection of dW).")


def _check_svd(svd: str, rank: int | None) -> None:
    if svd not in SVD_KINDS:
        raise D2MergeError(f"unknown --svd {svd!r}", hint=f"choose one of {', '.join(SVD_KINDS)}")
    if svd == "randomized" and rank is None:
        raise D2MergeError("--svd randomized needs --rank (--energy and the exact default need every singular "
                           "value)", hint="give --rank R, or use --svd full")


def _check_energy(energy: float | None) -> None:
    if energy is not None and not (0.0 < energy <= 1.0):
        raise D2MergeError(f"--energy {energy:g} is outside (0, 1]", hint="e.g. --energy 0.99 keeps 99% of ||dW||^2")


def _check_rank(rank: int | None, flag: str) -> None:
    if rank is not None and rank < 1:
        raise D2MergeError(f"{flag} {rank} must be at least 1", hint=f"e.g. {flag} 16")


@dataclass(frozen=True)
class CombineOptions:
    """How ``d2merge combine`` combines adapters: PEFT 0.21's ``add_weighted_adapter`` arguments."""

    combination: str = field(default="svd", metadata={
        "help": "PEFT's combination_type. linear/ties/dare_*/magnitude_prune combine A and B separately "
                "(equal ranks); cat stacks them (exact, rank = sum); *svd combine the full updates and factor "
                "them by a truncated SVD. DoRA, D2-LoRA, Dual LoRA inputs take an *svd type and --base.",
        "choices": COMBINATIONS})
    density: float | None = field(default=None, metadata={
        "help": "Fraction of values kept by ties/dare/magnitude_prune types, in [0, 1] (required by them)."})
    svd_rank: int | None = field(default=None, metadata={
        "help": "Rank of the *svd types' output [default: the largest input rank, as PEFT]."})
    svd_clamp: float | None = field(default=None, metadata={
        "help": "*svd types: clamp the factors' values to this quantile of their magnitudes (PEFT's svd_clamp)."})
    majority_sign_method: str = field(default="total", metadata={
        "help": "ties/dare_ties types: the elected sign by the sum of values (total) or by count (frequency).",
        "choices": SIGN_METHODS})
    seed: int = field(default=0, metadata={
        "help": "dare types: seed of the random masks (the same seed gives the same adapter)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output folder (only once the new one is complete)."})

    def __post_init__(self) -> None:
        if self.combination not in COMBINATIONS:
            raise D2MergeError(f"unknown combination {self.combination!r}", hint=f"choose one of {', '.join(COMBINATIONS)}")
        if self.combination in WITH_DENSITY:
            if self.density is None:
                raise D2MergeError(f"--combination {self.combination} needs --density (fraction kept, in [0, 1])",
                                   hint="e.g. --density 0.5, as PEFT's examples use")
            if not (0.0 <= self.density <= 1.0) or math.isnan(self.density):
                raise D2MergeError(f"--density {self.density:g} is outside [0, 1]",
                                   hint="0 prunes every value, 1 keeps every value")
        elif self.density is not None:
            raise D2MergeError(f"--density does nothing with --combination {self.combination}",
                               hint=f"it applies to {', '.join(WITH_DENSITY)}")
        if not self.combination.endswith("svd") and (self.svd_rank is not None or self.svd_clamp is not None):
            raise D2MergeError(f"--svd-rank/--svd-clamp do nothing with --combination {self.combination}",
                               hint="they apply to the *svd types")
        _check_rank(self.svd_rank, "--svd-rank")
        if self.svd_clamp is not None and not (0.0 <= self.svd_clamp <= 1.0):
            raise D2MergeError(f"--svd-clamp {self.svd_clamp:g} is outside [0, 1] (a quantile)",
                               hint="e.g. --svd-clamp 0.99 clamps the factors at their 99th percentile")
        if self.majority_sign_method not in SIGN_METHODS:
            raise D2MergeError(f"unknown majority sign method {self.majority_sign_method!r}",
                               hint=f"choose one of {', '.join(SIGN_METHODS)}")


@dataclass(frozen=True)
class ConvertOptions:
    """How ``d2merge convert`` turns an adapter into a plain LoRA (or llama.cpp's LoRA GGUF)."""

    to: str = field(default="lora", metadata={
        "help": "lora: a plain PEFT LoRA folder (what vLLM, TGI and PEFT load); gguf-lora: llama.cpp's "
                "LoRA adapter GGUF.", "choices": CONVERT_TARGETS})
    rank: int | None = field(default=None, metadata={
        "help": "Largest rank per module [default: the update's own numerical rank: exact to fp32 rounding]."})
    energy: float | None = field(default=None, metadata={
        "help": "Instead of --rank: per module the least rank keeping this fraction of ||dW||_F^2, in (0, 1]."})
    svd: str = field(default="full", metadata={
        "help": SVD_HELP, "choices": SVD_KINDS})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output (only once the new one is complete)."})

    def __post_init__(self) -> None:
        if self.to not in CONVERT_TARGETS:
            raise D2MergeError(f"unknown target {self.to!r}", hint=f"choose one of {', '.join(CONVERT_TARGETS)}")
        if self.rank is not None and self.energy is not None:
            raise D2MergeError("--rank and --energy both choose the rank; give one",
                               hint="--rank R for one rank everywhere, --energy E for the least rank keeping E")
        _check_rank(self.rank, "--rank")
        _check_energy(self.energy)
        _check_svd(self.svd, self.rank)


@dataclass(frozen=True)
class ExtractOptions:
    """How ``d2merge extract`` turns TUNED - BASE into a LoRA adapter."""

    rank: int | None = field(default=None, metadata={
        "help": "Rank of every module's truncated SVD (capped by the module's own update rank)."})
    energy: float | None = field(default=None, metadata={
        "help": "Instead of --rank: per module the least rank keeping this fraction of ||dW||_F^2, in (0, 1]."})
    svd: str = field(default="full", metadata={
        "help": SVD_HELP, "choices": SVD_KINDS})
    device: str = field(default="cpu", metadata={
        "help": "Where the SVDs run (cpu or cuda); files are read and written on the CPU.",
        "choices": ("cpu", "cuda")})
    skip_other_changes: bool = field(default=False, metadata={
        "help": "Leave out (and list) changed tensors a LoRA cannot carry (norms, biases) instead of refusing."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output folder (only once the new one is complete)."})

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise D2MergeError("give exactly one of --rank and --energy",
                               hint="e.g. --rank 16, or --energy 0.9 for 90% of each update's ||dW||^2")
        _check_rank(self.rank, "--rank")
        _check_energy(self.energy)
        _check_svd(self.svd, self.rank)
        if self.device not in ("cpu", "cuda"):
            raise D2MergeError(f"unknown device {self.device!r}", hint="choose cpu or cuda")
