"""Every tensor of a GGUF, planned from shapes alone, then encoded a block of rows at a time.

The plan (:func:`plan_tensors`) names each HF tensor in llama.cpp's layout, picks its GGML type
(1-D tensors and rows that are not whole blocks as llama.cpp does) and its byte size, so that the
header can be written before any tensor is read. Encoding (:func:`encoded_blocks`) permutes q/k
rows per head for llama.cpp's rope, adds Gemma's norm offset and quantizes with gguf-py, a block
of rows at a time: memory holds one block, whatever the model's size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace as _replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from d2merge.errors import D2MergeError
from d2merge.export.gguf.architectures import (arch_spec, expert_counts, head_dim_of, llama3_rope_factors, rope_of,
                                               tied_output)
from d2merge.export.gguf.file_types import GGUF_TYPES
from d2merge.export.gguf.library import gguf_py

def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotates the two halves of each head; llama.cpp rotates interleaved pairs: reorder rows."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor as the header describes it, and the HF tensors it is written from."""

    source: str | None  # HF tensor name (None: generated, e.g. rope_freqs); a stack's first expert
    name: str
    shape: tuple[int, ...]
    qtype: Any
    nbytes: int
    stacked: tuple[str, ...] = ()  # MoE: the per-expert HF tensors written one after the other, in expert order
    plus_one: bool = False  # Gemma's RMSNorm weights: written as 1 + w (in fp32, as HF computes it)

    @property
    def parts(self) -> tuple[str, ...]:
        """The HF tensors this GGUF tensor is written from, in stream order."""
        return self.stacked or ((self.source,) if self.source is not None else ())


def stream_order(planned: list[PlannedTensor]) -> list[str]:
    """The HF tensors in the order the writer consumes them (an expert stack's members together)."""
    return [name for item in planned for name in item.parts]


EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<index>\d+)\.(?P<rest>.+)$")


