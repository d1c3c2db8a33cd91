"""What ``d2merge inspect`` reports about an adapter: method, ranks, targets, size, update norms."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.checkpoint import open_base
from d2merge.io.model_structure import meta_model
from d2merge.methods import get_method, target_parameters
from d2merge.methods.base import PARAMETER
from d2merge.natural_sort import natural_key


@dataclass(frozen=True)
class ModuleInfo:
    module: str
    layer_kind: str
    rank: Any
    scale: float
    update_norm: float | None  # Frobenius norm of the adapter's own update dW (None: needs the base, see --base)
    parameter: str | None = None  # target_parameters resolved on the base: the parameter's name
    experts: int | None = None  # and its number of experts (3-D parameters)

    @property
    def label(self) -> str:
        if self.parameter is None:
            return self.module
        experts = f", {self.experts} experts" if self.experts else ""
        return f"{self.module} ({self.parameter}{experts})"


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
                         "update_norm": m.update_norm, "parameter": m.parameter, "experts": m.experts}
                        for m in self.modules],
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
        width = max((len(m.label) for m in self.modules), default=6)
        lines += ["", f"{'module':<{width}}  kind       rank   scale      ||dW||_F"]
        for m in self.modules:
            norm = "- (a target parameter: pass --base to resolve it)" if m.update_norm is None else f"{m.update_norm:.6g}"
            lines.append(f"{m.label:<{width}}  {m.layer_kind:<9}  {method.rank_text(m.rank):<5}  {m.scale:<9.4g}  {norm}")
        return "\n".join(lines)


def _may_be_target_parameter(module: str, config: Any) -> bool:
    """Whether a module's factors may be PEFT ParamWrapper's: nested, or a module target_modules does not name."""
    from d2merge.methods.matching import is_target

    if target_parameters.BASE_LAYER in module:
        return True
    return not is_target(config.target_modules, module, config.raw.get("exclude_modules"))


def inspect_adapter(adapter: Adapter | str | Path, *, allow_pickle: bool = False,
                    base: str | Path | None = None) -> AdapterInfo:
    """Summarise an adapter; reads its (small) factor tensors, and of ``base`` only its config.

    Keys of PEFT's ``target_parameters`` name a module, not the parameter (nested wrappers),
    so which parameter (and how many experts) each is, is known only against the base model
    as transformers builds it; without ``base`` those modules are listed without a norm.
    """
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    method, config = adapter.method, adapter.config
    names = config.raw.get("target_parameters") or []
    targets: dict[str, target_parameters.Target] = {}
    if names and base is not None:
        model = meta_model(open_base(base, allow_pickle=allow_pickle).config)
        if model is None:
            raise D2MergeError("transformers cannot build this base from its config.json, so the parameters "
                               "target_parameters names are unknown", path=base)
        targets = target_parameters.resolve(model, names)
    modules = []
    for name, entry in sorted(adapter.modules.items(), key=lambda item: natural_key(item[0])):
        factors = {k: v.to(torch.float64) for k, v in adapter.factors(name).items()}
        if name in targets:
            target = targets[name]
            settings = method.module_settings(config, target.key, PARAMETER)
            update = target_parameters.delta(factors, target, settings.scale)
            modules.append(ModuleInfo(name, PARAMETER, settings.r, settings.scale, float(torch.linalg.vector_norm(update)),
                                      target.parameter, target.num_experts if len(target.shape) == 3 else None))
            continue
        if names and _may_be_target_parameter(name, config):
            settings = method.module_settings(config, name, entry.layer_kind)
            modules.append(ModuleInfo(name, PARAMETER, method.rank_of(factors, entry.layer_kind), settings.scale, None))
            continue
        settings = method.module_settings(config, name, entry.layer_kind)
        norm = float(torch.linalg.matrix_norm(method.update(factors, settings)))
        rank = method.rank_of(factors, entry.layer_kind)
        modules.append(ModuleInfo(name, entry.layer_kind, rank, settings.scale, norm))
    target = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules or [])
    return AdapterInfo(adapter.path, method.name, config.peft_type, config.r, config.lora_alpha, dict(config.options),
                       target, adapter.num_parameters(), tuple(modules), tuple(sorted(adapter.replacements)),
                       {name: config.raw[name] for name in config.honoured_fields})
