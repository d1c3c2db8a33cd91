"""One merged ``.safetensors`` file, with the merge's provenance in its header metadata.

For deployments that take a bare weights file. The metadata records the method,
its settings, the d2merge version and the sha256 of every source file; the
hashes are computed while the tensors stream and written into space reserved
in the header, so the file is still written in a single pass.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from d2merge.version import __version__
from d2merge.errors import D2MergeError
from d2merge.io.output import AtomicFiles, check_output_location
from d2merge.io.safetensors_file import rewrite_metadata
from d2merge.engine import resolve_device, write_tensors
from d2merge.export.hf_folder import MergeResult, card_info
from d2merge.io.source_hashes import BackgroundHashes
from d2merge.options import MergeOptions
from d2merge.plan import MergePlan, plan_for as plan

PLACEHOLDER = "0" * 64  # a sha256 in hex has exactly this width


def single_file_metadata(merge_plan: MergePlan, hashes: dict[str, str]) -> dict[str, str]:
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


def merge_to_safetensors(base: Any, adapter: Any, out: str | Path, options: MergeOptions | None = None, *,
                         progress: bool = False, **overrides: Any) -> MergeResult:
    """Merge into one ``.safetensors`` file at ``out`` (written beside it, renamed at the end)."""
    options = MergeOptions.resolve(options, {"max_shard_size": 2**62, **overrides})
    started = time.perf_counter()
    merge_plan = plan(base, adapter, options)
    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise D2MergeError("a single-file output must end in .safetensors", path=out_path,
                           hint="name the output like merged.safetensors, or use --format hf for a folder")
    out_path = check_output_location(out_path, [merge_plan.base.location, *(a.path for a in merge_plan.adapters)],
                                     overwrite=options.overwrite, is_file=True)
    device = resolve_device(options.device)
    sources = merge_plan.source_files()
    reserved = {label: PLACEHOLDER for label in sources}
    hasher = BackgroundHashes(sources) if options.hash_sources else None
    hashes: dict[str, str] = {}
    with AtomicFiles(out_path, overwrite=options.overwrite) as staging:
        temp = staging.staged
        write_tensors(merge_plan, staging.temp, device=device, progress=progress,
                      shard_paths=[temp], metadata=single_file_metadata(merge_plan, reserved), hasher=hasher)
        if hasher is not None:
            hashes = hasher.result()
            final = {k: (v if len(v) == 64 else PLACEHOLDER) for k, v in hashes.items()}
            entries = [(t.name, t.out_dtype, t.shape) for t in merge_plan.tensors]
            rewrite_metadata(temp, entries, single_file_metadata(merge_plan, {**reserved, **final}))
        staging.commit()
    return MergeResult(out_path, merge_plan, (out_path.name,), time.perf_counter() - started, hashes)
