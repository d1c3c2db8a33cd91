"""The merge's options: one frozen model, the source of the CLI's flags, defaults and help.

Kept free of torch and of the engine, so ``d2merge --help`` and option
errors answer at once, before any heavy import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from d2merge.dtypes import FLOAT_DTYPES
from d2merge.errors import D2MergeError

# "auto" keeps each base tensor's dtype; the others are d2merge.dtypes' rows.
OUT_DTYPE_NAMES: tuple[str, ...] = ("auto", *FLOAT_DTYPES)
TIED_POLICIES = ("untie", "tie", "error")
# A Hub repo id as the Hub accepts it: ORG/NAME, letters, digits, "-", "_", "." (no "--" or ".." runs).
HUB_REPO_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


@dataclass(frozen=True)
class MergeOptions:
    """Every merge setting in one place; the CLI's flags and help are derived from these fields."""

    dtype: str = field(default="auto", metadata={
        "help": "Output dtype of floating tensors: auto keeps each base tensor's dtype.",
        "choices": OUT_DTYPE_NAMES})
    max_shard_size: str = field(default="5GB", metadata={
        "help": "Largest output shard, e.g. 5GB, 500MB, 2GiB."})
    tied_embeddings: str = field(default="untie", metadata={
        "help": "When the adapter changes a tied embedding/lm_head: untie (exact, writes both), "
                "tie (the change applies to both), error (refuse).",
        "choices": TIED_POLICIES})
    device: str = field(default="cpu", metadata={
        "help": "Where the fp32 math runs (cpu or cuda); files are always read and written on the CPU.",
        "choices": ("cpu", "cuda")})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output folder (only once the new one is complete)."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Allow .bin (pickle) weights; loaded with weights_only=True. Only for files you trust."})
    hash_sources: bool = field(default=True, metadata={
        "help": "Record the sha256 of the base and adapter files in the model card (hashed from the "
                "bytes the merge reads, in a background thread; a Hub-cache file's name is its sha256)."})
    base_model_id: str | None = field(default=None, metadata={
        "help": "The base's Hub id (ORG/NAME) for the model card's base_model, which puts the merge in the "
                "base's model tree on the Hub. [default: the Hub id when BASE comes from the Hub cache; a local "
                "folder has none]"})

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise D2MergeError(f"invalid {f.name} {getattr(self, f.name)!r}; choose one of {', '.join(choices)}")
        if self.base_model_id is not None and not HUB_REPO_ID.fullmatch(self.base_model_id):
            raise D2MergeError(f"--base-model-id {self.base_model_id!r} is not a Hub model id",
                               hint="give it as ORG/NAME, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")

    def with_overrides(self, **overrides: Any) -> MergeOptions:
        """These options with some fields changed; an unknown name is a TypeError, as for a function."""
        known = {f.name for f in fields(MergeOptions)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown merge option(s): {', '.join(sorted(unknown))}")
        return replace(self, **overrides) if overrides else self

    @classmethod
    def resolve(cls, options: MergeOptions | None, overrides: dict[str, Any]) -> MergeOptions:
        """``options`` (or the defaults) with the keyword overrides of a call like ``merge(..., dtype="bf16")``."""
        return (options or cls()).with_overrides(**overrides)


ONNX_DTYPES = ("fp32", "fp16")  # ONNX Runtime's CPU provider has no bf16 kernels
EXPORTERS = ("dynamo", "legacy")
# 18 is the opset torch's dynamo exporter implements natively: asked for less, it silently keeps
# 18 (torch 2.13), so a lower opset with dynamo is refused before any work. 23 is not a safe
# default: it emits the fused RotaryEmbedding op, which ONNX Runtime 1.32 rejects for batch > 1
# when position ids are shared across the batch (transformers' default).
DEFAULT_OPSET = 18
DYNAMO_MIN_OPSET = 18


@dataclass(frozen=True)
class OnnxExportOptions:
    """The settings of ``d2merge export-onnx`` (generic runtime); its flags' names, defaults and help."""

    dtype: str = field(default="fp32", metadata={
        "help": "Precision of the graph. fp32 matches PyTorch to ~1e-7; fp16 halves the file. bf16 is "
                "refused: ONNX Runtime's CPU provider has no bf16 kernels.",
        "choices": ONNX_DTYPES})
    with_past: bool = field(default=False, metadata={
        "help": "Also take and return the key/value cache (past_key_values.{i}.key/value in, present.{i}.key/value "
                "out) for token-by-token generation; attention_mask then covers past + new tokens."})
    opset: int = field(default=DEFAULT_OPSET, metadata={
        "help": f"ONNX opset. The dynamo exporter writes {DYNAMO_MIN_OPSET} and newer (a lower one is refused up "
                "front); an opset that does not take is an error, never a silent change."})
    exporter: str = field(default="dynamo", metadata={
        "help": "dynamo: torch.export-based, PyTorch's supported path. legacy: TorchScript tracing, much faster "
                f"and able to write opsets below {DYNAMO_MIN_OPSET}, deprecated by PyTorch.",
        "choices": EXPORTERS})

    def __post_init__(self) -> None:
        if self.dtype in ("bf16", "bfloat16"):
            raise D2MergeError("bf16 ONNX graphs cannot be validated or run: ONNX Runtime's CPU provider has no "
                               "bfloat16 kernels", hint="use --dtype fp32, exact, or --dtype fp16, half the size")
        if self.dtype not in ONNX_DTYPES:
            raise D2MergeError(f"unknown dtype {self.dtype!r}", hint=f"choose one of {', '.join(ONNX_DTYPES)}")
        if self.exporter not in EXPORTERS:
            raise D2MergeError(f"unknown exporter {self.exporter!r}", hint=f"choose one of {', '.join(EXPORTERS)}")
        if self.exporter == "dynamo" and self.opset < DYNAMO_MIN_OPSET:
            raise D2MergeError(f"the dynamo exporter cannot write ONNX opset {self.opset}: it writes "
                               f"{DYNAMO_MIN_OPSET} and newer (asked for less, it keeps {DYNAMO_MIN_OPSET})",
                               hint=f"use --opset {DYNAMO_MIN_OPSET}, or --exporter legacy for opset {self.opset}")


def option_help(options: type, name: str) -> str:
    """The help text of one field of an option model (the CLI reads its flags' help from here)."""
    return next(f.metadata.get("help", "") for f in fields(options) if f.name == name)
