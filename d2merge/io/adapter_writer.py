"""Plain PEFT LoRA adapter folders, written atomically: what combine, convert and extract produce.

"Plain" is what every LoRA server reads (vLLM, TGI, llama.cpp's converter, PEFT itself):
``peft_type: LORA``, ``lora_A``/``lora_B`` (``lora_embedding_A``/``_B`` on embeddings), ``r``
and ``lora_alpha``, per-module ranks as ``rank_pattern`` with an equal ``alpha_pattern`` (so
every module's scale is exactly 1), no DoRA, no ``modules_to_save``, no field of d2merge's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from d2merge.io.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from d2merge.io.output import AtomicFolder, check_output_location, write_json
from d2merge.io.safetensors_file import save_tensors
from d2merge.methods.base import EMBEDDING, LINEAR


@dataclass(frozen=True)
class LoraModule:
    """One module of a plain LoRA: A (r, in) and B (out, r), its update is ``scale * B @ A``."""

    module: str
    layer_kind: str  # LINEAR or EMBEDDING
    lora_a: torch.Tensor
    lora_b: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


def stored_keys(module: str, layer_kind: str) -> tuple[str, str]:
    """PEFT's keys of A and B: ``.lora_A.weight`` on linear layers, bare ``.lora_embedding_A`` on embeddings."""
    if layer_kind == EMBEDDING:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def plain_lora_config(modules: Iterable[LoraModule], *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None, fan_in_fan_out: bool = False,
                      target_modules: list[str] | str | None = None, rank: int | None = None,
                      alpha: float | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a plain LoRA whose modules hold the given factors.

    Without ``rank``/``alpha``: r is the most common rank and lora_alpha equals it, every
    other module gets its rank in ``rank_pattern`` and the same number in ``alpha_pattern``,
    so each module's scale is 1 (the factors carry the whole update). ``target_modules``
    defaults to the adapted modules' full names, so PEFT injects exactly these.
    """
    modules = list(modules)
    ranks = Counter(m.rank for m in modules)
    r = rank if rank is not None else (ranks.most_common(1)[0][0] if ranks else 1)
    rank_pattern = {m.module: m.rank for m in modules if m.rank != r}
    alpha_pattern = dict(rank_pattern) if alpha is None else {}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r if alpha is None else alpha,
        "target_modules": target_modules if target_modules is not None else sorted(m.module for m in modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def lora_tensors(modules: Iterable[LoraModule], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The stored tensors of the modules, keyed as PEFT saves them, in ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        a_key, b_key = stored_keys(m.module, m.layer_kind)
        tensors[a_key] = m.lora_a.detach().to("cpu", dtype).contiguous()
        tensors[b_key] = m.lora_b.detach().to("cpu", dtype).contiguous()
    return tensors


def check_adapter_output(out: str | Path, inputs: Iterable[Path], *, overwrite: bool) -> Path:
    """Refuse an output that would clobber an input or an existing folder, before any work."""
    return check_output_location(Path(out), list(inputs), overwrite=overwrite)


def write_lora_adapter(out: str | Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *,
                       overwrite: bool = False, extra_files: Mapping[str, Any] | None = None) -> Path:
    """Write the folder under a temp name and rename it into place once complete.

    ``extra_files``: JSON files written beside the adapter (a report), never read by PEFT.
    """
    folder = check_output_location(Path(out), [], overwrite=overwrite)
    with AtomicFolder(folder, overwrite=overwrite) as staged:
        write_json(staged.path(CONFIG_NAME), dict(config))
        save_tensors(staged.path(WEIGHTS_NAME), dict(sorted(tensors.items())), {"format": "pt"})
        for name, data in (extra_files or {}).items():
            write_json(staged.path(name), data)
        staged.commit()
    return folder


__all__ = ["LoraModule", "stored_keys", "plain_lora_config", "lora_tensors", "check_adapter_output",
           "write_lora_adapter", "LINEAR", "EMBEDDING"]
