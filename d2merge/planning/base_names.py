"""Where a module an adapter names lives in the base's checkpoint.

An adapter names modules as transformers holds the model in memory. The checkpoint may store them
otherwise: a tied ``lm_head`` is read from the input embedding, and a model that transformers renames
or fuses on load (transformers 5's conversion mapping: per-expert tensors fused into one, say) stores
the pieces under their old names. :class:`BaseNames` answers from headers and config.json alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from d2merge.errors import D2MergeError
from d2merge.io.checkpoint_layout import CheckpointLayout
from d2merge.io.model_structure import meta_model


class BaseNames:
    """The base's stored tensor names for an adapter's in-memory names (``infos``: {stored name: (dtype, shape)})."""

    def __init__(self, infos: dict[str, tuple[torch.dtype, tuple[int, ...]]], config: dict[str, Any],
                 tied: tuple[str, str] | None):
        self.infos = infos
        self.config = config
        self.tied = tied  # (input embedding, lm_head) when the base ties them
        self._layout: CheckpointLayout | None = None

    def layout(self) -> CheckpointLayout:
        """The checkpoint's names for what transformers holds in memory (built once, only when needed)."""
        if self._layout is None:
            self._layout = CheckpointLayout(meta_model(self.config), self.infos)
        return self._layout

    def renamed_on_load(self) -> str | None:
        """What transformers renames or fuses when it loads this base (None: nothing)."""
        return renamed_on_load(self.config.get("model_type"))

    def stored_as(self, weight_name: str) -> str | None:
        """The name the checkpoint stores an in-memory tensor under, when transformers renames it on load."""
        if weight_name in self.infos or self.renamed_on_load() is None:
            return None
        return self.layout().stored_name(weight_name)

    def is_tied_head(self, weight_name: str) -> bool:
        return bool(self.tied) and weight_name == self.tied[1]

    def source_of(self, weight_name: str, what: str, tensor: str, adapter_file: Path) -> str:
        """The stored tensor a module's weight is read from (lm_head of a tied model reads the embedding).

        ``what`` ("adapted module", "replaced module") and ``tensor`` (the adapter's key) name the
        refusal when the base has no such tensor.
        """
        if self.tied and weight_name == self.tied[1]:
            return self.tied[0]  # transformers loads a tied lm_head from the embedding, whatever is stored
        if weight_name in self.infos:
            return weight_name
        stored = self.stored_as(weight_name)
        if stored is not None:
            return stored
        renamed = self.renamed_on_load()
        model_type = self.config.get("model_type")
        if renamed:
            raise D2MergeError(f"{what} '{weight_name.rsplit('.', 1)[0]}' is named as transformers holds this "
                               f"'{model_type}' model in memory, but its checkpoint stores no tensor "
                               f"that transformers loads into '{weight_name}' by a plain rename ({renamed})",
                               path=adapter_file, tensor=tensor,
                               hint="was the adapter trained on another base model? Otherwise merge with PEFT's "
                                    "merge_and_unload")
        raise D2MergeError(f"{what} '{weight_name.rsplit('.', 1)[0]}' is not in the base model",
                           path=adapter_file, tensor=tensor,
                           hint="was the adapter trained on another base model?")


def renamed_on_load(model_type: Any) -> str | None:
    """What transformers renames or fuses when it loads a checkpoint of ``model_type`` (None: nothing)."""
    if not isinstance(model_type, str):
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    mapping = get_checkpoint_conversion_mapping(model_type) or []
    shown = []
    for transform in mapping:
        sources = getattr(transform, "source_patterns", None)
        targets = getattr(transform, "target_patterns", None)
        if sources and targets:
            first = lambda v: (v[0] if isinstance(v, (list, tuple)) else v).strip(".")  # noqa: E731
            shown.append(f"{first(sources)} -> {first(targets)}")
    return "; ".join(shown[:3]) or None

