"""Wrong merges that `d2merge verify` must fail: each helper writes a merged folder wrong in one way.

Shared by the tiny-model fault tests (tests/unit/verify/test_verify.py) and the real-model ones
(tests/system/test_verify_real.py), so both suites test the same faults:

- ``wrong_tau_sign``: a D2-LoRA merge made with tau negated (a sign convention mixed up);
- ``scale_tensor``: one merged tensor multiplied by 1.01;
- ``swap_tensors``: two layers' merged tensors exchanged;
- an adapter trained on another task merged instead of the one verified (the tests train it);
- ``drift_merge``: a 16-bit merge computed as most tools do it, the update rounded to 16 bits and
  added into the 16-bit base: two roundings instead of one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from d2merge.api import merge
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import open_base
from d2merge.io.safetensors_file import save_tensors
from d2merge.planning import build_plan


def rewrite_tensors(folder: Path, changes: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Rewrite the folder's safetensors files with ``changes[name](tensor)`` applied (dtype kept)."""
    checkpoint = open_base(folder)
    files = {checkpoint.tensors.file_of(name) for name in changes}
    for file in files:
        tensors = {}
        for key in checkpoint.tensors.keys():
            if checkpoint.tensors.file_of(key) != file:
                continue
            tensor = checkpoint.tensors.read(key).clone()
            if key in changes:
                tensor = changes[key](tensor).to(tensor.dtype).contiguous()
            tensors[key] = tensor
        save_tensors(file, tensors, {"format": "pt"})


def copy_folder(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def scale_tensor(merged: Path, target: Path, name: str, factor: float = 1.01) -> Path:
    folder = copy_folder(merged, target)
    rewrite_tensors(folder, {name: lambda t: (t.float() * factor)})
    return folder


def swap_tensors(merged: Path, target: Path, first: str, second: str) -> Path:
    folder = copy_folder(merged, target)
    checkpoint = open_base(folder)
    a, b = checkpoint.tensors.read(first).clone(), checkpoint.tensors.read(second).clone()
    rewrite_tensors(folder, {first: lambda t: b, second: lambda t: a})
    return folder


def wrong_tau_sign(base: Path, adapter: Path, target: Path, dtype: str) -> Path:
    """A D2-LoRA merge whose adapter_config says -tau: every adapted tensor is off."""
    edited = copy_folder(adapter, target.with_name(target.name + "-adapter"))
    config = json.loads((edited / "adapter_config.json").read_text())
    config["tau"] = -config["tau"]
    (edited / "adapter_config.json").write_text(json.dumps(config))
    return merge(base, edited, target, dtype=dtype, hash_sources=False).output


def drift_merge(base: Path, adapter: Path, merged: Path, fp32_merged: Path, target: Path) -> Path:
    """``merged`` (a correct 16-bit merge) with every adapted tensor recomputed as W0_16 + round16(dW).

    dW is taken from a correct fp32 merge (``fp32_merged - W0``), rounded to the output dtype and
    added to the base rounded to that dtype, in that dtype: the classic bf16 drift.
    """
    folder = copy_folder(merged, target)
    base_ckpt, exact = open_base(base), open_base(fp32_merged)
    stored = open_base(folder)
    plan = build_plan(base_ckpt, load_adapter(adapter))

    def drifted(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        dtype = stored.tensors.info(name)[0]
        w0 = base_ckpt.tensors.read(name).float()
        update = exact.tensors.read(name).float() - w0
        return lambda t: w0.to(dtype) + update.to(dtype)

    rewrite_tensors(folder, {item.name: drifted(item.name) for item in plan.merged})
    return folder
