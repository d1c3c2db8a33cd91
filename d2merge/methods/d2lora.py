"""D2-LoRA: a signed pair of rank-r branches, projected onto the base's norms.

    dW = s * (B_pos @ A_pos - tau * B_neg @ A_neg)
    V = W0 + dW;  W* = (||W0|| / max(||V||, eps)) * V   (per row for norm_axis "out", per column for "in")
    W_merged = W* + dW   (residual: true)  or  W*   (residual: false)

The choices the paper leaves open (norm_axis, residual, eps) are config settings.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from d2merge.errors import D2MergeError
from d2merge.methods.base import Method, ModuleSettings, _flag, _number
from d2merge.methods.adapter_layer import AdapterLayer

NORM_AXES = ("out", "in")


class D2LoRA(Method):
    name = "d2lora"
    peft_type = "D2LORA"
    linear_tensors = ("lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg")
    random_init_tensors = frozenset({"lora_A_pos", "lora_A_neg"})
    row_factors = frozenset({"lora_B_pos", "lora_B_neg"})

    def parse_options(self, raw: Mapping[str, Any], source: str) -> dict[str, Any]:
        # tau changes the merged weight and has no safe default (the paper uses 0.5 and 1.0): required.
        tau = _number(raw, "tau", source)
        eps = _number(raw, "eps", source, default=0.0)
        if eps < 0:
            raise D2MergeError(f"field 'eps' must be >= 0, got {eps!r}", path=source)
        if eps > torch.finfo(torch.float32).max:  # the merge clamps fp32 norms with it
            raise D2MergeError(f"field 'eps' must fit in float32, got {eps!r}", path=source)
        norm_axis = raw.get("norm_axis", "out")
        if norm_axis not in NORM_AXES:
            raise D2MergeError(f"field 'norm_axis' must be \"out\" or \"in\", got {norm_axis!r}", path=source)
        return {"tau": tau, "norm_axis": norm_axis, "residual": _flag(raw, "residual", source, True), "eps": eps}

    def example_config(self, r: int) -> dict[str, Any]:
        # The paper's tau 0.5; eps 0 keeps the projection exact.
        return {"peft_type": self.peft_type, "r": r, "tau": 0.5, "norm_axis": "out", "residual": True, "eps": 0.0}

    def expected_shapes(self, settings: ModuleSettings, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        r = settings.r
        return {"lora_A_pos": (r, in_features), "lora_B_pos": (out_features, r),
                "lora_A_neg": (r, in_features), "lora_B_neg": (out_features, r)}

    def rank_of(self, tensors: Mapping[str, torch.Tensor], layer_kind: str) -> Any:
        return tensors["lora_A_pos"].shape[0]

    def low_rank(self, f: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor:
        tau = settings.options["tau"]
        return settings.scale * (f["lora_B_pos"] @ f["lora_A_pos"] - tau * (f["lora_B_neg"] @ f["lora_A_neg"]))

    def norms(self, w: torch.Tensor, settings: ModuleSettings) -> torch.Tensor:
        """One norm per output row (norm_axis "out") or per input column ("in").

        Accumulated in fp64, returned in ``w``'s dtype: the sum of squares over a
        row of thousands of real weights loses several fp32 ulps, and the ratio
        multiplies every element (measured on MiniLM, norm_axis "in": 8.2 fp32
        eps off the fp64 merge with fp32 accumulation, 1.6 with fp64).
        """
        dim = 1 if settings.options["norm_axis"] == "out" else 0
        if w.dtype == torch.float64:
            return torch.linalg.vector_norm(w, dim=dim)
        return torch.linalg.vector_norm(w, dim=dim, dtype=torch.float64).to(w.dtype)

    def ratio_from_norms(self, base_norm: torch.Tensor, v_norm: torch.Tensor, settings: ModuleSettings) -> torch.Tensor:
        """||W0|| / max(||V||, eps), zero where that maximum is zero (so W* is zero there, not NaN)."""
        v_norm = v_norm.clamp_min(settings.options["eps"])
        safe = torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
        return torch.where(v_norm > 0, base_norm / safe, torch.zeros_like(v_norm))

    def norm_ratio(self, w0: torch.Tensor, v: torch.Tensor, settings: ModuleSettings) -> torch.Tensor:
        return self.ratio_from_norms(self.norms(w0, settings), self.norms(v, settings), settings)

    def update(self, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor:
        return self.low_rank(factors, settings)

    def row_separable(self, settings: ModuleSettings) -> bool:
        return settings.options["norm_axis"] == "out"  # column norms need every row

    def merge_rows_(self, w: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings,
                    rows: slice) -> torch.Tensor:
        dw = self.low_rank(self.rows_of(factors, rows), settings)
        base_norm = self.norms(w, settings)
        v = w.add_(dw)
        ratio = self.ratio_from_norms(base_norm, self.norms(v, settings), settings)
        w_star = v.mul_(ratio[:, None] if settings.options["norm_axis"] == "out" else ratio[None, :])
        return w_star.add_(dw) if settings.options["residual"] else w_star

    report_combine = {"norm_ratio_min": "min", "norm_ratio_max": "max"}

    def report(self, w0: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> dict[str, float]:
        ratio = self.norm_ratio(w0, w0 + self.low_rank(factors, settings), settings)
        return {"norm_ratio_min": float(ratio.min()), "norm_ratio_max": float(ratio.max())}

    def runtime_module(self, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                       settings: ModuleSettings, *, dropout: float = 0.0) -> nn.Module:
        return D2LoRALayer(self, base_layer, tensors, settings, dropout=dropout)


class D2LoRALayer(AdapterLayer):
    """The training forward: norms from the full V, the update applied through the low-rank factors.

    In eval mode this equals ``x @ W_merged.T + b``; in train mode dropout acts
    on the input of the low-rank branches only, as in LoRA.
    """

    def __init__(self, method: D2LoRA, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                 settings: ModuleSettings, *, dropout: float = 0.0):
        super().__init__(method, base_layer, tensors, settings, dropout=dropout)
        self.method = method

    def update_output(self, x: torch.Tensor) -> torch.Tensor:
        f, s = self.factors, self.settings
        pos = F.linear(F.linear(x, f["lora_A_pos"]), f["lora_B_pos"])
        neg = F.linear(F.linear(x, f["lora_A_neg"]), f["lora_B_neg"])
        return s.scale * (pos - s.options["tau"] * neg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        w0 = self.base_weight()
        v = w0 + self.method.low_rank(self.factors, s)
        ratio = self.method.norm_ratio(w0, v, s)
        x_drop = self.dropout(x)
        update = self.update_output(x_drop)
        if s.options["norm_axis"] == "out":
            out = ratio * (F.linear(x, w0) + update)
        else:
            out = F.linear(x * ratio, w0) + self.update_output(x_drop * ratio)
        if s.options["residual"]:
            out = out + update
        return out if self.bias is None else out + self.bias
