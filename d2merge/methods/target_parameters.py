"""PEFT's ``target_parameters``: LoRA on an ``nn.Parameter`` itself (PEFT 0.21's ``lora.ParamWrapper``).

It is how PEFT adapts what is not an ``nn.Linear``: the fused MoE experts transformers 5
holds as one 3-D parameter per projection (``mlp.experts.gate_up_proj`` (E, out, in) in
Mixtral and Qwen3-MoE; (E, in, out) in gpt-oss, whose experts say ``is_transposed``), and
routers such as Mixtral's ``mlp.gate.weight`` (a 2-D weight of a module that is not a linear
layer). PEFT stores, for a parameter of E experts and rank r:

    lora_A  (r * E, in)     expert e's A: rows e*r .. e*r + r       (reshape (E, r, in))
    lora_B  (out, r * E)    expert e's B: columns e, e + E, ...     (reshape (out, r, E))
    dW[e] = s * B_e @ A_e   (out, in); transposed to (in, out) where the parameter is stored so

and ``merge_and_unload`` adds dW to the parameter. A 2-D parameter is plain LoRA
(``dW = s * B @ A``). Several parameters of one module are nested wrappers: PEFT walks
the module's parameters in definition order and wraps each matched one around the
previous wrapper, so with n of them the k-th (0-based) is saved under
``<module>`` + ``.base_layer`` * (n - 1 - k) (Mixtral: ``experts.base_layer.lora_A`` is
``gate_up_proj``, ``experts.lora_A`` is ``down_proj``). :func:`resolve` follows that rule on
the model transformers builds, so the key of each factor names its parameter exactly.

The checkpoint may store a fused parameter differently (Mixtral's per-expert w1/w3/w2);
the planner maps it through transformers' own conversion table (d2merge.io.checkpoint_layout)
and each stored tensor gets its :class:`Piece` of the parameter's dW. The unmerged
forward (:class:`ParameterLoRA`) runs the module with W + dW, as PEFT's parametrisation does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from d2merge.errors import D2MergeError

BASE_LAYER = ".base_layer"


@dataclass(frozen=True)
class Target:
    """One targeted parameter of the model: where it is, its in-memory shape, how PEFT orients it."""

    module: str  # the module holding the parameter ("model.layers.0.mlp.experts")
    parameter: str  # "gate_up_proj"
    shape: tuple[int, ...]
    # 3-D only: the experts module says ``is_transposed`` (gpt-oss): the parameter is (E, in, out).
    in_out: bool = False

    @property
    def key(self) -> str:
        """PEFT's name for it (what rank_pattern / alpha_pattern match)."""
        return f"{self.module}.{self.parameter}"

    @property
    def num_experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def out_in(self) -> tuple[int, int]:
        """(out, in) of one expert's matrix, as PEFT's factors see it."""
        if len(self.shape) == 2:
            return self.shape[0], self.shape[1]
        _, first, second = self.shape
        return (second, first) if self.in_out else (first, second)


@dataclass(frozen=True)
class Piece:
    """The part of a target's dW one stored tensor holds.

    ``expert`` None: the stored tensor is the whole parameter (its in-memory layout).
    Otherwise the tensor is expert ``expert``'s matrix (in the parameter's own per-expert
    orientation) restricted to ``start:stop`` along ``dim`` (0 or 1); None bounds take it all.
    """

    target: Target
    expert: int | None = None
    dim: int = 0
    start: int | None = None
    stop: int | None = None

    def shape(self) -> tuple[int, ...]:
        if self.expert is None:
            return self.target.shape
        matrix = list(self.target.shape[1:])
        start = 0 if self.start is None else self.start
        stop = matrix[self.dim] if self.stop is None else self.stop
        matrix[self.dim] = stop - start
        return tuple(matrix)


