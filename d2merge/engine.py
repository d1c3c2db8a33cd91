"""The merge engine: read, compute, cast and write one stream of tensors, one tensor at a time.

Memory holds one base tensor, its adapter factors and the merged result at a
time, so peak memory depends on the largest tensor, not on the model size.
The engine knows the plan (what each output tensor is) and the safetensors
writer; it knows nothing of output formats: the HF-folder writer
(``d2merge.export.hf_folder``) and the single-file exporter
(``d2merge.export.single_file``) both hand it the shard paths to fill, and an
exporter with its own file layout (GGUF) takes the tensors one at a time from
:func:`stream_tensors`.
"""

from __future__ import annotations

import contextlib
import math
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

import d2merge.profile as profile
from d2merge.device import ComputeDevice
from d2merge.errors import D2MergeError
from d2merge.io.checkpoint import SafetensorsFiles, TensorSource
from d2merge.io.output import disk_error
from d2merge.io.safetensors_file import StreamingWriter, dtype_size
from d2merge.io.source_hashes import BackgroundHashes
from d2merge.io.direct_io import cold_enough
from d2merge.io.tensor_reader import TensorReader
from d2merge.planning import MergePlan, TensorPlan


def resolve_device(name: str | torch.device | ComputeDevice) -> ComputeDevice:
    """The device the fp32 math runs on; a missing CUDA device is refused (one line) before any work."""
    return name if isinstance(name, ComputeDevice) else ComputeDevice(str(name))


# Rows merged per block: 2^18 fp32 values (1 MB) stay in cache through convert, update and cast.
CHUNK_ELEMENTS = 1 << 18


class ScratchBuffers:
    """Memory reused from tensor to tensor.

    Fresh multi-megabyte allocations are page-faulted in on first touch, which
    costs more than the merge arithmetic itself; reusing buffers makes the
    merge run at memory speed. Output buffers (whole tensors, for the paths
    that need one) come back through :meth:`release` once written.
    """

    def __init__(self, device: ComputeDevice | None = None, hasher: BackgroundHashes | None = None,
                 schedule: list[tuple[TensorSource, str]] | None = None, direct: bool = False) -> None:
        self.device = device or ComputeDevice("cpu")
        # Base reads: a ring of reused (pinned, for a GPU) buffers, shown to the hasher of a cold
        # base; with a schedule a prefetch thread reads them ahead (O_DIRECT when ``direct``).
        self.reader = TensorReader(hasher, allocate=self.device.host_buffer, schedule=schedule, direct=direct)
        self._work = torch.empty(0, dtype=torch.float32)
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()

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
                return self.device.host_buffer(nbytes)
            if buffer.numel() >= nbytes:
                return buffer
            # too small for this tensor: dropped, so the pool converges on the larger sizes

    def release(self, buffer: torch.Tensor | None) -> None:
        if buffer is not None:
            self._free.put(buffer)


def _output_tensor(buffers: ScratchBuffers, item: TensorPlan) -> tuple[torch.Tensor, torch.Tensor]:
    storage = buffers.output(item.out_bytes)
    return storage, storage[: item.out_bytes].view(item.out_dtype).view(item.shape)


def compute_tensor(merge_plan: MergePlan, item: TensorPlan, *, device: str | torch.device | ComputeDevice = "cpu",
                   compute_dtype: torch.dtype = torch.float32, buffers: ScratchBuffers | None = None
                   ) -> torch.Tensor:
    """The output tensor for one plan entry, already cast to its output dtype (NaN/Inf refused).

    With ``buffers`` the result lives in a reused buffer: hand it back with
    ``buffers.release`` (see :func:`write_tensors`); without, it is fresh memory.
    """
    device = resolve_device(device)
    storage, out, ready = _compute(merge_plan, item, device, compute_dtype, buffers or ScratchBuffers(device))
    ready()
    return out


