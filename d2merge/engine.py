"""The merge engine: read, compute, cast and write one stream of tensors, one tensor at a time.

Memory holds one base tensor, its adapter factors and the merged result at a
time, so peak memory depends on the largest tensor, not on the model size.
The engine knows the plan (what each output tensor is) and the safetensors
writer; it knows nothing of output formats: the HF-folder writer
(``d2merge.export.hf_folder``) and the single-file exporter
(``d2merge.export.single_file``) both hand it the shard paths to fill.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch

from d2merge.errors import D2MergeError
from d2merge.io.output import disk_error
from d2merge.io.safetensors_file import StreamingWriter, dtype_size
from d2merge.plan import MergePlan, TensorPlan


def resolve_device(name: str) -> torch.device:
    """The device the fp32 math runs on; a missing CUDA device is refused before any work."""
    if name == "cuda" and not torch.cuda.is_available():
        raise D2MergeError("--device cuda was asked for but no CUDA device is available", hint="use --device cpu")
    return torch.device(name)


# Rows merged per block: 2^18 fp32 values (1 MB) stay in cache through convert, update and cast.
CHUNK_ELEMENTS = 1 << 18


class ScratchBuffers:
    """Memory reused from tensor to tensor.

    Fresh multi-megabyte allocations are page-faulted in on first touch, which
    costs more than the merge arithmetic itself; reusing buffers makes the
    merge run at memory speed. Output buffers come back through
    :meth:`release` once the writer thread has written them.
    """

    def __init__(self) -> None:
        self._read = torch.empty(0, dtype=torch.uint8)
        self._work = torch.empty(0, dtype=torch.float32)
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()

    def read_buffer(self, nbytes: int) -> torch.Tensor:
        if self._read.numel() < nbytes:
            self._read = torch.empty(nbytes, dtype=torch.uint8)
        return self._read[:nbytes]

    def work(self, numel: int) -> torch.Tensor:
        if self._work.numel() < numel:
            self._work = torch.empty(numel, dtype=torch.float32)
        return self._work[:numel]

    def output(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` (the caller views it with the tensor's dtype and shape)."""
        while True:
            try:
                buffer = self._free.get_nowait()
            except queue.Empty:
                return torch.empty(max(nbytes, 1), dtype=torch.uint8)
            if buffer.numel() >= nbytes:
                return buffer
            # too small for this tensor: dropped, so the pool converges on the larger sizes

    def release(self, buffer: torch.Tensor | None) -> None:
        if buffer is not None:
            self._free.put(buffer)


def _output_tensor(buffers: ScratchBuffers, item: TensorPlan) -> tuple[torch.Tensor, torch.Tensor]:
    storage = buffers.output(item.out_bytes)
    return storage, storage[: item.out_bytes].view(item.out_dtype).view(item.shape)


def compute_tensor(merge_plan: MergePlan, item: TensorPlan, *, device: torch.device = torch.device("cpu"),
                   compute_dtype: torch.dtype = torch.float32, buffers: ScratchBuffers | None = None
                   ) -> torch.Tensor:
    """The output tensor for one plan entry, already cast to its output dtype (NaN/Inf refused).

    With ``buffers`` the result lives in a reused buffer: hand it back with
    ``buffers.release`` (see :func:`write_tensors`); without, it is fresh memory.
    """
    return _compute(merge_plan, item, device, compute_dtype, buffers or ScratchBuffers())[1]


def compute_output(merge_plan: MergePlan, item: TensorPlan, *, device: torch.device,
                   buffers: ScratchBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage to release, output tensor) for one plan entry: exactly what :func:`write_tensors` streams.

    For writers that fan one base read out to several outputs (``d2merge.many``): calling the
    function the single merge calls is what makes their bytes the single merge's.
    """
    return _compute(merge_plan, item, device, torch.float32, buffers)


def _compute(merge_plan: MergePlan, item: TensorPlan, device: torch.device, compute_dtype: torch.dtype,
             buffers: ScratchBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage to release, output tensor) for one plan entry."""
    if item.action == "copy":
        source = merge_plan.base.tensors.read(item.source, buffers.read_buffer(item_bytes(item)))
        storage, out = _output_tensor(buffers, item)
        return storage, out.copy_(source)
    if item.action == "replace":
        tensor = merge_plan.adapter.tensors.read(item.source)
        check_finite(tensor, merge_plan.adapter.weights_file, item.source, "adapter tensor")
        storage, out = _output_tensor(buffers, item)
        return storage, out.copy_(tensor)
    adapter = merge_plan.adapter
    method, settings = adapter.method, item.settings
    factors = adapter.factors(item.module)  # type: ignore[arg-type]
    for name, tensor in factors.items():
        check_finite(tensor, adapter.weights_file, adapter.modules[item.module].keys[name], "adapter tensor")
    path = merge_plan.base_weight_file(item)
    w0 = merge_plan.base_weight(item, buffers.read_buffer(item_bytes(item)))
    storage, out = _output_tensor(buffers, item)
    blockwise = (device.type == "cpu" and compute_dtype == torch.float32 and w0.ndim == 2
                 and not settings.transposed
                 and method.row_separable(settings))
    if not blockwise:
        merged = method.merged_weight(w0.to(device), {k: v.to(device) for k, v in factors.items()}, settings,
                                      compute_dtype=compute_dtype)
        out.copy_(merged)  # the one cast: round-to-nearest-even
        check_finite(out, path, item.name, "merged weight")
        return storage, out
    factors = {k: v.to(compute_dtype) for k, v in factors.items()}
    rows, cols = w0.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    work = buffers.work(step * cols)
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step))
        w = work[: (block.stop - start) * cols].view(block.stop - start, cols).copy_(w0[block])
        out[block].copy_(method.merge_rows_(w, factors, settings, block))  # the one cast
    check_finite(out, path, item.name, "merged weight")
    return storage, out


