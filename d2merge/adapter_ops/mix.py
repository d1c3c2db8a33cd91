"""Several adapters merged straight into the base, in one streaming pass: ``d2merge merge BASE A1 A2 --weights``.

What "weights" mean (docs/adapter-ops.md):

- **default** (no combination): the weighted sum of the adapters' updates on the base,
  ``W = W0 + sum_i w_i * dW_i``, where ``dW_i = M_i(W0) - W0`` is adapter i's own merge
  (its method's ``merged_weight``: the one formula d2merge has for it) minus the base. For a
  LoRA that is ``w_i * scale_i * B_i @ A_i``; for DoRA, D2-LoRA, Dual LoRA the whole change
  their merge makes, magnitude and norm included. Any mix of methods. With one adapter and
  weight 1 it is that adapter's merge.
- **a combine type** (``CombineOptions``): per module exactly what ``d2merge combine`` computes
  (adapter_ops/combine.py's own per-module code, factors cast to the dtype combine writes), then
  merged as a plain LoRA of scale 1: the same tensors as ``combine`` followed by ``merge``.

Memory stays one module's: the engine hands the rule one W0; the rule holds it, the result and
one adapter's merged tensor (or one module's combined factors), never every adapter's update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from d2merge.adapter_ops.combine import (check_combination, check_weights_and_bases, combine_module_factors,
                                         factor_dtype, module_generator, svd_rank, svd_step)
from d2merge.options.adapter_ops import CombineOptions
from d2merge.adapter_ops.updates import refuse_extras, update_on
from d2merge.errors import D2MergeError, Spelled, escaped, option_error
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.methods import get_method
from d2merge.methods.base import ModuleSettings
from d2merge.options import MergeOptions
from d2merge.planning import MergePlan, TensorPlan, build_plan, mix_plans

@dataclass(frozen=True)
class AdapterMix:
    """Several adapters and their weights, merged at once: pass it where ``merge()`` takes an adapter.

    ``combination`` None: the weighted sum of the updates; a ``CombineOptions``: that combine type.
    """

    adapters: tuple[str | Path | Adapter, ...]
    weights: tuple[float, ...]
    combination: CombineOptions | None = None
    _loaded: dict[bool, tuple[Adapter, ...]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.adapters:
            raise D2MergeError("no adapter given", hint="name at least one ADAPTER")
        if len(self.weights) != len(self.adapters):
            raise option_error(f"{len(self.weights)} weight(s) for {len(self.adapters)} adapter(s)",
                               hint="give one {weights} value per adapter, in order, e.g. {weights=}",
                               weights=Spelled("(0.5, 0.5)", "0.5,0.5"))
        bad = next((w for w in self.weights if not math.isfinite(w)), None)
        if bad is not None:
            raise option_error(f"weight {bad} is not a finite number", hint="{weights} takes finite numbers")

    def load(self, *, allow_pickle: bool = False) -> tuple[Adapter, ...]:
        """The adapters, opened once (headers and configs only)."""
        if allow_pickle not in self._loaded:
            self._loaded[allow_pickle] = tuple(a if isinstance(a, Adapter) else load_adapter(a, allow_pickle=allow_pickle)
                                               for a in self.adapters)
        return self._loaded[allow_pickle]

    def plan_on(self, base: BaseCheckpoint, options: MergeOptions) -> MergePlan:
        """The plan of this mix on ``base``: each adapter planned on its own, then one plan of them all."""
        if options.device != "cpu":
            raise option_error("a merge of several adapters computes on the CPU", hint="drop {device=cuda}")
        adapters = self.load(allow_pickle=options.allow_pickle)
        if self.combination is None:
            check_weights_and_bases(adapters, self.weights)
            for adapter in adapters:
                refuse_extras(adapter, "a weighted merge")
        else:
            combination, plain = check_combination(adapters, self.weights, self.combination,
                                                   "a merge with {combination}", has_base=True)
        plans = [build_plan(base, a, dtype=options.dtype, max_shard_size=options.max_shard_size,
                            tied_embeddings=options.tied_embeddings) for a in adapters]
        by_name: dict[str, list[tuple[int, TensorPlan]]] = {}
        for i, adapter_plan in enumerate(plans):
            for item in adapter_plan.merged:
                by_name.setdefault(item.name, []).append((i, item))
        rule: WeightedSum | Combined
        if self.combination is None:
            rule = WeightedSum(adapters, self.weights, None, by_name)
        else:
            rule = Combined(adapters, self.weights, combination, by_name, self.combination, plain,
                            svd_rank(adapters, combination, self.combination), factor_dtype(adapters))
        merge_plan = mix_plans(plans, rule, options.max_shard_size)
        if options.base_model_id is not None:
            merge_plan = replace(merge_plan, base_model_id=options.base_model_id)
        return merge_plan


def mix_for(adapters: Sequence[str | Path], weights: Sequence[float] | None,
            combination: CombineOptions | None = None) -> str | Path | AdapterMix:
    """What the CLI merges: one adapter as given, or an ``AdapterMix`` when weights or several adapters are."""
    if weights is None and combination is None and len(adapters) == 1:
        return adapters[0]
    if weights is None:
        ones = Spelled("(" + ", ".join(["1.0"] * len(adapters)) + ")", ",".join(["1"] * len(adapters)))
        raise option_error(f"{len(adapters)} adapters need {{weights}} (one per adapter, e.g. {{weights=}})"
                           if len(adapters) > 1 else "{combination} needs {weights}",
                           hint="weights scale each adapter's update", weights=ones)
    return AdapterMix(tuple(adapters), tuple(weights), combination)


@dataclass(frozen=True)
class WeightedSum:
    """``W0 + sum_i w_i (M_i(W0) - W0)``: each adapter's own merge on the base, weighted and summed."""

    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    combination: None
    by_name: dict[str, list[tuple[int, TensorPlan]]]

    def contributors(self, item: TensorPlan) -> tuple[int, ...]:
        return tuple(i for i, _ in self.by_name.get(item.name, ()))

    def row_merger(self, item: TensorPlan) -> Callable[[torch.Tensor, slice], torch.Tensor] | None:
        """Row blocks when every contributor's merge is row-separable on (out, in) rows, as the single merge's."""
        entries = self.by_name[item.name]
        parts = []
        for i, entry in entries:
            adapter, settings = self.adapters[i], entry.settings
            assert settings is not None and entry.module is not None
            if settings.transposed or not adapter.method.row_separable(settings):
                return None
            factors = {k: v.to(torch.float32) for k, v in _checked_factors(adapter, entry.module).items()}
            parts.append((adapter.method, factors, settings, self.weights[i]))
        if len(parts) == 1 and parts[0][3] == 1.0:
            method, factors, settings, _ = parts[0]
            return lambda w, rows: method.merge_rows_(w, factors, settings, rows)  # that adapter's own merge

        def merge_rows(w: torch.Tensor, rows: slice) -> torch.Tensor:
            start = w.clone()
            for method, factors, settings, weight in parts:
                merged = method.merge_rows_(start.clone(), factors, settings, rows)
                w.add_(merged.sub_(start), alpha=weight)
            return w

        return merge_rows

    def merged_weight(self, item: TensorPlan, w0: torch.Tensor, *,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        entries = self.by_name[item.name]
        if len(entries) == 1 and self.weights[entries[0][0]] == 1.0:
            return _merge_one(self.adapters[entries[0][0]], entries[0][1], w0, compute_dtype)  # that adapter's merge
        start = w0.to(compute_dtype)
        total = start.clone()
        for i, entry in entries:
            merged = _merge_one(self.adapters[i], entry, w0, compute_dtype)
            total.add_(merged.sub_(start), alpha=self.weights[i])
            del merged  # one adapter's merged tensor at a time
        return total


def _merge_one(adapter: Adapter, item: TensorPlan, w0: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """One adapter's merged tensor on W0 (its factors checked finite first)."""
    assert item.module is not None and item.settings is not None
    factors = _checked_factors(adapter, item.module)
    return adapter.method.merged_weight(w0, factors, item.settings, compute_dtype=compute_dtype)


def _checked_factors(adapter: Adapter, module: str) -> dict[str, torch.Tensor]:
    """One module's factors, each checked finite (as the single merge checks them), naming the stored key."""
    factors = adapter.factors(module)
    for name, tensor in factors.items():
        if not torch.isfinite(tensor).all():
            raise D2MergeError("adapter tensor has NaN/Inf values", path=adapter.weights_file,
                               tensor=adapter.modules[module].keys[name],
                               hint="the adapter is corrupt or diverged in training; nothing was written")
    return factors


LORA = get_method("lora")


@dataclass(frozen=True)
class Combined:
    """``combine``'s factors of each module (same code, same dtype), merged as a plain LoRA of scale 1."""

    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    combination: str
    by_name: dict[str, list[tuple[int, TensorPlan]]]
    options: CombineOptions
    plain: bool  # every input a plain LoRA: factor-wise types allowed; else the *svd types on full updates
    rank: int | None  # the *svd types' output rank
    dtype: torch.dtype  # the dtype combine writes its factors in

    def contributors(self, item: TensorPlan) -> tuple[int, ...]:
        return tuple(i for i, _ in self.by_name.get(item.name, ()))

    def row_merger(self, item: TensorPlan) -> Callable[[torch.Tensor, slice], torch.Tensor] | None:
        """Plain LoRA inputs: combine's factors need no W0, so the merge goes in row blocks as a LoRA's does
        (linear layers); the *svd types on full updates need the whole W0, so those go whole."""
        first = self.by_name[item.name][0][1].settings
        assert first is not None
        if not self.plain or first.transposed:
            return None
        factors, settings = self._lora(item, None)
        factors = {k: v.to(torch.float32) for k, v in factors.items()}
        return lambda w, rows: LORA.merge_rows_(w, factors, settings, rows)

    def merged_weight(self, item: TensorPlan, w0: torch.Tensor, *,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        factors, settings = self._lora(item, w0)
        return LORA.merged_weight(w0, factors, settings, compute_dtype=compute_dtype)

    def _lora(self, item: TensorPlan, w0: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], ModuleSettings]:
        """The plain LoRA (factors in the dtype combine writes, scale 1) combine makes of this tensor's module."""
        entries = self.by_name[item.name]
        first = entries[0][1].settings
        assert first is not None
        modules = {e.settings.module for _, e in entries if e.settings is not None}
        if len(modules) > 1:
            raise option_error(f"the adapters adapt this tensor as different modules "
                               f"({escaped(', '.join(sorted(modules)))})",
                               path=self.adapters[entries[-1][0]].weights_file, tensor=item.name,
                               hint="combine needs one module name per tensor; merge without {combination}")
        module = first.module
        present = [i for i, _ in entries]
        if self.plain:
            combined, _ = combine_module_factors(module, self.adapters, present, self.weights, self.combination,
                                                 self.options, self.rank)
            a, b = combined.lora_a, combined.lora_b
        else:
            assert w0 is not None
            assert self.rank is not None
            updates = [update_on(self.adapters[i], e.settings, lambda: w0)  # type: ignore[arg-type]
                       for i, e in entries]
            shapes = {tuple(u.shape) for u in updates}
            if len(shapes) > 1:
                raise D2MergeError(f"module '{module}' has updates of shapes {sorted(shapes)}: they do not combine",
                                   path=self.adapters[entries[-1][0]].weights_file, tensor=item.name,
                                   hint="were the adapters trained on different base models?")
            a, b, _ = svd_step(module, updates, [self.weights[i] for i in present], self.combination, self.options,
                               module_generator(self.options.seed, module), self.rank, self.adapters[present[0]])
        a_name, b_name = LORA.tensor_names(first.layer_kind)[:2]
        rank = int(a.shape[0])
        settings = ModuleSettings(module, first.layer_kind, rank, float(rank), 1.0, first.fan_in_fan_out)
        # As combine writes them (then merge reads them back): the same rounding of the factors.
        return {a_name: a.to(self.dtype), b_name: b.to(self.dtype)}, settings
