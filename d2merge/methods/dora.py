"""DoRA in PEFT's format (``peft_type: LORA`` with ``use_dora: true``).

V = W0 + s * (B @ A); W_merged = (m / ||V||_row)[:, None] * V, with the norm
taken from this adapter's own unmerged base W0, never from a merged weight.

Embeddings: PEFT's DoRA embedding takes one norm per embedding dimension (over the
vocabulary), and its magnitude has embedding_dim entries. In the (out, in) =
(embedding_dim, num_embeddings) orientation every formula here works in, that is the
same per-row norm as for a linear layer, so one formula serves both.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from d2merge.methods.base import EMBEDDING, ModuleSettings
from d2merge.methods.lora import LoRA
from d2merge.methods.adapter_layer import AdapterLayer, embed_scale

MAGNITUDE = "lora_magnitude_vector"


def row_norms(v: torch.Tensor) -> torch.Tensor:
    """||V|| per output row, accumulated in fp64 and returned in ``v``'s dtype.

    As D2-LoRA's norms (``D2LoRA.norms``): the sum of squares over a row of
    thousands of weights loses fp32 ulps, and the ratio multiplies every element
    of the row, so the accumulation is the merge's largest rounding term.
    """
    if v.dtype == torch.float64:
        return torch.linalg.vector_norm(v, dim=1)
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64).to(v.dtype)


class DoRA(LoRA):
    name = "dora"
    peft_type = "LORA"
    linear_tensors = ("lora_A", "lora_B", MAGNITUDE)
    embedding_tensors = ("lora_embedding_A", "lora_embedding_B", MAGNITUDE)
    bare_tensors = frozenset({MAGNITUDE})
    row_factors = frozenset({"lora_B", "lora_embedding_B", MAGNITUDE})
    optional_linear_tensors = {}  # PEFT refuses lora_bias with DoRA

    def expected_shapes(self, settings: ModuleSettings, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        a, b, m = self.tensor_names(settings.layer_kind)
        return {a: (settings.r, in_features), b: (out_features, settings.r), m: (out_features,)}

    def optional_shapes(self, settings: ModuleSettings, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {}

    def low_rank(self, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor:
        a, b = self.tensor_names(settings.layer_kind)[:2]
        return (factors[b] @ factors[a]).mul_(settings.scale)  # in place: no second product-sized tensor

    def merge_rows_(self, w: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings,
                    rows: slice) -> torch.Tensor:
        a, b = self.tensor_names(settings.layer_kind)[:2]
        v = w.addmm_(factors[b][rows], factors[a], alpha=settings.scale)
        return v.mul_((factors[MAGNITUDE][rows] / row_norms(v))[:, None])

    report_combine = {"magnitude_ratio_min": "min", "magnitude_ratio_max": "max"}

    def report(self, w0: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> dict[str, float]:
        v = w0 + self.low_rank(factors, settings)
        ratio = factors[MAGNITUDE] / torch.linalg.vector_norm(v, dim=1)
        return {"magnitude_ratio_min": float(ratio.min()), "magnitude_ratio_max": float(ratio.max())}

    def runtime_module(self, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                       settings: ModuleSettings, *, dropout: float = 0.0) -> nn.Module:
        return DoRALayer(self, base_layer, tensors, settings, dropout=dropout)

    def initial_magnitude(self, base_weight_oriented: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(base_weight_oriented.float(), dim=1)


class DoRALayer(AdapterLayer):
    """PEFT's DoRA forward, operation for operation, so unmerged-vs-merged sits at PEFT's own level.

    PEFT (0.21, ``DoraLinearLayer.forward``) computes ``base(x) + (m/||V|| - 1) * (base(x) - bias)
    + m/||V|| * s * B(A(x))`` with the norm treated as a constant (detached), as the paper
    suggests. The algebraically equal ``m/||V|| * (x @ W0 + s * B(A(x)))`` rounds differently:
    on SmolLM2-135M it put the fp32 unmerged forward 2.6e-3 from the merged model, PEFT's 8.8e-4.
    In training with dropout, PEFT applies the dropped input to both branches; so does this.
    """

    def __init__(self, method: DoRA, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                 settings: ModuleSettings, *, dropout: float = 0.0):
        super().__init__(method, base_layer, tensors, settings, dropout=dropout)
        if tensors is None:
            with torch.no_grad():
                self.factors[MAGNITUDE].copy_(method.initial_magnitude(self.base_weight()))
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.settings.layer_kind == EMBEDDING:
            return self.embedding_forward(x)
        f, s = self.factors, self.settings
        w0 = self.base_weight()
        lora_weight = (f["lora_B"] @ f["lora_A"]).detach()
        norm = torch.linalg.vector_norm(w0 + s.scale * lora_weight, dim=1).detach()
        mag_norm_scale = f[MAGNITUDE] / norm
        result = self.base_layer(x)
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
            base_result = F.linear(x, w0)
        else:
            base_result = result if self.bias is None else result - self.bias
        lora_result = F.linear(F.linear(x, f["lora_A"]), f["lora_B"])
        return result + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * s.scale)

    def embedding_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA embedding: m/||V|| * base(x) + m/||V|| * s * lookup(A)(x) @ B^T * embed_scale."""
        f, s, layer = self.factors, self.settings, self.base_layer
        a, b = f["lora_embedding_A"], f["lora_embedding_B"]
        w0 = self.base_weight()  # (embedding_dim, num_embeddings)
        norm = torch.linalg.vector_norm(w0 + s.scale * (b @ a).detach(), dim=1).detach()
        mag_norm_scale = f[MAGNITUDE] / norm
        hidden = F.embedding(x, a.T, layer.padding_idx, layer.max_norm, layer.norm_type,
                             layer.scale_grad_by_freq, layer.sparse)
        lora_result = mag_norm_scale * (hidden @ b.T) * s.scale * embed_scale(layer, hidden.dtype)
        return mag_norm_scale * layer(x) + lora_result
