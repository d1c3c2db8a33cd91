"""The merge engine: stream the plan tensor by tensor, fp32 math, one cast, atomic output.

Memory holds one base tensor, its adapter factors and the merged result at a
time, so peak memory depends on the largest tensor, not on the model size.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from d2merge import profile
from d2merge.device import ComputeDevice
from d2merge.errors import D2MergeError
from d2merge.export.model_card import CardInfo, render_model_card
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.checkpoint import SAFETENSORS_INDEX, BaseCheckpoint, SafetensorsFiles, TensorSource, open_base
from d2merge.io.output import (TEMP_MARKER, AtomicFolder, check_output_location, copy_support_files, disk_error, write_json,
                               write_text)
from d2merge.io.safetensors_file import StreamingWriter, dtype_size
from d2merge.io.source_hash import SourceHasher
from d2merge.io.tensor_reader import TensorReader, cold_enough
from d2merge.methods import EMBEDDING
from d2merge.plan import OUT_DTYPES, TIED_POLICIES, MergePlan, TensorPlan, build_plan

CONFIG_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class MergeOptions:
    """Every merge setting in one place; the CLI's flags and help are derived from these fields."""

    dtype: str = field(default="auto", metadata={
        "help": "Output dtype of floating tensors: auto keeps each base tensor's dtype.",
        "choices": tuple(OUT_DTYPES)})
    max_shard_size: str = field(default="5GB", metadata={
        "help": "Largest output shard, e.g. 5GB, 500MB, 2GiB."})
    tied_embeddings: str = field(default="untie", metadata={
        "help": "When the adapter changes a tied embedding/lm_head: untie (exact, writes both), "
                "tie (the change applies to both), error (refuse).",
        "choices": TIED_POLICIES})
    device: str = field(default="cpu", metadata={
        "help": "Where the fp32 math runs (cpu or cuda); files are always read and written on the CPU.",
        "choices": ("cpu", "cuda")})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output folder (only once the new one is complete)."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Allow .bin (pickle) weights; loaded with weights_only=True. Only for files you trust."})
    hash_sources: bool = field(default=True, metadata={
        "help": "Record the sha256 of the base and adapter files in the model card (hashed from the "
                "bytes the merge reads, in a background thread; a Hub-cache file's name is its sha256)."})

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise D2MergeError(f"invalid {f.name} {getattr(self, f.name)!r}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class MergeResult:
    output: Path
    plan: MergePlan
    files: tuple[str, ...]
    seconds: float
    source_hashes: dict[str, str]


def plan(base: str | Path | BaseCheckpoint, adapter: str | Path | Adapter,
         options: MergeOptions | None = None, **overrides: Any) -> MergePlan:
    """The merge plan (what would change, and how) without writing anything."""
    options = _options(options, overrides)
    if not isinstance(base, BaseCheckpoint):
        base = open_base(base, allow_pickle=options.allow_pickle)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=options.allow_pickle)
    return build_plan(base, adapter, dtype=options.dtype, max_shard_size=options.max_shard_size,
                      tied_embeddings=options.tied_embeddings)