def compute_output(merge_plan: MergePlan, item: TensorPlan, *, device: str | torch.device | ComputeDevice,
                   buffers: ScratchBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage to release, output tensor) for one plan entry: exactly what :func:`write_tensors` streams.

    For writers that fan one base read out to several outputs (``d2merge.many``): calling the
    function the single merge calls is what makes their bytes the single merge's.
    """
    storage, out, ready = _compute(merge_plan, item, resolve_device(device), torch.float32, buffers)
    ready()
    return storage, out


def _no_wait() -> None:
    return None


def _compute(merge_plan: MergePlan, item: TensorPlan, device: ComputeDevice, compute_dtype: torch.dtype,
             buffers: ScratchBuffers, merge: "_MergeInputs | None" = None
             ) -> tuple[torch.Tensor, torch.Tensor, Callable[[], None]]:
    """(storage to release, output tensor, wait until its bytes are on the host) for one plan entry.

    ``merge``: a "merge" entry's inputs when the caller has already read them.
    """
    if item.action == "copy":
        source = buffers.reader.read(*_base_read(merge_plan, item))
        storage, out = _output_tensor(buffers, item)
        return storage, out.copy_(source), _no_wait
    if item.action == "replace":
        tensor = merge_plan.adapter.tensors.read(item.source)
        check_finite(tensor, merge_plan.adapter.weights_file, item.source, "adapter tensor")
        storage, out = _output_tensor(buffers, item)
        return storage, out.copy_(tensor), _no_wait
    if merge_plan.mix is not None:
        return _mixed(merge_plan, item, compute_dtype, buffers)
    merge = merge or _merge_inputs(merge_plan, item, device, compute_dtype, buffers)
    storage, out = _output_tensor(buffers, item)
    if not merge.blockwise:
        # On a GPU the finiteness check below synchronises with the upload, so the host
        # read buffer is no longer needed when this returns (the reader may reuse it).
        merged = merge.method.merged_weight(device.upload(merge.w0),
                                            {k: device.upload(v) for k, v in merge.factors.items()},
                                            merge.settings, compute_dtype=compute_dtype)
        ready = device.download(merged, out,
                                lambda cast: check_finite(cast, merge.path, item.name, "merged weight"))
        return storage, out, ready
    for block, merged in _merged_blocks(merge, buffers):
        out[block].copy_(merged)  # the one cast
    check_finite(out, merge.path, item.name, "merged weight")
    return storage, out, _no_wait


def _mixed(merge_plan: MergePlan, item: TensorPlan, compute_dtype: torch.dtype, buffers: ScratchBuffers,
           w0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Callable[[], None]]:
    """A tensor several adapters change: W0 read here (unless given), the plan's rule makes it, one cast.

    Row-separable tensors go in row blocks (the rule merges each block for every adapter in
    turn: a few block-sized buffers); the others whole, the rule holding W0, its result and one
    adapter's merged tensor: three tensors of this shape, never every adapter's update at once.
    """
    assert merge_plan.mix is not None
    if w0 is None:
        w0 = buffers.reader.read(*_base_read(merge_plan, item))
    merger = _mix_rows(merge_plan, item, w0, compute_dtype)
    storage, out = _output_tensor(buffers, item)
    if merger is None:
        out.copy_(merge_plan.mix.merged_weight(item, w0, compute_dtype=compute_dtype))  # the one cast
    else:
        for block, merged in _row_blocks(w0, merger, buffers):
            out[block].copy_(merged)  # the one cast
    check_finite(out, merge_plan.base_weight_file(item), item.name, "merged weight")
    return storage, out, _no_wait


def _mix_rows(merge_plan: MergePlan, item: TensorPlan, w0: torch.Tensor, compute_dtype: torch.dtype
              ) -> Callable[[torch.Tensor, slice], torch.Tensor] | None:
    """The mix rule's row merger when this tensor can go in row blocks (fp32, 2-D), else None (whole)."""
    assert merge_plan.mix is not None
    if compute_dtype != torch.float32 or w0.ndim != 2:
        return None
    return merge_plan.mix.row_merger(item)


def _row_blocks(w0: torch.Tensor, merger: Callable[[torch.Tensor, slice], torch.Tensor], buffers: ScratchBuffers
                ) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, fp32 merged rows) of a tensor several adapters change, a cache-sized block at a time.

    The same blocks as :func:`_merged_blocks`, so a mix holds row blocks, never a whole fp32 tensor,
    and the whole-tensor path and the path into the output's staging write the same bytes.
    """
    rows, cols = w0.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    work = buffers.work(step * cols)
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step))
        w = work[: (block.stop - start) * cols].view(block.stop - start, cols).copy_(w0[block])
        yield block, merger(w, block)


@dataclass(frozen=True)
class _MergeInputs:
    """What one "merge" entry's arithmetic needs, read and checked (factors finite)."""

    method: object
    settings: object
    factors: dict[str, torch.Tensor]
    w0: torch.Tensor
    path: Path  # the base file, for errors about the merged weight
    blockwise: bool  # row blocks on the CPU in fp32 (else the whole tensor at once)


