"""A merge's provenance, in every place an output records it, and whether an existing output is a given merge's.

One module for what every format writes about how it was made: the card's facts (``card_info``:
method, settings, base, output dtype, sha256 of every source), the same facts as a single
``.safetensors`` file's header metadata and as a GGUF's ``d2merge.*`` keys, and the hash
placeholders: the sources are hashed while the tensors stream, so a one-pass writer reserves
their width (:data:`HASH_PLACEHOLDER`) in its header and fills it at the end (:func:`filled`).

:func:`output_matches` is the one answer to "is this output complete and made from these sources
with these options": merge-many skips a job whose output it accepts, and refuses to replace one
it does not without ``--overwrite``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from d2merge.errors import D2MergeError
from d2merge.export.model_card import CardInfo, render_model_card
from d2merge.io.output import check_complete
from d2merge.io.safetensors_file import SafetensorsFile
from d2merge.planning import MergePlan
from d2merge.version import __version__

HASH_PLACEHOLDER = "0" * 64  # a sha256 in hex has exactly this width


def reserved(labels: Iterable[str]) -> dict[str, str]:
    """Every source label with the placeholder: what a header holds until the hashes are known."""
    return {label: HASH_PLACEHOLDER for label in labels}


def filled(labels: Iterable[str], hashes: Mapping[str, str]) -> dict[str, str]:
    """The hashes as they replace the placeholders: a digest that is not 64 hex digits (an unreadable
    file) keeps its placeholder, so the header keeps its length."""
    final = {k: (v if len(v) == len(HASH_PLACEHOLDER) else HASH_PLACEHOLDER) for k, v in hashes.items()}
    return {**reserved(labels), **final}


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


def single_file_metadata(merge_plan: MergePlan, hashes: dict[str, str]) -> dict[str, str]:
    """A single ``.safetensors`` file's header metadata: the card's facts as strings."""
    info = card_info(merge_plan, hashes)
    return {
        "format": "pt",
        "d2merge_version": __version__,
        "method": info.method,
        "settings": json.dumps(dict(info.settings), sort_keys=True, default=str),
        "base_model": info.base_model or "",
        "out_dtype": info.out_dtype,
        "sources": json.dumps(dict(sorted(hashes.items())), sort_keys=True),
    }


def gguf_provenance(merge_plan: MergePlan, hashes: Mapping[str, str]) -> dict[str, str]:
    """The ``d2merge.*`` provenance of a merge in a GGUF, as the HF card says it (empty values left out)."""
    info = card_info(merge_plan, dict(hashes))
    provenance = {"method": info.method, "settings": json.dumps(dict(info.settings), sort_keys=True, default=str),
                  "sources": json.dumps(dict(info.source_hashes), sort_keys=True),
                  "base_model": info.base_model or ""}
    return {k: v for k, v in provenance.items() if v}


_VERIFY_SECTION = re.compile(r"\n## Verification \(merged vs unmerged\)\n\n```\n.*?\n```\n", re.DOTALL)


def output_matches(merge_plan: MergePlan, output: Path, hashes: dict[str, str], *, is_file: bool) -> bool:
    """Whether ``output`` is complete and carries this merge's provenance.

    Complete: a finished d2merge output (``io.output.check_complete``, the one definition push
    uses too, its marker required), whose shards hold the tensors this plan writes.
    Provenance: the card (or header metadata) is exactly what this merge would
    write, sha256 of every source included, apart from a verify table.
    """
    try:
        if output.is_file() != is_file:
            return False
        check_complete(output, written_by_d2merge=True, needs_config=merge_plan.base.config is not None)
        if is_file:
            stored = SafetensorsFile(output)
            return (stored.keys() == [t.name for t in merge_plan.tensors]
                    and stored.metadata == single_file_metadata(merge_plan, hashes))
        for shard, name in enumerate(merge_plan.shard_names):
            stored = SafetensorsFile(output / name)
            if stored.keys() != [t.name for t in merge_plan.tensors if t.shard == shard]:
                return False
        card = (output / "README.md").read_text(encoding="utf-8")
    except (D2MergeError, OSError, UnicodeDecodeError):
        return False
    return _VERIFY_SECTION.sub("", card, count=1) == render_model_card(card_info(merge_plan, hashes))
