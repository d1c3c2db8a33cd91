"""The adapter's entries that are not a plain factor pair on a 2-D weight, and the layer's orientation.

- ``target_parameters`` (PEFT's ParamWrapper): a parameter of the model as transformers builds it,
  which the checkpoint may store in pieces (per expert, fused on load);
- trainable tokens: rows of an embedding, their indices from adapter_config.json;
- ``fan_in_fan_out``: whether a layer stores its weight (in, out) like GPT-2's Conv1D.

Each is checked against the base's headers here, before any byte is read.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter
from d2merge.io.model_structure import is_listed, meta_model
from d2merge.methods import ModuleSettings, target_parameters, trainable_tokens
from d2merge.methods.base import PARAMETER, TOKENS
from d2merge.planning.base_names import BaseNames

CONV1D_MODEL_TYPES = {"gpt2"}
CONV1D_LAYERS = {"c_attn", "c_proj", "c_fc"}


def parameter_targets(adapter: Adapter, config: dict[str, Any]) -> dict[str, target_parameters.Target]:
    """The adapter's ``target_parameters`` resolved on the base as transformers builds it (module path -> target)."""
    names = adapter.config.raw.get("target_parameters") or []
    if not names:
        return {}
    model = meta_model(config)
    source = adapter.path / "adapter_config.json"
    if model is None:
        raise D2MergeError(f"target_parameters {names!r}: transformers cannot build this base from its config.json, "
                           "so the parameters these names match are unknown", path=source,
                           hint="merge with PEFT's merge_and_unload")
    try:
        targets = target_parameters.resolve(model, names)
    except D2MergeError as exc:
        raise D2MergeError(exc.reason, path=source, hint=exc.hint) from None
    if not targets:
        raise D2MergeError(f"target_parameters {names!r} match no parameter of the base model", path=source,
                           hint="was the adapter trained on another base model?")
    return targets


def parameter_merges(adapter: Adapter, module: str, target: target_parameters.Target,
                     base_names: BaseNames) -> list[tuple[str, ModuleSettings]]:
    """(stored tensor, settings) for each tensor of the checkpoint that holds part of a targeted parameter."""
    entry = adapter.modules[module]
    method = adapter.method
    first_key = next(iter(entry.keys.values()))
    target_parameters.check_supported(adapter.config.raw, target, str(adapter.path / "adapter_config.json"))
    names = method.tensor_names(PARAMETER)
    extra = sorted(set(entry.keys) - set(names))
    missing = [n for n in names if n not in entry.keys]
    if extra or missing:
        raise D2MergeError(f"target parameter '{target.key}' has the tensors {sorted(entry.keys)}, PEFT's "
                           f"ParamWrapper saves exactly {list(names)}", path=adapter.weights_file, tensor=first_key,
                           hint="the adapter file is incomplete, or not a PEFT target_parameters adapter")
    settings = method.module_settings(adapter.config, target.key, PARAMETER, False)
    expected = target_parameters.expected_shapes(target, settings.r)
    for name, key in entry.keys.items():
        dtype, shape = adapter.tensors.info(key)
        if tuple(shape) != expected[name]:
            raise D2MergeError(f"shape {list(shape)} does not fit the parameter '{target.key}' {list(target.shape)}"
                               f" ({target.num_experts} expert(s), r={settings.r}): expected {list(expected[name])}",
                               path=adapter.weights_file, tensor=key,
                               hint="was the adapter trained on another base model, or with another r / rank_pattern?")
        if not dtype.is_floating_point:
            raise D2MergeError(f"adapter tensor has non-float dtype {dtype}", path=adapter.weights_file, tensor=key,
                               hint="adapter factors are floating point; save the adapter again")
    pieces = base_names.layout().pieces(target)
    if isinstance(pieces, str):
        raise D2MergeError(f"target parameter '{target.key}' {list(target.shape)}: {pieces}, so d2merge cannot tell "
                           "which stored values its update changes", path=adapter.weights_file, tensor=first_key,
                           hint="merge with PEFT's merge_and_unload")
    merges = []
    for stored, piece in pieces:
        dtype, shape = base_names.infos[stored]
        if tuple(shape) != piece.shape() or not dtype.is_floating_point:
            raise D2MergeError(f"stored tensor has shape {list(shape)} ({dtype}); its part of '{target.key}' is "
                               f"{list(piece.shape())} floats", tensor=stored, hint="is the base checkpoint complete?")
        merges.append((stored, replace(settings, module=module, piece=piece)))
    return merges


def token_settings(adapter: Adapter, module: str, keys: dict[str, str], base_shape: tuple[int, ...]
                   ) -> ModuleSettings:
    """Settings of a trainable-tokens entry, its indices and delta checked against the base embedding."""
    settings = adapter.method.module_settings(adapter.config, module, TOKENS, False)
    key = keys[trainable_tokens.DELTA]
    indices = settings.options.get("token_indices")
    if indices is None:
        raise D2MergeError(f"trainable_token_indices names no indices for '{module}'", path=adapter.weights_file,
                           tensor=key, hint="the adapter config and weights do not match")
    rows, dim = base_shape
    if len(set(indices)) != len(indices) or any(not 0 <= i < rows for i in indices):
        raise D2MergeError(f"trainable_token_indices for '{module}' repeat an index or fall outside its {rows} rows",
                           path=adapter.path / "adapter_config.json", tensor=key,
                           hint="was the adapter trained on another base model (or a resized vocabulary)?")
    dtype, shape = adapter.tensors.info(key)
    if tuple(shape) != (len(indices), dim) or not dtype.is_floating_point:
        raise D2MergeError(f"trained token rows have shape {list(shape)} ({dtype}), expected "
                           f"[{len(indices)}, {dim}] floats", path=adapter.weights_file, tensor=key,
                           hint="was the adapter trained on another base model?")
    return settings


def check_orientation(module: str, fan_in_fan_out: bool, conv1d: frozenset[str] | None, config: dict[str, Any],
                      adapter: Adapter, first_key: str) -> None:
    """``fan_in_fan_out`` must match the layer: Conv1D stores (in, out), nn.Linear (out, in).

    ``conv1d`` is transformers' own answer (d2merge.io.model_structure); without it
    (an architecture transformers cannot build) GPT-2's layer names are the rule.
    """
    if conv1d is not None:
        is_conv1d = is_listed(module, conv1d)
    else:
        is_conv1d = config.get("model_type") in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_LAYERS
    if is_conv1d and not fan_in_fan_out:
        raise D2MergeError(f"module '{module}' is a Conv1D layer stored (in, out) but the adapter config has "
                           "fan_in_fan_out: false", path=adapter.path / "adapter_config.json", tensor=first_key,
                           hint="set fan_in_fan_out: true, as PEFT does for GPT-2")
    if conv1d is not None and fan_in_fan_out and not is_conv1d:
        # PEFT resets fan_in_fan_out to false for an nn.Linear; merging it transposed would be wrong
        # without a shape error whenever the weight is square.
        raise D2MergeError(f"module '{module}' is an nn.Linear stored (out, in) but the adapter config has "
                           "fan_in_fan_out: true", path=adapter.path / "adapter_config.json", tensor=first_key,
                           hint="set fan_in_fan_out: false (PEFT uses true only for GPT-2 style Conv1D layers)")
