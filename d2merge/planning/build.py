"""Building the merge plan: every output tensor, where it comes from and how it changes, before any byte is written.

Building the plan reads only headers and configs. It is where every mismatch
between base and adapter is found and reported, naming the tensor, and where
each adapter tensor is accounted for: a tensor the plan does not consume is an
error, never silently dropped.

The steps of :func:`build_plan`, in the order they refuse: the options, the adapter's keys, each
adapted module (:func:`_module_merges`), the trainable tokens, the replaced modules
(:func:`_replacements`), the tied embeddings (``ties.settle_tie``), then the output dtype, the
tensor list (:func:`_tensor_plans`) and the shards.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from d2merge.dtypes import by_torch
from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, AdapterModule, load_adapter
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.io.model_structure import conv1d_modules
from d2merge.io.quantized import names_quantized_repo
from d2merge.io.safetensors_file import DTYPE_NAMES
from d2merge.methods import LINEAR, ModuleSettings, target_parameters, trainable_tokens
from d2merge.methods.base import BIAS, TOKENS
from d2merge.methods.lora import LORA_BIAS
from d2merge.options.merge import TIED_POLICIES, MergeOptions
from d2merge.planning.base_names import BaseNames
from d2merge.planning.model import OUT_DTYPES, MergePlan, SeveralAdapters, TensorPlan, parse_dtype
from d2merge.planning.shards import assign_shards
from d2merge.planning.targets import check_orientation, parameter_merges, parameter_targets, token_settings
from d2merge.planning.ties import settle_tie, tied_pair
from d2merge.sizes import parse_size

# What the adapter does to the base, by the output tensor's name: (tensor W0 is read from, settings).
Merges = dict[str, tuple[str, ModuleSettings]]


def plan_for(base: str | Path | BaseCheckpoint, adapter: str | Path | Adapter | SeveralAdapters,
             options: MergeOptions | None = None, **overrides: Any) -> MergePlan:
    """The merge plan of ``base`` and ``adapter`` (paths or opened sources), writing nothing.

    ``adapter`` may be several adapters with their weights (``d2merge.adapter_ops.mix.AdapterMix``).

    ``d2merge.api.plan`` is this function; it lives here, below every writer, so that the
    format modules in ``d2merge.export`` plan a merge without importing ``d2merge.api``.
    """
    options = MergeOptions.resolve(options, overrides)
    if not isinstance(base, BaseCheckpoint):
        base = open_base(base, allow_pickle=options.allow_pickle)
    if isinstance(adapter, SeveralAdapters):
        return adapter.plan_on(base, options)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=options.allow_pickle)
    merge_plan = build_plan(base, adapter, dtype=options.dtype, max_shard_size=options.max_shard_size,
                            tied_embeddings=options.tied_embeddings)
    if options.base_model_id is not None:
        merge_plan = replace(merge_plan, base_model_id=options.base_model_id)
    return merge_plan


def build_plan(base: BaseCheckpoint | str | Path, adapter: Adapter | str | Path, *, dtype: str = "auto",
               max_shard_size: str | int = "5GB", tied_embeddings: str = "untie",
               allow_pickle: bool = False) -> MergePlan:
    """Match every adapter tensor to a base tensor, check shapes and ranks, and lay out the output."""
    if not isinstance(base, BaseCheckpoint):
        base = open_base(base, allow_pickle=allow_pickle)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    out_dtype_name = parse_dtype(dtype)
    if tied_embeddings not in TIED_POLICIES:
        raise D2MergeError(f"unknown tied-embeddings policy {tied_embeddings!r}; choose one of {', '.join(TIED_POLICIES)}")
    shard_limit = parse_size(max_shard_size)
    _refuse_unknown_keys(adapter)

    stored = base.tensors.keys()
    infos = {n: base.tensors.info(n) for n in stored}
    config = base.config or {}
    names = BaseNames(infos, config, tied_pair(infos, config))
    linear_modules = [m for m, e in adapter.modules.items() if e.layer_kind == LINEAR]
    conv1d = conv1d_modules(config) if linear_modules else None
    notes: list[str] = []
    config_updates: dict[str, Any] = {}

    targets = parameter_targets(adapter, config)
    merges, token_rows = _module_merges(base, adapter, names, targets, conv1d)
    if adapter.config.use_rslora and not targets and names.renamed_on_load():
        fused = {key for found in names.layout().sources.values() for key, expert, _, _ in found if expert is not None}
        if any(f"{m}.weight" in fused for m in adapter.modules):
            notes.append("rsLoRA on per-expert tensors that transformers 5 fuses on load: merged with the scale the "
                         "adapter was trained with (lora_alpha / sqrt(r)); PEFT 0.21 fuses w1 and w3 at rank 2r with "
                         "alpha 2*lora_alpha when it loads such an adapter, which scales their update by sqrt(2)")
    if adapter.config.raw.get("trainable_token_indices") not in (None, [], {}) and not token_rows:
        raise D2MergeError("trainable_token_indices is set but the adapter holds no trained rows "
                           f"(*.{trainable_tokens.STORED_SUFFIX})", path=adapter.weights_file,
                           hint="the adapter file is incomplete, or the config does not match these weights")
    replacements = _replacements(adapter, names)

    # Output tensor list: the base's own tensors, plus an explicit lm_head when a tied pair is untied.
    outputs = list(stored)
    if names.tied:
        emb, head = names.tied
        untie, tie_notes = settle_tie(names.tied, tied_embeddings, merges, replacements, token_rows,
                                      adapter.weights_file)
        if untie:
            if head not in infos:
                outputs.insert(outputs.index(emb) + 1, head)
            config_updates["tie_word_embeddings"] = False
        notes += tie_notes

    target_dtype = OUT_DTYPES[out_dtype_name]
    if target_dtype is None and base.quantization is not None:
        # "auto" keeps each stored dtype, but a quantized weight has none: the dtype the base was
        # stored in before quantization (config.json's dtype), else bf16, for every tensor.
        target_dtype = base.quantization.out_dtype
        out_dtype_name = by_torch(target_dtype).name
    notes += _quantization_notes(base, adapter, out_dtype_name)
    plans = _tensor_plans(outputs, names, merges, replacements, target_dtype, adapter)
    plans, shard_names = assign_shards(plans, shard_limit)
    from d2merge.io.output import support_files

    _, skipped = support_files(base.folder, base.weight_files)
    if skipped:
        notes.append(f"not copied from the base folder: {', '.join(skipped)}")
    dtype_label = out_dtype_name if target_dtype is not None else _auto_label(plans)
    if target_dtype is not None:
        config_updates["dtype"] = by_torch(target_dtype).config_name
    return MergePlan(base, adapter, tuple(plans), tuple(shard_names), dtype_label, config_updates, tuple(notes))


def _refuse_unknown_keys(adapter: Adapter) -> None:
    """Every adapter tensor must be one the plan consumes: an unknown one is refused, never dropped."""
    if adapter.unknown_keys:
        key = adapter.unknown_keys[0]
        more = f" (and {len(adapter.unknown_keys) - 1} more)" if len(adapter.unknown_keys) > 1 else ""
        raise D2MergeError(f"adapter tensor is not a {adapter.method.name} factor, modules_to_save or base_layer "
                           f"tensor{more}", path=adapter.weights_file, tensor=key,
                           hint="is adapter_config.json's peft_type right for these weights?")


def _module_merges(base: BaseCheckpoint, adapter: Adapter, names: BaseNames,
                   targets: dict[str, target_parameters.Target], conv1d: frozenset[str] | None
                   ) -> tuple[Merges, set[str]]:
    """What each adapted module merges into, by output tensor name, and the tensors whose change is
    trainable token rows (PEFT keeps a tied head tied to them)."""
    merges: Merges = {}
    token_rows: set[str] = set()
    for module, entry in adapter.modules.items():
        first_key = next(iter(entry.keys.values()))
        if module in targets:
            for stored, settings in parameter_merges(adapter, module, targets[module], names):
                if stored in merges:
                    raise D2MergeError(f"two adapted parameters both change the stored tensor '{stored}'",
                                       path=adapter.weights_file, tensor=first_key,
                                       hint="check target_parameters and target_modules")
                merges[stored] = (stored, settings)
            continue
        weight_name = f"{module}.weight"
        source = names.source_of(weight_name, "adapted module", first_key, adapter.weights_file)
        if source != weight_name and not names.is_tied_head(weight_name):
            weight_name = source  # renamed on load: the output keeps the checkpoint's name
        if entry.layer_kind == TOKENS:
            merges[weight_name] = (source, token_settings(adapter, module, entry.keys, names.infos[source][1]))
            token_rows.add(weight_name)
            continue
        settings = _factor_settings(base, adapter, module, entry, source, names, conv1d)
        merges[weight_name] = (source, settings)
        bias_name = _lora_bias_target(adapter, module, entry, names)
        if bias_name is not None:
            merges[bias_name] = (bias_name, replace(settings, part=BIAS, fan_in_fan_out=False))
    return merges, token_rows


def _factor_settings(base: BaseCheckpoint, adapter: Adapter, module: str, entry: AdapterModule, source: str,
                     names: BaseNames, conv1d: frozenset[str] | None) -> ModuleSettings:
    """The settings of a module adapted by factors on a 2-D weight (``source`` in the base), once its
    tensors are all there, its orientation fits the layer and its ranks and shapes fit the base."""
    method = adapter.method
    first_key = next(iter(entry.keys.values()))
    required = method.tensor_names(entry.layer_kind)
    missing = [n for n in required if n not in entry.keys]
    if missing:
        raise D2MergeError(f"module '{module}' lacks the {method.name} tensor '{missing[0]}'",
                           path=adapter.weights_file, tensor=first_key,
                           hint="the adapter file is incomplete, or peft_type does not match these weights")
    fan_in_fan_out = adapter.config.fan_in_fan_out if entry.layer_kind == LINEAR else False
    if entry.layer_kind == LINEAR:
        check_orientation(module, fan_in_fan_out, conv1d, names.config, adapter, first_key)
    _, base_shape = names.infos[source]
    if len(base_shape) != 2:
        raise D2MergeError(f"base tensor has shape {list(base_shape)}; only 2-D weights can be adapted",
                           path=base.tensors.file_of(source), tensor=source)
    answer = method.answer(adapter.config, module, entry.layer_kind, fan_in_fan_out, tuple(base_shape),
                           {n: tuple(adapter.tensors.info(k)[1]) for n, k in entry.keys.items()})
    if answer.stored_rank != answer.configured_rank:
        raise D2MergeError(f"factor rank {answer.stored_rank} does not match the config's rank "
                           f"{answer.configured_rank}", path=adapter.weights_file, tensor=entry.keys[required[0]],
                           hint="check r / rank_pattern in adapter_config.json")
    for name, key in entry.keys.items():
        dtype, shape = adapter.tensors.info(key)
        if tuple(shape) != tuple(answer.shapes[name]):
            raise D2MergeError(f"shape {list(shape)} does not fit base '{source}' {list(base_shape)}: "
                               f"expected {list(answer.shapes[name])}", path=adapter.weights_file, tensor=key,
                               hint="was the adapter trained on another base model?")
        if not dtype.is_floating_point:
            raise D2MergeError(f"adapter tensor has non-float dtype {dtype}", path=adapter.weights_file, tensor=key,
                               hint="adapter factors are floating point; save the adapter again")
    return answer.settings


def _lora_bias_target(adapter: Adapter, module: str, entry: AdapterModule, names: BaseNames) -> str | None:
    """The base's bias a module's ``lora_B.bias`` merges into (None: the module has none to merge)."""
    first_key = next(iter(entry.keys.values()))
    if adapter.config.raw.get("lora_bias") is True and entry.layer_kind == LINEAR and LORA_BIAS not in entry.keys:
        raise D2MergeError(f"module '{module}' lacks lora_B.bias, which lora_bias: true gives every LoRA layer",
                           path=adapter.weights_file, tensor=first_key,
                           hint="the adapter file is incomplete, or lora_bias does not match these weights")
    if LORA_BIAS not in entry.keys:
        return None
    bias_name = names.stored_as(f"{module}.bias") or f"{module}.bias"
    if bias_name not in names.infos:
        raise D2MergeError(f"lora_bias: module '{module}' has no bias in the base, so lora_B.bias has nowhere "
                           "to merge (PEFT refuses to merge it too)", path=adapter.weights_file,
                           tensor=entry.keys[LORA_BIAS], hint="serve this adapter unmerged with PEFT")
    return bias_name


def _replacements(adapter: Adapter, names: BaseNames) -> dict[str, str]:
    """The base tensors the adapter replaces whole (modules_to_save, base_layer): output name -> adapter key."""
    replacements: dict[str, str] = {}
    for target, key in adapter.replacements.items():
        source = names.source_of(target, "replaced module", key, adapter.weights_file)
        if tuple(adapter.tensors.info(key)[1]) != tuple(names.infos[source][1]):
            raise D2MergeError(f"replacement shape {list(adapter.tensors.info(key)[1])} does not match the base's "
                               f"{list(names.infos[source][1])}", path=adapter.weights_file, tensor=key,
                               hint="was the adapter trained on another base model?")
        if source != target and not names.is_tied_head(target):
            target = source  # renamed on load: the checkpoint's name
        replacements[target] = key
    return replacements


def _quantization_notes(base: BaseCheckpoint, adapter: Adapter, out_dtype_name: str) -> list[str]:
    """What the plan says about a quantized base, or about an adapter trained on one merged into a plain base."""
    notes = []
    trained_on = adapter.config.raw.get("base_model_name_or_path")
    if base.quantization is None and names_quantized_repo(trained_on if isinstance(trained_on, str) else None):
        notes.append(f"warning: the adapter was trained on {trained_on}, a quantized base, but this base is not "
                     "quantized: the merge is exact for a model nobody trained; pass the quantized base, or "
                     "measure the difference with `d2merge verify QBASE ADAPTER MERGED --original-base BASE` "
                     "(docs/qlora.md)")
    if base.quantization is not None:
        notes.append(f"base quantized with {base.quantization.method}: its weights are dequantized as the "
                     f"training runtime computed them; output dtype {out_dtype_name} (--dtype overrides)")
    return notes


def _tensor_plans(outputs: list[str], names: BaseNames, merges: Merges, replacements: dict[str, str],
                  target_dtype: torch.dtype | None, adapter: Adapter) -> list[TensorPlan]:
    """One entry per output tensor, in ``outputs``' order: copied, merged or replaced, and its dtypes."""
    plans: list[TensorPlan] = []
    for name in outputs:
        source = names.tied[0] if names.is_tied_head(name) else name
        in_dtype, shape = names.infos[source]
        out_dtype = target_dtype if (target_dtype is not None and in_dtype.is_floating_point) else in_dtype
        if name in replacements and name in merges:
            # An embedding's ``base_layer`` weight (save_embedding_layers) replaces the base's
            # tensor before the merge; the adapter's factors still apply on top of it.
            key, (_, settings) = replacements[name], merges[name]
            plans.append(TensorPlan(name, key, "merge", tuple(shape), adapter.tensors.info(key)[0], out_dtype,
                                    module=settings.module, settings=settings, base_from_adapter=True))
        elif name in replacements:
            key = replacements[name]
            rep_dtype = adapter.tensors.info(key)[0]
            plans.append(TensorPlan(name, key, "replace", tuple(shape), rep_dtype,
                                    out_dtype if target_dtype is not None else in_dtype))
        elif name in merges:
            src, settings = merges[name]
            plans.append(TensorPlan(name, src, "merge", tuple(shape), in_dtype, out_dtype, module=settings.module,
                                    settings=settings))
        else:
            plans.append(TensorPlan(name, source, "copy", tuple(shape), in_dtype, out_dtype))
    return plans


def _auto_label(plans: list[TensorPlan]) -> str:
    floats = {DTYPE_NAMES[t.out_dtype] for t in plans if t.out_dtype.is_floating_point}
    return "auto (" + ", ".join(sorted(floats)).lower() + ")"

