"""A stored adapter put into a loaded model: the unmerged forward the adapter was trained with.

``attach_adapter`` replaces every adapted layer by its method's runtime module (or PEFT's
parameter wrapper, trainable token rows, a replaced tensor); ``load_unmerged`` is loading plus
attaching. verify's unmerged column and the PEFT oracles run what this builds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.methods import EMBEDDING, LINEAR
from d2merge.methods.base import TOKENS
from d2merge.runtime.loading import load_base_model


def layer_kind(layer: nn.Module) -> str:
    return EMBEDDING if isinstance(layer, nn.Embedding) else LINEAR


def is_conv1d(layer: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass(frozen=True)
class WeightedAdapters:
    """Several adapters attached at once, each one's change weighted (verify's reference for a merge of several).

    Each adapted layer computes ``base(x) + sum_i w_i * (adapter_i(x) - base(x))``, where
    ``adapter_i(x)`` is adapter i's own unmerged forward around the same base layer: the runtime
    twin of the merge's weighted sum ``W0 + sum_i w_i (M_i(W0) - W0)`` (adapter_ops/mix.py).
    """

    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]

    @property
    def modules(self) -> dict[str, Any]:
        """Every module any of the adapters adapts."""
        return {m: e for a in reversed(self.adapters) for m, e in a.modules.items()}

    @property
    def replacements(self) -> dict[str, str]:
        return {t: k for a in reversed(self.adapters) for t, k in a.replacements.items()}


def restricted(adapter: Adapter | WeightedAdapters, keep: Callable[[str], bool]) -> Adapter | WeightedAdapters:
    """The adapter (or each adapter of several) with only the modules and replacements ``keep`` accepts."""
    if isinstance(adapter, WeightedAdapters):
        return WeightedAdapters(tuple(restricted(a, keep) for a in adapter.adapters),  # type: ignore[misc]
                                adapter.weights)
    return replace(adapter, modules={k: v for k, v in adapter.modules.items() if keep(k)},
                   replacements={k: v for k, v in adapter.replacements.items() if keep(k)})


class WeightedChange(nn.Module):
    """One layer under several adapters: ``base(x) + sum_i w_i * (adapter_i(x) - base(x))``."""

    def __init__(self, base_layer: nn.Module, parts: list[tuple[float, nn.Module]]):
        super().__init__()
        self.base_layer = base_layer
        self.parts = nn.ModuleList(m for _, m in parts)
        self.weights = [w for w, _ in parts]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer(x, *args, **kwargs)
        out = base.clone()
        for weight, part in zip(self.weights, self.parts):
            out.add_(part(x, *args, **kwargs) - base, alpha=weight)
        return out


def _attach_weighted(model: nn.Module, several: WeightedAdapters) -> nn.Module:
    """Every module any adapter adapts becomes a :class:`WeightedChange` of their runtime modules."""
    for adapter in several.adapters:
        if adapter.replacements or adapter.config.raw.get("target_parameters"):
            raise D2MergeError("the adapter replaces whole tensors or targets parameters, which a weighted sum of "
                               "several adapters cannot run", path=adapter.weights_file,
                               hint="verify that adapter alone")
    for module_name in several.modules:
        layer = model.get_submodule(module_name)
        parts = []
        for adapter, weight in zip(several.adapters, several.weights):
            entry = adapter.modules.get(module_name)
            if entry is None:
                continue
            kind = entry.layer_kind
            if kind not in (LINEAR, EMBEDDING) or (kind == LINEAR and not (isinstance(layer, nn.Linear)
                                                                           or is_conv1d(layer))):
                raise D2MergeError(f"module '{module_name}' ({type(layer).__name__}, {kind}) has no unmerged forward "
                                   "in a weighted sum of several adapters", path=adapter.weights_file,
                                   hint="verify that adapter alone")
            settings = adapter.method.module_settings(adapter.config, module_name, kind,
                                                      adapter.config.fan_in_fan_out if kind == LINEAR else False)
            # A PiSSA/OLoRA part rewrites its base layer's weight as the residual: it gets its own copy,
            # so the shared base (the other parts' W0, and the base(x) subtracted) stays W0.
            own = copy.deepcopy(layer) if settings.base_init is not None else layer
            parts.append((weight, adapter.method.runtime_module(own, adapter.factors(module_name), settings)))
        set_submodule(model, module_name, WeightedChange(layer, parts))
    return model


def attach_adapter(model: nn.Module, adapter: Adapter | WeightedAdapters | str | Path, *, dropout: float = 0.0,
                   allow_pickle: bool = False) -> nn.Module:
    """Replace every adapted layer of ``model`` by the method's runtime module, with the stored factors."""
    if isinstance(adapter, WeightedAdapters):
        return _attach_weighted(model, adapter)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    method, config = adapter.method, adapter.config
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for target, key in adapter.replacements.items():
            if target not in params:
                raise D2MergeError("replacement target is not a parameter of the model",
                                   path=adapter.weights_file, tensor=key)
            old = params[target]
            # A new Parameter, not an in-place copy: a tied lm_head and embedding share one
            # Parameter, and PEFT's modules_to_save replaces only the module it names (as the
            # merge's --tied-embeddings untie does), so the tie is broken here too.
            owner_name, _, attr = target.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            new = adapter.tensors.read(key).to(device=old.device, dtype=old.dtype).clone()
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
            if any(p is old for name, p in params.items() if name != target):
                _untie_in_config(model)
    targets = _attach_parameter_targets(model, adapter)
    for module_name in adapter.modules:
        if module_name in targets:
            continue
        try:
            layer = model.get_submodule(module_name)
        except AttributeError:
            raise D2MergeError(f"module '{module_name}' is not in the model", path=adapter.weights_file,
                               hint="was the adapter trained on another base model?") from None
        kind = adapter.modules[module_name].layer_kind
        if kind == LINEAR and _is_parameter_only(layer) and method.name == "lora" \
                and set(adapter.modules[module_name].keys) == {"lora_A", "lora_B"}:
            _attach_weight_parameter(model, module_name, layer, adapter)
            continue
        if kind == LINEAR and not (isinstance(layer, nn.Linear) or is_conv1d(layer)):
            raise D2MergeError(f"module '{module_name}' is a {type(layer).__name__}, not a linear layer, so its "
                               "unmerged forward is not base(x) + B(A(x))", path=adapter.weights_file,
                               hint="merge with PEFT's merge_and_unload")
        settings = method.module_settings(config, module_name, kind,
                                          config.fan_in_fan_out if kind == LINEAR else False)
        if kind == TOKENS:
            _attach_trainable_tokens(model, module_name, layer, adapter.factors(module_name), settings)
            continue
        runtime = method.runtime_module(layer, adapter.factors(module_name), settings, dropout=dropout)
        set_submodule(model, module_name, runtime)
    return model


