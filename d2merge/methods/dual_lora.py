"""Dual LoRA: a magnitude group and a direction group combined elementwise.

    dW = lora_alpha / sqrt(r_mag * r_dir) * relu(B_mag @ A_mag) * sign(B_dir @ A_dir)

``sign`` here is +1 for x > 0 and -1 otherwise (sign(0) == -1), unlike
``torch.sign``. The merge is discontinuous at zero, so reports count the
direction entries close enough to zero that rounding could flip them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from d2merge.errors import D2MergeError
from d2merge.methods.base import Method, ModuleSettings, _number
from d2merge.methods.adapter_layer import AdapterLayer

# Direction entries with |B_dir @ A_dir| below this many fp32 ulps of the product's
# scale may flip sign between dtypes or matmul orders.
FLIP_MARGIN_ULPS = 64
# Warm-up: B_mag starts uniform in [0, B_MAG_INIT) and dW is scaled by a factor ramping
# 0 -> 1 over the first warm-up steps (folded into B_mag before saving).
B_MAG_INIT = 1e-3


def dual_sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x > 0, -1 elsewhere (zero included)."""
    return torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))


class _SignSTE(torch.autograd.Function):
    """sign forward; straight-through backward with the gradient clipped to |x| <= 1 (hardtanh)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return dual_sign(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class DualLoRA(Method):
    name = "dual_lora"
    peft_type = "DUAL_LORA"
    linear_tensors = ("lora_A_mag", "lora_B_mag", "lora_A_dir", "lora_B_dir")
    random_init_tensors = frozenset({"lora_A_mag", "lora_A_dir"})
    row_factors = frozenset({"lora_B_mag", "lora_B_dir"})

    def parse_rank(self, raw: Mapping[str, Any], source: str) -> Any:
        return {"r_mag": _number(raw, "r_mag", source, positive=True, integer=True),
                "r_dir": _number(raw, "r_dir", source, positive=True, integer=True)}

    def rank_override(self, pattern_value: Any) -> dict[str, Any]:
        if isinstance(pattern_value, dict):
            return {k: pattern_value.get(k) for k in ("r_mag", "r_dir") if k in pattern_value}
        if isinstance(pattern_value, (list, tuple)) and len(pattern_value) == 2:
            return {"r_mag": pattern_value[0], "r_dir": pattern_value[1]}
        return {"r_mag": pattern_value, "r_dir": pattern_value}

    def parse_options(self, raw: Mapping[str, Any], source: str) -> dict[str, Any]:
        if "lora_alpha" not in raw:
            raise D2MergeError("missing required field 'lora_alpha'", path=source, hint="add it to adapter_config.json")
        return {}

    def scale(self, rank: Any, alpha: float, use_rslora: bool) -> float:
        # The paper's scale already uses a square root; use_rslora changes nothing here.
        return alpha / math.sqrt(rank["r_mag"] * rank["r_dir"])

    def expected_shapes(self, settings: ModuleSettings, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        rm, rd = settings.options["r_mag"], settings.options["r_dir"]
        return {"lora_A_mag": (rm, in_features), "lora_B_mag": (out_features, rm),
                "lora_A_dir": (rd, in_features), "lora_B_dir": (out_features, rd)}

    def rank_of(self, tensors: Mapping[str, torch.Tensor], layer_kind: str) -> Any:
        return {"r_mag": tensors["lora_A_mag"].shape[0], "r_dir": tensors["lora_A_dir"].shape[0]}

    rank_name = "r_mag/r_dir"

    def example_config(self, r: int) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "r_mag": r, "r_dir": r}

    def configured_rank(self, settings: ModuleSettings) -> Any:
        return {k: settings.options[k] for k in ("r_mag", "r_dir")}

    def rank_text(self, rank: Any) -> str:
        return f"{rank['r_mag']}/{rank['r_dir']}"

    def delta_from(self, f: Mapping[str, torch.Tensor], settings: ModuleSettings, *, ste: bool = False) -> torch.Tensor:
        magnitude = torch.relu(f["lora_B_mag"] @ f["lora_A_mag"])
        direction_product = f["lora_B_dir"] @ f["lora_A_dir"]
        direction = _SignSTE.apply(direction_product) if ste else dual_sign(direction_product)
        return settings.scale * magnitude * direction

    def update(self, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor:
        return self.delta_from(factors, settings)

    def merge_rows_(self, w: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings,
                    rows: slice) -> torch.Tensor:
        return w.add_(self.delta_from(self.rows_of(factors, rows), settings))

    def flip_threshold(self, factors: Mapping[str, torch.Tensor]) -> float:
        """|B_dir @ A_dir| below this could round to the other side of zero in fp32."""
        b, a = factors["lora_B_dir"].float(), factors["lora_A_dir"].float()
        bound = (b.abs() @ a.abs()).max()
        return float(bound) * FLIP_MARGIN_ULPS * torch.finfo(torch.float32).eps

    def report(self, w0: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> dict[str, float]:
        product = factors["lora_B_dir"] @ factors["lora_A_dir"]
        threshold = self.flip_threshold(factors)
        return {"direction_near_zero": float((product.abs() <= threshold).sum()), "flip_threshold": threshold}

    report_combine = {"direction_near_zero": "sum", "flip_threshold": "max"}

    def report_rows(self, w0: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings,
                    rows: slice, state: dict[str, Any]) -> dict[str, float]:
        # The threshold is the whole tensor's (one per tensor, computed on its first block).
        if "flip_threshold" not in state:
            state["flip_threshold"] = self.flip_threshold(factors)
        threshold = state["flip_threshold"]
        product = factors["lora_B_dir"][rows] @ factors["lora_A_dir"]
        return {"direction_near_zero": float((product.abs() <= threshold).sum()), "flip_threshold": threshold}

    def runtime_module(self, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                       settings: ModuleSettings, *, dropout: float = 0.0) -> nn.Module:
        return DualLoRALayer(self, base_layer, tensors, settings, dropout=dropout)


class DualLoRALayer(AdapterLayer):
    """base(x) + dropout(x) @ dW.T, with sign's gradient passed straight through in training.

    ``warmup`` (default 1.0) multiplies dW. Training from attach's init (every B
    zero) would never move: relu'(0) = 0 blocks the magnitude group and a zero
    magnitude blocks the direction group. d2merge.train therefore starts B_mag
    small and positive and ramps ``warmup`` from 0 to 1, so dW is exactly zero at
    step 0 yet gradients flow from step 1. Because relu is positively homogeneous,
    ``warmup * relu(B_mag @ A_mag) == relu((warmup * B_mag) @ A_mag)``:
    :meth:`fold_warmup` moves the factor into B_mag before saving, so a saved
    adapter always follows the merge formula with no extra setting.
    """

    def __init__(self, method: DualLoRA, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                 settings: ModuleSettings, *, dropout: float = 0.0):
        super().__init__(method, base_layer, tensors, settings, dropout=dropout)
        self.method = method
        self.warmup = 1.0

    def start_training(self, generator: torch.Generator | None = None, init: float = B_MAG_INIT) -> bool:
        """A small positive B_mag and warmup 0: dW stays exactly zero, yet gradients flow from step 1."""
        with torch.no_grad():
            b_mag = self.factors["lora_B_mag"]
            b_mag.copy_(torch.rand(b_mag.shape, generator=generator).to(b_mag) * init)
        self.warmup = 0.0
        return True

    def set_warmup(self, value: float) -> None:
        self.warmup = value

    def finish_training(self) -> None:
        self.fold_warmup()

    def fold_warmup(self) -> None:
        """Scale B_mag by ``warmup`` and reset it to 1 (exact up to one rounding of B_mag)."""
        if self.warmup != 1.0:
            with torch.no_grad():
                self.factors["lora_B_mag"].mul_(self.warmup)
            self.warmup = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.method.delta_from(self.factors, self.settings, ste=self.training)
        if self.warmup != 1.0:  # skipped at 1.0 so the eval forward is the merge formula bit for bit
            delta = delta * self.warmup
        return self.base_layer(x) + F.linear(self.dropout(x), delta)
