"""The options of ``combine``, ``convert`` and ``extract``: the CLI's flags, defaults and help; no torch.

All three write any of ``CONVERT_TARGETS`` (``to``): a PEFT LoRA folder, or llama.cpp's LoRA GGUF.

Which combination takes which setting is field metadata (``density`` only with the types that
prune, ``svd_rank`` only with the *svd types), refused when given elsewhere, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from d2merge.options.base import OptionModel, option, option_like, when
from d2merge.options.merge import MergeOptions

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


SVD_COMBINATIONS = tuple(c for c in COMBINATIONS if c.endswith("svd"))
_ENERGY_HINT = "e.g. {energy=0.99} keeps 99% of ||dW||^2"
_RANK_HINT = "e.g. {rank=16}"
_ENERGY_HELP = "Instead of --rank: per module the least rank keeping this fraction of ||dW||_F^2, in (0, 1]."


_TO_HELP = ("lora: a plain PEFT LoRA folder (what vLLM, TGI and PEFT load); gguf-lora: llama.cpp's LoRA adapter "
            "GGUF, one .gguf file.")


@dataclass(frozen=True)
class _AdapterOutput(OptionModel):
    """What combine, convert and extract write: ``to`` names an entry of ``export.adapter_outputs.REGISTRY``."""

    to: str = option("lora", choices=CONVERT_TARGETS, help=_TO_HELP)

    def require_target(self, writes: str) -> None:
        """A writer called directly with options for another target refuses, instead of writing its own format."""
        if self.to != writes:
            raise self.error(f"{{to=}} asks for another output than this function writes ({writes})",
                             hint="use d2merge.convert, d2merge.combine or d2merge.extract with {to=}: they write "
                                  "every target")


@dataclass(frozen=True)
class _SvdRank(_AdapterOutput):
    """The rank rules convert and extract share: --svd randomized needs a fixed --rank."""

    def validate(self) -> None:
        rank, energy, svd = getattr(self, "rank"), getattr(self, "energy"), getattr(self, "svd")
        if rank is not None and energy is not None:
            raise self.error("{rank} and {energy} both choose the rank; give one",
                             hint="{rank=R} for one rank everywhere, {energy=E} for the least rank keeping E")
        if svd == "randomized" and rank is None:
            raise self.error("{svd=randomized} needs {rank} ({energy} and the exact default need every singular value)",
                             hint="give {rank=R}, or use {svd=full}")


@dataclass(frozen=True)
class CombineOptions(_AdapterOutput):
    """How ``d2merge combine`` combines adapters: PEFT 0.21's ``add_weighted_adapter`` arguments."""

    what: ClassVar[str] = "combine option"

    combination: str = option("svd", choices=COMBINATIONS,
                              help="PEFT's combination_type. linear/ties/dare_*/magnitude_prune combine A and B "
                                   "separately (equal ranks); cat stacks them (exact, rank = sum); *svd combine the full "
                                   "updates and factor them by a truncated SVD. DoRA, D2-LoRA, Dual LoRA inputs take an "
                                   "*svd type and --base.")
    density: float | None = option(None, min=0, max=1, applies_with=when("combination", *WITH_DENSITY),
                                   range_hint="0 prunes every value, 1 keeps every value",
                                   help="Fraction of values kept by ties/dare/magnitude_prune types, in [0, 1] "
                                        "(required by them).")
    svd_rank: int | None = option(None, min=1, applies_with=when("combination", *SVD_COMBINATIONS),
                                  range_hint="e.g. {svd_rank=16}",
                                  help="Rank of the *svd types' output [default: the largest input rank, as PEFT].")
    svd_clamp: float | None = option(None, min=0, max=1, applies_with=when("combination", *SVD_COMBINATIONS),
                                     range_hint="a quantile: e.g. {svd_clamp=0.99} clamps the factors at their 99th "
                                                "percentile",
                                     help="*svd types: clamp the factors' values to this quantile of their magnitudes "
                                          "(PEFT's svd_clamp).")
    majority_sign_method: str = option("total", choices=SIGN_METHODS, applies_with=when("combination", *WITH_SIGN),
                                       help="ties/dare_ties types: the elected sign by the sum of values (total) or "
                                            "by count (frequency).")
    seed: int = option(0, applies_with=when("combination", *RANDOM),
                       help="dare types: seed of the random masks (the same seed gives the same adapter).")
    overwrite: bool = option(False, help="Replace an existing output folder (only once the new one is complete).")

    def validate(self) -> None:
        if self.combination in WITH_DENSITY and self.density is None:
            raise self.error("{combination=} needs {density} (fraction kept, in [0, 1])",
                             hint="e.g. {density=0.5}, as PEFT's examples use")


