"""``d2merge combine``: several adapters into one plain LoRA, as PEFT 0.21's ``add_weighted_adapter``.

Plain LoRA inputs need no base: the factor-wise types (linear, ties, dare_*, magnitude_prune)
combine each module's A's and B's, ``cat`` stacks them, the ``*svd`` types combine the
scaled updates and factor them, all as PEFT does (d2merge/adapter_ops/task_arithmetic.py).
DoRA, D2-LoRA, Dual LoRA and PiSSA/OLoRA inputs have updates that depend on the base, so
they need ``--base``: their full updates (merged minus base) are combined by an ``*svd``
type and factored to the requested rank. One module is in memory at a time.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from d2merge.adapter_ops import task_arithmetic as ta
from d2merge.adapter_ops.factor import peft_svd_factors
from d2merge.options.adapter_ops import CombineOptions
from d2merge.options.base import option_error
from d2merge.adapter_ops.updates import is_plain_lora, plan_updates, refuse_extras, update_of
from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.adapter_writer import LoraModule, check_adapter_output, lora_tensors, plain_lora_config, write_lora_adapter
from d2merge.methods.base import LINEAR

UPDATES_HINT = "DoRA, D2-LoRA, Dual LoRA and PiSSA/OLoRA updates depend on the base: pass {base=BASE}"


@dataclass(frozen=True)
class CombinedModule:
    """What the combination made of one module (the report's row)."""

    module: str
    rank: int
    inputs: int  # how many adapters adapt this module
    energy: float | None = None  # *svd types: fraction of the combined update's ||.||_F^2 kept

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "rank": self.rank, "inputs": self.inputs, "retained_energy": self.energy}


@dataclass(frozen=True)
class CombineResult:
    out: Path
    combination: str
    weights: tuple[float, ...]
    modules: tuple[CombinedModule, ...] = field(default=())

    def describe(self) -> str:
        lines = [f"combined {len(self.weights)} adapter(s) with {self.combination} into {self.out}"]
        width = max((len(m.module) for m in self.modules), default=6)
        lines.append(f"{'module':<{width}}  rank  inputs  energy")
        for m in self.modules:
            energy = "-" if m.energy is None else f"{m.energy:.6f}"
            lines.append(f"{m.module:<{width}}  {m.rank:<4}  {m.inputs:<6}  {energy}")
        return "\n".join(lines)


def _natural_key(name: str) -> list[Any]:
    """Module names in model order (layers.2 before layers.10), as PEFT walks them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _configured_ranks(adapter: Adapter) -> int:
    """PEFT's rank of an adapter for add_weighted_adapter: r, or the largest rank_pattern value."""
    pattern = [v for v in adapter.config.rank_pattern.values() if isinstance(v, int)]
    return max([adapter.config.r, *pattern])


def check_inputs(adapters: Sequence[Adapter], weights: Sequence[float], combination: str) -> None:
    """PEFT's rules and ours, as one-line refusals naming the file."""
    check_weights_and_bases(adapters, weights)
    _fan_in_fan_out_and_kinds(adapters, {a.config.fan_in_fan_out for a in adapters}, combination)


def check_weights_and_bases(adapters: Sequence[Adapter], weights: Sequence[float]) -> None:
    """One finite weight per adapter, and one base named by them all (``base_model_name_or_path``)."""
    if not adapters:
        raise D2MergeError("no adapter given", hint="name at least one ADAPTER")
    if len(weights) != len(adapters):
        raise D2MergeError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s)", path=adapters[-1].path,
                           hint="give one weight per adapter, in order, e.g. 0.5,0.5")
    for w in weights:
        if w != w or w in (float("inf"), float("-inf")):
            raise D2MergeError(f"weight {w} is not a finite number", path=adapters[-1].path,
                               hint="the weights must be finite numbers")
    names = {}
    for adapter in adapters:
        base = adapter.config.base_model_name_or_path
        if base:
            names.setdefault(base, adapter.path)
    if len(names) > 1:
        (first, first_path), (second, second_path) = list(names.items())[:2]
        raise D2MergeError(f"the adapters were trained on different bases: '{first}' ({first_path}) and '{second}'",
                           path=second_path / "adapter_config.json",
                           hint="combine adapters of one base; if these paths name the same model, set "
                                "base_model_name_or_path alike")


