"""PEFT's ``trainable_token_indices``: some rows of an embedding trained in full, next to a LoRA adapter.

PEFT saves the trained rows as ``<embedding>.token_adapter.trainable_tokens_delta``
(shape (len(indices), embedding_dim)); despite the name they are the new rows, not a
difference. The merge writes them over the base's rows, in the order of the indices:

    W_merged = W0;  W_merged[indices[i]] = delta[i]

When the base ties ``lm_head`` to the embedding, PEFT ties its token adapter to the
same rows, so the tied ``lm_head`` changes with the embedding: the tie is kept and
the merge is exact (the planner does this). The forward here is PEFT's: an embedding
lookup in the merged table (times the layer's ``embed_scale``, as Gemma's scaled
embedding applies), and for a tied head a linear layer with it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

DELTA = "trainable_tokens_delta"
STORED_SUFFIX = "token_adapter.trainable_tokens_delta"


def indices_for(value: Any, module: str) -> tuple[int, ...] | None:
    """The token indices ``trainable_token_indices`` gives ``module`` (a list: the input embedding's)."""
    if isinstance(value, dict):
        for name, indices in value.items():
            if module == name or module.endswith("." + name):
                return tuple(int(i) for i in indices)
        return None
    return tuple(int(i) for i in value)


def merged_embedding(w0: torch.Tensor, delta: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """W0 (num_embeddings, dim) with the trained rows written over the rows ``indices``."""
    index = torch.tensor(list(indices), dtype=torch.long, device=w0.device)
    return w0.index_copy(0, index, delta.to(w0.dtype))


class TrainableTokensLayer(nn.Module):
    """The embedding (or the ``lm_head`` tied to it) computed with the trained rows in place."""

    def __init__(self, base_layer: nn.Module, delta: nn.Parameter | torch.Tensor, indices: Sequence[int]):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        weight = base_layer.weight
        self.delta = delta if isinstance(delta, nn.Parameter) else nn.Parameter(
            delta.detach().to(device=weight.device, dtype=weight.dtype).clone())
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.long, device=weight.device),
                             persistent=False)

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight.index_copy(0, self.indices, self.delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, weight = self.base_layer, self.merged_weight()
        if isinstance(layer, nn.Embedding):
            out = F.embedding(x, weight, layer.padding_idx, layer.max_norm, layer.norm_type,
                              layer.scale_grad_by_freq, layer.sparse)
            scale = getattr(layer, "embed_scale", None)
            return out if scale is None else out * torch.as_tensor(scale).to(out.dtype)
        return F.linear(x, weight, getattr(layer, "bias", None))
