"""merge-many on a Ray cluster: groups of jobs run as Ray tasks, each one pass over the base on its node.

The base, the adapters and OUTDIR must be at the same paths on every node (a
shared filesystem); each task writes its jobs' outputs there directly, atomically.
A task holds a group of jobs so that each node reads the base once per group,
not once per job. Ray retries a task whose worker is lost (``max_retries``);
the retry skips the jobs its lost attempt had already finished (their outputs
are complete and their provenance matches) and redoes the rest. A job's own
failure is a row of the task's result, so it never fails the task's other jobs,
and a task lost for good fails only its own jobs.

``ray`` is an optional extra (``pip install 'd2merge[ray]'``), imported only here.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from d2merge.errors import D2MergeError, escaped, option_error
from d2merge.many.manifest import Job
from d2merge.options.many import ManyOptions
from d2merge.many.report import FAILED, JobOutcome
from d2merge.many.run import run_group, split_jobs
from d2merge.many.stream import OnTensor

# Retries of a task whose worker process or node died (Ray's own default is 3 as well).
TASK_RETRIES = 3


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise option_error("{ray} needs the ray package, which is not installed",
                           hint="pip install 'd2merge[ray]'") from None
    return ray


def _group_task(base: str, jobs: list[Job], outdir: str, options: ManyOptions,
                on_tensor: OnTensor | None) -> list[dict[str, Any]]:
    """One Ray task: check, merge and verify a group of jobs on this node (rows, never an exception for a job)."""
    import torch

    torch.set_num_threads(1)
    try:
        outcomes, _ = run_group(base, jobs, outdir, options, on_tensor=on_tensor)
    except D2MergeError as exc:  # the base itself cannot be opened here (a path not shared with this node?)
        return [JobOutcome(j.name, str(j.adapter), str(j.output(Path(outdir))), FAILED,
                           error=f"job '{j.name}': {exc}").to_json() for j in jobs]
    return [o.to_json() for o in outcomes]


def connect(ray: Any, address: str, num_cpus: int | None) -> bool:
    """Connect to (or, for ``local``, start) a cluster; True when this call started Ray and must shut it down."""
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            # Workers must import d2merge from where this process does.
            here = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
        else:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=False)
    except D2MergeError:
        raise
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError... for an unreachable cluster
        raise option_error(escaped(f"cannot reach the Ray cluster at {address!r}: {type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:300]}"),
                           hint="start one with `ray start --head`, pass its address, or use {ray=local}") from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes: Ray retries an unreachable head for a long time before it gives up."""
    if address == "auto":
        return  # Ray finds the local cluster itself and says at once when there is none
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise D2MergeError(f"invalid Ray address {address!r}",
                           hint="use auto, local, HOST:PORT (the GCS port, 6379) or ray://HOST:PORT (client, 10001)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise option_error(escaped(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}"),
                           hint="start one with `ray start --head`, check the address, or use {ray=local}") from None


def group_count(jobs: int, cpus: float, max_jobs_per_pass: int) -> int:
    """As many tasks as the cluster has CPUs (each reads the base once), no task over the per-pass cap."""
    return max(1, min(jobs, max(int(cpus), math.ceil(jobs / max_jobs_per_pass))))


def run_on_ray(address: str, base: str | Path, jobs: Sequence[Job], outdir: Path, options: ManyOptions, *,
               on_tensor: OnTensor | None = None, echo: Callable[[str], None] | None = None) -> list[JobOutcome]:
    """Run ``jobs`` as Ray tasks (groups sized from the cluster's CPUs); one outcome per job."""
    if not jobs:
        return []
    ray = import_ray()
    say = echo or (lambda _msg: None)
    started_here = connect(ray, address, options.workers if address == "local" else None)
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        groups = split_jobs(list(jobs), group_count(len(jobs), cpus, options.max_jobs_per_pass))
        say(f"ray: {len(jobs)} jobs in {len(groups)} task(s) on {cpus:g} CPU(s)")
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(_group_task)
        inner = ManyOptions(**{**options.__dict__, "workers": 1})
        refs = [task.remote(str(base), group, str(outdir), inner, on_tensor) for group in groups]
        outcomes: list[JobOutcome] = []
        for group, ref in zip(groups, refs):
            try:
                outcomes += [JobOutcome.from_json(row) for row in ray.get(ref)]
            except Exception as exc:  # retries exhausted or the task could not run: only its jobs fail
                line = ' '.join(str(exc).split())[:300]
                outcomes += [JobOutcome(j.name, str(j.adapter), str(j.output(outdir)), FAILED,
                                        error=f"job '{j.name}': Ray task failed: {type(exc).__name__}: {line}")
                             for j in group]
        return outcomes
    finally:
        if started_here:
            ray.shutdown()
