"""LoRA in PEFT's format, with rsLoRA, rank/alpha patterns, fan_in_fan_out and embeddings.

dW = s * (B @ A), W_merged = W0 + dW; embeddings store A (r, num_embeddings) and
B (embedding_dim, r), which is the transposed layout of the same formula.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from d2merge.methods import target_parameters, trainable_tokens
from d2merge.methods.base import BIAS, EMBEDDING, PARAMETER, TOKENS, Method, ModuleSettings
from d2merge.methods.adapter_layer import AdapterLayer, embed_scale

# lora_bias: PEFT gives lora_B a bias, scaled with the rest of the branch: b_merged = b0 + s * lora_B.bias.
LORA_BIAS = "lora_bias"


class LoRA(Method):
    name = "lora"
    peft_type = "LORA"
    linear_tensors = ("lora_A", "lora_B")
    embedding_tensors = ("lora_embedding_A", "lora_embedding_B")
    random_init_tensors = frozenset({"lora_A", "lora_embedding_A"})

    def example_config(self, r: int) -> dict[str, Any]:
        # PEFT's LoRA and DoRA share peft_type LORA; use_dora tells them apart.
        return {"peft_type": self.peft_type, "r": r, "use_dora": self.name == "dora"}
    row_factors = frozenset({"lora_B", "lora_embedding_B"})
    optional_linear_tensors = {LORA_BIAS: "lora_B.bias"}

    def expected_shapes(self, settings: ModuleSettings, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        a, b = self.tensor_names(settings.layer_kind)[:2]
        return {a: (settings.r, in_features), b: (out_features, settings.r)}

    def optional_shapes(self, settings: ModuleSettings, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {LORA_BIAS: (out_features,)}

    def merged_bias(self, b0: torch.Tensor, factors: Mapping[str, torch.Tensor],
                    settings: ModuleSettings) -> torch.Tensor:
        return b0.add_(factors[LORA_BIAS], alpha=settings.scale)

    def rank_of(self, tensors: Mapping[str, torch.Tensor], layer_kind: str) -> Any:
        return tensors[self.tensor_names(layer_kind)[0]].shape[0]

    def low_rank(self, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor:
        a, b = self.tensor_names(settings.layer_kind)[:2]
        # scaled in place: ``scale * (B @ A)`` allocates a second product-sized tensor, which in
        # verify's weight check (a 7B's every row block) cost more than the product itself
        return (factors[b] @ factors[a]).mul_(settings.scale)

    def update(self, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor:
        if settings.layer_kind == TOKENS:
            return factors[trainable_tokens.DELTA]  # the new rows themselves
        if settings.part == BIAS:
            return settings.scale * factors[LORA_BIAS]
        if settings.layer_kind == PARAMETER:
            assert settings.piece is not None
            return target_parameters.piece_delta(factors, settings.piece, settings.scale)
        return self.low_rank(factors, settings)

    def update_square_sum(self, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor | None:
        if settings.layer_kind in (TOKENS, PARAMETER) or settings.part == BIAS:
            return None
        a, b = self.tensor_names(settings.layer_kind)[:2]
        # ||s B A||_F^2 = s^2 sum((B^T B) * (A A^T)): two r x r products instead of out x in entries
        return settings.scale ** 2 * ((factors[b].T @ factors[b]) * (factors[a] @ factors[a].T)).sum()

    def merge_rows_(self, w: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings,
                    rows: slice) -> torch.Tensor:
        a, b = self.tensor_names(settings.layer_kind)[:2]
        # W0 + s * (B @ A), fused into one pass over the rows.
        return w.addmm_(factors[b][rows], factors[a], alpha=settings.scale)

    def runtime_module(self, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                       settings: ModuleSettings, *, dropout: float = 0.0) -> nn.Module:
        return LoRALayer(self, base_layer, tensors, settings, dropout=dropout)


class LoRALayer(AdapterLayer):
    """base(x) + s * B(A(dropout(x))): the forward PEFT trains with."""

    def __init__(self, method: LoRA, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                 settings: ModuleSettings, *, dropout: float = 0.0):
        super().__init__(method, base_layer, tensors, settings, dropout=dropout)
        self.a_name, self.b_name = method.tensor_names(settings.layer_kind)[:2]

    def low_rank_output(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors[self.a_name], self.factors[self.b_name]
        if self.settings.layer_kind == EMBEDDING:
            layer = self.base_layer
            hidden = F.embedding(x, a.T, layer.padding_idx, layer.max_norm, layer.norm_type,
                                 layer.scale_grad_by_freq, layer.sparse)
            # Gemma's scaled embedding multiplies its lookup; PEFT scales the adapter's part too.
            return self.settings.scale * F.linear(hidden, b) * embed_scale(layer, hidden.dtype)
        hidden = F.linear(self.dropout(x), a)
        bias = self.factors[LORA_BIAS] if LORA_BIAS in self.factors else None
        return F.linear(hidden, b, bias) * self.settings.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.low_rank_output(x)