def item_bytes(item: TensorPlan) -> int:
    """Bytes of the tensor read for an entry (its input dtype)."""
    return math.prod(item.shape) * dtype_size(item.in_dtype)


def check_finite(tensor: torch.Tensor, path: Path, name: str, what: str) -> None:
    # A sum is a cheap screen (NaN/Inf propagate); only a non-finite sum, which a finite
    # tensor can also give by overflow, pays for the elementwise check.
    if not tensor.dtype.is_floating_point:
        return
    if tensor.dtype.itemsize == 1:  # float8 has no sum kernel on the CPU; the upcast is exact
        tensor = tensor.float()
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise D2MergeError(f"{what} has {bad} NaN/Inf value(s)", path=path, tensor=name,
                           hint="the adapter is corrupt or diverged in training; nothing was written")


def _raw_copy_source(merge_plan: MergePlan, item: TensorPlan) -> tuple[Path, int, int] | None:
    """Unchanged tensors in their own dtype are copied byte for byte, never decoded."""
    if item.action != "copy" or item.in_dtype != item.out_dtype:
        return None
    byte_range = getattr(merge_plan.base.tensors, "byte_range", None)
    return byte_range(item.source) if byte_range is not None else None


class _WriterThread:
    """Writes on a second thread while the main thread computes the next tensor.

    The queue is bounded, so at most ``depth`` computed tensors wait in memory.
    Jobs run strictly in order; the first error stops the thread and is raised
    in the main thread at the next submit or at :meth:`finish`.
    """

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2merge-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None and not self._abort.is_set():
                try:
                    job()
                except BaseException as exc:  # handed to the main thread, which reports it
                    self._error = exc

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_error()
        self._queue.put(job)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.raise_error()

    def abort(self) -> None:
        """Stop after the job in hand (used when the main thread fails or is interrupted)."""
        self._abort.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the block in one intra-op thread, then give the caller's setting back.

    The blocks are cache-sized, and on a busy machine a second OpenMP thread
    waiting for a core stalls every block (measured: 5-8 s vs 15-70 s for a
    1.1B merge on 2 loaded cores); parallelism comes from the writer and hash
    threads. The setting is process-wide in torch, so it is restored even when
    the merge fails: a library call must not leave the caller's torch changed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_tensors(merge_plan: MergePlan, folder: Path, *, device: torch.device = torch.device("cpu"),
                  progress: bool = False, on_tensor: Callable[[TensorPlan], None] | None = None,
                  shard_paths: list[Path] | None = None, metadata: dict[str, str] | None = None) -> list[str]:
    """Stream every planned tensor into its shard; returns the file names written.

    Computing (main thread) and writing (a writer thread) overlap; both release
    the GIL in their heavy parts. ``shard_paths`` overrides where each shard
    goes (the single-file exporter names its one shard), ``metadata`` the
    header metadata. ``on_tensor`` is called after each tensor is written.
    """
    from tqdm.auto import tqdm

    by_shard: dict[int, list[TensorPlan]] = {}
    for item in merge_plan.tensors:
        by_shard.setdefault(item.shard, []).append(item)
    paths = shard_paths or [folder / name for name in merge_plan.shard_names]
    bar = tqdm(total=merge_plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress,
               dynamic_ncols=True, leave=False)
    open_writer: dict[str, StreamingWriter] = {}

    def opened(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> Callable[[], None]:
        def job() -> None:
            try:
                open_writer["current"] = StreamingWriter(path, entries, metadata or {"format": "pt"})
            except OSError as exc:
                raise disk_error(exc, path) from None
        return job

    def wrote(path: Path, item: TensorPlan, computed: tuple[torch.Tensor, torch.Tensor] | None,
              raw: tuple[Path, int, int] | None) -> Callable[[], None]:
        def job() -> None:
            try:
                if computed is not None:
                    open_writer["current"].write(item.name, computed[1])
                    buffers.release(computed[0])
                else:
                    open_writer["current"].copy_from(item.name, *raw)  # type: ignore[misc]
            except OSError as exc:
                raise disk_error(exc, path) from None
            bar.update(item.out_bytes)
            if on_tensor is not None:
                on_tensor(item)
        return job

    def closed(path: Path) -> Callable[[], None]:
        def job() -> None:
            try:
                open_writer.pop("current").close()
            except OSError as exc:
                raise disk_error(exc, path) from None
        return job

    buffers = ScratchBuffers()
    writer = _WriterThread()
    try:
        with one_intra_op_thread():
            for shard, items in sorted(by_shard.items()):
                path = paths[shard]
                writer.submit(opened(path, [(t.name, t.out_dtype, t.shape) for t in items]))
                for item in items:
                    bar.set_postfix_str(item.name[-40:], refresh=False)
                    raw = _raw_copy_source(merge_plan, item)
                    computed = None if raw is not None else _compute(merge_plan, item, device, torch.float32, buffers)
                    writer.submit(wrote(path, item, computed, raw))
                    del computed
                writer.submit(closed(path))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        for handle in open_writer.values():
            handle.abandon()
        bar.close()
    return [p.name for p in paths]
