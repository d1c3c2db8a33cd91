"""merge-many's checks: plan every job and decide run, skip or cannot run, before anything is written.

A job that cannot be planned, or whose output exists but is not its complete result, gets its
row's error here (one line, naming the job); a job whose output is complete and made from the
same sources (``export.provenance.output_matches``, the sha256 of every source) is skipped.
The passes (:mod:`d2merge.many.run`) then merge only what is left.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from d2merge.errors import D2MergeError, OptionError
from d2merge.export.provenance import output_matches
from d2merge.export.registry import get_format
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.io.output import check_output_location, sha256_file
from d2merge.many.manifest import Job
from d2merge.options.many import ManyOptions
from d2merge.planning import MergePlan, build_plan


@dataclass
class CheckedJob:
    """A job after planning: its plan, and whether it is to run, to skip, or cannot run."""

    job: Job
    output: Path
    plan: MergePlan | None = None
    error: str | None = None
    skip: bool = False


def error_line(job: Job, exc: BaseException) -> str:
    """A job's row in the report. Its text speaks the command line's language (``--allow-pickle``, as
    ``pass --keep-going`` does): the rows are printed by ``merge-many``, written to its JSON and HTML
    reports, and carried as plain strings through process pools and Ray."""
    if isinstance(exc, OptionError):
        return f"job '{job.name}': {exc.for_cli()}"
    if isinstance(exc, D2MergeError):
        return f"job '{job.name}': {exc}"
    return f"job '{job.name}': internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"


def plan_job(base: BaseCheckpoint, job: Job, allow_pickle: bool = False) -> MergePlan:
    adapter = load_adapter(job.adapter, allow_pickle=allow_pickle)
    settings = {"dtype": job.dtype, "max_shard_size": job.max_shard_size, "tied_embeddings": job.tied_embeddings}
    settings.update(get_format(job.format).plan_overrides())  # what the format's own merge plans
    return build_plan(base, adapter, **settings)


class SourceHashes:
    """sha256 of the base's files (once per process) and of each adapter's, labelled as the model card does."""

    def __init__(self, base: BaseCheckpoint):
        self._base = base
        self._base_hashes: dict[Path, str] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Hash the base on a background thread (hashlib releases the GIL) while the pass runs."""
        if self._base_hashes is None and self._thread is None:
            self._thread = threading.Thread(target=self.base_hashes, name="d2merge-many-hash", daemon=True)
            self._thread.start()

    def base_hashes(self) -> dict[Path, str]:
        with self._lock:
            if self._base_hashes is None:
                self._base_hashes = {p: _sha256_or_unreadable(p) for p in self._base.weight_files}
            return self._base_hashes

    def for_plan(self, plan: MergePlan) -> dict[str, str]:
        """The labels ``d2merge merge`` records (``plan.source_files``), the base hashed once for all jobs."""
        base = self.base_hashes()
        return {label: base[path] if path in base else _sha256_or_unreadable(path)
                for label, path in plan.source_files().items()}


def _sha256_or_unreadable(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError:
        return "unreadable"


def check_jobs(base: BaseCheckpoint, jobs: Sequence[Job], outdir: Path, options: ManyOptions,
               hashes: SourceHashes) -> list[CheckedJob]:
    """Plan every job and decide run / skip / cannot run, before anything is written."""
    checked: list[CheckedJob] = []
    for job in jobs:
        output = job.output(outdir)
        entry = CheckedJob(job, output)
        checked.append(entry)
        try:
            entry.plan = plan_job(base, job, options.allow_pickle)
            is_file = get_format(job.format).is_file
            if outdir.is_dir():  # a dry run may name an OUTDIR the real run would create
                check_output_location(output, [base.location, entry.plan.adapter.path], overwrite=True,
                                      is_file=is_file)
            if output.exists():
                if output_matches(entry.plan, output, hashes.for_plan(entry.plan), is_file=is_file):
                    # A verified job is verified again: the card's old verdict may be for other thresholds.
                    entry.skip = True
                elif not options.overwrite:
                    raise D2MergeError("output exists but is not this job's complete result (its sources, options "
                                       "or files differ)", path=output,
                                       hint="pass --overwrite to replace it, or choose another OUTDIR")
        except Exception as exc:  # a bad job is reported by name; the others are unaffected
            entry.error = error_line(job, exc)
    return checked
