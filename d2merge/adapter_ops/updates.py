"""Each adapted module's full update dW = W_merged - W0, for any method, one module at a time.

A plain LoRA's update is its factors' product and needs no base; DoRA's, D2-LoRA's and
Dual LoRA's (and a PiSSA/OLoRA LoRA's, whose base PEFT rebuilds) depend on W0, so they are
the merge's own result minus the base: the method's ``merged_weight`` (the one formula
d2merge has for it), computed in fp64 so the difference is exact to fp32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from d2merge.errors import D2MergeError, escaped, option_error
from d2merge.io.adapter import Adapter
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.methods.base import EMBEDDING, LINEAR, WEIGHT, ModuleSettings
from d2merge.planning import MergePlan, TensorPlan, build_plan


@dataclass(frozen=True)
class ModuleUpdate:
    """One module's update in the formula's (out, in) orientation, fp32."""

    module: str
    layer_kind: str  # LINEAR or EMBEDDING
    fan_in_fan_out: bool
    base_tensor: str
    update: torch.Tensor


def is_plain_lora(adapter: Adapter) -> bool:
    """A LoRA whose update is ``scale * B @ A`` alone: no DoRA, no rebuilt PiSSA/OLoRA base."""
    from d2merge.methods import residual_base

    return adapter.method.name == "lora" and adapter.config.raw.get("init_lora_weights") not in residual_base.INITS


def refuse_extras(adapter: Adapter, what: str) -> None:
    """A plain LoRA holds only A/B factors: anything else in the adapter would be lost, so it is refused.

    ``what``: the operation, in the refusal's words; ``{name}`` in it names an option (``a merge with
    {combination}``), rendered for the caller (Python or the command line)."""
    if adapter.replacements:
        target, key = next(iter(adapter.replacements.items()))
        raise option_error(f"the adapter replaces the whole tensor '{escaped(target)}' (modules_to_save or an "
                           f"embedding's base_layer), which a plain LoRA cannot hold, so {what} would lose it",
                           path=adapter.weights_file, tensor=key,
                           hint="merge this adapter into the base with `d2merge merge` instead")
    if adapter.unknown_keys:
        raise D2MergeError(f"adapter tensor is not a {adapter.method.name} factor", path=adapter.weights_file,
                           tensor=adapter.unknown_keys[0], hint="is adapter_config.json's peft_type right?")
    for field in ("lora_bias", "trainable_token_indices", "target_parameters"):
        if adapter.config.raw.get(field) not in (None, False, [], {}):
            raise option_error(f"the adapter uses {field}, which a plain LoRA of A/B factors cannot hold, so {what} "
                               "would lose it", path=adapter.path / "adapter_config.json",
                               hint="merge this adapter into the base with `d2merge merge` instead")
    if adapter.config.raw.get("bias") not in (None, "none"):
        bias = escaped(repr(adapter.config.raw.get("bias")))
        raise option_error(f"the adapter trains biases (bias: {bias}), which {what} "
                           "cannot carry into a plain LoRA", path=adapter.path / "adapter_config.json",
                           hint="merge this adapter into the base with `d2merge merge` instead")


def plan_updates(base: str | Path | BaseCheckpoint, adapter: Adapter, what: str) -> MergePlan:
    """The merge plan of ``adapter`` on ``base`` (every shape and name checked), extras refused."""
    refuse_extras(adapter, what)
    return build_plan(base, adapter, dtype="fp32")


def _settings(item: TensorPlan) -> ModuleSettings:
    assert item.settings is not None
    return item.settings


def update_of(plan: MergePlan, item: TensorPlan) -> ModuleUpdate:
    """The full update of one merged tensor of ``plan`` (reads its factors, and W0 when the method needs it)."""
    adapter = plan.adapter
    settings = _settings(item)
    if settings.part != WEIGHT or settings.layer_kind not in (LINEAR, EMBEDDING) or item.base_from_adapter:
        raise D2MergeError(f"module '{settings.module}' is not a linear or embedding weight update",
                           path=adapter.weights_file, tensor=item.name,
                           hint="merge this adapter into the base with `d2merge merge` instead")
    update = update_on(adapter, settings, lambda: plan.base_weight(item))
    return ModuleUpdate(settings.module, settings.layer_kind, settings.fan_in_fan_out, item.source,
                        update.contiguous())


def update_on(adapter: Adapter, settings: ModuleSettings, base_weight: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One module's update (out, in), fp32: ``scale * B @ A`` for a plain LoRA, else merged minus W0 in fp64.

    ``base_weight`` reads W0 (as stored) only when the method needs it.
    """
    factors = adapter.factors(settings.module)
    if is_plain_lora(adapter):
        return adapter.method.update({k: v.float() for k, v in factors.items()}, settings)
    w0 = base_weight().to(torch.float64)
    merged = adapter.method.merged_weight(w0, factors, settings, compute_dtype=torch.float64)
    update = merged.sub_(w0)
    return (update.T if settings.transposed else update).to(torch.float32)


def module_updates(plan: MergePlan) -> Iterator[ModuleUpdate]:
    """The full update of every merged module of ``plan``, one at a time (one module's memory)."""
    for item in plan.merged:
        yield update_of(plan, item)
