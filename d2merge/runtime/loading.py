"""Transformers models loaded for our runs: the base as the adapter saw it, and any folder upcast to fp32.

Loading is its own module because verify, bench, training and the exports all start here, and
the memory rules (one model resident, weights read afresh and upcast one at a time) are one
decision, not one per caller.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from d2merge.errors import D2MergeError


_FROZEN = {"depth": 0}
_FROZEN_LOCK = threading.Lock()


@contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """Inside, ``gc.collect()`` walks only objects made inside: those alive on entry are frozen.

    Why: verify and bench collect after each model so that at most one is resident, and a full
    collection walks every object of the process (about 370k once torch and transformers are
    imported: 0.2 s each, 14 s of a 36 s run of tests/unit/verify/test_verify.py's correct-merge cases),
    yet the cycles to free (a model, its adapter layers) are all younger than the call.
    Nested uses (verify inside merge --verify) freeze once and thaw at the outermost exit;
    cycles among the frozen objects wait for that exit. Usable as a decorator.
    """
    with _FROZEN_LOCK:
        if _FROZEN["depth"] == 0:
            gc.freeze()
        _FROZEN["depth"] += 1
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            _FROZEN["depth"] -= 1
            if _FROZEN["depth"] == 0:
                gc.unfreeze()


def load_base_model(base: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A transformers causal LM from a local folder (or cached Hub id), in eval mode."""
    from d2merge.io.checkpoint import open_base, resolve_location
    from d2merge.io.quantized import quantization_config
    from d2merge.io.json_file import read_json
    from d2merge.io.transformers_folder import load_dequantized_model, load_model

    location = resolve_location(base)
    if not (location / "config.json").exists():
        raise D2MergeError("a transformers model folder (with config.json) is needed here", path=location)
    config = read_json(location / "config.json", "config.json")
    if isinstance(config, dict) and quantization_config(config) is not None:
        # the model the adapter was trained on: the dequantized weights, never bitsandbytes' layers
        return load_dequantized_model(open_base(location), dtype=dtype).to(device).eval()
    try:
        # safetensors only: a pytorch_model.bin is pickle, which d2merge never loads without --allow-pickle
        model = load_model(location, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise D2MergeError(f"transformers cannot load the model: {' '.join(str(exc).split())[:300]}",
                           path=location, hint="d2merge reads safetensors weights; convert pickle "
                                               "(pytorch_model.bin) weights to safetensors") from None
    return model.to(device).eval()


def load_fp32_model(location: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """A transformers model from ``location`` with every weight upcast to fp32, at one model's memory.

    Asking transformers for fp32 from a 16-bit file converts from a memory map that stays
    mapped until the whole file is loaded: 1.5x the fp32 model at the peak. Loading in the
    stored dtype instead maps the file without reading it; each weight is then read afresh
    and upcast one at a time, so the mapped pages are never touched. verify runs every model
    this way, so a column measures what storing in a dtype costs, not low-precision arithmetic.
    """
    from d2merge.dtypes import FLOAT_DTYPES
    from d2merge.io.checkpoint import open_base

    checkpoint = open_base(location, allow_pickle=allow_pickle)
    names = checkpoint.tensors.keys()
    floats = [checkpoint.tensors.info(n)[0] for n in names if checkpoint.tensors.info(n)[0].is_floating_point]
    stored = max(set(floats), key=floats.count) if floats else torch.float32
    if stored not in {d.torch_dtype for d in FLOAT_DTYPES.values()}:
        stored = torch.float32
    model = load_base_model(checkpoint.location, dtype=stored)
    known = set(names)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # fp32 weights are read afresh too: transformers leaves them as views of its memory
            # map, at the file's offsets, and a matrix-vector product (the last position's
            # logits) sums in another order on memory not aligned to 64 bytes; fresh memory
            # is aligned, as the block-streamed models' (verify.streamed), which then agree bit for bit.
            if param.is_floating_point() and name in known:
                param.data = checkpoint.tensors.read(name).to(torch.float32)
            elif param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    model.float()
    return model
