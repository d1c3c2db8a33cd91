"""A GGUF file as verify's MERGED: its type from its tensors, what is stored exactly, and its gates.

verify (``verify/columns.py``) judges a GGUF column by what the file holds: tensors stored in
F32/F16/BF16 are checked in ulps of that dtype against the rounding floor, like a merged folder;
a quantized file has no floor and is judged on real text by the gate of its llama.cpp file type
(:data:`QUANTIZED_GATES`, measured in docs/gguf.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from d2merge.errors import D2MergeError
from d2merge.export.gguf.library import gguf_py
from d2merge.export.gguf.reader import load_gguf_model, read_gguf

# The GGUF architectures verify reads back: its weight check maps HF names one to one (Phi-3's fused
# qkv_proj / gate_up_proj included). Stacked experts have no such name, and Gemma's norms, stored as
# 1 + w, read back as (1 + w) - 1 with one fp32 rounding each way, so its copied tensors are not
# bit-exact: those are refused, and their export is checked by logits in the tests.
VERIFY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3")
# GGML tensor types that hold the merged values exactly in a torch dtype: verify checks those
# tensors in ulps of that dtype. Quantized tensors have no such dtype and are gated by logits only.
EXACT_TENSOR_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# verify's column defaults for a file whose 2-D weights are stored exactly in that dtype.
EXACT_FILE_TYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# llama.cpp's file types (enum llama_ftype, written as general.file_type) -> the GGML type most of
# their 2-D weights get (llama_ftype_get_default_type in llama.cpp's src/llama-quant.cpp).
LLAMA_FILE_TYPES: dict[str, tuple[int, str]] = {
    "f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0"),
    "q4_0": (2, "Q4_0"), "q4_1": (3, "Q4_1"), "q5_0": (8, "Q5_0"), "q5_1": (9, "Q5_1"),
    "q2_k": (10, "Q2_K"), "q3_k_s": (11, "Q3_K"), "q3_k_m": (12, "Q3_K"), "q3_k_l": (13, "Q3_K"),
    "q4_k_s": (14, "Q4_K"), "q4_k_m": (15, "Q4_K"), "q5_k_s": (16, "Q5_K"), "q5_k_m": (17, "Q5_K"),
    "q6_k": (18, "Q6_K"), "iq4_nl": (25, "IQ4_NL"), "iq4_xs": (30, "IQ4_XS"),
}
# What llama.cpp writes instead for rows that are not whole 256-value blocks (tensor_type_fallback).
LLAMA_FALLBACKS = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                   "IQ4_XS": "IQ4_NL"}


@dataclass(frozen=True)
class QuantizedGate:
    """How verify judges a quantized file of one type, on real text (never random tokens)."""

    max_kl: float  # mean KL(unmerged fp32 || file) per position
    min_top1: float  # top-1 agreement with the unmerged fp32 model
    max_ppl_ratio: float  # perplexity file / unmerged on the text's own next tokens
    max_rel_diff: float  # max |logit diff| / largest |logit| of the unmerged model


# Quantized gates by file type, from the figures measured on SmolLM2-135M + a D2-LoRA merge on the
# built-in sentences (docs/gguf.md, benchmarks/gguf_quality.py): max mean KL 3x the measured (at
# least 0.02), min top-1 the measured less 15 points, max perplexity ratio 1 + 3x the measured
# excess (at least 1.03). They catch a broken file (wrong weights: KL of several nats, top-1 near
# 0), not a model that quantizes worse than SmolLM2; --max-kl / --min-top1 / --max-ppl-ratio /
# --max-abs-diff set your own. Measured through transformers' reader (what verify runs): q8_0 KL
# 0.0021 / top-1 96.8% / ppl 1.0068; q4_0_pure 0.620 / 50.5% / 1.387; q4_1_pure 0.081 / 80.0% /
# 1.078; q5_0_pure 0.128 / 82.3% / 1.157; q5_1_pure 0.220 / 70.9% / 1.341. Measured in llama.cpp
# (whose f16 cache and rounded activations add to the error, so these gates are looser than
# verify's own view needs; max |logit diff| at 2-3x the measured): q2_k 0.598 / 63.6% / 1.443;
# q3_k_m 0.163 / 75.0% / 1.162; q4_0 0.489 / 65.5% / 1.332; q4_k_s 0.072 / 83.6% / 1.069; q4_k_m
# 0.071 / 85.5% / 1.051; q5_0 0.106 / 87.3% / 1.181; q5_k_s 0.087 / 80.9% / 1.139; q5_k_m 0.075 /
# 83.6% / 1.080; q6_k 0.027 / 88.6% / 0.967; q3_k_s as q2_k (the same tensors on SmolLM2); q3_k_l
# 0.192 / 71.8% / 1.225 (docs/gguf.md has the table). Types without a figure
# this session get the gate of the nearest measured type with fewer bits, loosened.
QUANTIZED_GATES: dict[str, QuantizedGate] = {
    "q8_0": QuantizedGate(0.02, 0.8, 1.03, 0.5),
    "q4_0_pure": QuantizedGate(1.9, 0.35, 2.2, 1.5), "q4_1_pure": QuantizedGate(0.25, 0.65, 1.25, 1.5),
    "q5_0_pure": QuantizedGate(0.4, 0.67, 1.5, 1.5), "q5_1_pure": QuantizedGate(0.7, 0.55, 2.1, 1.5),
    "q2_k": QuantizedGate(1.8, 0.48, 2.35, 1.5), "q3_k_s": QuantizedGate(1.8, 0.48, 2.35, 1.5),
    "q3_k_m": QuantizedGate(0.49, 0.6, 1.49, 1.0), "q3_k_l": QuantizedGate(0.58, 0.56, 1.68, 1.0),
    "q4_0": QuantizedGate(1.5, 0.5, 2.0, 1.5), "q5_0": QuantizedGate(0.32, 0.72, 1.55, 0.8),
    "q4_k_s": QuantizedGate(0.22, 0.68, 1.21, 0.6), "q4_k_m": QuantizedGate(0.22, 0.7, 1.16, 0.6),
    "q5_k_s": QuantizedGate(0.26, 0.65, 1.42, 0.8), "q5_k_m": QuantizedGate(0.23, 0.68, 1.25, 0.8),
    "q6_k": QuantizedGate(0.09, 0.73, 1.06, 0.5),
    # not measured this session: from the nearest measured type with fewer bits, loosened
    "q4_1": QuantizedGate(1.5, 0.5, 2.0, 1.5), "q5_1": QuantizedGate(0.7, 0.55, 2.1, 1.5),
    "iq4_nl": QuantizedGate(1.5, 0.5, 2.0, 1.5), "iq4_xs": QuantizedGate(1.5, 0.5, 2.0, 1.5),
}
# The loosest of them: a mix no file type names (the GGML type that dominates it decides nothing).
LOOSEST_GATE = QuantizedGate(max(g.max_kl for g in QUANTIZED_GATES.values()),
                             min(g.min_top1 for g in QUANTIZED_GATES.values()),
                             max(g.max_ppl_ratio for g in QUANTIZED_GATES.values()),
                             max(g.max_rel_diff for g in QUANTIZED_GATES.values()))


def file_type_from_tensors(table: Mapping[str, tuple[tuple[int, ...], str]], file_type: Any = None,
                           path: Path | None = None) -> tuple[str, str | None]:
    """(the file's type name, its exact dtype or None) from the GGML types of its 2-D tensors.

    Never from ``d2merge.gguf_type``: llama.cpp's quantizer copies every key of its input, so
    a Q4_K_M made from our f32 file still says f32 there. A file whose 2-D weights are all
    F32/F16/BF16 is exact (judged by the least precise of them); otherwise it is quantized and
    named by ``file_type`` (llama.cpp's ``general.file_type``) only if that type's GGML type, or
    llama.cpp's fallback for it, is among its weights' types, else by the GGML type that holds
    most of its quantized weights.
    """
    elements: dict[str, int] = {}
    for shape, kind in table.values():
        if len(shape) >= 2:
            elements[kind] = elements.get(kind, 0) + math.prod(shape)
    if not elements:
        raise D2MergeError("the GGUF file has no 2-D weight tensors", path=path)
    if set(elements) <= set(EXACT_FILE_TYPES):
        kind = next(k for k in ("BF16", "F16", "F32") if k in elements)
        return kind.lower(), EXACT_FILE_TYPES[kind]
    quantized = {k: v for k, v in elements.items() if k not in EXACT_FILE_TYPES}
    dominant = max(sorted(quantized), key=lambda k: quantized[k])
    named = next((name for name, (code, kind) in LLAMA_FILE_TYPES.items() if code == file_type), None)
    if named is not None and {LLAMA_FILE_TYPES[named][1], LLAMA_FALLBACKS.get(LLAMA_FILE_TYPES[named][1])} & set(quantized):
        return named, None
    return dominant.lower(), None


def quantized_gate(gguf_type: str) -> QuantizedGate:
    """The gate of a quantized file type; the loosest one for a mix no file type names."""
    return QUANTIZED_GATES.get(gguf_type, LOOSEST_GATE)


class GGUFWeights:
    """The exactly stored tensors of a GGUF, by HF name, as transformers' reader loaded them.

    A ``TensorSource`` for verify's weight check: each tensor is handed back in the dtype the
    file stores it in (the reader's fp32 upcast of F16/BF16 is exact), so ulps are the file's.
    ``quantized`` names the tensors stored in a block format, which no dtype holds exactly.
    """

    def __init__(self, path: Path, state: Mapping[str, torch.Tensor], stored: Mapping[str, torch.dtype],
                 quantized: tuple[str, ...]):
        self.path = path
        self._state = state
        self._stored = dict(stored)
        self.quantized = quantized

    def keys(self) -> list[str]:
        return list(self._stored)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._stored[name], tuple(self._state[name].shape)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._state[name].to(self._stored[name])

    def file_of(self, name: str) -> Path:
        return self.path


@dataclass(frozen=True)
class GGUFForVerify:
    """What ``d2merge verify`` needs to judge a GGUF file given as MERGED."""

    path: Path
    gguf_type: str
    architecture: str  # the GGUF's (llama, qwen2, qwen3)
    blocks: int
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type name
    exact_dtype: str | None = None  # fp32/fp16/bf16 when every 2-D weight is stored exactly (from the tensors)

    @property
    def label(self) -> str:
        return f"gguf-{self.gguf_type}"

    def load_model(self) -> torch.nn.Module:
        return load_gguf_model(self.path)

    def weights(self, model: torch.nn.Module) -> GGUFWeights:
        """The model's tensors (HF names) mapped back to how the file stores them."""
        gguf = gguf_py()
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.architecture)
        mapping = gguf.get_tensor_name_map(arch_id, self.blocks)
        embedding = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        state = model.state_dict()
        stored: dict[str, torch.dtype] = {}
        quantized: list[str] = []
        for name in state:
            target = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
            if name == "lm_head.weight" and target not in self.tensor_types:
                target = embedding  # tied: llama.cpp reuses token_embd as the output
            if target not in self.tensor_types:
                continue
            kind = self.tensor_types[target]
            if kind in EXACT_TENSOR_TYPES:
                stored[name] = EXACT_TENSOR_TYPES[kind]
            else:
                quantized.append(name)
        return GGUFWeights(self.path, state, stored, tuple(quantized))

    @property
    def floor_dtype(self) -> str | None:
        """The dtype whose rounding floor verify judges this file by; None for quantized files."""
        return self.exact_dtype

    def thresholds(self, reference_max_abs: float) -> Any:
        """verify's limits for this file (``reference_max_abs``: the largest |logit| of the unmerged model)."""
        from d2merge.options.verify import DEFAULT_THRESHOLDS, Thresholds

        if self.floor_dtype is not None:
            return DEFAULT_THRESHOLDS[self.floor_dtype]
        gate = quantized_gate(self.gguf_type)
        # No rounding floor for block formats: fixed limits on real text. F16 fallbacks in a quantized
        # file are checked like an fp16 merge; answers flipped on --mc-eval are judged by McNemar's test.
        fp16 = DEFAULT_THRESHOLDS["fp16"]
        return Thresholds(floor_multiple=fp16.floor_multiple, alpha=fp16.alpha, max_ulp=fp16.max_ulp,
                          max_abs_diff=gate.max_rel_diff * reference_max_abs, min_top1=gate.min_top1,
                          max_kl=gate.max_kl, max_ppl_ratio=gate.max_ppl_ratio)


def gguf_for_verify(path: str | os.PathLike) -> GGUFForVerify:
    """A GGUF's type (from its tensors' GGML types) and per-tensor storage, read once for verify."""
    path = Path(path)
    metadata, table = read_gguf(path)
    arch = metadata.get("general.architecture")
    if arch not in VERIFY_ARCHITECTURES or metadata.get(f"{arch}.expert_count"):
        what = f"{arch!r} with experts" if arch in VERIFY_ARCHITECTURES else repr(arch)
        names = ", ".join(VERIFY_ARCHITECTURES[:-1]) + " and " + VERIFY_ARCHITECTURES[-1]
        raise D2MergeError(f"verify reads GGUF files of the {names} architectures, not {what}",
                           path=path, hint="verify the merged folder instead (merge --format hf)")
    gguf_type, exact = file_type_from_tensors(table, metadata.get("general.file_type"), path)
    return GGUFForVerify(path, gguf_type, arch, int(metadata.get(f"{arch}.block_count") or 0),
                         {name: kind for name, (_, kind) in table.items()}, exact)

