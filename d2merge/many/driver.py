"""``merge_many``: the manifest, every job checked first, then the groups run here, in worker processes or on Ray.

It sits above :mod:`d2merge.many.run` (the unit of work), :mod:`d2merge.many.checks` and
:mod:`d2merge.many.report` (the report's records) and
:mod:`d2merge.many.ray_jobs` (which runs that unit as Ray tasks), so neither imports
the other's caller: the Ray runner imports ``run``, and only this module imports both.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from d2merge.errors import D2MergeError
from d2merge.io.output import check_output_location, disk_error
from d2merge.io.checkpoint import open_base
from d2merge.many.manifest import Job, load_manifest
from d2merge.options.many import ManyOptions
from d2merge.many.checks import SourceHashes, check_jobs
from d2merge.many.report import FAILED, NOT_RUN, PLANNED, SKIPPED, JobOutcome, ManyReport
from d2merge.many.run import _run_checked, _run_processes
from d2merge.many.stream import OnTensor


def merge_many(base: str | Path, manifest: str | Path | Sequence[Job | str | Path], outdir: str | Path,
               options: ManyOptions | None = None, *, dry_run: bool = False, ray: str | None = None,
               progress: bool = False, on_tensor: OnTensor | None = None,
               echo: Callable[[str], None] | None = None, **overrides: Any) -> ManyReport:
    """Merge every job of ``manifest`` (a manifest file, or Jobs / adapter folders) into ``base`` under ``outdir``.

    Keyword overrides are ManyOptions fields: ``merge_many(base, "jobs.yaml", "out", dtype="bf16", workers=2)``.
    ``ray`` (``"auto"``, ``"local"`` or a cluster address) runs the groups of jobs as Ray tasks.
    ``on_tensor(job_name, tensor_plan)`` is called after each tensor a job writes.
    The report's ``exit_code`` is what the CLI exits with.
    """
    from d2merge.many.manifest import jobs_from

    options = replace(options or ManyOptions(), **overrides) if overrides else (options or ManyOptions())
    say = echo or (lambda _msg: None)
    started = time.perf_counter()
    if isinstance(manifest, (str, Path)):
        jobs = load_manifest(manifest, options.job_defaults())
    else:
        plain = [str(j) if isinstance(j, Path) else j for j in manifest]
        if all(isinstance(j, Job) for j in plain):
            jobs = list(plain)  # type: ignore[arg-type]
        else:
            jobs = jobs_from([j.to_json() if isinstance(j, Job) else j for j in plain], base_folder=Path.cwd(),
                             defaults=options.job_defaults())
    out = Path(outdir).expanduser().absolute()
    if ray is not None and not dry_run:
        from d2merge.many.ray_jobs import import_ray

        import_ray()  # a missing extra is one line before anything is planned or created
    if options.html:  # before any work: a run's page is never lost to a bad path at the end
        html = check_output_location(Path(options.html), (), overwrite=True, is_file=True)
        options = replace(options, html=str(html))  # absolute: workers and Ray tasks write the job pages
    base_ckpt = open_base(base, allow_pickle=options.allow_pickle)
    if not dry_run:
        _make_outdir(out)
    hashes = SourceHashes(base_ckpt)
    checked = check_jobs(base_ckpt, jobs, out, options, hashes)
    bad = [c for c in checked if c.error is not None]
    for entry in bad:
        say(f"d2merge: error: {entry.error}")
    runner = "local" if ray is None else "ray"
    if dry_run or (bad and not options.keep_going):
        outcomes = []
        for c in checked:
            status = FAILED if c.error else (SKIPPED if c.skip else (PLANNED if dry_run else NOT_RUN))
            error = c.error if c.error else (None if dry_run or c.skip else
                                             "not run: another job cannot run (fix it, or pass --keep-going)")
            outcomes.append(JobOutcome(c.job.name, str(c.job.adapter), str(c.output), status, error=error,
                                       method=c.plan.adapter.method.name if c.plan else None, plan=c.plan))
        return _with_page(ManyReport(str(base_ckpt.location), str(out), outcomes, time.perf_counter() - started,
                                     runner), options)

    peak = 0
    if ray is not None:
        from d2merge.many.ray_jobs import run_on_ray

        runnable = [c.job for c in checked if c.error is None]
        done = {o.name: o for o in run_on_ray(ray, base_ckpt.location, runnable, out, options, on_tensor=on_tensor,
                                              echo=say)}
        outcomes = [done.get(c.job.name) or JobOutcome(c.job.name, str(c.job.adapter), str(c.output), FAILED,
                                                       error=c.error) for c in checked]
    elif options.parallel == "process" and options.workers > 1:
        outcomes, peak = _run_processes(base_ckpt, checked, out, options, on_tensor)
    else:
        outcomes, peak = _run_checked(base_ckpt, checked, options, hashes, progress=progress, on_tensor=on_tensor)
    return _with_page(ManyReport(str(base_ckpt.location), str(out), outcomes, time.perf_counter() - started, runner,
                                 peak), options)


def _with_page(report: ManyReport, options: ManyOptions) -> ManyReport:
    if options.html:
        from d2merge.reports.many_page import write_many_page

        write_many_page(report, options.html)
    return report


def _make_outdir(out: Path) -> None:
    if out.is_dir():
        return
    if out.exists() or out.is_symlink():
        raise D2MergeError("OUTDIR exists and is not a folder", path=out, hint="choose another -o OUTDIR")
    if not out.parent.is_dir():
        raise D2MergeError("OUTDIR's parent folder does not exist", path=out.parent, hint="create it first")
    try:
        out.mkdir()
    except OSError as exc:
        raise disk_error(exc, out) from None
