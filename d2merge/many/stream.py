"""One pass over the base for many merges: each base tensor is read once, every job's tensor computed from it.

The jobs share the base, so the pass walks the base's tensors in order. At
each step the base tensor is read once into a shared buffer; each job then
takes its output tensor from it exactly as ``d2merge merge`` would (the same
engine function, the same one-thread fp32 arithmetic, the same cast), and a
writer thread appends it to that job's open shard. A job's tensors reach its
files in the order of its own plan, so each output is the bytes a single merge
writes. A tensor a job leaves unchanged (same dtype) is copied file to file
as the single merge copies it (``copy_file_range``: kernel-side, no pass
through this process's memory), so it is read into memory by nobody.

Memory: the base tensor of the step plus the jobs' computed tensors waiting
for the writer, all drawn from one :class:`InflightBudget` whose cap
(``max_inflight_bytes``) bounds them: roughly min(jobs x largest tensor, cap),
and never less than one step's tensors. A job that fails (a NaN in its merged
weight, a write error) is dropped from the pass; the others go on.
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

import d2merge.profile as profile
from d2merge.io.output import disk_error
from d2merge.io.safetensors_file import StreamingWriter, dtype_size
from d2merge.engine import ScratchBuffers, compute_output, one_intra_op_thread
from d2merge.planning import MergePlan, TensorPlan

OnTensor = Callable[[str, TensorPlan], None]


class WriterThread:
    """Runs write jobs on a second thread, strictly in order, while the pass computes the next step.

    Why a thread of the pass's own (the single merge needs none: its file's
    flusher overlaps the disk): here one step fans a base tensor out to many
    jobs' shards, so the appends themselves (copies into each file's staging)
    overlap the next step's arithmetic.

    - ``depth``: how many jobs may wait (``None``: unbounded; the pass bounds
      memory with its own budget);
    - ``job_submitted`` / ``job_done``: called as each job is queued and after it
      ran or was skipped (the pass's budget counts jobs in flight).

    Error policy: the first exception a job lets escape stops the writer (later
    jobs are skipped) and is raised in the caller's thread at the next
    :meth:`submit` or at :meth:`finish`. The pass's jobs record their own
    target's failure and carry on, so only a bug escapes.
    """

    def __init__(self, *, depth: int | None = 2, job_submitted: Callable[[], None] | None = None,
                 job_done: Callable[[], None] | None = None, name: str = "d2merge-writer"):
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth or 0)
        self._job_submitted = job_submitted
        self._job_done = job_done
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self._error is None and not self._abort.is_set():
                    job()
            except BaseException as exc:  # handed to the caller's thread, which reports it
                self._error = exc
            finally:
                if self._job_done is not None:
                    self._job_done()

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_error()
        if self._job_submitted is not None:
            self._job_submitted()
        with profile.phase("write (wait)"):  # the writer is behind: the caller waits here
            self._queue.put(job)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.raise_error()

    def abort(self) -> None:
        """Stop after the job in hand (the caller failed or was interrupted); queued jobs are skipped."""
        self._abort.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and self._job_done is not None:
                self._job_done()
        self._queue.put(None)
        self._thread.join()


class InflightBudget:
    """Buffers for the pass (read tensors and computed outputs), with the bytes they hold capped.

    Buffers are pooled by exact size (a model has few distinct tensor sizes), so
    the page faults of fresh allocations are paid once. ``take`` waits for the
    writer to hand buffers back when the cap is reached; when the writer has
    nothing pending, waiting cannot free anything, so one step may go over the cap
    rather than deadlock.
    """

    def __init__(self, cap: int):
        self.cap = max(1, int(cap))
        self.peak = 0
        self._held = 0  # bytes in use plus bytes pooled
        self._free: dict[int, list[torch.Tensor]] = {}
        self._pending = 0  # writer jobs not yet done
        self._cond = threading.Condition()

    def take(self, nbytes: int) -> torch.Tensor:
        size = max(int(nbytes), 1)
        with self._cond:
            while True:
                pool = self._free.get(size)
                if pool:
                    return pool.pop()
                self._evict(size)
                if self._held + size <= self.cap or self._pending == 0:
                    self._held += size
                    self.peak = max(self.peak, self._held)
                    return torch.empty(size, dtype=torch.uint8)
                self._cond.wait()

    def give(self, buffer: torch.Tensor) -> None:
        with self._cond:
            self._free.setdefault(buffer.numel(), []).append(buffer)
            self._cond.notify_all()

    def _evict(self, size: int) -> None:
        for other in list(self._free):
            pool = self._free[other]
            while pool and self._held + size > self.cap:
                pool.pop()
                self._held -= other
            if not pool:
                del self._free[other]

    def submitted(self) -> None:
        with self._cond:
            self._pending += 1

    def done(self) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()


class _PassBuffers(ScratchBuffers):
    """The engine's scratch buffers with outputs drawn from the pass's budget.

    No read buffer: the pass reads each base tensor itself, once, into the budget.
    """

    def __init__(self, budget: InflightBudget):
        super().__init__()
        self._budget = budget

    def read_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def output(self, nbytes: int) -> torch.Tensor:
        return self._budget.take(nbytes)

    def release(self, buffer: torch.Tensor | None) -> None:
        if buffer is not None:
            self._budget.give(buffer)


class _OnceReader:
    """The base's tensors as each job's plan sees them during the pass: loaded once per step, shared."""

    def __init__(self, tensors, budget: InflightBudget):  # tensors: a d2merge.io.checkpoint.TensorSource
        self._tensors = tensors
        self._budget = budget
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(self, name: str) -> None:
        if name in self._loaded:
            return
        dtype, shape = self._tensors.info(name)
        storage = self._budget.take(math.prod(shape) * dtype_size(dtype))
        self._loaded[name] = (self._tensors.read(name, storage), storage)

    def loaded(self, name: str) -> torch.Tensor:
        return self._loaded[name][0]

    def end_step(self) -> list[torch.Tensor]:
        """The step's buffers (handed back once the writer is done with them)."""
        storages = [storage for _, storage in self._loaded.values()]
        self._loaded = {}
        return storages

    # The TensorSource verbs the engine calls.
    def keys(self) -> list[str]:
        return self._tensors.keys()

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._tensors.info(name)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        if name in self._loaded:
            return self._loaded[name][0]
        return self._tensors.read(name, buffer if buffer is not None and buffer.numel() else None)

    def file_of(self, name: str) -> Path:
        return self._tensors.file_of(name)


@dataclass(eq=False)
class Target:
    """One job's output in the pass: its plan, where each shard goes, the header metadata.

    ``error`` is set when the job fails; the pass then skips it and abandons its file.
    """

    name: str
    plan: MergePlan
    shard_paths: list[Path]
    metadata: dict[str, str] | None = None
    error: BaseException | None = None
    # Open shard writers by shard index, and the tensors each shard still waits for. Shards are
    # not always contiguous in tensor order (huggingface_hub gives a tensor over the limit a shard
    # of its own before the shard being filled), so a job may hold several open at once.
    _writers: dict[int, StreamingWriter] = field(default_factory=dict, repr=False)
    _left: dict[int, int] = field(default_factory=dict, repr=False)
    _opened: set[int] = field(default_factory=set, repr=False)

    def abandon_all(self) -> None:
        for handle in self._writers.values():
            handle.abandon()
        self._writers.clear()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


def _reads_base(item: TensorPlan) -> bool:
    return item.action == "copy" or (item.action == "merge" and not item.base_from_adapter)


def stream_many(targets: list[Target], *, device: torch.device = torch.device("cpu"),
                max_inflight_bytes: int = 512 * 10**6, threads: int = 1, progress: bool = False,
                on_tensor: OnTensor | None = None) -> InflightBudget:
    """Write every target's tensors in one pass over their shared base; failed targets get ``error`` set.

    All targets must plan against the same opened base. ``threads`` > 1 computes
    different jobs' tensors of a step on a thread pool (torch releases the GIL in
    the arithmetic). Returns the budget (its ``peak`` is the bytes the pass held).
    """
    from tqdm.auto import tqdm

    if not targets:
        return InflightBudget(max_inflight_bytes)
    base = targets[0].plan.base
    if any(t.plan.base is not base for t in targets):
        raise ValueError("stream_many: every target must plan against the same opened base")
    budget = InflightBudget(max_inflight_bytes)
    reader = _OnceReader(base.tensors, budget)
    pass_base = replace(base, tensors=reader)
    order = {name: i for i, name in enumerate(base.tensors.keys())}

    # Each job's tensors grouped by the base tensor they are anchored at, in its plan's order.
    steps: dict[int, list[tuple[Target, MergePlan, list[TensorPlan]]]] = {}
    entries: dict[int, dict[int, list[tuple[str, torch.dtype, tuple[int, ...]]]]] = {}
    for t in targets:
        pass_plan = replace(t.plan, base=pass_base)
        groups: dict[int, list[TensorPlan]] = {}
        last = -1
        for item in t.plan.tensors:
            anchor = order.get(item.name, order.get(item.source, -1))
            if anchor < last or anchor < 0:
                raise RuntimeError(f"stream_many: plan of {t.name} is not in base order at {item.name}")
            last = anchor
            groups.setdefault(anchor, []).append(item)
        for anchor, items in groups.items():
            steps.setdefault(anchor, []).append((t, pass_plan, items))
        shard_entries: dict[int, list[tuple[str, torch.dtype, tuple[int, ...]]]] = {}
        for item in t.plan.tensors:
            shard_entries.setdefault(item.shard, []).append((item.name, item.out_dtype, item.shape))
        entries[id(t)] = shard_entries
        t._left = {shard: len(items) for shard, items in shard_entries.items()}

    byte_range = getattr(base.tensors, "byte_range", None)

    def raw_source(item: TensorPlan) -> tuple[Path, int, int] | None:
        if item.action != "copy" or item.in_dtype != item.out_dtype or byte_range is None:
            return None
        return byte_range(item.source)

    # Unbounded (the budget bounds memory), counting jobs in flight so the budget knows when
    # waiting for the writer can free anything; jobs record their own target's failure.
    writer = WriterThread(depth=None, job_submitted=budget.submitted, job_done=budget.done,
                          name="d2merge-many-writer")
    local = threading.local()

    def buffers() -> _PassBuffers:
        if not hasattr(local, "buffers"):
            local.buffers = _PassBuffers(budget)
        return local.buffers

    def opened(t: Target, path: Path, shard: int) -> Callable[[], None]:
        def job() -> None:
            if t.error is not None:
                return
            try:
                t._writers[shard] = StreamingWriter(path, entries[id(t)][shard], t.metadata or {"format": "pt"})
            except OSError as exc:
                t.fail(disk_error(exc, path))
            except Exception as exc:
                t.fail(exc)
        return job

    def wrote(t: Target, path: Path, item: TensorPlan, tensor: torch.Tensor | tuple[Path, int, int],
              storage: torch.Tensor | None) -> Callable[[], None]:
        def job() -> None:
            try:
                handle = t._writers.get(item.shard)
                if t.error is None and handle is not None:
                    try:
                        if isinstance(tensor, tuple):
                            handle.copy_from(item.name, *tensor)
                        else:
                            handle.write(item.name, tensor)
                    except OSError as exc:
                        raise disk_error(exc, path) from None
                    if on_tensor is not None:
                        on_tensor(t.name, item)
            except Exception as exc:
                t.fail(exc)
            finally:
                if storage is not None:
                    budget.give(storage)
        return job

    def closed(t: Target, path: Path, shard: int | None) -> Callable[[], None]:
        """Close one shard (``None``: abandon every open shard of a failed job)."""
        def job() -> None:
            if shard is None or t.error is not None:
                t.abandon_all()
                return
            handle = t._writers.pop(shard, None)
            if handle is None:
                return
            try:
                handle.close()
            except OSError as exc:
                t.fail(disk_error(exc, path))
            except Exception as exc:
                t.fail(exc)
        return job

    def released(storages: list[torch.Tensor]) -> Callable[[], None]:
        def job() -> None:
            for storage in storages:
                budget.give(storage)
        return job

    def run_step(t: Target, pass_plan: MergePlan, items: list[TensorPlan]) -> None:
        if t.error is not None:
            return
        try:
            for item in items:
                if item.shard not in t._opened:
                    t._opened.add(item.shard)
                    writer.submit(opened(t, t.shard_paths[item.shard], item.shard))
                path = t.shard_paths[item.shard]
                raw = raw_source(item)
                if raw is not None:
                    # unchanged bytes, copied file to file as `d2merge merge` does (kernel-side, never
                    # through this process's memory)
                    writer.submit(wrote(t, path, item, raw, None))
                elif item.action == "copy" and item.in_dtype == item.out_dtype:
                    writer.submit(wrote(t, path, item, reader.loaded(item.source), None))
                else:
                    storage, out = compute_output(pass_plan, item, device=device, buffers=buffers())
                    writer.submit(wrote(t, path, item, out, storage))
                t._left[item.shard] -= 1
                if t._left[item.shard] == 0:  # the shard's last tensor: close (fsync) it now
                    writer.submit(closed(t, path, item.shard))
        except Exception as exc:
            t.fail(exc)
            writer.submit(closed(t, t.shard_paths[0], None))

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="d2merge-many") if threads > 1 else None
    bar = tqdm(total=len(steps), unit="tensor", desc=f"merging {len(targets)} jobs", disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        # One intra-op thread, as the single merge: the same arithmetic order, so the same bytes.
        with one_intra_op_thread():
            for anchor in sorted(steps):
                # the step's base tensors are read once, then every job takes its tensors from them
                work = [entry for entry in steps[anchor] if entry[0].error is None]
                for _t, _plan, items in work:
                    for item in items:
                        if _reads_base(item) and raw_source(item) is None:
                            reader.load(item.source)
                if pool is None or len(work) < 2:
                    for entry in work:
                        run_step(*entry)
                else:
                    for future in [pool.submit(run_step, *entry) for entry in work]:
                        future.result()
                writer.submit(released(reader.end_step()))
                bar.update(1)
        for t in targets:
            if t.error is not None:  # failed in the writer thread: its open shards are abandoned
                writer.submit(closed(t, t.shard_paths[0], None))
        writer.finish()
    except BaseException:
        writer.abort()
        for t in targets:
            t.abandon_all()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        bar.close()
    return budget