@dataclass(frozen=True)
class ConvertOptions(_SvdRank):
    """How ``d2merge convert`` turns an adapter into a plain LoRA (or llama.cpp's LoRA GGUF)."""

    what: ClassVar[str] = "convert option"

    rank: int | None = option(None, min=1, range_hint=_RANK_HINT, help="Largest rank per module [default: the update's own numerical rank: "
                                                "exact to fp32 rounding].")
    energy: float | None = option(None, min=0, min_open=True, max=1, range_hint=_ENERGY_HINT, help=_ENERGY_HELP)
    svd: str = option("full", choices=SVD_KINDS, help=SVD_HELP)
    overwrite: bool = option(False, help="Replace an existing output (only once the new one is complete).")


@dataclass(frozen=True)
class ExtractOptions(_SvdRank):
    """How ``d2merge extract`` turns TUNED - BASE into a LoRA adapter."""

    what: ClassVar[str] = "extract option"

    rank: int | None = option(None, min=1, range_hint=_RANK_HINT, help="Rank of every module's truncated SVD (capped by the module's own "
                                                "update rank).")
    energy: float | None = option(None, min=0, min_open=True, max=1, range_hint=_ENERGY_HINT, help=_ENERGY_HELP)
    svd: str = option("full", choices=SVD_KINDS, help=SVD_HELP)
    device: str = option_like(MergeOptions, "device",
                              help="Where the SVDs run (cpu or cuda); files are read and written on the CPU.")
    skip_other_changes: bool = option(False, help="Leave out (and list) changed tensors a LoRA cannot carry (norms, "
                                                  "biases) instead of refusing.")
    overwrite: bool = option(False, help="Replace an existing output folder (only once the new one is complete).")

    def validate(self) -> None:
        if self.rank is None and self.energy is None:
            raise self.error("give exactly one of {rank} and {energy}",
                             hint="e.g. {rank=16}, or {energy=0.9} for 90% of each update's ||dW||^2")
        super().validate()


@dataclass(frozen=True)
class MixOptions(OptionModel):
    """Several adapters into one base (``merge`` and ``verify`` with ADAPTER...): a weight each, and
    optionally combine's combination instead of the weighted sum (docs/adapter-ops.md)."""

    what: ClassVar[str] = "merge option"

    weights: str | None = option(None, metavar="W1,W2,...",
                                 help="One weight per ADAPTER, in order: merges W0 + sum of w_i * (adapter i's merge "
                                      "- W0), any mix of methods (required with several adapters; with one it scales "
                                      "its update).")
    combination: str | None = option(None, choices=COMBINATIONS,
                                     help="Instead of the weighted sum: combine the adapters as `d2merge combine "
                                          "--combination` does and merge the result (the same tensors as combine, "
                                          "then merge).")
    density: float | None = option_like(CombineOptions, "density")
    svd_rank: int | None = option_like(CombineOptions, "svd_rank")

    def combine_options(self) -> CombineOptions | None:
        """combine's options for a ``combination`` merge (its own rules checked), else None."""
        if self.combination is None:
            return None
        return CombineOptions(combination=self.combination, density=self.density, svd_rank=self.svd_rank)
