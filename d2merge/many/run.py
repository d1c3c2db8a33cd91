"""merge-many: plan and check every job, skip the finished ones, merge the rest in one pass over the base.

Order of work, which is also the safety policy:

1. open the base once and plan every job (headers and configs only); a job that
   cannot be planned is reported by name before anything is written;
2. a job whose output already exists is skipped when the output is complete
   and its provenance matches (the sha256 of every source in its model card or
   header, the same options); otherwise it is refused unless ``overwrite``;
3. the rest are merged in passes of at most ``max_jobs_per_pass`` jobs, each
   pass reading the base once (:mod:`d2merge.many.stream`); every output is
   written to a temp name and renamed into place only when complete;
4. jobs that asked for it are verified, and the table goes into their card.

The unit of work (:func:`run_group`: open, check, merge, verify a list of jobs)
is self-contained, so worker processes and Ray tasks run the same code.
``merge_many`` (:mod:`d2merge.many.driver`) sits above this module and
:mod:`d2merge.many.ray_jobs`, and picks where the groups run.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from d2merge.errors import D2MergeError, OptionError
from d2merge.export.pipeline import EngineOutput, Staged
from d2merge.export.provenance import output_matches
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.io.output import check_output_location, sha256_file
from d2merge.many.manifest import Job
from d2merge.options.many import ManyOptions, job_page_path
from d2merge.many.stream import OnTensor, Target, stream_many
from d2merge.engine import resolve_device
from d2merge.export.registry import get_format
from d2merge.export.hf_folder import add_verify_table_to_card
from d2merge.planning import MergePlan, build_plan
from d2merge.sizes import parse_size

# Statuses of a job in the report.
PLANNED, SKIPPED, MERGED, FAILED, VERIFY_FAILED, NOT_RUN = (
    "planned", "skipped", "merged", "failed", "verify_failed", "not_run")


@dataclass
class JobOutcome:
    """What happened to one job: the report's row."""

    name: str
    adapter: str
    output: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    verify: dict[str, Any] | None = None  # {"passed": bool, "failures": [...]} when verified
    method: str | None = None
    plan: MergePlan | None = field(default=None, repr=False, compare=False)  # in-process runs only

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": self.adapter, "output": self.output, "status": self.status,
                "seconds": round(self.seconds, 3), "error": self.error, "verify": self.verify, "method": self.method}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobOutcome":
        return cls(**{k: data[k] for k in ("name", "adapter", "output", "status", "seconds", "error", "verify",
                                           "method")})


@dataclass
class ManyReport:
    """The run's summary: one outcome per job, in manifest order."""

    base: str
    outdir: str
    outcomes: list[JobOutcome]
    seconds: float = 0.0
    runner: str = "local"
    peak_inflight_bytes: int = 0

    @property
    def exit_code(self) -> int:
        """0 all succeeded (or skipped), 1 a verification failed, 2 a job could not run."""
        statuses = {o.status for o in self.outcomes}
        if statuses & {FAILED, NOT_RUN}:
            return 2
        return 1 if VERIFY_FAILED in statuses else 0

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        return counts

    def table(self) -> str:
        width = max([len(o.name) for o in self.outcomes] + [3])
        lines = [f"{'job':<{width}}  {'status':<13}  {'seconds':>7}  output / error"]
        for o in self.outcomes:
            verdict = ""
            if o.verify is not None:
                verdict = "  verify " + ("PASS" if o.verify["passed"] else "FAIL: " + "; ".join(o.verify["failures"]))
            detail = o.error if o.error else o.output + verdict
            lines.append(f"{o.name:<{width}}  {o.status:<13}  {o.seconds:>7.2f}  {detail}")
        lines.append(", ".join(f"{n} {s}" for s, n in self.counts().items())
                     + f" of {len(self.outcomes)} jobs in {self.seconds:.2f}s ({self.runner})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "outdir": self.outdir, "runner": self.runner, "seconds": round(self.seconds, 3),
                "exit_code": self.exit_code, "counts": self.counts(), "peak_inflight_bytes": self.peak_inflight_bytes,
                "jobs": [o.to_json() for o in self.outcomes]}

    def save(self, path: str | Path) -> Path:
        from d2merge.io.output import save_json

        return save_json(Path(path), self.to_json())


# ----- planning and checking -----------------------------------------------------------------


@dataclass
class CheckedJob:
    """A job after planning: its plan, and whether it is to run, to skip, or cannot run."""

    job: Job
    output: Path
    plan: MergePlan | None = None
    error: str | None = None
    skip: bool = False