def _fan_in_fan_out_and_kinds(adapters: Sequence[Adapter], fifo: set[bool], combination: str) -> None:
    """What PEFT needs to combine factors: one orientation, one way of naming targets, equal ranks (factor-wise)."""
    if len(fifo) > 1:
        raise D2MergeError("the adapters disagree on fan_in_fan_out, so their factors do not combine",
                           path=adapters[-1].path / "adapter_config.json",
                           hint="were the adapters trained on different base models?")
    kinds = {type(a.config.target_modules) for a in adapters}
    if len(kinds) > 1:
        raise D2MergeError("target_modules is a list in some adapters and a regex string in others (PEFT refuses "
                           "to combine them)", path=adapters[-1].path / "adapter_config.json",
                           hint="write target_modules the same way in every adapter_config.json")
    if combination in ta.FACTORWISE and len(adapters) > 1:
        ranks = [_configured_ranks(a) for a in adapters]
        if len(set(ranks)) > 1:
            odd = adapters[next(i for i, r in enumerate(ranks) if r != ranks[0])]
            raise option_error(f"{{combination=}} needs equal ranks (PEFT's rule), got r = "
                               f"{', '.join(map(str, ranks))}", path=odd.path / "adapter_config.json",
                               hint="use {combination=cat} (exact, rank = sum) or svd / ties_svd (factored to "
                                    "{svd_rank})", combination=combination)


def combine(adapters: Sequence[str | Path], out: str | Path, weights: Sequence[float],
            options: CombineOptions | None = None, *, base: str | Path | None = None,
            allow_pickle: bool = False) -> CombineResult:
    """Combine ``adapters`` with ``weights`` into one plain LoRA folder ``out``; nothing is written on a refusal.

    Other outputs (``to="gguf-lora"``): ``d2merge.combine`` (``export.adapter_outputs``).
    """
    options = options or CombineOptions()
    options.require_target("lora")
    loaded = [load_adapter(a, allow_pickle=allow_pickle) for a in adapters]
    weights = [float(w) for w in weights]
    combination, plain = check_combination(loaded, weights, options, "combine", has_base=base is not None)
    out_path = check_adapter_output(out, [a.path for a in loaded] + ([Path(base)] if base else []),
                                    overwrite=options.overwrite)
    if plain:
        if base is not None:
            for adapter in loaded:  # each adapter checked against the base (names, shapes), headers only
                plan_updates(base, adapter, "combine")
        modules, rows = _combine_factors(loaded, weights, combination, options)
    else:
        assert base is not None
        modules, rows = _combine_updates(loaded, weights, combination, options, base)
    first = loaded[0].config
    config = plain_lora_config(modules, base_model_name_or_path=first.base_model_name_or_path,
                               task_type=first.raw.get("task_type"), fan_in_fan_out=first.fan_in_fan_out)
    write_lora_adapter(out_path, config, lora_tensors(modules, factor_dtype(loaded)), overwrite=options.overwrite)
    return CombineResult(out_path, combination, tuple(weights), tuple(rows))


def check_combination(adapters: Sequence[Adapter], weights: Sequence[float], options: CombineOptions, what: str,
                      *, has_base: bool) -> tuple[str, bool]:
    """(the combination that applies, whether every input is a plain LoRA), or a one-line refusal.

    One adapter takes ``linear`` for every factor-wise type (PEFT's rule); DoRA, D2-LoRA, Dual LoRA
    and PiSSA/OLoRA inputs need the base and an ``*svd`` type (their updates are full matrices).
    """
    combination = "linear" if len(adapters) == 1 and options.combination in ta.FACTORWISE + ("cat",) \
        else options.combination
    check_inputs(adapters, weights, combination)
    for adapter in adapters:
        refuse_extras(adapter, what)
    plain = all(is_plain_lora(a) for a in adapters)
    if not plain:
        odd = next(a for a in adapters if not is_plain_lora(a))
        if not has_base:
            raise option_error(f"a {odd.method.name} adapter's update depends on the base model",
                               path=odd.path, hint=UPDATES_HINT)
        if combination not in ta.ON_UPDATES:
            raise option_error(f"{{combination=}} combines LoRA factors; a {odd.method.name} adapter has "
                               "no such factors", path=odd.path, combination=combination,
                               hint="use an *svd type (svd, ties_svd, dare_linear_svd, dare_ties_svd, "
                                    "magnitude_prune_svd): it combines the full updates and factors them")
    return combination, plain