def _merge_inputs(merge_plan: MergePlan, item: TensorPlan, device: ComputeDevice, compute_dtype: torch.dtype,
                  buffers: ScratchBuffers) -> _MergeInputs:
    adapter = merge_plan.adapter
    method, settings = adapter.method, item.settings
    factors = adapter.factors(item.module)  # type: ignore[arg-type]
    for name, tensor in factors.items():
        check_finite(tensor, adapter.weights_file, adapter.modules[item.module].keys[name], "adapter tensor")
    w0 = buffers.reader.read(*_base_read(merge_plan, item))
    blockwise = (device.blockwise and compute_dtype == torch.float32 and w0.ndim == 2
                 and not settings.transposed
                 and method.row_separable(settings))
    return _MergeInputs(method, settings, factors, w0, merge_plan.base_weight_file(item), blockwise)


def _merged_blocks(merge: _MergeInputs, buffers: ScratchBuffers) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, fp32 merged rows) a cache-sized block at a time; each block valid until the next.

    The only place the blockwise arithmetic is written: the whole-tensor path and
    the path into the output's staging take the same blocks, so the same bytes.
    """
    factors = {k: v.to(torch.float32) for k, v in merge.factors.items()}
    rows, cols = merge.w0.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    work = buffers.work(step * cols)
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step))
        w = work[: (block.stop - start) * cols].view(block.stop - start, cols).copy_(merge.w0[block])
        yield block, merge.method.merge_rows_(w, factors, merge.settings, block)  # type: ignore[attr-defined]


def _base_read(merge_plan: MergePlan, item: TensorPlan) -> tuple[TensorSource, str]:
    """The (source, name) the engine reads for a "copy" or "merge" entry."""
    return merge_plan.base_weight_source(item), item.source


def _read_schedule(merge_plan: MergePlan, items: list[TensorPlan]
                   ) -> tuple[list[tuple[TensorSource, str]] | None, bool]:
    """(the engine's base reads in order, for the prefetch thread; whether to read them with O_DIRECT).

    A safetensors base is always read ahead on the prefetch thread: with O_DIRECT
    when it is cold, by the ordinary (page-cache) read when it is warm. Other
    sources (pickles, in-memory tensors) are read where they are used.
    """
    if not isinstance(merge_plan.base.tensors, SafetensorsFiles):
        return None, False
    reads = [_base_read(merge_plan, item) for item in items
             if item.action != "replace" and _raw_copy_source(merge_plan, item) is None]
    schedule = [(source, name) for source, name in reads if getattr(source, "byte_range", None) is not None]
    return schedule or None, cold_enough(merge_plan.base.weight_files)


def item_bytes(item: TensorPlan) -> int:
    """Bytes of the tensor read for an entry (its input dtype)."""
    return math.prod(item.shape) * dtype_size(item.in_dtype)


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values ``tensor`` holds (0 for integer tensors)."""
    # A sum is a cheap screen (NaN/Inf propagate); only a non-finite sum, which a finite
    # tensor can also give by overflow, pays for the elementwise check.
    if not tensor.dtype.is_floating_point:
        return 0
    if tensor.dtype.itemsize == 1:  # float8 has no sum kernel on the CPU; the upcast is exact
        tensor = tensor.float()
    if math.isfinite(tensor.sum().item()):  # one op: a torch.isfinite of the sum was a second (~25 us)
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_finite(tensor: torch.Tensor, path: Path, name: str, what: str) -> None:
    bad = count_nonfinite(tensor)
    if bad:
        raise _nonfinite_error(bad, path, name, what)


def _nonfinite_error(bad: int, path: Path, name: str, what: str) -> D2MergeError:
    return D2MergeError(f"{what} has {bad} NaN/Inf value(s)", path=path, tensor=name,
                        hint="the adapter is corrupt or diverged in training; nothing was written")


def _raw_copy_source(merge_plan: MergePlan, item: TensorPlan) -> tuple[Path, int, int] | None:
    """Unchanged tensors go from file to file, never held whole in memory.

    In their own dtype they are copied byte for byte; cast between float dtypes
    (``--dtype fp32`` on a bf16 base) they are converted a chunk at a time.
    """
    if item.action != "copy":
        return None
    if item.in_dtype != item.out_dtype and not (item.in_dtype.is_floating_point and item.out_dtype.is_floating_point):
        return None
    byte_range = getattr(merge_plan.base.tensors, "byte_range", None)
    return byte_range(item.source) if byte_range is not None else None


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


def write_tensors(merge_plan: MergePlan, folder: Path, *, device: str | torch.device | ComputeDevice = "cpu",
                  progress: bool = False, on_tensor: Callable[[TensorPlan], None] | None = None,
                  shard_paths: list[Path] | None = None, metadata: dict[str, str] | None = None,
                  hasher: BackgroundHashes | None = None) -> list[str]:
    """Stream every planned tensor into its shard; returns the file names written.

    Three stages overlap: a prefetch thread reads the base ahead
    (:class:`~d2merge.io.tensor_reader.TensorReader`), this thread computes each
    merged row block and casts it straight into the shard's staging buffers, and
    the shard file's flusher thread writes full buffers to disk
    (:class:`~d2merge.io.direct_io.OutputFile`). No merged tensor is held whole
    (row-separable methods on the CPU; the others hold one), so peak memory is the
    read buffers plus 64 MB of staging. ``shard_paths`` overrides where each shard
    goes (the single-file exporter names its one shard), ``metadata`` the header
    metadata. ``on_tensor`` is called after each tensor is handed to its file.
    ``hasher`` sees every base range the engine reads (io/source_hashes.py), so
    the sources are hashed without a second pass; it is abandoned if the merge fails.
    """
    from tqdm.auto import tqdm

    by_shard: dict[int, list[TensorPlan]] = {}
    for item in merge_plan.tensors:
        by_shard.setdefault(item.shard, []).append(item)
    paths = shard_paths or [folder / name for name in merge_plan.shard_names]
    bar = tqdm(total=merge_plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=not progress,
               dynamic_ncols=True, leave=False)
    device = resolve_device(device)
    ordered = [item for _, items in sorted(by_shard.items()) for item in items]
    buffers = ScratchBuffers(device, hasher, *_read_schedule(merge_plan, ordered))
    shard: StreamingWriter | None = None
    try:
        with _reading(buffers, hasher), one_intra_op_thread():
            for index, items in sorted(by_shard.items()):
                path = paths[index]
                with _writing(path):
                    shard = StreamingWriter(path, [(t.name, t.out_dtype, t.shape) for t in items],
                                            metadata or {"format": "pt"})
                for item in items:
                    bar.set_postfix_str(item.name[-40:], refresh=False)
                    _write_entry(shard, path, merge_plan, item, device, buffers)
                    bar.update(item.out_bytes)
                    if on_tensor is not None:
                        on_tensor(item)
                with _writing(path), profile.phase("write"):
                    shard.close()
                shard = None
    finally:
        if shard is not None:
            shard.abandon()
        bar.close()
    return [p.name for p in paths]


@contextlib.contextmanager
def _reading(buffers: ScratchBuffers, hasher: BackgroundHashes | None) -> Iterator[None]:
    """One stream's base reads: the hasher is abandoned if the stream fails; the prefetch thread always stops."""
    try:
        yield
    except BaseException:
        if hasher is not None:
            hasher.abandon()
        raise
    finally:
        buffers.reader.close()


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Write failures (disk full, permissions, I/O errors) as one line naming the output file."""
    try:
        yield
    except OSError as exc:
        raise disk_error(exc, path) from None


def _write_entry(shard: StreamingWriter, path: Path, merge_plan: MergePlan, item: TensorPlan,
                 device: ComputeDevice, buffers: ScratchBuffers) -> None:
    """One plan entry into the open shard: copied file to file, merged row block by row block, or whole."""
    raw = _raw_copy_source(merge_plan, item)
    if raw is not None:
        with _writing(path), profile.phase("write"):
            if item.in_dtype == item.out_dtype:
                shard.copy_from(item.name, *raw)
            else:
                shard.convert_from(item.name, raw[0], raw[1], item.in_dtype)
        return
    with profile.phase("compute"):
        merge = (_merge_inputs(merge_plan, item, device, torch.float32, buffers)
                 if item.action == "merge" and merge_plan.mix is None else None)
        if item.action == "merge" and merge_plan.mix is not None:
            _write_mixed(shard, path, merge_plan, item, buffers)
            return
        if merge is None or not merge.blockwise:
            storage, out, ready = _compute(merge_plan, item, device, torch.float32, buffers, merge)
            ready()
            with _writing(path):
                shard.write(item.name, out)
            buffers.release(storage)
            return
        # The same blocks and the same cast as _compute, landing in the shard's staging buffers.
        with _writing(path):
            shard.begin(item.name)
        bad = 0
        for _, merged in _merged_blocks(merge, buffers):
            if bad:  # already refused: only finish the count for the message
                bad += count_nonfinite(merged.to(item.out_dtype))
                continue
            with _writing(path):
                bad = shard.append_cast(merged, count_nonfinite)  # the one cast, screened before it is written
        if bad:
            raise _nonfinite_error(bad, merge.path, item.name, "merged weight")
        shard.end()


def _write_mixed(shard: StreamingWriter, path: Path, merge_plan: MergePlan, item: TensorPlan,
                 buffers: ScratchBuffers) -> None:
    """A tensor several adapters change into the open shard: row blocks cast into its staging, or whole."""
    w0 = buffers.reader.read(*_base_read(merge_plan, item))
    merger = _mix_rows(merge_plan, item, w0, torch.float32)
    if merger is None:
        storage, out, ready = _mixed(merge_plan, item, torch.float32, buffers, w0)
        ready()
        with _writing(path):
            shard.write(item.name, out)
        buffers.release(storage)
        return
    with _writing(path):
        shard.begin(item.name)
    bad = 0
    for _, merged in _row_blocks(w0, merger, buffers):
        if bad:
            bad += count_nonfinite(merged.to(item.out_dtype))
            continue
        with _writing(path):
            bad = shard.append_cast(merged, count_nonfinite)
    if bad:
        raise _nonfinite_error(bad, merge_plan.base_weight_file(item), item.name, "merged weight")
    shard.end()


@dataclass(frozen=True)
class StreamedTensor:
    """One planned tensor as :func:`stream_tensors` hands it out: computed, or a file range to read.

    ``tensor`` (computed entries) is in ``item.out_dtype`` and lives in a reused buffer: valid
    only until the next tensor is asked for. ``raw`` (unchanged entries of a file-backed base) is
    ``(file, offset, bytes)`` of the tensor in ``item.in_dtype``, for the consumer to read in
    pieces, so a copied embedding is never held whole, as in :func:`write_tensors`.
    """

    item: TensorPlan
    tensor: torch.Tensor | None
    raw: tuple[Path, int, int] | None


def stream_tensors(merge_plan: MergePlan, items: list[TensorPlan] | None = None, *,
                   device: str | torch.device | ComputeDevice = "cpu",
                   hasher: BackgroundHashes | None = None) -> Iterator[StreamedTensor]:
    """Every planned tensor (``items``: an order of the plan's entries), one at a time.

    For exporters that lay the tensors out themselves (``d2merge.export.gguf``): the same
    arithmetic as :func:`write_tensors` (one intra-op thread, the same blocks), so the same
    values; memory holds one computed tensor. ``hasher`` sees the engine's reads as in
    :func:`write_tensors` (it reads the ``raw`` ranges itself) and is abandoned if the stream fails.
    """
    device = resolve_device(device)
    buffers = ScratchBuffers(device, hasher)
    with _reading(buffers, hasher), one_intra_op_thread():
        for item in (merge_plan.tensors if items is None else items):
            raw = _raw_copy_source(merge_plan, item)
            if raw is not None:
                yield StreamedTensor(item, None, raw)
                continue
            with profile.phase("compute"):
                storage, out, ready = _compute(merge_plan, item, device, torch.float32, buffers)
                ready()
            yield StreamedTensor(item, out, None)
            buffers.release(storage)