def _error_line(job: Job, exc: BaseException) -> str:
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
            if outdir.is_dir():  # a dry run may name an OUTDIR the real run would create
                check_output_location(output, [base.location, entry.plan.adapter.path], overwrite=True,
                                      is_file=get_format(job.format).is_file)
            if output.exists():
                if output_matches(entry.plan, output, hashes.for_plan(entry.plan), is_file=get_format(job.format).is_file):
                    # A verified job is verified again: the card's old verdict may be for other thresholds.
                    entry.skip = True
                elif not options.overwrite:
                    raise D2MergeError("output exists but is not this job's complete result (its sources, options "
                                       "or files differ)", path=output,
                                       hint="pass --overwrite to replace it, or choose another OUTDIR")
        except Exception as exc:  # a bad job is reported by name; the others are unaffected
            entry.error = _error_line(job, exc)
    return checked


# ----- running -------------------------------------------------------------------------------


def _shard_paths(entry: CheckedJob, opened: Staged) -> list[Path]:
    assert entry.plan is not None
    return opened.shard_paths or [opened.temp / name for name in entry.plan.shard_names]


def run_pass(base: BaseCheckpoint, entries: list[CheckedJob], options: ManyOptions, hashes: SourceHashes, *,
             progress: bool = False, on_tensor: OnTensor | None = None) -> tuple[list[JobOutcome], int]:
    """Merge ``entries`` (planned, to run) in one pass over the base; (outcomes, peak bytes held)."""
    started = time.perf_counter()
    hashes.start()
    outcomes: dict[str, JobOutcome] = {}
    targets: list[Target] = []
    with ExitStack() as stack:
        # Each job's output opens and finishes as `d2merge merge` writes it (export.pipeline): the same bytes.
        staged: dict[str, tuple[EngineOutput, Staged]] = {}
        for entry in entries:
            assert entry.plan is not None
            job = entry.job
            try:
                output = get_format(job.format).engine_output()
                opened = stack.enter_context(output.begin(entry.plan, entry.output, entry.output.exists()))
                staged[job.name] = (output, opened)
                targets.append(Target(job.name, entry.plan, _shard_paths(entry, opened), opened.metadata))
            except Exception as exc:
                outcomes[job.name] = JobOutcome(job.name, str(job.adapter), str(entry.output), FAILED,
                                                error=_error_line(job, exc), method=entry.plan.adapter.method.name)
        budget = stream_many(targets, device=resolve_device(options.device),
                             max_inflight_bytes=parse_size(options.max_inflight),
                             threads=options.workers if options.parallel == "thread" else 1,
                             progress=progress, on_tensor=on_tensor)
        by_name = {e.job.name: e for e in entries}
        for target in targets:
            entry = by_name[target.name]
            job = entry.job
            if target.error is None:
                try:
                    output, opened = staged[job.name]
                    output.finish(opened, entry.plan, hashes.for_plan(entry.plan), [])  # type: ignore[arg-type]
                except Exception as exc:
                    target.fail(exc)
            seconds = time.perf_counter() - started
            if target.error is not None:
                outcomes[job.name] = JobOutcome(job.name, str(job.adapter), str(entry.output), FAILED, seconds,
                                                error=_error_line(job, target.error),
                                                method=target.plan.adapter.method.name)
            else:
                outcomes[job.name] = JobOutcome(job.name, str(job.adapter), str(entry.output), MERGED, seconds,
                                                method=target.plan.adapter.method.name, plan=target.plan)
    return [outcomes[e.job.name] for e in entries], budget.peak


def _verify(entry: CheckedJob, outcome: JobOutcome, base: BaseCheckpoint, options: ManyOptions,
            hashes: SourceHashes) -> None:
    """Verify a merged job as `d2merge merge --verify` does, and put the table in its card."""
    from d2merge.verify import VerifyOptions, verify

    job = entry.job
    started = time.perf_counter()
    try:
        report = verify(base.location, job.adapter, entry.output, thresholds=dict(job.thresholds) or None,
                        options=VerifyOptions(tied_embeddings=job.tied_embeddings, allow_pickle=options.allow_pickle))
        plan = entry.plan
        assert plan is not None
        add_verify_table_to_card(entry.output, plan, hashes.for_plan(plan), report.table())
        page = None
        if options.html:
            from d2merge.reports.verify_page import write_verify_page

            page = job_page_path(options.html, job.name)
            page.parent.mkdir(parents=True, exist_ok=True)
            write_verify_page(report, page)
    except Exception as exc:
        outcome.status, outcome.error = FAILED, _error_line(job, exc)
        return
    finally:
        outcome.seconds += time.perf_counter() - started
    outcome.verify = {"passed": report.passed, "failures": report.failures()}
    if page is not None:
        outcome.verify["html"] = str(page)
    if not report.passed:
        outcome.status = VERIFY_FAILED