def _options(options: MergeOptions | None, overrides: dict[str, Any]) -> MergeOptions:
    base = options or MergeOptions()
    if not overrides:
        return base
    known = {f.name for f in fields(MergeOptions)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown merge option(s): {', '.join(sorted(unknown))}")
    return MergeOptions(**{**{f.name: getattr(base, f.name) for f in fields(MergeOptions)}, **overrides})


def merge(base: str | Path | BaseCheckpoint, adapter: str | Path | Adapter, out: str | Path,
          options: MergeOptions | None = None, *, progress: bool = False,
          on_tensor: Callable[[TensorPlan], None] | None = None, **overrides: Any) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a Hugging Face folder at ``out``.

    Keyword overrides are MergeOptions fields: ``merge(base, adapter, out, dtype="bf16")``.
    """
    options = _options(options, overrides)
    started = time.perf_counter()
    with profile.phase("plan"):
        merge_plan = plan(base, adapter, options)
    inputs = [merge_plan.base.location, merge_plan.adapter.path]
    out_path = check_output_location(Path(out), inputs, overwrite=options.overwrite)
    device = _device(options.device)
    hasher = start_hashing(merge_plan) if options.hash_sources else None
    try:
        with AtomicFolder(out_path, overwrite=options.overwrite) as folder:
            written = write_tensors(merge_plan, folder.temp, device=device, progress=progress, on_tensor=on_tensor,
                                    hasher=hasher)
            hashes = hasher.finish() if hasher is not None else {}
            written += write_metadata(merge_plan, folder.temp, hashes)
            folder.commit()
    finally:
        if hasher is not None:
            hasher.abandon()
    return MergeResult(out_path, merge_plan, tuple(written), time.perf_counter() - started, hashes)


def _device(name: str | torch.device | ComputeDevice) -> ComputeDevice:
    """The compute device; ``cuda`` without a GPU is refused in one line."""
    return name if isinstance(name, ComputeDevice) else ComputeDevice(str(name))


def start_hashing(merge_plan: MergePlan) -> SourceHasher:
    """A hasher for the base and adapter files, fed by the engine's reads (see io/source_hash.py)."""
    files = [merge_plan.adapter.weights_file, merge_plan.adapter.path / "adapter_config.json",
             *merge_plan.base.weight_files]
    return SourceHasher({_source_label(merge_plan, path): path for path in files})


def _source_label(merge_plan: MergePlan, path: Path) -> str:
    if path.parent == merge_plan.adapter.path:
        return f"adapter/{path.name}"
    return f"base/{path.name}"


# Rows merged per block: 2^18 fp32 values (1 MB) stay in cache through convert, update and cast.
CHUNK_ELEMENTS = 1 << 18


class ScratchBuffers:
    """Memory reused from tensor to tensor.

    Fresh multi-megabyte allocations are page-faulted in on first touch, which
    costs more than the merge arithmetic itself; reusing buffers makes the
    merge run at memory speed. Output buffers come back through
    :meth:`release` once the writer thread has written them.
    """

    def __init__(self, device: ComputeDevice | None = None, hasher: SourceHasher | None = None,
                 schedule: list[tuple[TensorSource, str]] | None = None) -> None:
        self.device = device or ComputeDevice("cpu")
        self.reader = TensorReader(hasher, allocate=self.device.host_buffer, schedule=schedule, direct=bool(schedule))
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
    device = _device(device)
    storage, out, ready = _compute(merge_plan, item, device, compute_dtype, buffers or ScratchBuffers(device))
    ready()
    return out


def _no_wait() -> None:
    return None


def _compute(merge_plan: MergePlan, item: TensorPlan, device: ComputeDevice, compute_dtype: torch.dtype,
             buffers: ScratchBuffers) -> tuple[torch.Tensor, torch.Tensor, Callable[[], None]]:
    """(storage to release, output tensor, wait until its bytes are on the host) for one plan entry."""
    if item.action == "copy":
        source = buffers.reader.read(*_base_read(merge_plan, item))
        storage, out = _output_tensor(buffers, item)
        return storage, out.copy_(source), _no_wait
    if item.action == "replace":
        tensor = merge_plan.adapter.tensors.read(item.source)
        _check_finite(tensor, merge_plan.adapter.weights_file, item.source, "adapter tensor")
        storage, out = _output_tensor(buffers, item)
        return storage, out.copy_(tensor), _no_wait
    adapter = merge_plan.adapter
    method, settings = adapter.method, item.settings
    factors = adapter.factors(item.module)  # type: ignore[arg-type]
    for name, tensor in factors.items():
        _check_finite(tensor, adapter.weights_file, adapter.modules[item.module].keys[name], "adapter tensor")
    path = merge_plan.base_weight_file(item)
    w0 = buffers.reader.read(*_base_read(merge_plan, item))
    storage, out = _output_tensor(buffers, item)
    blockwise = (device.blockwise and compute_dtype == torch.float32 and w0.ndim == 2
                 and not (settings.fan_in_fan_out or settings.layer_kind == EMBEDDING)
                 and method.row_separable(settings))
    if not blockwise:
        merged = method.merged_weight(device.upload(w0), {k: device.upload(v) for k, v in factors.items()},
                                      settings, compute_dtype=compute_dtype)
        ready = device.download(merged, out, lambda cast: _check_finite(cast, path, item.name, "merged weight"))
        return storage, out, ready
    factors = {k: v.to(compute_dtype) for k, v in factors.items()}
    rows, cols = w0.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    work = buffers.work(step * cols)
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step))
        w = work[: (block.stop - start) * cols].view(block.stop - start, cols).copy_(w0[block])
        out[block].copy_(method.merge_rows_(w, factors, settings, block))  # the one cast
    _check_finite(out, path, item.name, "merged weight")
    return storage, out, _no_wait


