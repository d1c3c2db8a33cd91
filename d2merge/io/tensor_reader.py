"""The merge engine's reads: base tensors into a small ring of reused buffers, each range shown to the hasher.

Why a ring and not one buffer: the hashing thread (io/source_hashes.py) still
holds the bytes of tensor k while the engine reads tensor k+1, so the engine
cycles through ``slots`` buffers and waits only if the hasher falls behind.
Reused buffers also matter on their own: fresh multi-megabyte allocations are
page-faulted in on first touch, which costs more than the merge arithmetic.
``allocate`` lets a GPU device hand out pinned host memory.

Cold bases: with ``schedule`` (the reads the engine will make, in order) and
``direct=True``, a prefetch thread reads ahead with O_DIRECT into page-aligned
slots while the main thread computes. Measured on the 2-core machine, a cold
2.2 GB file read in 4 s with O_DIRECT and 15-27 s through the page cache (most
of it kernel time allocating and filling cache pages); a warm one is cheaper
from the page cache, so the engine asks :func:`d2merge.io.direct_io.resident_fraction`
first. A tensor whose offset does not allow an aligned read, a file that
refuses O_DIRECT, and every error take the ordinary strict read
(``SafetensorsFile.read``), so the result and the one-line errors are the same.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Callable

import torch

import d2merge.profile as profile
from d2merge.io.checkpoint import TensorSource
from d2merge.io.direct_io import ALIGNMENT, cold_enough, round_up
from d2merge.io.source_hashes import BackgroundHashes


def _plain(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class _Slot:
    """A reusable buffer; ``free`` is set once the engine and the hasher are both done with it."""

    def __init__(self) -> None:
        self.storage = torch.empty(0, dtype=torch.uint8)
        self.buffer = self.storage  # page-aligned view of storage
        self.users = 0
        self.lock = threading.Lock()
        self.free = threading.Event()
        self.free.set()

    def ensure(self, nbytes: int, allocate: Callable[[int], torch.Tensor]) -> None:
        if self.buffer.numel() >= nbytes:
            return
        self.storage = self.buffer = torch.empty(0, dtype=torch.uint8)  # drop the old one before allocating
        self.storage = allocate(nbytes + ALIGNMENT)
        pad = -self.storage.data_ptr() % ALIGNMENT
        self.buffer = self.storage[pad:pad + nbytes]

    def hold(self, users: int) -> None:
        self.users = users
        self.free.clear()

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users <= 0:
                self.free.set()


class TensorReader:
    """``read(source, name)``: a tensor viewing one of ``slots`` reused buffers, valid until the next read."""

    def __init__(self, hasher: BackgroundHashes | None = None, *, slots: int = 2,
                 allocate: Callable[[int], torch.Tensor] = _plain,
                 schedule: list[tuple[TensorSource, str]] | None = None, direct: bool | None = False):
        """``direct``: the prefetch thread reads with O_DIRECT; None decides from the scheduled files
        (O_DIRECT when most of them are not in the page cache, :func:`d2merge.io.direct_io.cold_enough`)."""
        self.hasher = hasher
        # A prefetch thread fills one slot while the engine computes on another; a hasher fed from
        # the slots (a cold base) holds a third until it has hashed it.
        fed = hasher is not None and getattr(hasher, "read_ahead", False) is False
        extra = (1 if schedule else 0) if fed else 0
        self._slots = [_Slot() for _ in range(max(1, slots if fed or not schedule else max(2, slots)) + extra)]
        self._next = 0
        self._allocate = allocate
        self._current: _Slot | None = None
        self.bytes_read = 0
        self.direct_bytes = 0
        self._prefetch: _Prefetcher | None = None
        if schedule:
            if direct is None:
                direct = cold_enough(sorted({source.file_of(name) for source, name in schedule}))
            self._prefetch = _Prefetcher(self, schedule, direct)

    def _take_slot(self, waiting_for: str = "hash") -> _Slot:
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if not slot.free.is_set():
            with profile.phase(waiting_for):  # the hasher (or the engine) still holds this buffer
                slot.free.wait()
        return slot

    def _done_with_current(self) -> None:
        if self._current is not None:
            self._current.release()
            self._current = None

    def done(self) -> None:
        """The last tensor read is no longer needed: its buffer may be read into before the next read."""
        self._done_with_current()

    def read(self, source: TensorSource, name: str) -> torch.Tensor:
        with profile.phase("read"):
            self._done_with_current()
            if getattr(source, "byte_range", None) is None:
                # Not file-backed (pickles already in memory, d2merge.many's shared loads):
                # the source has the tensor; a ring buffer would only add memory.
                return source.read(name)
            if self._prefetch is not None:
                slot, tensor, path, start = self._prefetch.take(source, name)
            else:
                slot, tensor, path, start = self.strict_read(source, name, self._take_slot())
            self.bytes_read += tensor.numel() * tensor.element_size()
            self._hand_out(slot, tensor, path, start)
            return tensor

    def strict_read(self, source: TensorSource, name: str, slot: _Slot
                    ) -> tuple[_Slot, torch.Tensor, Path | None, int | None]:
        """The ordinary read (SafetensorsFile's checks and one-line errors) into ``slot``."""
        dtype, shape = source.info(name)
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        slot.ensure(nbytes, self._allocate)
        slot.hold(1)
        try:
            tensor = source.read(name, slot.buffer)
        except BaseException:
            slot.release()
            raise
        path = start = None
        byte_range = getattr(source, "byte_range", None)
        if byte_range is not None and nbytes and tensor.data_ptr() == slot.buffer.data_ptr():
            path, start, _ = byte_range(name)
        return slot, tensor, path, start

    def _hand_out(self, slot: _Slot, tensor: torch.Tensor, path: Path | None, start: int | None) -> None:
        """The engine holds ``slot`` until its next read; the hasher until it has hashed the bytes."""
        self._current = slot
        if self.hasher is not None and path is not None and start is not None and self.hasher.wants(path):
            with slot.lock:
                slot.users += 1
            view = tensor.reshape(-1).view(torch.uint8)
            self.hasher.saw(path, start, memoryview(view.numpy()), slot.release)

    def close(self) -> None:
        """Stop the prefetch thread and let go of the last buffer."""
        self._done_with_current()
        if self._prefetch is not None:
            self._prefetch.stop()
            self._prefetch = None


class _Prefetcher:
    """Reads the scheduled tensors ahead into the reader's slots, strictly in order.

    With ``direct`` (a cold base) by O_DIRECT; otherwise by the ordinary read,
    which for a warm base is the page-cache copy: on this thread it runs on the
    other core instead of delaying the next tensor's arithmetic.
    """

    def __init__(self, reader: TensorReader, schedule: list[tuple[TensorSource, str]], direct: bool = True):
        self._reader = reader
        self._direct = direct
        self._schedule = schedule
        self._ready: queue.Queue[tuple[int, object]] = queue.Queue()
        self._position = 0  # next schedule index the engine will take
        self._stop = threading.Event()
        self._refused: set[Path] = set()
        self._thread = threading.Thread(target=self._run, name="d2merge-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            for index, (source, name) in enumerate(self._schedule):
                if self._stop.is_set():
                    return
                slot = self._reader._take_slot("read (prefetch wait)")
                if self._stop.is_set():
                    return
                try:
                    result: object = self._direct and self._read_direct(source, name, slot, fds)
                    if not result:
                        with profile.phase("read (prefetch)"):
                            result = self._reader.strict_read(source, name, slot)
                except BaseException as exc:  # raised in the engine's thread when it reaches this read
                    result = exc
                self._ready.put((index, result))
        finally:
            for fd in fds.values():
                os.close(fd)

    def _read_direct(self, source: TensorSource, name: str, slot: _Slot, fds: dict[Path, int]
                     ) -> tuple[_Slot, torch.Tensor, Path, int] | None:
        byte_range = getattr(source, "byte_range", None)
        if byte_range is None:
            return None
        path, start, nbytes = byte_range(name)
        dtype, shape = source.info(name)
        lead = start % ALIGNMENT
        element = dtype.itemsize
        if nbytes == 0 or lead % element or path in self._refused:
            return None
        fd = fds.get(path)
        if fd is None:
            try:
                fd = fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # refused (EINVAL) or unreadable: the strict read reports or copes
                self._refused.add(path)
                return None
        span = round_up(lead + nbytes)
        slot.ensure(span, self._reader._allocate)
        slot.hold(1)
        view = memoryview(slot.buffer[:span].numpy())
        done = 0
        with profile.phase("read (prefetch)"):
            try:
                while done < lead + nbytes:
                    got = os.preadv(fd, [view[done:]], start - lead + done)
                    if got <= 0:
                        break
                    done += got
            except OSError:
                done = -1  # EIO, or EINVAL from a device with larger blocks: the strict read decides
                self._refused.add(path)
        view.release()
        if done < lead + nbytes:
            slot.release()
            return None  # shorter than the header says: the strict read gives the one-line error
        raw = slot.buffer[lead:lead + nbytes]
        tensor = raw.view(torch.bool if dtype == torch.bool else dtype).reshape(shape)
        self._reader.direct_bytes += nbytes
        return slot, tensor, path, start

    def take(self, source: TensorSource, name: str) -> tuple[_Slot, torch.Tensor, Path | None, int | None]:
        """The next scheduled read, which must be this one (the engine builds the schedule from its plan)."""
        if self._position >= len(self._schedule):
            raise RuntimeError(f"read {name!r} beyond the prefetch schedule")
        expected_source, expected_name = self._schedule[self._position]
        if expected_source is not source or expected_name != name:
            raise RuntimeError(f"read {name!r} out of the prefetch schedule (expected {expected_name!r})")
        with profile.phase("read (wait)"):
            index, result = self._ready.get()
        self._position += 1
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[return-value]

    def stop(self) -> None:
        self._stop.set()
        # Free every slot the thread may be waiting on, then drain what it already read.
        for slot in self._reader._slots:
            slot.free.set()
        self._thread.join()
        while True:
            try:
                _, result = self._ready.get_nowait()
            except queue.Empty:
                break