def run_group(base: str | Path | BaseCheckpoint, jobs: Sequence[Job], outdir: str | Path,
              options: ManyOptions | None = None, *, progress: bool = False,
              on_tensor: OnTensor | None = None) -> tuple[list[JobOutcome], int]:
    """Check, merge (passes of ``max_jobs_per_pass``) and verify ``jobs``: what a worker or a Ray task runs.

    Jobs already complete with matching provenance are skipped, so a retried
    task redoes only what its lost attempt did not finish.
    """
    options = options or ManyOptions()
    if not isinstance(base, BaseCheckpoint):
        base = open_base(base, allow_pickle=options.allow_pickle)
    hashes = SourceHashes(base)
    checked = check_jobs(base, jobs, Path(outdir), options, hashes)
    return _run_checked(base, checked, options, hashes, progress=progress, on_tensor=on_tensor)


def _run_checked(base: BaseCheckpoint, checked: list[CheckedJob], options: ManyOptions, hashes: SourceHashes, *,
                 progress: bool, on_tensor: OnTensor | None) -> tuple[list[JobOutcome], int]:
    outcomes: dict[str, JobOutcome] = {}
    todo = []
    for entry in checked:
        job = entry.job
        if entry.error is not None:
            outcomes[job.name] = JobOutcome(job.name, str(job.adapter), str(entry.output), FAILED, error=entry.error)
        elif entry.skip:
            outcomes[job.name] = JobOutcome(job.name, str(job.adapter), str(entry.output), SKIPPED,
                                            method=entry.plan.adapter.method.name, plan=entry.plan)
        else:
            todo.append(entry)
    peak = 0
    step = options.max_jobs_per_pass
    for start in range(0, len(todo), step):
        done, pass_peak = run_pass(base, todo[start:start + step], options, hashes, progress=progress,
                                   on_tensor=on_tensor)
        peak = max(peak, pass_peak)
        outcomes.update({o.name: o for o in done})
    for entry in checked:
        outcome = outcomes[entry.job.name]
        needs = entry.job.verify and outcome.status in (MERGED, SKIPPED) and outcome.verify is None
        if needs:
            _verify(entry, outcome, base, options, hashes)
    return [outcomes[e.job.name] for e in checked], peak


def _process_group(base: str, jobs: list[Job], outdir: str, options: ManyOptions,
                   on_tensor: OnTensor | None) -> tuple[list[dict[str, Any]], int]:
    torch.set_num_threads(1)
    outcomes, peak = run_group(base, jobs, outdir, options, on_tensor=on_tensor)
    return [o.to_json() for o in outcomes], peak


def split_jobs(jobs: Sequence[Job], groups: int) -> list[list[Job]]:
    """Round-robin into ``groups`` non-empty groups (similar sizes, manifest order kept within each)."""
    groups = max(1, min(groups, len(jobs)))
    return [list(jobs[i::groups]) for i in range(groups)]


def _run_processes(base: BaseCheckpoint, checked: list[CheckedJob], out: Path, options: ManyOptions,
                   on_tensor: OnTensor | None) -> tuple[list[JobOutcome], int]:
    """Each group of jobs in its own process (spawned: no forked torch state), each with its own pass."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    runnable = [c.job for c in checked if c.error is None]
    groups = split_jobs(runnable, options.workers)
    done: dict[str, JobOutcome] = {}
    peak = 0
    inner = replace(options, workers=1)
    with ProcessPoolExecutor(max_workers=len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(group, pool.submit(_process_group, str(base.location), group, str(out), inner, on_tensor))
                   for group in groups]
        for group, future in futures:
            try:
                rows, group_peak = future.result()
            except Exception as exc:  # the process died: its jobs failed, the other groups are unaffected
                for job in group:
                    done[job.name] = JobOutcome(job.name, str(job.adapter), str(job.output(out)), FAILED,
                                                error=f"job '{job.name}': worker process failed: "
                                                      f"{type(exc).__name__}: {' '.join(str(exc).split())}")
                continue
            peak = max(peak, group_peak)
            done.update({row["name"]: JobOutcome.from_json(row) for row in rows})
    return [done.get(c.job.name) or JobOutcome(c.job.name, str(c.job.adapter), str(c.output), FAILED, error=c.error)
            for c in checked], peak