def factor_dtype(adapters: Sequence[Adapter]) -> torch.dtype:
    """The dtype combine writes its factors in: the first adapter's (fp32 when it stores no floats)."""
    first = adapters[0]
    dtype = first.tensors.info(next(iter(first.modules[next(iter(first.modules))].keys.values())))[0]
    return dtype if dtype.is_floating_point else torch.float32


def _module_names(adapters: Sequence[Adapter]) -> list[str]:
    names = {m for a in adapters for m in a.modules}
    return sorted(names, key=_natural_key)


def _check_shapes(module: str, adapters: Sequence[Adapter], present: Sequence[int],
                  factors: Sequence[tuple[torch.Tensor, torch.Tensor]], kinds: Sequence[str]) -> None:
    """The adapters' factors of one module must describe the same (out, in) layer."""
    first = present[0]
    for i, (a, b) in zip(present, factors):
        if kinds[present.index(i)] != kinds[0]:
            raise D2MergeError(f"module '{module}' is an {kinds[present.index(i)]} layer here and an {kinds[0]} "
                               f"layer in {adapters[first].path}", path=adapters[i].weights_file,
                               hint="were the adapters trained on different base models?")
        if (b.shape[0], a.shape[1]) != (factors[0][1].shape[0], factors[0][0].shape[1]):
            key = next(iter(adapters[i].modules[module].keys.values()))
            raise D2MergeError(f"module '{module}' is {b.shape[0]}x{a.shape[1]} here but "
                               f"{factors[0][1].shape[0]}x{factors[0][0].shape[1]} in {adapters[first].weights_file}: "
                               "the shapes do not combine", path=adapters[i].weights_file, tensor=key,
                               hint="were the adapters trained on different base models?")


def _combine_factors(adapters: Sequence[Adapter], weights: Sequence[float], combination: str,
                     options: CombineOptions) -> tuple[list[LoraModule], list[CombinedModule]]:
    new_rank = svd_rank(adapters, combination, options)
    modules: list[LoraModule] = []
    rows: list[CombinedModule] = []
    for module in _module_names(adapters):
        present = [i for i, a in enumerate(adapters) if module in a.modules]
        combined, row = combine_module_factors(module, adapters, present, weights, combination, options, new_rank)
        modules.append(combined)
        rows.append(row)
    return modules, rows


def svd_rank(adapters: Sequence[Adapter], combination: str, options: CombineOptions) -> int | None:
    """The *svd types' output rank: --svd-rank, else the largest input rank (PEFT's default); None otherwise."""
    if not combination.endswith("svd"):
        return None
    return options.svd_rank or max(_configured_ranks(a) for a in adapters)