def _attach_parameter_targets(model: nn.Module, adapter: Adapter) -> set[str]:
    """PEFT's ParamWrapper forward for each module whose parameters the adapter changes; the modules it handled.

    Two kinds of adapter module land here: ``target_parameters`` factors, resolved on this
    model as PEFT resolves them (methods/target_parameters.py), and plain LoRA modules named
    as the checkpoint stores them but renamed or fused by transformers on load (Mixtral's
    ``block_sparse_moe.experts.N.w1``, from adapters trained with transformers 4), which
    are pieces of a fused parameter (io/checkpoint_layout.py), as the merge maps them.
    Every factor is checked against its parameter's shape, as the merge checks it.
    """
    from d2merge.methods.base import PARAMETER
    from d2merge.methods.target_parameters import (Contribution, ParameterLoRA, Target, check_supported,
                                                   expected_shapes, resolve)

    method, source = adapter.method, str(adapter.path / "adapter_config.json")
    names = adapter.config.raw.get("target_parameters") or []
    targets = {path: t for path, t in resolve(model, names).items() if path in adapter.modules} if names else {}
    grouped: dict[str, list[Any]] = {}
    for path, target in targets.items():
        check_supported(adapter.config.raw, target, source)
        settings = method.module_settings(adapter.config, target.key, PARAMETER, False)
        factors = adapter.factors(path)
        expected = expected_shapes(target, settings.r)
        if set(factors) != set(method.tensor_names(PARAMETER)) or any(
                tuple(factors[n].shape) != expected[n] for n in expected):
            raise D2MergeError(f"the factors of target parameter '{target.key}' {list(target.shape)} have shapes "
                               f"{ {n: list(t.shape) for n, t in factors.items()} }, expected "
                               f"{ {n: list(v) for n, v in expected.items()} }", path=adapter.weights_file,
                               hint="was the adapter trained on another base model?")
        grouped.setdefault(target.module, []).append((target.parameter, Contribution(target, settings.scale), factors))
    handled = set(targets)
    stored = [m for m in adapter.modules if m not in targets and not _has_submodule(model, m)]
    if stored:
        from d2merge.io.checkpoint_layout import CheckpointLayout, stored_tensors_of

        layout = CheckpointLayout(model, stored_tensors_of(model))

        def target_of(memory: str) -> Target:
            module_name, _, parameter = memory.rpartition(".")
            module = model.get_submodule(module_name)
            return Target(module_name, parameter, tuple(getattr(module, parameter).shape),
                          bool(getattr(module, "is_transposed", False)))

        for module_name in stored:
            entry = adapter.modules[module_name]
            located = layout.locate(f"{module_name}.weight", target_of)
            if located is None:
                continue  # not a stored name transformers changes: the caller refuses it
            key = next(iter(entry.keys.values()))
            if isinstance(located, str):
                raise D2MergeError(f"module '{module_name}': {located}", path=adapter.weights_file, tensor=key,
                                   hint="merge with PEFT's merge_and_unload")
            if method.name != "lora" or entry.layer_kind != LINEAR or set(entry.keys) != {"lora_A", "lora_B"}:
                raise D2MergeError(f"module '{module_name}' is stored under this name but transformers holds it "
                                   f"as part of '{located[0].key}'; only plain LoRA factors are run there",
                                   path=adapter.weights_file, tensor=key, hint="merge with PEFT's merge_and_unload")
            target, piece = located
            settings = method.module_settings(adapter.config, module_name, LINEAR, False)
            factors = adapter.factors(module_name)
            if (factors["lora_B"].shape[0], factors["lora_A"].shape[1]) != piece.shape():
                raise D2MergeError(f"the factors of '{module_name}' do not fit its stored shape {list(piece.shape())}",
                                   path=adapter.weights_file, tensor=key,
                                   hint="was the adapter trained on another base model?")
            grouped.setdefault(target.module, []).append(
                (target.parameter, Contribution(target, settings.scale, piece), factors))
            handled.add(module_name)
    for module_name, adapted in grouped.items():
        set_submodule(model, module_name, ParameterLoRA(model.get_submodule(module_name), adapted))
    return handled


