"""Unmerged adapters inside transformers models: for verification, training and saving.

``load_unmerged`` puts an adapter's runtime modules into a base model (the forward
the adapter was trained with); ``attach`` adds fresh trainable adapters;
``save_adapter`` writes them back in PEFT's layout for the loaders to read.
"""

from __future__ import annotations

import copy
import gc
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, load_adapter, write_adapter
from d2merge.io.transformers_folder import quiet_transformers  # noqa: F401  (its home is io; callers import it here too)
from d2merge.methods import EMBEDDING, LINEAR, AdapterConfig, parse_adapter_config
from d2merge.methods.base import TOKENS
from d2merge.methods.runtime import AdapterLayer


_FROZEN = {"depth": 0}
_FROZEN_LOCK = threading.Lock()


@contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """Inside, ``gc.collect()`` walks only objects made inside: those alive on entry are frozen.

    Why: verify and bench collect after each model so that at most one is resident, and a full
    collection walks every object of the process (about 370k once torch and transformers are
    imported: 0.2 s each, 14 s of a 36 s run of tests/test_verify.py's correct-merge cases),
    yet the cycles to free (a model, its adapter layers) are all younger than the call.
    Nested uses (verify inside merge --verify) freeze once and thaw at the outermost exit;
    cycles among the frozen objects wait for that exit. Usable as a decorator.
    """
    with _FROZEN_LOCK:
        if _FROZEN["depth"] == 0:
            gc.freeze()
        _FROZEN["depth"] += 1
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            _FROZEN["depth"] -= 1
            if _FROZEN["depth"] == 0:
                gc.unfreeze()


def load_base_model(base: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A transformers causal LM from a local folder (or cached Hub id), in eval mode."""
    from d2merge.io.checkpoint import open_base, resolve_location
    from d2merge.io.quantized import quantization_config
    from d2merge.io.json_file import read_json
    from d2merge.io.transformers_folder import load_dequantized_model, load_model

    location = resolve_location(base)
    if not (location / "config.json").exists():
        raise D2MergeError("a transformers model folder (with config.json) is needed here", path=location)
    config = read_json(location / "config.json", "config.json")
    if isinstance(config, dict) and quantization_config(config) is not None:
        # the model the adapter was trained on: the dequantized weights, never bitsandbytes' layers
        return load_dequantized_model(open_base(location), dtype=dtype).to(device).eval()
    try:
        # safetensors only: a pytorch_model.bin is pickle, which d2merge never loads without --allow-pickle
        model = load_model(location, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise D2MergeError(f"transformers cannot load the model: {' '.join(str(exc).split())[:300]}",
                           path=location, hint="d2merge reads safetensors weights; convert pickle "
                                               "(pytorch_model.bin) weights to safetensors") from None
    return model.to(device).eval()


def load_fp32_model(location: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """A transformers model from ``location`` with every weight upcast to fp32, at one model's memory.

    Asking transformers for fp32 from a 16-bit file converts from a memory map that stays
    mapped until the whole file is loaded: 1.5x the fp32 model at the peak. Loading in the
    stored dtype instead maps the file without reading it; each weight is then read afresh
    and upcast one at a time, so the mapped pages are never touched. verify runs every model
    this way, so a column measures what storing in a dtype costs, not low-precision arithmetic.
    """
    from d2merge.dtypes import FLOAT_DTYPES
    from d2merge.io.checkpoint import open_base

    checkpoint = open_base(location, allow_pickle=allow_pickle)
    names = checkpoint.tensors.keys()
    floats = [checkpoint.tensors.info(n)[0] for n in names if checkpoint.tensors.info(n)[0].is_floating_point]
    stored = max(set(floats), key=floats.count) if floats else torch.float32
    if stored not in {d.torch_dtype for d in FLOAT_DTYPES.values()}:
        stored = torch.float32
    model = load_base_model(checkpoint.location, dtype=stored)
    known = set(names)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # fp32 weights are read afresh too: transformers leaves them as views of its memory
            # map, at the file's offsets, and a matrix-vector product (the last position's
            # logits) sums in another order on memory not aligned to 64 bytes; fresh memory
            # is aligned, as the block-streamed models' (verify.streamed), which then agree bit for bit.
            if param.is_floating_point() and name in known:
                param.data = checkpoint.tensors.read(name).to(torch.float32)
            elif param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    model.float()
    return model


def _layer_kind(layer: nn.Module) -> str:
    return EMBEDDING if isinstance(layer, nn.Embedding) else LINEAR


def _is_conv1d(layer: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
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
                                                                           or _is_conv1d(layer))):
                raise D2MergeError(f"module '{module_name}' ({type(layer).__name__}, {kind}) has no unmerged forward "
                                   "in a weighted sum of several adapters", path=adapter.weights_file,
                                   hint="verify that adapter alone")
            settings = adapter.method.module_settings(adapter.config, module_name, kind,
                                                      adapter.config.fan_in_fan_out if kind == LINEAR else False)
            # A PiSSA/OLoRA part rewrites its base layer's weight as the residual: it gets its own copy,
            # so the shared base (the other parts' W0, and the base(x) subtracted) stays W0.
            own = copy.deepcopy(layer) if settings.base_init is not None else layer
            parts.append((weight, adapter.method.runtime_module(own, adapter.factors(module_name), settings)))
        _set_submodule(model, module_name, WeightedChange(layer, parts))
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
        if kind == LINEAR and not (isinstance(layer, nn.Linear) or _is_conv1d(layer)):
            raise D2MergeError(f"module '{module_name}' is a {type(layer).__name__}, not a linear layer, so its "
                               "unmerged forward is not base(x) + B(A(x))", path=adapter.weights_file,
                               hint="merge with PEFT's merge_and_unload")
        settings = method.module_settings(config, module_name, kind,
                                          config.fan_in_fan_out if kind == LINEAR else False)
        if kind == TOKENS:
            _attach_trainable_tokens(model, module_name, layer, adapter.factors(module_name), settings)
            continue
        runtime = method.runtime_module(layer, adapter.factors(module_name), settings, dropout=dropout)
        _set_submodule(model, module_name, runtime)
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
        _set_submodule(model, module_name, ParameterLoRA(model.get_submodule(module_name), adapted))
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
            and not _is_conv1d(layer))


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
    _set_submodule(model, module_name, ParameterLoRA(layer, [("weight", Contribution(target, settings.scale), factors)]))


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
    _set_submodule(model, module_name, tokens)
    for name, module in list(model.named_modules()):
        if module is not layer and isinstance(module, nn.Linear) and module.weight is layer.weight:
            _set_submodule(model, name, TrainableTokensLayer(module, tokens.delta, settings.options["token_indices"]))


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
        kind = _layer_kind(layer)
        # GPT-2's Conv1D stores (in, out): PEFT switches fan_in_fan_out on for it, and so do we.
        fan_in_fan_out = config.fan_in_fan_out or (kind == LINEAR and _is_conv1d(layer))
        settings = method.module_settings(config, name, kind, fan_in_fan_out)
        _set_submodule(model, name, method.runtime_module(layer, None, settings, dropout=dropout))
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