def _base_read(merge_plan: MergePlan, item: TensorPlan) -> tuple[TensorSource, str]:
    """The (source, name) the engine reads for a "copy" or "merge" entry."""
    tensors = merge_plan.adapter.tensors if item.base_from_adapter else merge_plan.base.tensors
    return tensors, item.source


def _direct_read_schedule(merge_plan: MergePlan, items: list[TensorPlan]) -> list[tuple[TensorSource, str]] | None:
    """The engine's reads in order, for the prefetch thread, when the base is cold; else None."""
    if not isinstance(merge_plan.base.tensors, SafetensorsFiles) or not cold_enough(merge_plan.base.weight_files):
        return None
    return [_base_read(merge_plan, item) for item in items
            if item.action != "replace" and _raw_copy_source(merge_plan, item) is None]


def item_bytes(item: TensorPlan) -> int:
    """Bytes of the tensor read for an entry (its input dtype)."""
    return math.prod(item.shape) * dtype_size(item.in_dtype)


def _check_finite(tensor: torch.Tensor, path: Path, name: str, what: str) -> None:
    # A sum is a cheap screen (NaN/Inf propagate); only a non-finite sum, which a finite
    # tensor can also give by overflow, pays for the elementwise check.
    if not tensor.dtype.is_floating_point or bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise D2MergeError(f"{what} has {bad} NaN/Inf value(s)", path=path, tensor=name,
                           hint="the adapter is corrupt or diverged in training; nothing was written")


def _raw_copy_source(merge_plan: MergePlan, item: TensorPlan) -> tuple[Path, int, int] | None:
    """Unchanged tensors go from file to file in the writer thread, never held whole in memory.

    In their own dtype they are copied byte for byte; cast between float dtypes
    (``--dtype fp32`` on a bf16 base) they are converted a chunk at a time.
    """
    if item.action != "copy":
        return None
    if item.in_dtype != item.out_dtype and not (item.in_dtype.is_floating_point and item.out_dtype.is_floating_point):
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
        with profile.phase("write (wait)"):  # the writer is behind: the main thread waits here
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


