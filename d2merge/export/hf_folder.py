"""The Hugging Face folder a merge writes: shards, index, config, tokenizer files, model card.

The engine (``d2merge.engine``) streams the shards into a hidden temp folder;
this module adds what turns those shards into a folder ``transformers`` loads
(the index, the config with the output dtype, the copied tokenizer files) and
the model card, then renames the folder into place, so an interrupted run
leaves no folder that looks complete.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from d2merge.export.model_card import render_model_card
from d2merge.export.pipeline import MergeResult, ShardOutput, Staged, run_merge
from d2merge.export.provenance import card_info
from d2merge.io.checkpoint import SAFETENSORS_INDEX
from d2merge.io.output import (TEMP_MARKER, AtomicFolder, check_output_location, copy_support_files, disk_error,
                               write_json, write_text)
from d2merge.options import MergeOptions
from d2merge.planning import MergePlan, TensorPlan

__all__ = ["FOLDER", "MergeResult", "add_verify_table_to_card", "card_info", "merge_to_hf_folder", "merged_config",
           "write_metadata"]


def merge_to_hf_folder(base: Any, adapter: Any, out: str | Path, options: MergeOptions | None = None, *,
                       progress: bool = False, on_tensor: Callable[[TensorPlan], None] | None = None,
                       **overrides: Any) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a Hugging Face folder at ``out`` (``d2merge.api.merge``).

    It lives beside the folder's writer, as ``merge_to_safetensors`` and ``merge_to_gguf`` do beside
    theirs, so that no format module imports ``d2merge.api`` (which imports this one). The steps
    are the one merge pipeline's (``export.pipeline.run_merge``) with this folder as the output.
    """
    options = MergeOptions.resolve(options, overrides)
    return run_merge(base, adapter, out, options, FOLDER, progress=progress, on_tensor=on_tensor)


class FolderOutput(ShardOutput):
    """The HF folder as an engine output: shards in a hidden temp folder (``AtomicFolder``), then the index,
    config, tokenizer files and card, then the rename."""

    is_file = False

    def check_location(self, out: Path, merge_plan: MergePlan, overwrite: bool) -> Path:
        return check_output_location(out, [merge_plan.base.location, *(a.path for a in merge_plan.adapters)],
                                     overwrite=overwrite)

    @contextmanager
    def begin(self, merge_plan: MergePlan, out: Path, overwrite: bool) -> Iterator[Staged]:
        with AtomicFolder(out, overwrite=overwrite) as folder:
            yield Staged(folder.temp, [folder.temp / name for name in merge_plan.shard_names], None, folder)

    def finish(self, staged: Staged, merge_plan: MergePlan, hashes: dict[str, str], written: list[str]
               ) -> list[str]:
        """Written only after every shard (the card records ``hashes``)."""
        written = written + write_metadata(merge_plan, staged.temp, hashes)
        staged.atomic.commit()
        return written


FOLDER = FolderOutput()


def write_metadata(merge_plan: MergePlan, folder: Path, hashes: dict[str, str]) -> list[str]:
    """Index, config, copied tokenizer files and the model card: written only after every shard."""
    written: list[str] = []
    if len(merge_plan.shard_names) > 1:
        weight_map = {t.name: merge_plan.shard_names[t.shard] for t in merge_plan.tensors}
        write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": merge_plan.total_bytes},
                                                "weight_map": dict(sorted(weight_map.items()))})
        written.append(SAFETENSORS_INDEX)
    config = merged_config(merge_plan)
    if config is not None:
        write_json(folder / "config.json", config)
        written.append("config.json")
    written += copy_support_files(merge_plan.base.folder, folder, merge_plan.base.weight_files)
    write_text(folder / "README.md", render_model_card(card_info(merge_plan, hashes)))
    written.append("README.md")
    return written


def merged_config(merge_plan: MergePlan) -> dict[str, Any] | None:
    """The merged folder's config.json: the base's with the plan's updates (dtype, tied embeddings)."""
    if merge_plan.base.config is None:
        return None
    config = dict(merge_plan.base.config)
    for key, value in merge_plan.config_updates.items():
        config[key] = value
    if "dtype" in merge_plan.config_updates and "torch_dtype" in config:
        config["torch_dtype"] = merge_plan.config_updates["dtype"]
    return config


def add_verify_table_to_card(folder: Path, merge_plan: MergePlan, hashes: dict[str, str], verify_table: str) -> Path:
    """Rewrite the model card of a finished merge with the verify table (atomic replace)."""
    card = folder / "README.md"
    staged = folder / f".README.md{TEMP_MARKER}{os.getpid()}"
    write_text(staged, render_model_card(card_info(merge_plan, hashes, verify_table)))
    try:
        os.replace(staged, card)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise disk_error(exc, card) from None
    return card
