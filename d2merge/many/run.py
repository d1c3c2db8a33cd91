"""merge-many's unit of work: check every job, skip the finished ones, merge the rest in one pass over the base.

Order of work, which is also the safety policy:

1. open the base once and plan every job (headers and configs only); a job that
   cannot be planned is reported by name before anything is written
   (:mod:`d2merge.many.checks`);
2. a job whose output already exists is skipped when the output is complete
   and its provenance matches (the sha256 of every source in its model card or
   header, the same options); otherwise it is refused unless ``overwrite`` (the same module);
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

import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from d2merge.engine import resolve_device
from d2merge.export.hf_folder import add_verify_table_to_card
from d2merge.export.pipeline import EngineOutput, Staged
from d2merge.export.registry import get_format
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.many.checks import CheckedJob, SourceHashes, check_jobs, error_line
from d2merge.many.manifest import Job
from d2merge.many.report import FAILED, MERGED, SKIPPED, VERIFY_FAILED, JobOutcome
from d2merge.many.stream import OnTensor, Target, stream_many
from d2merge.options.many import ManyOptions, job_page_path
from d2merge.sizes import parse_size

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
                                                error=error_line(job, exc), method=entry.plan.adapter.method.name)
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
                                                error=error_line(job, target.error),
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
        outcome.status, outcome.error = FAILED, error_line(job, exc)
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
