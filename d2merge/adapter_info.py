"""What ``d2merge inspect`` reports about an adapter: method, ranks, targets, size, update norms."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2merge.io.adapter import Adapter, load_adapter
from d2merge.methods import get_method


@dataclass(frozen=True)
class ModuleInfo:
    module: str
    layer_kind: str
    rank: Any
    scale: float
    update_norm: float  # Frobenius norm of the adapter's own update dW


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    method: str
    peft_type: str
    r: int
    lora_alpha: float
    options: dict[str, Any]
    target_modules: Any
    num_parameters: int
    modules: tuple[ModuleInfo, ...]
    replaced: tuple[str, ...]
    # adapter_config.json fields that act on the weights, each with its value (methods/fields.py).
    honoured_fields: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "method": self.method, "peft_type": self.peft_type, "r": self.r,
            "lora_alpha": self.lora_alpha, "options": self.options, "target_modules": self.target_modules,
            "num_parameters": self.num_parameters, "replaced": list(self.replaced),
            "honoured_fields": self.honoured_fields,
            "modules": [{"module": m.module, "layer_kind": m.layer_kind, "rank": m.rank, "scale": m.scale,
                         "update_norm": m.update_norm} for m in self.modules],
        }

    def table(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        method = get_method(self.method)
        rank = self.r or (self.modules[0].rank if self.modules else None)
        ranks = f"{method.rank_name}={method.rank_text(rank) if rank else '?'}"
        lines = [f"adapter      {self.path}",
                 f"method       {self.method} (peft_type {self.peft_type}), {ranks}, alpha={self.lora_alpha:g}{opts}",
                 f"targets      {self.target_modules}",
                 f"parameters   {self.num_parameters:,} in {len(self.modules)} modules",
                 "fields       " + ", ".join(f"{k}={json.dumps(v)}" for k, v in self.honoured_fields.items())
                 + " (honoured; every other field is weight-neutral)"]
        if self.replaced:
            lines.append(f"replaced     {', '.join(self.replaced)} (full tensors: modules_to_save / base_layer)")
        width = max((len(m.module) for m in self.modules), default=6)
        lines += ["", f"{'module':<{width}}  kind       rank   scale      ||dW||_F"]
        for m in self.modules:
            lines.append(f"{m.module:<{width}}  {m.layer_kind:<9}  {method.rank_text(m.rank):<5}  {m.scale:<9.4g}  {m.update_norm:.6g}")
        return "\n".join(lines)


def inspect_adapter(adapter: Adapter | str | Path, *, allow_pickle: bool = False) -> AdapterInfo:
    """Summarise an adapter; reads its (small) factor tensors, never a base model."""
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    method, config = adapter.method, adapter.config
    modules = []
    for name, entry in sorted(adapter.modules.items()):
        settings = method.module_settings(config, name, entry.layer_kind)
        factors = {k: v.to(torch.float64) for k, v in adapter.factors(name).items()}
        norm = float(torch.linalg.matrix_norm(method.update(factors, settings)))
        rank = method.rank_of(factors, entry.layer_kind)
        modules.append(ModuleInfo(name, entry.layer_kind, rank, settings.scale, norm))
    target = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules or [])
    return AdapterInfo(adapter.path, method.name, config.peft_type, config.r, config.lora_alpha, dict(config.options),
                       target, adapter.num_parameters(), tuple(modules), tuple(sorted(adapter.replacements)),
                       {name: config.raw[name] for name in config.honoured_fields})