def plan_tensors(names_shapes: list[tuple[str, tuple[int, ...]]], config: Mapping[str, Any], arch: str,
                 gguf_type: str, path: Path) -> list[PlannedTensor]:
    """Every GGUF tensor of these HF tensors (sorted names and shapes), in file order; one-line refusals."""
    gguf = gguf_py()
    spec = arch_spec(config, path)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    mapping = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    weight_type = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][0])
    tied = tied_output(config, spec)
    stacks: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {}
    planned = []
    for name, shape in names_shapes:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp ties output to token_embd when output.weight is absent
        expert = EXPERT_NAME.match(name) if spec.experts else None
        if expert is not None:
            # llama.cpp's ``*_exps`` tensor is the experts stacked on a new first axis: written as
            # one after the other (rows encode independently, so the bytes are the stack's)
            key = f"{expert['prefix']}.{expert['rest']}"
            stacks.setdefault(key, {})[int(expert["index"])] = (name, shape)
            continue
        target = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise D2MergeError(f"no GGUF name for this tensor in llama.cpp's {arch} layout", path=path, tensor=name)
        if name.endswith("shared_expert_gate.weight") and len(shape) == 2 and shape[0] == 1:
            shape = shape[1:]  # Qwen2-MoE's [1, hidden] gate: llama.cpp's converter writes it as a vector
        item = _plan_one(name, target, shape, weight_type)
        if spec.norm_offset and name.endswith("norm.weight"):
            item = _replace(item, plus_one=True)
        planned.append(item)
    experts = expert_counts(config)[0] if spec.experts else 0
    for key, members in sorted(stacks.items()):
        target = mapping.get_name(key, try_suffixes=(".weight", ".bias"))
        first = members.get(0, next(iter(members.values())))
        if target is None:
            raise D2MergeError(f"no GGUF name for these experts in llama.cpp's {arch} layout", path=path,
                               tensor=first[0])
        if sorted(members) != list(range(experts)) or len({shape for _, shape in members.values()}) != 1:
            raise D2MergeError(f"expected experts 0..{experts - 1} of one shape (num_experts={experts})",
                               path=path, tensor=first[0])
        item = _plan_one(first[0], target, (experts, *first[1]), weight_type)
        planned.append(_replace(item, stacked=tuple(members[i][0] for i in range(experts))))
    if not tied and "lm_head.weight" not in {n for n, _ in names_shapes}:
        raise D2MergeError("config says untied embeddings but there is no lm_head.weight", path=path)
    theta, rope = rope_of(config)
    if rope["rope_type"] == "llama3":
        planned.append(_planned_f32(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                    (head_dim_of(config) // 2,)))
    return planned


def _planned_f32(source: str | None, name: str, shape: tuple[int, ...]) -> PlannedTensor:
    gguf = gguf_py()
    return PlannedTensor(source, name, shape, gguf.GGMLQuantizationType.F32, 4 * math.prod(shape))


def _plan_one(source: str, name: str, shape: tuple[int, ...], weight_type: Any) -> PlannedTensor:
    gguf = gguf_py()
    if len(shape) < 2 or weight_type == gguf.GGMLQuantizationType.F32:
        return _planned_f32(source, name, shape)
    block, _ = gguf.GGML_QUANT_SIZES[weight_type]
    if shape[-1] % block:
        # a row that is not a whole number of blocks cannot be quantized: F16, as llama.cpp does
        weight_type = gguf.GGMLQuantizationType.F16
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, weight_type)
    return PlannedTensor(source, name, shape, weight_type, math.prod(byte_shape))


def _encode(tensor: torch.Tensor, qtype: Any) -> np.ndarray:
    gguf = gguf_py()
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


# Values per encoded block of rows: a block's temporaries (fp32 copy, quantization scratch) are
# a few times this, whatever the model's size; rows are independent in every GGML type, so the
# bytes are those of the whole tensor encoded at once.
BLOCK_VALUES = 1 << 21


@dataclass(frozen=True)
class TensorData:
    """One tensor to encode: in memory, or a byte range of a file (read a block of rows at a time)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None
    raw: tuple[Path, int, int] | None = None  # (file, offset, bytes), in ``dtype``

    def row_blocks(self, rows_per_block: int) -> Iterator[torch.Tensor]:
        rows = self.shape[0] if self.shape else 1
        if self.tensor is not None:
            tensor = self.tensor.reshape(self.shape) if self.shape else self.tensor.reshape(1)
            for start in range(0, rows, rows_per_block):
                yield tensor[start:start + rows_per_block]
            return
        assert self.raw is not None
        path, offset, nbytes = self.raw
        row_bytes = nbytes // max(rows, 1)
        buffer = torch.empty(min(rows, rows_per_block) * row_bytes, dtype=torch.uint8)
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                for start in range(0, rows, rows_per_block):
                    count = min(rows_per_block, rows - start)
                    view = buffer[: count * row_bytes]
                    if fh.readinto(memoryview(view.numpy())) != count * row_bytes:
                        raise D2MergeError("file ended inside the tensor (changed while exporting?)", path=path,
                                           tensor=self.name)
                    yield view.view(self.dtype).reshape(count, *self.shape[1:])
        except OSError as exc:
            raise D2MergeError(f"cannot read file: {exc.strerror or exc}", path=path, tensor=self.name) from None


def _heads_to_permute(item: PlannedTensor, config: Mapping[str, Any], permute: bool) -> int | None:
    if not permute or item.source is None:
        return None
    if item.source.endswith(("q_proj.weight", "q_proj.bias")):
        return int(config["num_attention_heads"])
    if item.source.endswith(("k_proj.weight", "k_proj.bias")):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def encoded_blocks(item: PlannedTensor, data: TensorData | None, config: Mapping[str, Any],
                   permute: bool) -> Iterator[np.ndarray]:
    """The tensor's GGUF bytes, a block of rows at a time (q/k: whole heads, permuted per head)."""
    if data is None:  # rope_freqs
        theta, rope = rope_of(config)
        yield llama3_rope_factors(rope, theta, head_dim_of(config))
        return
    heads = _heads_to_permute(item, config, permute)
    shape = data.shape  # one expert of a stack: its own shape
    rows = shape[0] if shape else 1
    row_values = math.prod(shape[1:]) if len(shape) > 1 else (math.prod(shape) if shape else 1)
    unit = rows // heads if heads else 1  # the permutation moves rows within a head only
    step = max(1, BLOCK_VALUES // max(row_values * unit, 1)) * unit
    if len(shape) < 2:
        step = rows  # 1-D: one block
    for block in data.row_blocks(step):
        if heads:
            block = permute_for_llama_cpp(block, block.shape[0] // unit)
        if item.plus_one:
            block = block.to(torch.float32) + 1.0
        yield _encode(block, item.qtype)