def module_generator(seed: int, module: str) -> torch.Generator:
    """DARE's random source for one module: seeded by --seed and the module's name.

    Per module, not one stream over the model, so the masks do not depend on the order the
    modules are visited in: ``combine`` walks them in model order, a merge of several adapters
    (adapter_ops/mix.py) in the base checkpoint's order, and both draw the same masks.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % (1 << 63))


def combine_module_factors(module: str, adapters: Sequence[Adapter], present: Sequence[int],
                           weights: Sequence[float], combination: str, options: CombineOptions,
                           new_rank: int | None) -> tuple[LoraModule, CombinedModule]:
    """One module's combined plain-LoRA factors from the plain LoRAs ``present`` (indices) that adapt it."""
    kinds = [adapters[i].modules[module].layer_kind for i in present]
    factors, scales = [], []
    for i in present:
        adapter = adapters[i]
        entry = adapter.modules[module]
        a_name, b_name = adapter.method.tensor_names(entry.layer_kind)[:2]
        missing = [n for n in (a_name, b_name) if n not in entry.keys]
        if missing:
            raise D2MergeError(f"module '{module}' lacks the lora tensor '{missing[0]}'",
                               path=adapter.weights_file, tensor=next(iter(entry.keys.values())),
                               hint="the adapter file is incomplete")
        a, b = (adapter.tensors.read(entry.keys[n]).float() for n in (a_name, b_name))
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise D2MergeError(f"factors {list(a.shape)} and {list(b.shape)} of module '{module}' do not form a "
                               "LoRA", path=adapter.weights_file, tensor=entry.keys[a_name],
                               hint="the adapter file is damaged; save it again")
        fifo = adapter.config.fan_in_fan_out if entry.layer_kind == LINEAR else False
        settings = adapter.method.module_settings(adapter.config, module, entry.layer_kind, fifo)
        if settings.r != a.shape[0]:
            raise D2MergeError(f"factor rank {a.shape[0]} does not match the config's rank {settings.r}",
                               path=adapter.weights_file, tensor=entry.keys[a_name],
                               hint="check r / rank_pattern in adapter_config.json")
        factors.append((a, b))
        scales.append(settings.scale)
    _check_shapes(module, adapters, present, factors, kinds)
    used = [weights[i] for i in present]
    generator = module_generator(options.seed, module)
    energy = None
    if combination == "cat":
        a, b = ta.concatenate_factors(factors, used, scales)
    elif combination in ta.FACTORWISE:
        if len({f[0].shape[0] for f in factors}) > 1:
            raise option_error(f"{{combination=}} needs equal ranks, and module '{module}' has ranks "
                               f"{', '.join(str(f[0].shape[0]) for f in factors)} (PEFT's rule)",
                               path=adapters[present[-1]].weights_file,
                               hint="use {combination=cat} or an *svd type", combination=combination)
        a, b = ta.combine_factors(factors, used, scales, combination, density=options.density or 0.0,
                                  sign_method=options.majority_sign_method, generator=generator)
    else:
        assert new_rank is not None
        updates = [s * (b @ a) for (a, b), s in zip(factors, scales)]
        a, b, energy = svd_step(module, updates, used, combination, options, generator, new_rank,
                                adapters[present[0]])
    return (LoraModule(module, kinds[0], a, b), CombinedModule(module, int(a.shape[0]), len(present), energy))


def svd_step(module: str, updates: list[torch.Tensor], weights: Sequence[float], combination: str,
             options: CombineOptions, generator: torch.Generator, rank: int, adapter: Adapter
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The *svd types on one module: the scaled updates combined (pruned per type), then PEFT's truncated SVD."""
    out_f, in_f = updates[0].shape
    if rank > min(out_f, in_f):
        raise option_error(f"{{svd_rank=}} is above module '{module}''s size {out_f}x{in_f}",
                           path=adapter.weights_file, tensor=next(iter(adapter.modules[module].keys.values())),
                           hint=f"choose {{svd_rank={min(out_f, in_f)}}} or less", svd_rank=rank)
    combined = ta.combine_updates(updates, weights, combination, density=options.density or 0.0,
                                  sign_method=options.majority_sign_method, generator=generator)
    return peft_svd_factors(combined, rank, options.svd_clamp)


def _combine_updates(adapters: Sequence[Adapter], weights: Sequence[float], combination: str,
                     options: CombineOptions, base: str | Path
                     ) -> tuple[list[LoraModule], list[CombinedModule]]:
    """Full updates (merged minus base) of every input, combined per module, factored to the rank asked."""
    plans = [plan_updates(base, a, "combine") for a in adapters]
    by_module: dict[str, list[tuple[int, Any]]] = {}
    for i, plan in enumerate(plans):
        for item in plan.merged:
            assert item.settings is not None
            by_module.setdefault(item.settings.module, []).append((i, item))
    rank = options.svd_rank or max(_configured_ranks(a) for a in adapters)
    modules: list[LoraModule] = []
    rows: list[CombinedModule] = []
    for module in sorted(by_module, key=_natural_key):
        entries = by_module[module]
        updates = [update_of(plans[i], item) for i, item in entries]
        kinds = {u.layer_kind for u in updates}
        shapes = {tuple(u.update.shape) for u in updates}
        if len(kinds) > 1 or len(shapes) > 1:
            raise D2MergeError(f"module '{module}' has updates of shapes {sorted(shapes)}: they do not combine",
                               path=adapters[entries[-1][0]].weights_file,
                               hint="were the adapters trained on different base models?")
        a, b, energy = svd_step(module, [u.update for u in updates], [weights[i] for i, _ in entries], combination,
                                options, module_generator(options.seed, module), rank, adapters[entries[0][0]])
        modules.append(LoraModule(module, updates[0].layer_kind, a, b))
        rows.append(CombinedModule(module, int(a.shape[0]), len(entries), energy))
    return modules, rows