def _is_parameter_only(layer: nn.Module) -> bool:
    """A module PEFT has no LoRA layer for but whose 2-D ``weight`` it adapts as a parameter (a MoE router).

    PEFT builds LoRA layers for linear, embedding, convolution and attention modules; LoRA
    factors on any other module come from its ParamWrapper (PEFT 0.21 turns a router
    target ``gate`` into ``gate.weight``), whose forward is the module run with W + dW.
    """
    weight = getattr(layer, "weight", None)
    supported = (nn.Linear, nn.Embedding, nn.MultiheadAttention, nn.modules.conv._ConvNd)
    return (isinstance(weight, nn.Parameter) and weight.ndim == 2 and not isinstance(layer, supported)
            and not is_conv1d(layer))


def _attach_weight_parameter(model: nn.Module, module_name: str, layer: nn.Module, adapter: Adapter) -> None:
    from d2merge.methods.base import PARAMETER
    from d2merge.methods.target_parameters import Contribution, ParameterLoRA, Target, expected_shapes

    target = Target(module_name, "weight", tuple(layer.weight.shape))
    settings = adapter.method.module_settings(adapter.config, module_name, PARAMETER, False)
    factors = adapter.factors(module_name)
    expected = expected_shapes(target, settings.r)
    if any(tuple(factors[n].shape) != expected[n] for n in expected):
        raise D2MergeError(f"the factors of '{module_name}' do not fit its weight {list(target.shape)}",
                           path=adapter.weights_file, hint="was the adapter trained on another base model?")
    set_submodule(model, module_name, ParameterLoRA(layer, [("weight", Contribution(target, settings.scale), factors)]))


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _attach_trainable_tokens(model: nn.Module, module_name: str, layer: nn.Module,
                             factors: Mapping[str, torch.Tensor], settings: Any) -> None:
    """The embedding with its trained rows; a tied ``lm_head`` shares them, as in PEFT."""
    from d2merge.methods.trainable_tokens import DELTA, TrainableTokensLayer

    tokens = TrainableTokensLayer(layer, factors[DELTA], settings.options["token_indices"])
    set_submodule(model, module_name, tokens)
    for name, module in list(model.named_modules()):
        if module is not layer and isinstance(module, nn.Linear) and module.weight is layer.weight:
            set_submodule(model, name, TrainableTokensLayer(module, tokens.delta, settings.options["token_indices"]))


def _untie_in_config(model: nn.Module) -> None:
    """Record that the embeddings are no longer tied, so transformers does not tie them again."""
    config = getattr(model, "config", None)
    if config is None:
        return
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in {id(config): config, id(text_config): text_config}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


def load_unmerged(base: str | Path, adapter: Adapter | str | Path, *, dtype: torch.dtype = torch.float32,
                  device: str = "cpu", allow_pickle: bool = False) -> nn.Module:
    """Base model + adapter computing the unmerged forward (eval mode)."""
    model = load_base_model(base, dtype=dtype, device=device)
    attach_adapter(model, adapter, allow_pickle=allow_pickle)
    return model.to(device).eval()
