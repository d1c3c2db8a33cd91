"""Merge orchestration: options, plan, then the engine and a writer, as one call.

The data flows one way (docs/architecture.md): the loaders in ``d2merge.io``
read headers and configs, ``d2merge.plan`` decides what every output tensor is,
``d2merge.engine`` streams the tensors, and a writer in ``d2merge.export``
(here the Hugging Face folder) lays them out. This module only wires them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import d2merge.profile as profile
from d2merge.engine import compute_tensor, resolve_device
from d2merge.export.hf_folder import card_info, write_hf_folder
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.io.output import check_output_location
from d2merge.io.source_hashes import BackgroundHashes
from d2merge.options import MergeOptions
from d2merge.plan import MergePlan, TensorPlan, build_plan

__all__ = ["MergeOptions", "MergeResult", "card_info", "compute_tensor", "merge", "plan"]


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: the output, the plan it followed, its files, its time and the source hashes."""

    output: Path
    plan: MergePlan
    files: tuple[str, ...]
    seconds: float
    source_hashes: dict[str, str]


def plan(base: str | Path | BaseCheckpoint, adapter: str | Path | Adapter,
         options: MergeOptions | None = None, **overrides: Any) -> MergePlan:
    """The merge plan (what would change, and how) without writing anything."""
    options = MergeOptions.resolve(options, overrides)
    if not isinstance(base, BaseCheckpoint):
        base = open_base(base, allow_pickle=options.allow_pickle)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=options.allow_pickle)
    merge_plan = build_plan(base, adapter, dtype=options.dtype, max_shard_size=options.max_shard_size,
                            tied_embeddings=options.tied_embeddings)
    if options.base_model_id is not None:
        merge_plan = dataclasses.replace(merge_plan, base_model_id=options.base_model_id)
    return merge_plan


def merge(base: str | Path | BaseCheckpoint, adapter: str | Path | Adapter, out: str | Path,
          options: MergeOptions | None = None, *, progress: bool = False,
          on_tensor: Callable[[TensorPlan], None] | None = None, **overrides: Any) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a Hugging Face folder at ``out``.

    Keyword overrides are MergeOptions fields: ``merge(base, adapter, out, dtype="bf16")``.
    """
    options = MergeOptions.resolve(options, overrides)
    started = time.perf_counter()
    with profile.phase("plan"):
        merge_plan = plan(base, adapter, options)
    inputs = [merge_plan.base.location, merge_plan.adapter.path]
    out_path = check_output_location(Path(out), inputs, overwrite=options.overwrite)
    device = resolve_device(options.device)
    hashes = BackgroundHashes(merge_plan.source_files()) if options.hash_sources else None
    try:
        written, digests = write_hf_folder(merge_plan, out_path, overwrite=options.overwrite, device=device,
                                           progress=progress, on_tensor=on_tensor, hashes=hashes)
    finally:
        if hashes is not None:
            hashes.abandon()  # stops the hashing thread if the merge failed; a no-op after result()
    return MergeResult(out_path, merge_plan, tuple(written), time.perf_counter() - started, digests)
