"""The shared shell of the runtime (unmerged) modules: holds the base layer and the factors.

Each method subclasses :class:`AdapterLayer` and writes only its forward. Base
layers may be ``nn.Linear`` (weight (out, in)), GPT-2's ``Conv1D`` (weight
(in, out), the fan_in_fan_out case) or ``nn.Embedding``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from d2merge.errors import D2MergeError
from d2merge.methods.base import Method, ModuleSettings


class AdapterLayer(nn.Module):
    """A base layer plus trainable adapter factors; the base weights stay frozen."""

    def __init__(self, method: Method, base_layer: nn.Module, factors: Mapping[str, torch.Tensor] | None,
                 settings: ModuleSettings, *, dropout: float = 0.0):
        super().__init__()
        if factors is None and settings.base_init is not None:
            # Fresh factors on a residual base would drop the top-r part from the model.
            raise D2MergeError(f"init_lora_weights {settings.base_init!r}: d2merge trains only from the plain init",
                               hint="train PiSSA/OLoRA adapters with PEFT; d2merge merges them")
        if factors is None:
            factors = method.init_factors(method.expected_shapes(settings, *layer_shape(base_layer, settings)))
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
        return self.settings.transposed

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as (out, in)."""
        weight = self.base_layer.weight
        return weight.T if self.transposed else weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # Training hooks: a method whose init cannot train as is (Dual LoRA: relu'(0) = 0) overrides them.
    def start_training(self, generator: torch.Generator | None = None) -> bool:
        """Prepare the factors for training from the init; True when the layer needs the warm-up ramp."""
        return False

    def set_warmup(self, value: float) -> None:
        """Where the warm-up ramp is (0 -> 1), set before each step while ``start_training`` asked for it."""

    def finish_training(self) -> None:
        """Fold any training-only state into the factors, so the saved adapter follows the merge formula."""

    def extra_repr(self) -> str:
        return f"module={self.settings.module}, r={self.settings.r}, scale={self.settings.scale:g}"


def embed_scale(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor | float:
    """The factor a scaled embedding (Gemma's ``embed_scale``) applies to its lookups; 1 for a plain one."""
    scale = getattr(layer, "embed_scale", None)
    return 1.0 if scale is None else torch.as_tensor(scale).to(dtype)


def layer_shape(base_layer: nn.Module, settings: ModuleSettings) -> tuple[int, int]:
    """(out, in) of a base layer in the formula's orientation."""
    rows, cols = base_layer.weight.shape
    return (cols, rows) if settings.transposed else (rows, cols)