def _matches(key: str, names: Iterable[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def resolve(model: nn.Module, target_parameters: Iterable[str]) -> dict[str, Target]:
    """PEFT's injection on ``model``: the adapter's module path of each targeted parameter -> the parameter.

    The model is the base as transformers holds it (real, or built on the meta device).
    """
    names = sorted(set(target_parameters))
    found: dict[str, Target] = {}
    for module_name, module in model.named_modules():
        if not module_name:
            continue
        matched = [(p, tuple(param.shape)) for p, param in module.named_parameters(recurse=False)
                   if _matches(f"{module_name}.{p}", names)]
        for k, (parameter, shape) in enumerate(matched):
            if len(shape) not in (2, 3):
                raise D2MergeError(f"target_parameters: '{module_name}.{parameter}' has {len(shape)} dimensions; "
                                   "PEFT adapts only 2-D and 3-D parameters", hint="check target_parameters")
            path = module_name + BASE_LAYER * (len(matched) - 1 - k)
            found[path] = Target(module_name, parameter, shape, bool(getattr(module, "is_transposed", False)))
    return found


def expected_shapes(target: Target, r: int) -> dict[str, tuple[int, int]]:
    out_features, in_features = target.out_in
    return {"lora_A": (r * target.num_experts, in_features), "lora_B": (out_features, r * target.num_experts)}


def check_supported(raw: Mapping[str, Any], target: Target, source: str) -> None:
    """Refuse what PEFT's ParamWrapper refuses too (so no such adapter can exist) or d2merge cannot rebuild."""
    for name, value, what in (("use_dora", raw.get("use_dora"), "DoRA"), ("lora_bias", raw.get("lora_bias"), "lora_bias"),
                              ("fan_in_fan_out", raw.get("fan_in_fan_out"), "fan_in_fan_out")):
        if value:
            raise D2MergeError(f"target_parameters '{target.key}' with {name}: PEFT's ParamWrapper does not "
                               f"support {what}, so no PEFT merge exists to reproduce", path=source,
                               hint="train the adapter without it")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init not in ("gaussian", "orthogonal", "eva"):
        raise D2MergeError(f"target_parameters '{target.key}' with init_lora_weights {init!r}: the base PEFT "
                           "rebuilds for it from a parameter is not one d2merge reproduces", path=source,
                           hint="merge with PEFT's merge_and_unload")


def delta(factors: Mapping[str, torch.Tensor], target: Target, scale: float, expert: int | None = None
          ) -> torch.Tensor:
    """PEFT's dW for the whole parameter (its in-memory shape), or for one expert's matrix."""
    a, b = factors["lora_A"], factors["lora_B"]
    if len(target.shape) == 2:
        return scale * (b @ a)
    experts = target.num_experts
    a3 = a.reshape(experts, -1, a.shape[-1])  # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, experts)  # (out, r, E)
    if expert is not None:
        d = scale * (b3[:, :, expert] @ a3[expert])  # (out, in)
        return d.T if target.in_out else d
    d = torch.einsum("ore,eri->eoi", b3, a3) * scale
    return d.transpose(1, 2) if target.in_out else d


def piece_delta(factors: Mapping[str, torch.Tensor], piece: Piece, scale: float) -> torch.Tensor:
    """dW restricted to what one stored tensor holds, in that tensor's shape."""
    if piece.expert is None:
        return delta(factors, piece.target, scale)
    d = delta(factors, piece.target, scale, piece.expert)
    return d.narrow(piece.dim, piece.start or 0, piece.shape()[piece.dim])


class ParameterLoRA(nn.Module):
    """The unmerged forward of PEFT's ParamWrapper: the wrapped module run with each parameter W + dW.

    One wrapper holds every targeted parameter of a module (PEFT nests one wrapper per
    parameter; the sum is the same). The module's own forward runs unchanged through
    ``torch.func.functional_call``, so any experts implementation sees the adapted weights.
    """

    def __init__(self, base_layer: nn.Module, adapted: Mapping[str, tuple[Target, Mapping[str, torch.Tensor], float]]):
        super().__init__()
        self.base_layer = base_layer
        self.targets = {name: target for name, (target, _, _) in adapted.items()}
        self.scales = {name: scale for name, (_, _, scale) in adapted.items()}
        reference = next(iter(base_layer.parameters()))
        self.factors = nn.ModuleDict({
            name: nn.ParameterDict({k: nn.Parameter(t.detach().to(reference.device, reference.dtype).clone(),
                                                    requires_grad=False) for k, t in factors.items()})
            for name, (_, factors, _) in adapted.items()})
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weights = {name: getattr(self.base_layer, name) + delta(dict(self.factors[name].items()), target,
                                                                 self.scales[name]).to(getattr(self.base_layer, name).dtype)
                   for name, target in self.targets.items()}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # the model reads attributes of the wrapped module (a router's top_k, experts' num_experts)
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {t.shape}" for n, t in self.targets.items())
