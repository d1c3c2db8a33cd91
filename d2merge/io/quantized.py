"""Quantized base checkpoints (bitsandbytes 4-bit and 8-bit, FP8) seen as the plain weights they stand for.

QLoRA users train an adapter over a quantized base; the model they trained and evaluated is
that base *dequantized* plus the adapter. Merging into the 16-bit original instead gives an
exact merge of a model nobody trained. So a quantized base is read here, as transformers saves
it, and every consumer (plan, engine, verify, runtime) sees each quantized weight under its
plain name as the tensor the training runtime computed, its quantization state (``.absmax``,
``.quant_map``, ``.nested_*``, ``.quant_state.*``, ``SCB``, ``weight_format``,
``weight_scale_inv``) consumed and checked, never copied to the output.

Why our own torch dequantizer and not bitsandbytes: importing bitsandbytes on CPU looks for
kernels on the Hub and logs warnings, a merge must never need the network nor print more than
one line, and the arithmetic is three lines. tests/unit/io/test_quantized.py checks it bit for bit
against bitsandbytes 0.50 (``dequantize_4bit``, the 8-bit formula of its training matmul) on
every layout; bitsandbytes stays a test dependency, the oracle.

Which value is "the" weight (measured with bitsandbytes 0.50.2):

- 4-bit: bitsandbytes dequantizes into the dtype of the activations reaching the layer (its
  ``set_compute_type`` overrides ``bnb_4bit_compute_dtype`` for fp32 and bf16 inputs): the fp32
  product ``code[nibble] * absmax`` rounded once to that dtype. The activations run in the dtype
  the model was loaded in, which is the dtype recorded in each weight's quant state, so that is
  the dtype used here (for fp16 activations bitsandbytes keeps the configured compute dtype, so
  an fp16 quant state takes ``bnb_4bit_compute_dtype``). This is also ``dequantize_4bit``'s
  result, which PEFT's own merge uses. The code table is bitsandbytes' fixed nf4/fp4 table; the
  stored ``quant_map`` must equal it (bitsandbytes ignores it; a different one is a lying file).
- 8-bit: ``int8 * (SCB * (1/127))`` in fp32 (``MatMul8bitFp``, bitsandbytes' CPU training path;
  dividing by 127 instead differs in 4.5% of elements), rounded to the model's dtype.
- FP8: ``float(fp8) * weight_scale_inv`` in fp32 per 128x128 block (edge blocks partial) or
  per tensor, rounded to the model's dtype, as transformers' dequantizing load does.

Nothing is guessed: every field of a quant state we do not know, a blocksize or count that does
not fit the shape, a NaN/Inf or negative scale, a method we cannot dequantize exactly (GPTQ,
AWQ, HQQ, compressed-tensors, MXFP4, ...) is refused in one line naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d2merge.errors import D2MergeError

# bitsandbytes' fixed 4-bit code tables (bitsandbytes.functional.get_4bit_type), as fp32 values; fp4's code 8
# is -0.0 as its CPU kernel computes it (get_4bit_type says 0.0; only the sign bit of a zero differs).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
FP4_CODE = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
            0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
            -0.1666666716337204, -0.25)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT8_SCALE = 1.0 / 127.0  # rounded to fp32 by the multiplication, as bitsandbytes' SCB.mul(1.0 / 127.0)
_CHUNK = 1 << 22  # elements dequantized at a time

# Quant-state keys bitsandbytes writes into the JSON blob (QuantState.as_dict(packed=True)).
_STATE_KEYS = {"quant_type", "blocksize", "dtype", "shape"}
_NESTED_KEYS = {"nested_blocksize", "nested_dtype", "nested_offset"}
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# quant_method values of transformers' quantizers we refuse, with why.
_REFUSED_METHODS = {
    "gptq": "GPTQ", "awq": "AWQ", "hqq": "HQQ", "compressed-tensors": "compressed-tensors",
    "mxfp4": "MXFP4", "aqlm": "AQLM", "eetq": "EETQ", "quanto": "quanto", "torchao": "torchao",
    "fbgemm_fp8": "FBGEMM FP8", "higgs": "HIGGS", "vptq": "VPTQ", "spqr": "SpQR", "bitnet": "BitNet",
    "gguf": "GGUF", "auto-round": "AutoRound", "fp_quant": "FP-Quant", "quark": "Quark",
}
REFUSED_HINT = ("d2merge dequantizes only bitsandbytes 4-/8-bit and FP8 bases exactly; merge into the "
                "16-bit base the quantized one was made from, and check what that costs with "
                "`d2merge verify QBASE ADAPTER MERGED --original-base BASE16` where a supported base exists")
LYING_HINT = "the quantization state does not describe this weight; re-save or re-download the quantized base"
QUANTIZED_REPO_WORDS = ("bnb-4bit", "bnb-8bit", "-4bit", "-8bit", "-fp8", "-int8", "-nf4", "qlora")


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight: where its parts are stored and how to turn them into the weight."""

    name: str  # the plain weight name the model uses
    kind: str  # "nf4", "fp4", "int8", "fp8"
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype the training runtime dequantized into
    parts: dict[str, str]  # role ("packed", "absmax", ...) -> stored tensor name
    blocksize: int = 0
    nested_blocksize: int = 0
    nested_offset: float = 0.0
    block: tuple[int, int] | None = None  # FP8 block, None for one scale per tensor


