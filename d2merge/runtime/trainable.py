"""Fresh trainable adapters in a transformers model, and their saving in PEFT's layout.

``attach`` adds adapters whose B starts at zero (the model's output is unchanged until
training moves it) to every layer ``target_modules`` matches, as PEFT matches them;
``save_adapter`` writes them back as a folder the loaders read (train, the Trainer example).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from d2merge.errors import D2MergeError
from d2merge.io.adapter import write_adapter
from d2merge.methods import LINEAR, AdapterConfig, parse_adapter_config
from d2merge.methods.adapter_layer import AdapterLayer
from d2merge.runtime.attaching import is_conv1d, layer_kind, set_submodule


def _targets(model: nn.Module, config: AdapterConfig) -> Iterator[tuple[str, nn.Module]]:
    """Modules matched by ``target_modules`` / ``exclude_modules`` as PEFT matches them (methods.matching)."""
    from d2merge.methods.matching import is_target

    exclude = config.raw.get("exclude_modules")
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterLayer) or not hasattr(module, "weight"):
            continue
        matched = is_target(config.target_modules, name, exclude)
        if matched and getattr(module, "weight", None) is not None and module.weight.ndim == 2:
            yield name, module


def attach(model: nn.Module, config: AdapterConfig | Mapping[str, Any], *, dropout: float = 0.0,
           seed: int | None = 0) -> nn.Module:
    """Add fresh trainable adapters (B zero, A random) to every target layer; the base stays frozen.

    Because every B starts at zero, the model's output is unchanged until training moves it.
    """
    if not isinstance(config, AdapterConfig):
        config = parse_adapter_config(config)
    from d2merge.methods import get_method

    method = get_method(config.method)
    if config.raw.get("target_parameters"):
        raise D2MergeError("target_parameters: d2merge trains adapters on target_modules only",
                           hint="train target_parameters (MoE expert) adapters with PEFT; d2merge merges them")
    if seed is not None:
        torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    found = list(_targets(model, config))
    if not found:
        raise D2MergeError(f"no module of the model matches target_modules {config.target_modules!r}")
    for name, layer in found:
        kind = layer_kind(layer)
        # GPT-2's Conv1D stores (in, out): PEFT switches fan_in_fan_out on for it, and so do we.
        fan_in_fan_out = config.fan_in_fan_out or (kind == LINEAR and is_conv1d(layer))
        settings = method.module_settings(config, name, kind, fan_in_fan_out)
        set_submodule(model, name, method.runtime_module(layer, None, settings, dropout=dropout))
    model.d2merge_config = config  # type: ignore[attr-defined]
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (what ``adapter_model.safetensors`` holds)."""
    from d2merge.methods import get_method

    config: AdapterConfig = model.d2merge_config  # type: ignore[attr-defined]
    method = get_method(config.method)
    state = {}
    for name, layer in adapter_layers(model):
        for tensor_name, param in layer.factors.items():
            state[method.stored_key(name, tensor_name, layer.settings.layer_kind)] = param.detach().float().cpu()
    return state


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write the model's adapters as a PEFT-layout folder that :func:`load_adapter` reads back."""
    config: AdapterConfig | None = getattr(model, "d2merge_config", None)
    if config is None:
        raise D2MergeError("this model has no adapter attached by d2merge.attach()")
    raw = dict(config.raw)
    fan_in_fan_out = any(layer.settings.fan_in_fan_out for _, layer in adapter_layers(model)
                         if layer.settings.layer_kind == LINEAR)
    if fan_in_fan_out:
        raw["fan_in_fan_out"] = True
    return write_adapter(folder, raw, adapter_state(model))
