"""One merge pipeline: plan, output location, source hashes, atomic output, engine, finalize, result.

Every merge the engine streams runs :func:`run_merge` with its format's :class:`EngineOutput`: the
HF folder (``export.hf_folder.FOLDER``) and the single file (``export.single_file.SINGLE_FILE``),
which the engine writes as safetensors shards (:class:`ShardOutput`), and the GGUF
(``export.gguf.merge.GGUFOutput``), which lays the engine's stream out itself. merge-many's jobs
open and finish the shard outputs around its one pass over the base (``many/run.py``), so a job's
files are the bytes ``d2merge merge`` writes.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import d2merge.profile as profile
from d2merge.device import ComputeDevice
from d2merge.engine import resolve_device, write_tensors
from d2merge.io.source_hashes import BackgroundHashes
from d2merge.options import MergeOptions
from d2merge.planning import MergePlan, TensorPlan, plan_for


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: the output, the plan it followed, its files, its time and the source hashes."""

    output: Path
    plan: MergePlan
    files: tuple[str, ...]
    seconds: float
    source_hashes: dict[str, str]


@dataclass
class Staged:
    """An output being written: the temp folder the engine writes into, its shard paths, the one-file header's
    metadata (None: the engine's own), the atomic output that commits it (``io.output``), and what the
    output's ``begin`` hands its ``write`` and ``finish`` (``extra``: the GGUF's scratch and target files)."""

    temp: Path
    shard_paths: list[Path] | None
    metadata: dict[str, str] | None
    atomic: Any
    extra: dict[str, Any] = field(default_factory=dict)


class EngineOutput(Protocol):
    """An output the engine streams into: how it opens, how the stream is laid out, and what it adds at the end."""

    is_file: bool

    def check_location(self, out: Path, merge_plan: MergePlan, overwrite: bool) -> Path:
        """Refuse (one line) an output path this format cannot write; the path it writes."""
        ...

    def begin(self, merge_plan: MergePlan, out: Path, overwrite: bool) -> AbstractContextManager[Staged]:
        """The atomic output, entered: a temp place that vanishes unless ``finish`` commits it."""
        ...

    def write(self, staged: Staged, merge_plan: MergePlan, *, device: ComputeDevice, hasher: BackgroundHashes | None,
              progress: bool, on_tensor: Callable[[TensorPlan], None] | None) -> list[str]:
        """Every tensor of the plan, from the engine, into ``staged`` (``hasher`` fed from the engine's reads);
        the names of the files written."""
        ...

    def finish(self, staged: Staged, merge_plan: MergePlan, hashes: dict[str, str], written: list[str]
               ) -> list[str]:
        """Everything after the tensors (metadata, the hashes into their placeholders), then the commit;
        the names of the files the output holds."""
        ...


class ShardOutput:
    """The engine's own layout: safetensors shards at ``staged.shard_paths`` (the HF folder, the single file).

    merge-many writes these outputs' shards in its one pass and calls only ``begin`` and ``finish``.
    """

    def write(self, staged: Staged, merge_plan: MergePlan, *, device: ComputeDevice, hasher: BackgroundHashes | None,
              progress: bool, on_tensor: Callable[[TensorPlan], None] | None) -> list[str]:
        return write_tensors(merge_plan, staged.temp, device=device, progress=progress, on_tensor=on_tensor,
                             shard_paths=staged.shard_paths, metadata=staged.metadata, hasher=hasher)


def run_merge(base: Any, adapter: Any, out: str | Path, options: MergeOptions, output: EngineOutput, *,
              progress: bool = False, on_tensor: Callable[[TensorPlan], None] | None = None) -> MergeResult:
    """Plan, check the output, hash the sources while the engine streams into ``output``, finish, commit."""
    started = time.perf_counter()
    with profile.phase("plan"):
        merge_plan = plan_for(base, adapter, options)
    out_path = output.check_location(Path(out), merge_plan, options.overwrite)
    device = resolve_device(options.device)
    hashes = BackgroundHashes(merge_plan.source_files()) if options.hash_sources else None
    try:
        with output.begin(merge_plan, out_path, options.overwrite) as staged:
            written = output.write(staged, merge_plan, device=device, hasher=hashes, progress=progress,
                                   on_tensor=on_tensor)
            digests = hashes.result() if hashes is not None else {}
            files = output.finish(staged, merge_plan, digests, written)
    finally:
        if hashes is not None:
            hashes.abandon()  # stops the hashing thread if the merge failed; a no-op after result()
    return MergeResult(out_path, merge_plan, tuple(files), time.perf_counter() - started, digests)
