"""The shared shell of the runtime (unmerged) modules: holds the base layer and the factors.

Each method subclasses :class:`AdapterLayer` and writes only its forward. Base
layers may be ``nn.Linear`` (weight (out, in)), GPT-2's ``Conv1D`` (weight
(in, out), the fan_in_fan_out case) or ``nn.Embedding``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from d2merge.methods.base import EMBEDDING, Method, ModuleSettings


class AdapterLayer(nn.Module):
    """A base layer plus trainable adapter factors; the base weights stay frozen."""

    def __init__(self, method: Method, base_layer: nn.Module, factors: Mapping[str, torch.Tensor] | None,
                 settings: ModuleSettings, *, dropout: float = 0.0):
        super().__init__()
        if factors is None:
            factors = init_factors(method.expected_shapes(settings, *layer_shape(base_layer, settings)))
        self.base_layer = base_layer
        self.settings = settings
        weight = base_layer.weight
        self.factors = nn.ParameterDict(
            {name: nn.Parameter(t.detach().to(device=weight.device, dtype=weight.dtype).clone())
             for name, t in factors.items()}
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if settings.base_init is not None:
            # PiSSA/OLoRA: PEFT rebuilds the base layer's weight as the residual on load; so do we.
            with torch.no_grad():
                base = method.effective_base(self.base_weight().float(), settings)
                base_layer.weight.copy_(base.T if self.transposed else base)

    @property
    def transposed(self) -> bool:
        return self.settings.fan_in_fan_out or self.settings.layer_kind == EMBEDDING

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as (out, in)."""
        weight = self.base_layer.weight
        return weight.T if self.transposed else weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def apply_weight(self, x: torch.Tensor, weight_oriented: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with a replacement (out, in) weight and the base bias."""
        if self.settings.layer_kind == EMBEDDING:
            layer = self.base_layer
            return F.embedding(x, weight_oriented.T, layer.padding_idx, layer.max_norm, layer.norm_type,
                               layer.scale_grad_by_freq, layer.sparse)
        return F.linear(x, weight_oriented, self.bias)

    def extra_repr(self) -> str:
        return f"module={self.settings.module}, r={self.settings.r}, scale={self.settings.scale:g}"


def embed_scale(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor | float:
    """The factor a scaled embedding (Gemma's ``embed_scale``) applies to its lookups; 1 for a plain one."""
    scale = getattr(layer, "embed_scale", None)
    return 1.0 if scale is None else torch.as_tensor(scale).to(dtype)


def init_factors(shapes: Mapping[str, tuple[int, ...]], *, generator: torch.Generator | None = None
                 ) -> dict[str, torch.Tensor]:
    """Fresh factors for training: every ``A`` random (Kaiming-uniform as PEFT), every ``B`` zero.

    With B zero the adapter starts exactly at the base model. Each ``A``
    (``A_pos`` and ``A_neg`` too) gets its own draw, so the branches differ.
    """
    factors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if "_A" in name or name.endswith("embedding_A"):
            bound = (3.0 / shape[1]) ** 0.5
            factors[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            factors[name] = torch.zeros(shape)
    return factors


def layer_shape(base_layer: nn.Module, settings: ModuleSettings) -> tuple[int, int]:
    """(out, in) of a base layer in the formula's orientation."""
    rows, cols = base_layer.weight.shape
    return (cols, rows) if (settings.fan_in_fan_out or settings.layer_kind == EMBEDDING) else (rows, cols)
