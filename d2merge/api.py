"""The library's merge and plan: options, plan, then the engine and a writer, as one call.

The data flows one way (docs/architecture.md): the loaders in ``d2merge.io``
read headers and configs, ``d2merge.planning`` decides what every output tensor is,
``d2merge.engine`` streams the tensors, and a writer in ``d2merge.export``
(here the Hugging Face folder, ``export.hf_folder.merge_to_hf_folder``) lays them out.
This module is the API's face over them and sits above every format module:
nothing in ``d2merge.export`` imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from d2merge.engine import compute_tensor
from d2merge.export.hf_folder import MergeResult, card_info, merge_to_hf_folder
from d2merge.io.adapter import Adapter
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.options import MergeOptions
from d2merge.planning import MergePlan, TensorPlan, plan_for

__all__ = ["MergeOptions", "MergeResult", "card_info", "compute_tensor", "merge", "plan"]


def plan(base: str | Path | BaseCheckpoint, adapter: str | Path | Adapter,
         options: MergeOptions | None = None, **overrides: Any) -> MergePlan:
    """The merge plan (what would change, and how) without writing anything."""
    return plan_for(base, adapter, options, **overrides)


def merge(base: str | Path | BaseCheckpoint, adapter: str | Path | Adapter, out: str | Path,
          options: MergeOptions | None = None, *, progress: bool = False,
          on_tensor: Callable[[TensorPlan], None] | None = None, **overrides: Any) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a Hugging Face folder at ``out``.

    Keyword overrides are MergeOptions fields: ``merge(base, adapter, out, dtype="bf16")``.
    """
    return merge_to_hf_folder(base, adapter, out, options, progress=progress, on_tensor=on_tensor, **overrides)