@dataclass(frozen=True)
class Quantization:
    """What a quantized base is: its method, its weights, and the output dtype a merge defaults to."""

    method: str  # "bitsandbytes 4-bit (nf4, double quant)", ...
    config_path: Path
    out_dtype: torch.dtype
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)


def dtype_of_config(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype config.json says the model was stored in before quantization (``dtype``/``torch_dtype``)."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in _STATE_DTYPES:
            return _STATE_DTYPES[value.removeprefix("torch.")]
    return None


def quantization_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``quantization_config`` of a config.json (top level or in a composite model's part)."""
    if not config:
        return None
    parts = [config] + [v for v in config.values() if isinstance(v, dict)]
    for part in parts:
        qc = part.get("quantization_config")
        if qc is not None:
            return qc
    return None


def without_quantization(config: dict[str, Any]) -> dict[str, Any]:
    """config.json of the dequantized model: no ``quantization_config`` anywhere."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    for key, value in out.items():
        if isinstance(value, dict) and "quantization_config" in value:
            out[key] = {k: v for k, v in value.items() if k != "quantization_config"}
    return out


class DequantizedTensors:
    """A quantized checkpoint's tensors as plain ones: ``keys/info/read/file_of`` like every source.

    ``byte_range`` answers for the plain tensors only (None for a quantized weight, which is
    computed, never copied): an unchanged embedding still goes file to file and plain reads use
    the engine's reused buffers; without it a 1.1B nf4 merge peaked at 1.9x the bf16 merge's RSS.
    """

    def __init__(self, stored: Any, quantization: Quantization):
        self.stored = stored
        self.quantization = quantization
        consumed = {part for w in quantization.weights.values() for part in w.parts.values()}
        self._names = [n for n in stored.keys() if n not in consumed or n in quantization.weights]

    def keys(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        weight = self.quantization.weights.get(name)
        if weight is None:
            return self.stored.info(name)
        return weight.dtype, weight.shape

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.quantization.weights.get(name)
        if weight is None:
            return self.stored.read(name, buffer)
        # the quant-state blob and weight_format were read and checked when the base was opened
        parts = {role: self.stored.read(stored) for role, stored in weight.parts.items()
                 if role not in ("state", "weight_format")}
        return dequantize(weight, parts, self.stored.file_of(weight.parts["packed"]))

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, byte count) of a plain tensor; None for a quantized weight (it has no bytes of its own)."""
        if name in self.quantization.weights:
            return None
        return self.stored.byte_range(name)

    def file_of(self, name: str) -> Path:
        weight = self.quantization.weights.get(name)
        return self.stored.file_of(weight.parts["packed"] if weight is not None else name)


# ---------------------------------------------------------------------------------------------
# The arithmetic: tensors in, tensor out (no files), so it is testable against bitsandbytes.

def dequantize(weight: QuantizedWeight, parts: dict[str, torch.Tensor], path: Path | None = None) -> torch.Tensor:
    """The weight ``weight`` stands for, from its stored parts; refuses NaN/Inf or negative scales."""
    if weight.kind in CODES:
        absmax = _absmax_4bit(weight, parts, path)
        _check_code(parts["quant_map"], torch.tensor(CODES[weight.kind]), weight, "quant_map", path)
        return dequantize_4bit(parts["packed"], absmax, weight.kind, weight.blocksize, weight.shape, weight.dtype)
    if weight.kind == "int8":
        scb = parts["SCB"]
        _check_scales(scb, weight, "SCB", path)
        return dequantize_int8(parts["packed"], scb, weight.dtype)
    if weight.kind == "fp8":
        scale = parts["scale"]
        _check_scales(scale, weight, "scale", path, shown="weight_scale_inv")
        return dequantize_fp8(parts["packed"], scale, weight.block, weight.dtype)
    raise AssertionError(weight.kind)  # pragma: no cover - kinds come from open_quantized


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                    shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization: ``code[nibble] * absmax[block]`` in fp32, rounded once to ``dtype``.

    Two values per byte, the first in the high nibble; blocks run over the flattened weight,
    the last one partial.
    """
    n = math.prod(shape)
    raw = packed.reshape(-1).view(torch.uint8)
    code = torch.tensor(CODES[quant_type], dtype=torch.float32)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], 1)  # byte -> (high nibble, low nibble)
    out = torch.empty(n, dtype=dtype)
    # A chunk of whole blocks at a time: the int32 indices and fp32 values of a whole 90M-element
    # weight would be 1 GB of temporaries; per chunk they are a few MB, and the result is the same.
    step = max(blocksize, (_CHUNK // blocksize) * blocksize)
    for start in range(0, n, step):
        stop = min(n, start + step)
        first, last = start // 2, (stop + 1) // 2
        values = pairs[raw[first:last].int()].reshape(-1)[start - 2 * first:stop - 2 * first]
        full = (stop - start) - (stop - start) % blocksize
        block0 = start // blocksize
        if full:
            values[:full] = (values[:full].view(-1, blocksize) * absmax[block0:block0 + full // blocksize].view(-1, 1)
                             ).reshape(-1)
        if full < stop - start:
            values[full:] = values[full:] * absmax[block0 + full // blocksize]
        out[start:stop] = values  # the one rounding, to the dtype the runtime dequantized into
    return out.reshape(shape)


def nested_absmax(absmax_codes: torch.Tensor, nested: torch.Tensor, nested_code: torch.Tensor,
                  nested_blocksize: int, offset: float) -> torch.Tensor:
    """Double quantization: the 8-bit absmax codes back to fp32 (``code[byte] * nested_absmax[block] + offset``)."""
    n = absmax_codes.numel()
    values = nested_code.float()[absmax_codes.reshape(-1).long()]
    full = n - n % nested_blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, nested_blocksize) * nested[: full // nested_blocksize].view(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = values[full:] * nested[full // nested_blocksize]
    # bitsandbytes adds the offset as an fp32 scalar tensor (torch.tensor(float(offset)))
    return out + torch.tensor(offset, dtype=torch.float32)


def dequantize_int8(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' LLM.int8 weight as its CPU training matmul computes it: ``int8 * (SCB * (1/127))``."""
    row_scale = scb.float().mul(INT8_SCALE)
    return (codes.float() * row_scale.unsqueeze(1)).to(dtype)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """FP8 weight times its scale in fp32 (one per 128x128 block, edge blocks partial, or one per tensor)."""
    values = codes.float()
    if block is None:
        return (values * scale.float().reshape(())).to(dtype)
    rows, cols = values.shape
    grid = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (values * grid).to(dtype)


def _absmax_4bit(weight: QuantizedWeight, parts: dict[str, torch.Tensor], path: Path | None) -> torch.Tensor:
    if "nested_absmax" not in parts:
        absmax = parts["absmax"].float()
        _check_scales(absmax, weight, "absmax", path)
        return absmax
    _check_scales(parts["nested_absmax"], weight, "nested_absmax", path)
    code = parts["nested_quant_map"].float()
    if not bool(torch.isfinite(code).all()) or float(code.abs().max()) > 1.0:
        raise D2MergeError("nested_quant_map is not an 8-bit code (values outside [-1, 1] or NaN)",
                           path=path, tensor=weight.parts["nested_quant_map"], hint=LYING_HINT)
    return nested_absmax(parts["absmax"], parts["nested_absmax"].float(), code, weight.nested_blocksize,
                         weight.nested_offset)


def _check_scales(scales: torch.Tensor, weight: QuantizedWeight, role: str, path: Path | None,
                  shown: str | None = None) -> None:
    values = scales.float()
    role_name = shown or role
    if not bool(torch.isfinite(values).all()):
        raise D2MergeError(f"{role_name} holds NaN or Inf scales", path=path, tensor=weight.parts.get(role, weight.name),
                           hint=LYING_HINT)
    if values.numel() and float(values.min()) < 0:
        raise D2MergeError(f"{role_name} holds negative scales", path=path, tensor=weight.parts.get(role, weight.name),
                           hint=LYING_HINT)


def _check_code(stored: torch.Tensor, expected: torch.Tensor, weight: QuantizedWeight, role: str,
                path: Path | None) -> None:
    if tuple(stored.shape) != tuple(expected.shape) or not torch.equal(stored.float(), expected):
        raise D2MergeError(f"{role} is not bitsandbytes' {weight.kind} code table", path=path,
                           tensor=weight.parts[role], hint=LYING_HINT)


# ---------------------------------------------------------------------------------------------
# Reading the layout: headers, config and the small quant-state blobs only.

def open_quantized(stored: Any, config: dict[str, Any], config_path: Path) -> Quantization:
    """What each quantized weight of ``stored`` is, from config.json and the tensor headers; refuses what we cannot do.

    ``stored`` is the checkpoint's raw tensor source (safetensors files). Reads the tiny
    quant-state JSON blobs; every count, dtype and shape is checked here, before any merge.
    """
    qc = quantization_config(config)
    if not isinstance(qc, dict):
        raise D2MergeError("quantization_config is not a JSON object", path=config_path, hint=LYING_HINT)
    method = str(qc.get("quant_method", "")).lower()
    if method in _REFUSED_METHODS or method != "bitsandbytes" and method != "fp8":
        name = _REFUSED_METHODS.get(method, repr(qc.get("quant_method")))
        raise D2MergeError(f"the base is quantized with {name}, which d2merge cannot dequantize exactly",
                           path=config_path, hint=REFUSED_HINT)
    model_dtype = dtype_of_config(config)
    out_dtype = model_dtype or torch.bfloat16
    if method == "fp8":
        quantization = _open_fp8(stored, qc, config_path, model_dtype or torch.bfloat16, out_dtype)
    elif qc.get("load_in_4bit") is True and not qc.get("load_in_8bit"):
        quantization = _open_4bit(stored, qc, config_path, out_dtype)
    elif qc.get("load_in_8bit") is True and not qc.get("load_in_4bit"):
        quantization = _open_int8(stored, config_path, model_dtype or _stored_float_dtype(stored), out_dtype)
    else:
        raise D2MergeError("bitsandbytes quantization_config says neither load_in_4bit nor load_in_8bit (or both)",
                           path=config_path, hint=LYING_HINT)
    if not quantization.weights:
        raise D2MergeError(f"config.json says the base is quantized ({quantization.method}) but no weight is stored "
                           "quantized", path=config_path, hint="remove the quantization_config if the weights are "
                                                                "plain, or re-save the quantized model")
    return quantization


def _stored_float_dtype(stored: Any) -> torch.dtype:
    floats = [stored.info(n)[0] for n in stored.keys() if stored.info(n)[0] in _STATE_DTYPES.values()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _refuse(reason: str, stored: Any, name: str) -> D2MergeError:
    return D2MergeError(reason, path=stored.file_of(name), tensor=name, hint=LYING_HINT)


def _open_4bit(stored: Any, qc: dict[str, Any], config_path: Path, out_dtype: torch.dtype) -> Quantization:
    names = set(stored.keys())
    compute = _STATE_DTYPES.get(str(qc.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch."),
                                torch.float32)
    weights: dict[str, QuantizedWeight] = {}
    for name in sorted(n for n in names if ".quant_state.bitsandbytes__" in n):
        weight_name, _, suffix = name.partition(".quant_state.bitsandbytes__")
        state = _quant_state(stored, name)
        kinds = {state.get("quant_type"), suffix}
        if len(kinds) != 1 or suffix not in CODES:
            raise _refuse(f"quant state names quant_type {state.get('quant_type')!r} under the key for {suffix!r}",
                          stored, name)
        blocksize = state.get("blocksize")
        if blocksize not in BLOCKSIZES:
            raise _refuse(f"quant state has blocksize {blocksize!r}; bitsandbytes uses {list(BLOCKSIZES)}", stored, name)
        dtype = _STATE_DTYPES.get(state.get("dtype")) if isinstance(state.get("dtype"), str) else None
        if dtype is None:
            raise _refuse(f"quant state has dtype {state.get('dtype')!r}; expected one of {list(_STATE_DTYPES)}",
                          stored, name)
        shape = state.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise _refuse(f"quant state has shape {shape!r}; expected [out_features, in_features]", stored, name)
        n = shape[0] * shape[1]
        parts = {"packed": weight_name, "absmax": weight_name + ".absmax",
                 "quant_map": weight_name + ".quant_map", "state": name}
        nested = "nested_blocksize" in state
        if nested:
            parts.update({"nested_absmax": weight_name + ".nested_absmax",
                          "nested_quant_map": weight_name + ".nested_quant_map"})
        for part in parts.values():
            if part not in names:
                raise _refuse(f"quantized weight lacks its {part.rsplit('.', 1)[-1]}", stored, weight_name)
        p_dtype, p_shape = stored.info(weight_name)
        if math.prod(p_shape) * p_dtype.itemsize != (n + 1) // 2:
            raise _refuse(f"packed weight holds {math.prod(p_shape) * p_dtype.itemsize} bytes; the quant state's "
                          f"shape {shape} needs {(n + 1) // 2}", stored, weight_name)
        blocks = -(-n // blocksize)
        a_dtype, a_shape = stored.info(parts["absmax"])
        if math.prod(a_shape) != blocks or a_dtype != (torch.uint8 if nested else torch.float32):
            raise _refuse(f"absmax has {math.prod(a_shape)} {str(a_dtype).removeprefix('torch.')} values; "
                          f"shape {shape} in blocks of {blocksize} needs {blocks} "
                          f"{'uint8' if nested else 'float32'}", stored, parts["absmax"])
        _check_info(stored, parts["quant_map"], torch.float32, 16)
        offset = 0.0
        nested_blocksize = 0
        if nested:
            nested_blocksize = state.get("nested_blocksize")
            offset = state.get("nested_offset")
            if nested_blocksize not in BLOCKSIZES:
                raise _refuse(f"quant state has nested_blocksize {nested_blocksize!r}", stored, name)
            if state.get("nested_dtype") != "float32":
                raise _refuse(f"quant state has nested_dtype {state.get('nested_dtype')!r}; expected 'float32'",
                              stored, name)
            if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
                raise _refuse(f"quant state has nested_offset {offset!r}", stored, name)
            _check_info(stored, parts["nested_absmax"], torch.float32, -(-blocks // nested_blocksize))
            _check_info(stored, parts["nested_quant_map"], torch.float32, 256)
        act = compute if dtype == torch.float16 else dtype
        weights[weight_name] = QuantizedWeight(weight_name, suffix, (shape[0], shape[1]), act, parts, blocksize,
                                               nested_blocksize, float(offset))
    _refuse_leftovers(stored, weights, qc_kind="4-bit")
    kinds = sorted({w.kind for w in weights.values()})
    double = any(w.nested_blocksize for w in weights.values())
    label = f"bitsandbytes 4-bit ({'/'.join(kinds) or 'none'}{', double quant' if double else ''})"
    return Quantization(label, config_path, out_dtype, weights)


def _quant_state(stored: Any, name: str) -> dict[str, Any]:
    dtype, shape = stored.info(name)
    if dtype != torch.uint8 or len(shape) != 1 or not 0 < shape[0] <= 4096:
        raise _refuse("quant state is not a small uint8 JSON blob", stored, name)
    raw = bytes(stored.read(name).tolist())
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _refuse("quant state does not parse as JSON", stored, name) from None
    if not isinstance(state, dict):
        raise _refuse("quant state is not a JSON object", stored, name)
    unknown = set(state) - _STATE_KEYS - _NESTED_KEYS
    if unknown:
        raise _refuse(f"quant state has fields d2merge does not know: {sorted(unknown)}", stored, name)
    missing = _STATE_KEYS - set(state)
    if missing or 0 < len(_NESTED_KEYS & set(state)) < len(_NESTED_KEYS):
        raise _refuse(f"quant state lacks {sorted(missing or _NESTED_KEYS - set(state))}", stored, name)
    return state


def _check_info(stored: Any, name: str, dtype: torch.dtype, count: int) -> None:
    got_dtype, shape = stored.info(name)
    if got_dtype != dtype or math.prod(shape) != count:
        raise _refuse(f"has {math.prod(shape)} {str(got_dtype).removeprefix('torch.')} values; expected {count} "
                      f"{str(dtype).removeprefix('torch.')}", stored, name)


def _open_int8(stored: Any, config_path: Path, act: torch.dtype, out_dtype: torch.dtype) -> Quantization:
    names = set(stored.keys())
    weights: dict[str, QuantizedWeight] = {}
    for name in sorted(n for n in names if n.endswith(".SCB")):
        module = name.removesuffix(".SCB")
        weight_name = module + ".weight"
        if weight_name not in names:
            raise _refuse("SCB scales without an int8 weight beside them", stored, name)
        w_dtype, w_shape = stored.info(weight_name)
        if w_dtype != torch.int8 or len(w_shape) != 2:
            raise _refuse(f"8-bit weight is {str(w_dtype).removeprefix('torch.')} {list(w_shape)}; expected a 2-D "
                          "int8 matrix", stored, weight_name)
        _check_info(stored, name, torch.float32, w_shape[0])
        parts = {"packed": weight_name, "SCB": name}
        fmt = module + ".weight_format"
        if fmt in names:
            f_dtype, f_shape = stored.info(fmt)
            if f_dtype != torch.uint8 or math.prod(f_shape) != 1 or int(stored.read(fmt).reshape(-1)[0]) != 0:
                raise _refuse("weight_format is not 0 (row-major); d2merge reads only the row layout "
                              "transformers saves", stored, fmt)
            parts["weight_format"] = fmt
        weights[weight_name] = QuantizedWeight(weight_name, "int8", tuple(w_shape), act, parts)
    _refuse_leftovers(stored, weights, qc_kind="8-bit")
    return Quantization("bitsandbytes 8-bit (LLM.int8)", config_path, out_dtype, weights)


def _open_fp8(stored: Any, qc: dict[str, Any], config_path: Path, act: torch.dtype,
              out_dtype: torch.dtype) -> Quantization:
    known = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert",
             "dequantize", "scale_fmt"}
    unknown = set(qc) - known
    if unknown:
        raise D2MergeError(f"FP8 quantization_config has fields d2merge does not know: {sorted(unknown)}",
                           path=config_path, hint=REFUSED_HINT)
    if qc.get("fmt", "e4m3") != "e4m3":
        raise D2MergeError(f"FP8 format {qc.get('fmt')!r}; d2merge reads e4m3 only", path=config_path,
                           hint=REFUSED_HINT)
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise D2MergeError(f"FP8 activation_scheme {qc.get('activation_scheme')!r}: the trained model quantizes its "
                           "activations with stored scales, which no plain model reproduces", path=config_path,
                           hint=REFUSED_HINT)
    if qc.get("scale_fmt", "float") not in ("float", None):
        raise D2MergeError(f"FP8 scale_fmt {qc.get('scale_fmt')!r}; d2merge reads float scales only",
                           path=config_path, hint=REFUSED_HINT)
    block_size = qc.get("weight_block_size")
    if block_size is not None and (not isinstance(block_size, list) or len(block_size) != 2
                                   or not all(isinstance(b, int) and b > 0 for b in block_size)):
        raise D2MergeError(f"FP8 weight_block_size {block_size!r}; expected [rows, cols]", path=config_path,
                           hint=LYING_HINT)
    block = (block_size[0], block_size[1]) if block_size is not None else None
    names = set(stored.keys())
    weights: dict[str, QuantizedWeight] = {}
    for name in sorted(n for n in names if n.endswith(".weight_scale_inv")):
        weight_name = name.removesuffix("_scale_inv")
        if weight_name not in names:
            raise _refuse("weight_scale_inv without an FP8 weight beside it", stored, name)
        w_dtype, w_shape = stored.info(weight_name)
        if w_dtype != getattr(torch, "float8_e4m3fn", None) or len(w_shape) != 2:
            raise _refuse(f"FP8 weight is {str(w_dtype).removeprefix('torch.')} {list(w_shape)}; expected a 2-D "
                          "float8_e4m3fn matrix", stored, weight_name)
        s_dtype, s_shape = stored.info(name)
        if block is None:
            ok = math.prod(s_shape) == 1
            expected = "one scale"
        else:
            grid = (-(-w_shape[0] // block[0]), -(-w_shape[1] // block[1]))
            ok = tuple(s_shape) == grid
            expected = f"shape {list(grid)}"
        if not ok or s_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise _refuse(f"weight_scale_inv is {str(s_dtype).removeprefix('torch.')} {list(s_shape)}; weight "
                          f"{list(w_shape)} in blocks of {list(block) if block else 'the whole tensor'} needs "
                          f"{expected} (float)", stored, name)
        weights[weight_name] = QuantizedWeight(weight_name, "fp8", tuple(w_shape), act,
                                               {"packed": weight_name, "scale": name}, block=block)
    _refuse_leftovers(stored, weights, qc_kind="FP8")
    label = f"FP8 e4m3 ({'blocks of ' + 'x'.join(map(str, block)) if block else 'one scale per tensor'})"
    return Quantization(label, config_path, out_dtype, weights)


_STATE_LEAVES = ("absmax", "nested_absmax", "quant_map", "nested_quant_map", "SCB", "weight_format",
                 "weight_scale_inv", "weight_scale", "input_scale", "activation_scale", "qweight", "qzeros",
                 "scales", "g_idx", "weight_packed")


def _refuse_leftovers(stored: Any, weights: dict[str, QuantizedWeight], qc_kind: str) -> None:
    """Every stored tensor is a plain float tensor or a part of a quantized weight we read; nothing else."""
    consumed = {part for w in weights.values() for part in w.parts.values()}
    for name in stored.keys():
        if name in consumed:
            continue
        dtype = stored.info(name)[0]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _STATE_LEAVES or ".quant_state." in name:
            raise _refuse(f"quantization tensor that belongs to no {qc_kind} weight d2merge can read", stored, name)
        if not dtype.is_floating_point or dtype.itemsize == 1:
            if leaf == "weight" or dtype.is_floating_point:
                raise _refuse(f"{str(dtype).removeprefix('torch.')} tensor without the quantization state of a "
                              f"{qc_kind} weight", stored, name)


# Model types whose decoder projections have the Llama shapes computed by llama_like_shapes.
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2", "smollm3"}
_LLAMA_PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


def llama_like_shapes(config: dict[str, Any], names: list[str]) -> dict[str, tuple[int, ...]] | None:
    """The shapes a Llama-layout config gives ``names`` (all decoder projections), else None.

    Checking a quant state's shape claim needs the model's shapes; building the model on the
    meta device imports transformers (~130 MB of a merge's ~0.4 GB peak), which this avoids for
    the layouts QLoRA bases nearly always have.
    """
    if config.get("model_type") not in _LLAMA_LIKE or not all(_LLAMA_PROJECTION.match(n) for n in names):
        return None
    try:
        hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError):
        return None
    q, kv = heads * head_dim, kv_heads * head_dim
    by_leaf = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
               "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return {n: by_leaf[n.rsplit(".", 2)[-2]] for n in names}


def names_quantized_repo(name: str | None) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` looks like a quantized repo (``...-bnb-4bit``, ``...-FP8``)."""
    if not name:
        return False
    lowered = name.lower()
    return any(word in lowered for word in QUANTIZED_REPO_WORDS) or lowered.endswith(("-fp8", "-4bit", "-8bit"))
