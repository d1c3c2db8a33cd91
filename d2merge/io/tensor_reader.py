"""The merge engine's reads: base tensors into a small ring of reused buffers, each range shown to the hasher.

Why a ring and not one buffer: the hashing thread (io/source_hash.py) still
holds the bytes of tensor k while the engine reads tensor k+1, so the engine
alternates between ``slots`` buffers and waits only if the hasher falls
``slots`` tensors behind. Reused buffers also matter on their own: fresh
multi-megabyte allocations are page-faulted in on first touch, which costs
more than the merge arithmetic. ``allocate`` lets a GPU device hand out pinned
host memory, so its host-to-device copies can run asynchronously.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from d2merge import profile
from d2merge.io.checkpoint import TensorSource
from d2merge.io.source_hash import SourceHasher


def _plain(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class _Slot:
    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.free = threading.Event()
        self.free.set()


class TensorReader:
    """``read(source, name)``: a tensor viewing one of ``slots`` reused buffers, valid until ``slots`` reads later."""

    def __init__(self, hasher: SourceHasher | None = None, *, slots: int = 2,
                 allocate: Callable[[int], torch.Tensor] = _plain):
        self.hasher = hasher
        self._slots = [_Slot() for _ in range(max(1, slots))]
        self._next = 0
        self._allocate = allocate
        self.bytes_read = 0

    def read(self, source: TensorSource, name: str) -> torch.Tensor:
        with profile.phase("read"):
            return self._read(source, name)

    def _read(self, source: TensorSource, name: str) -> torch.Tensor:
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if not slot.free.is_set():
            with profile.phase("hash"):  # the hasher is behind: waiting for it to free the buffer
                slot.free.wait()
        dtype, shape = source.info(name)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if slot.buffer.numel() < nbytes:
            slot.buffer = torch.empty(0, dtype=torch.uint8)  # drop the old one before the larger allocation
            slot.buffer = self._allocate(nbytes)
        tensor = source.read(name, slot.buffer)
        self.bytes_read += nbytes
        byte_range = getattr(source, "byte_range", None)
        if self.hasher is not None and byte_range is not None and nbytes and tensor.data_ptr() == slot.buffer.data_ptr():
            path, start, _ = byte_range(name)
            if self.hasher.wants(path):
                slot.free.clear()
                self.hasher.saw(path, start, memoryview(slot.buffer[:nbytes].numpy()), slot.free.set)
        return tensor

    def scratch(self, nbytes: int) -> torch.Tensor:
        """A read-sized uint8 buffer from the ring that the hasher does not need (for non-file data)."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        slot.free.wait()
        if slot.buffer.numel() < nbytes:
            slot.buffer = torch.empty(0, dtype=torch.uint8)
            slot.buffer = self._allocate(nbytes)
        return slot.buffer[:nbytes]