def write_tensors(merge_plan: MergePlan, folder: Path, *, device: str | torch.device | ComputeDevice = "cpu",
                  progress: bool = False, on_tensor: Callable[[TensorPlan], None] | None = None,
                  shard_paths: list[Path] | None = None, metadata: dict[str, str] | None = None,
                  hasher: SourceHasher | None = None) -> list[str]:
    """Stream every planned tensor into its shard; returns the file names written.

    Computing (main thread) and writing (a writer thread) overlap; both release
    the GIL in their heavy parts. ``shard_paths`` overrides where each shard
    goes (the single-file exporter names its one shard), ``metadata`` the
    header metadata. ``on_tensor`` is called after each tensor is written.
    ``hasher`` receives every base range read (see :func:`start_hashing`).
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

    def wrote(path: Path, item: TensorPlan, computed: tuple[torch.Tensor, torch.Tensor, Callable[[], None]] | None,
              raw: tuple[Path, int, int] | None) -> Callable[[], None]:
        def job() -> None:
            try:
                with profile.phase("write"):
                    if computed is not None:
                        computed[2]()  # a GPU's copy back to the host has landed
                        open_writer["current"].write(item.name, computed[1])
                        buffers.release(computed[0])
                    elif item.in_dtype == item.out_dtype:
                        open_writer["current"].copy_from(item.name, *raw)  # type: ignore[misc]
                    else:
                        open_writer["current"].convert_from(item.name, raw[0], raw[1], item.in_dtype)  # type: ignore[index]
            except OSError as exc:
                raise disk_error(exc, path) from None
            bar.update(item.out_bytes)
            if on_tensor is not None:
                on_tensor(item)
        return job

    def closed(path: Path) -> Callable[[], None]:
        def job() -> None:
            try:
                with profile.phase("write"):
                    open_writer.pop("current").close()
            except OSError as exc:
                raise disk_error(exc, path) from None
        return job

    device = _device(device)
    ordered = [item for _, items in sorted(by_shard.items()) for item in items]
    buffers = ScratchBuffers(device, hasher, _direct_read_schedule(merge_plan, ordered))
    writer = _WriterThread()
    # One intra-op thread: the blocks are cache-sized, and on a busy machine a second
    # OpenMP thread waiting for a core stalls every block (measured: 5-8 s vs 15-70 s
    # for a 1.1B merge on 2 loaded cores). Parallelism comes from the writer and hash threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for shard, items in sorted(by_shard.items()):
            path = paths[shard]
            writer.submit(opened(path, [(t.name, t.out_dtype, t.shape) for t in items]))
            for item in items:
                bar.set_postfix_str(item.name[-40:], refresh=False)
                raw = _raw_copy_source(merge_plan, item)
                with profile.phase("compute"):
                    computed = None if raw is not None else _compute(merge_plan, item, device, torch.float32, buffers)
                writer.submit(wrote(path, item, computed, raw))
                del computed
            writer.submit(closed(path))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)
        buffers.reader.close()
        for handle in open_writer.values():
            handle.abandon()
        bar.close()
    return [p.name for p in paths]


def write_metadata(merge_plan: MergePlan, folder: Path, hashes: dict[str, str]) -> list[str]:
    """Index, config, copied tokenizer files and the model card: written only after every shard."""
    written: list[str] = []
    if len(merge_plan.shard_names) > 1:
        weight_map = {t.name: merge_plan.shard_names[t.shard] for t in merge_plan.tensors}
        write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": merge_plan.total_bytes},
                                                "weight_map": dict(sorted(weight_map.items()))})
        written.append(SAFETENSORS_INDEX)
    if merge_plan.base.config is not None:
        config = dict(merge_plan.base.config)
        for key, value in merge_plan.config_updates.items():
            config[key] = value
        if "dtype" in merge_plan.config_updates and "torch_dtype" in config:
            config["torch_dtype"] = merge_plan.config_updates["dtype"]
        write_json(folder / "config.json", config)
        written.append("config.json")
    written += copy_support_files(merge_plan.base.folder, folder)
    write_text(folder / "README.md", render_model_card(card_info(merge_plan, hashes)))
    written.append("README.md")
    return written


def card_info(merge_plan: MergePlan, hashes: dict[str, str], verify_table: str | None = None) -> CardInfo:
    cfg = merge_plan.adapter.config
    settings: dict[str, Any] = {"r": cfg.r} if cfg.r else {}
    settings.update({"lora_alpha": cfg.lora_alpha, **cfg.options})
    settings.update({"target_modules": ", ".join(sorted(merge_plan.adapter.modules))
                     if len(merge_plan.adapter.modules) <= 8 else f"{len(merge_plan.adapter.modules)} modules"})
    if cfg.use_rslora:
        settings["use_rslora"] = True
    if cfg.rank_pattern:
        settings["rank_pattern"] = dict(cfg.rank_pattern)
    if cfg.alpha_pattern:
        settings["alpha_pattern"] = dict(cfg.alpha_pattern)
    base_name = cfg.base_model_name_or_path
    if not base_name or Path(base_name).is_absolute() or base_name.startswith(".") or Path(base_name).exists():
        # A local path is no Hub id: name the base only when it came from the Hub cache.
        base_name = _hub_id_from_cache(merge_plan.base.location)
    return CardInfo(base_model=base_name, method=merge_plan.adapter.method.name, settings=settings,
                    source_hashes=dict(sorted(hashes.items())), out_dtype=merge_plan.out_dtype,
                    notes=merge_plan.notes, verify_table=verify_table)


def _hub_id_from_cache(location: Path) -> str | None:
    """``org/name`` when the base came from the Hub cache (models--org--name/snapshots/<sha>)."""
    for part in location.parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return None


def add_verify_table_to_card(result: MergeResult, verify_table: str) -> Path:
    """Rewrite the model card of a finished merge with the verify table (atomic replace)."""
    card = result.output / "README.md"
    staged = result.output / f".README.md{TEMP_MARKER}{os.getpid()}"
    write_text(staged, render_model_card(card_info(result.plan, result.source_hashes, verify_table)))
    try:
        os.replace(staged, card)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise disk_error(exc, card) from None
    return card
