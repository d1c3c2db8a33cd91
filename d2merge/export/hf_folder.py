"""The Hugging Face folder a merge writes: shards, index, config, tokenizer files, model card.

The engine (``d2merge.engine``) streams the shards into a hidden temp folder;
this module adds what turns those shards into a folder ``transformers`` loads
(the index, the config with the output dtype, the copied tokenizer files) and
the model card, then renames the folder into place, so an interrupted run
leaves no folder that looks complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import d2merge.profile as profile
from d2merge.device import ComputeDevice
from d2merge.engine import resolve_device, write_tensors
from d2merge.export.model_card import CardInfo, render_model_card
from d2merge.io.checkpoint import SAFETENSORS_INDEX
from d2merge.io.output import (TEMP_MARKER, AtomicFolder, check_output_location, copy_support_files, disk_error,
                               write_json, write_text)
from d2merge.io.source_hashes import BackgroundHashes
from d2merge.options import MergeOptions
from d2merge.plan import MergePlan, TensorPlan, plan_for


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: the output, the plan it followed, its files, its time and the source hashes."""

    output: Path
    plan: MergePlan
    files: tuple[str, ...]
    seconds: float
    source_hashes: dict[str, str]


def merge_to_hf_folder(base: Any, adapter: Any, out: str | Path, options: MergeOptions | None = None, *,
                       progress: bool = False, on_tensor: Callable[[TensorPlan], None] | None = None,
                       **overrides: Any) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a Hugging Face folder at ``out`` (``d2merge.merge.merge``).

    It lives beside the folder's writer, as ``merge_to_safetensors`` and ``merge_to_gguf`` do beside
    theirs, so that no format module imports ``d2merge.merge`` (which imports this one).
    """
    options = MergeOptions.resolve(options, overrides)
    started = time.perf_counter()
    with profile.phase("plan"):
        merge_plan = plan_for(base, adapter, options)
    inputs = [merge_plan.base.location, *(a.path for a in merge_plan.adapters)]
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


def write_hf_folder(merge_plan: MergePlan, out: Path, *, overwrite: bool = False,
                    device: str | torch.device | ComputeDevice = "cpu",
                    progress: bool = False, on_tensor: Callable[[TensorPlan], None] | None = None,
                    hashes: BackgroundHashes | None = None) -> tuple[list[str], dict[str, str]]:
    """Write the merged folder at ``out`` atomically; returns (file names written, source hashes).

    ``hashes``, when given, is fed by the engine's reads and waited for after the
    last shard: the card records them.
    """
    with AtomicFolder(out, overwrite=overwrite) as folder:
        written = write_tensors(merge_plan, folder.temp, device=device, progress=progress,
                                on_tensor=on_tensor, hasher=hashes)
        digests = hashes.result() if hashes is not None else {}
        written += write_metadata(merge_plan, folder.temp, digests)
        folder.commit()
    return written, digests


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


def card_info(merge_plan: MergePlan, hashes: dict[str, str], verify_table: str | None = None) -> CardInfo:
    """What the card (and the single-file and GGUF provenance) says about a merge."""
    cfg = merge_plan.adapter.config
    settings: dict[str, Any] = {"r": cfg.r} if cfg.r else {}
    settings.update({"lora_alpha": cfg.lora_alpha, **cfg.options})
    settings.update({"target_modules": ", ".join(sorted(merge_plan.adapter.modules))
                     if len(merge_plan.adapter.modules) <= 8 else f"{len(merge_plan.adapter.modules)} modules"})
    if cfg.use_rslora:
        settings["use_rslora"] = True
    if cfg.rank_pattern:
        settings["rank_pattern"] = dict(cfg.rank_pattern)
    if cfg.alpha_pattern:
        settings["alpha_pattern"] = dict(cfg.alpha_pattern)
    # Only what is true of the base actually used: the adapter's base_model_name_or_path is a claim
    # about the base it was trained on (meta-llama/Llama-3.1-8B for a tiny local base, say), and a
    # local folder has no Hub id. The base is named when the user says which it is (--base-model-id)
    # or when it came from the Hub cache.
    base_name = merge_plan.base_model_id or _hub_id_from_cache(merge_plan.base.location)
    method = merge_plan.adapter.method.name
    if merge_plan.mix is not None:  # several adapters: each one's method and weight, and how they were combined
        method = " + ".join(a.method.name for a in merge_plan.mix.adapters)
        settings = {f"adapter{i} ({a.method.name}, r={a.config.r})": f"weight {w:g}"
                    for i, (a, w) in enumerate(zip(merge_plan.mix.adapters, merge_plan.mix.weights), 1)}
        settings["combination"] = merge_plan.mix.combination or "weighted sum of updates"
    return CardInfo(base_model=base_name, method=method, settings=settings,
                    source_hashes=dict(sorted(hashes.items())), out_dtype=merge_plan.out_dtype,
                    notes=merge_plan.notes, verify_table=verify_table)


def _hub_id_from_cache(location: Path) -> str | None:
    """``org/name`` when the base came from the Hub cache (models--org--name/snapshots/<sha>)."""
    for part in location.parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return None


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
