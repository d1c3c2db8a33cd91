"""One merged ``.safetensors`` file, with the merge's provenance in its header metadata.

For deployments that take a bare weights file. The metadata records the method,
its settings, the d2merge version and the sha256 of every source file
(``export.provenance.single_file_metadata``); the hashes are computed while the
tensors stream and written into space reserved in the header, so the file is
still written in a single pass (``export.pipeline.run_merge`` with :data:`SINGLE_FILE`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from d2merge.errors import D2MergeError, option_error
from d2merge.export.pipeline import MergeResult, ShardOutput, Staged, run_merge
from d2merge.export.provenance import HASH_PLACEHOLDER as PLACEHOLDER
from d2merge.export.provenance import filled, reserved, single_file_metadata
from d2merge.io.output import AtomicFiles, check_output_location
from d2merge.io.safetensors_file import rewrite_metadata
from d2merge.options import MergeOptions
from d2merge.planning import MergePlan

__all__ = ["PLACEHOLDER", "SINGLE_FILE", "merge_to_safetensors", "single_file_metadata"]


def merge_to_safetensors(base: Any, adapter: Any, out: str | Path, options: MergeOptions | None = None, *,
                         progress: bool = False, **overrides: Any) -> MergeResult:
    """Merge into one ``.safetensors`` file at ``out`` (written beside it, renamed at the end)."""
    options = MergeOptions.resolve(options, {"max_shard_size": 2**62, **overrides})
    return run_merge(base, adapter, out, options, SINGLE_FILE, progress=progress)


class SingleFileOutput(ShardOutput):
    """One ``.safetensors`` file as an engine output: the header reserves the hashes' width, the end fills it."""

    is_file = True

    def check_location(self, out: Path, merge_plan: MergePlan, overwrite: bool) -> Path:
        if out.suffix != ".safetensors":
            raise option_error("a single-file output must end in .safetensors", path=out,
                               hint="name the output like merged.safetensors, or use {format=hf} for a folder")
        return check_output_location(out, [merge_plan.base.location, *(a.path for a in merge_plan.adapters)],
                                     overwrite=overwrite,
                                     is_file=True)

    @contextmanager
    def begin(self, merge_plan: MergePlan, out: Path, overwrite: bool) -> Iterator[Staged]:
        with AtomicFiles(out, overwrite=overwrite) as staging:
            yield Staged(staging.temp, [staging.staged], single_file_metadata(merge_plan, reserved(
                merge_plan.source_files())), staging)

    def finish(self, staged: Staged, merge_plan: MergePlan, hashes: dict[str, str], written: list[str]
               ) -> list[str]:
        """The hashes into the header's placeholders (same length: no byte moves), then the rename."""
        if hashes:  # none when the sources were not hashed: the placeholders stay
            entries = [(t.name, t.out_dtype, t.shape) for t in merge_plan.tensors]
            rewrite_metadata(staged.atomic.staged, entries,
                             single_file_metadata(merge_plan, filled(merge_plan.source_files(), hashes)))
        staged.atomic.commit()
        return [staged.atomic.final.name]


SINGLE_FILE = SingleFileOutput()
