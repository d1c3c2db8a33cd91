"""Strict, lazy safetensors reading and streaming writing.

The reader validates the whole header before any tensor is read (sizes bounded
before allocation, offsets contiguous and inside the file, byte counts matching
dtype x shape), then reads one tensor at a time. The writer takes the header up
front (from the merge plan) and then streams tensors in order, so memory never
holds more than the tensor being written.

Why not the ``safetensors`` package for these two jobs: its ``save_file`` takes the
whole state dict in memory (a merge holds one tensor at a time), and neither its
reader nor its writer gives byte ranges, which the engine uses to copy unchanged
tensors file to file without decoding them (``byte_range``/``copy_from``). The
format is small and fixed; ``tests/unit/io/test_reader_differential.py`` checks this reader
against ``safetensors.safe_open`` on every corrupt and valid file of the malformed
corpus, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from d2merge.errors import D2MergeError
from d2merge.io.direct_io import OutputFile
from d2merge.io.json_file import parse_json

# Largest header we accept: the real format caps it at 100 MB; a larger length
# prefix is a corrupt or hostile file, refused before allocating anything.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element (``dtype.itemsize``: allocating a tensor to ask cost 35 us, 0.3 s per 1.1B merge)."""
    return dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


class SafetensorsFile:
    """A validated safetensors file whose tensors are read on demand.

    Opening parses and checks the header only; :meth:`read` reads one tensor, into a
    reused buffer when given (the engine's scratch memory), which ``safe_open`` cannot.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse_header()

    def _fail(self, reason: str, tensor: str | None = None, hint: str | None = None) -> D2MergeError:
        return D2MergeError(reason, path=self.path, tensor=tensor,
                            hint=hint or "the file is not a valid safetensors file; re-save or re-download it")

    def _parse_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                prefix = fh.read(8)
                if len(prefix) < 8:
                    raise self._fail(f"file is {size} bytes, too short for a safetensors header")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > MAX_HEADER_BYTES:
                    raise self._fail(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
                if header_len > size - 8:
                    raise self._fail(f"header length {header_len} is larger than the file ({size} bytes)")
                raw = fh.read(header_len)
        except OSError as exc:
            raise D2MergeError(f"cannot read file: {exc.strerror or exc}", path=self.path) from None
        if len(raw) < header_len:
            raise self._fail("header is truncated")
        try:
            header = parse_json(raw.decode("utf-8"), "header")
        except UnicodeDecodeError as exc:
            raise self._fail(f"header is not valid JSON ({exc.__class__.__name__})") from None
        except D2MergeError as exc:
            raise self._fail(exc.reason) from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + header_len
        data_len = size - data_start
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise self._fail("__metadata__ must map strings to strings")
        self.metadata = metadata
        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            info = self._tensor_info(name, entry, data_start)
            spans.append((info.start - data_start, info.start - data_start + info.nbytes, name))
            self.tensors[name] = info
        spans.sort()
        cursor = 0
        for begin, end, name in spans:
            if begin > data_len:
                raise self._fail(f"data_offsets [{begin}, {end}) point past the end of the data, "
                                 f"which is {data_len} bytes", tensor=name)
            if begin != cursor:
                what = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
                raise self._fail(f"data offsets [{begin}, {end}) {what}", tensor=name)
            cursor = end
        if cursor > data_len:
            name = spans[-1][2] if spans else None
            raise self._fail(f"data is truncated: tensors need {cursor} bytes, the file has {data_len}", tensor=name)
        if cursor != data_len:
            raise self._fail(f"{data_len - cursor} unexpected bytes after the last tensor")

    def _tensor_info(self, name: str, entry: object, data_start: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail("header entry is not an object", tensor=name)
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise self._fail(f"unsupported dtype {dtype_name!r}", tensor=name)
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**53 for d in shape)):
            raise self._fail(f"invalid shape {shape!r}", tensor=name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2**63 for o in offsets)
                or offsets[0] > offsets[1]):
            raise self._fail(f"invalid data_offsets {offsets!r}", tensor=name)
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype_size(dtype)
        nbytes = offsets[1] - offsets[0]
        if nbytes != expected:
            raise self._fail(f"{dtype_name} {shape} needs {expected} bytes but data_offsets span {nbytes}", tensor=name)
        return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=data_start + offsets[0], nbytes=nbytes)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, read from disk (the file is not kept open).

        The data goes into ``buffer`` (uint8, reused by the merge engine) when it
        is large enough, else into fresh memory; the result is a view of it.
        """
        info = self.tensors.get(name)
        if info is None:
            raise D2MergeError("no such tensor in file", path=self.path, tensor=name)
        if buffer is None or buffer.numel() < info.nbytes:
            buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        buffer = buffer[: info.nbytes]
        try:
            with open(self.path, "rb") as fh:
                fh.seek(info.start)
                got = fh.readinto(memoryview(buffer.numpy())) if info.nbytes else 0
        except OSError as exc:
            raise D2MergeError(f"cannot read file: {exc.strerror or exc}", path=self.path, tensor=name) from None
        if got != info.nbytes:
            raise self._fail(f"file ended after {got} of {info.nbytes} bytes (changed while reading?)", tensor=name)
        return buffer.view(info.dtype).reshape(info.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian raw bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def encode_header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                  metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes for tensors written back to back in the given order.

    Returns the header (length prefix included, padded to 8 bytes as the format
    recommends) and each tensor's data span.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype_size(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        spans[name] = (offset, offset + nbytes)
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, spans


class StreamingWriter:
    """Writes a safetensors file whose header is known up front, one tensor at a time, in order.

    The header comes from the plan, so the file is written in one pass while the
    engine computes; ``safetensors.save_file`` would need every tensor in memory first.

    Bytes go through :class:`d2merge.io.direct_io.OutputFile`: O_DIRECT where the
    filesystem allows it, buffered writes elsewhere; the file is the same either way.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, *, direct: bool | None = None):
        self.path = Path(path)
        self._entries = entries
        self._next = 0
        self._open: tuple[torch.dtype, int] | None = None  # (dtype, bytes still to come) of a begun tensor
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._in_place = False  # whether the last cast_target is a view of the staging buffer
        header, spans = encode_header(entries, metadata)
        data_bytes = max((end for _, end in spans.values()), default=0)
        self._fh = OutputFile(self.path, size_hint=len(header) + data_bytes, direct=direct)
        self._fh.write(header)

    @property
    def direct(self) -> bool:
        """Whether the bytes are going out with O_DIRECT."""
        return self._fh.direct

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._entry()
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"writer expected {expected_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self._fh.write(tensor_bytes(tensor.cpu()))
        self._next += 1

    def begin(self, name: str) -> None:
        """Open the next tensor for :meth:`cast_target` / :meth:`append_cast`: the merge engine hands it over a row block at a time."""
        expected_name, dtype, shape = self._entry()
        if name != expected_name:
            raise RuntimeError(f"writer expected {expected_name}, got {name}")
        self._open = (dtype, math.prod(shape) * dtype_size(dtype))

    def cast_target(self, numel: int) -> torch.Tensor:
        """Where the next ``numel`` values of the begun tensor go, typed (1-D): fill it, then :meth:`commit`.

        A view of the output's staging buffer where the bytes fit in one buffer, so
        a merged tensor is never held whole (peak memory stays at the read buffers
        whatever the output dtype); a scratch block where they would straddle two
        buffers (once per buffer) or be misaligned, copied at :meth:`commit`.
        """
        if self._open is None:
            raise RuntimeError(f"{self.path}: cast_target without begin")
        dtype, remaining = self._open
        size = dtype_size(dtype)
        if numel * size > remaining:
            raise RuntimeError(f"writer got {numel * size} bytes for {self._entries[self._next][0]}, {remaining} left")
        region = self._fh.reserve(numel * size, align=size) if numel else None
        self._in_place = region is not None
        if region is not None:
            return torch.frombuffer(region, dtype=torch.uint8).view(dtype)
        if self._scratch.numel() < numel * size:
            self._scratch = torch.empty(numel * size, dtype=torch.uint8)
        return self._scratch[: numel * size].view(dtype)

    def commit(self, target: torch.Tensor) -> None:
        """``target`` (the last :meth:`cast_target`, now filled) is the next part of the begun tensor."""
        assert self._open is not None
        dtype, remaining = self._open
        nbytes = target.numel() * dtype_size(dtype)
        if self._in_place:
            self._fh.commit(nbytes)
        elif nbytes:
            self._fh.write(tensor_bytes(target))
        self._open = (dtype, remaining - nbytes)

    def append_cast(self, block: torch.Tensor, screen: Callable[[torch.Tensor], int] | None = None) -> int:
        """Append ``block`` cast to the begun tensor's dtype (torch's cast, as ``Tensor.copy_``).

        ``screen`` sees the cast values first and returns how many are bad
        (NaN/Inf); a piece with any is not written, and the count is returned
        for the caller to report.
        """
        target = self.cast_target(block.numel()).view(block.shape)
        target.copy_(block)
        bad = screen(target) if screen is not None else 0
        if not bad:
            self.commit(target)
        return bad

    def end(self) -> None:
        """The open tensor is complete (every byte appended)."""
        if self._open is None or self._open[1]:
            left = "never opened" if self._open is None else f"{self._open[1]} bytes missing"
            raise RuntimeError(f"{self.path}: {self._entries[self._next][0]} ended early ({left})")
        self._open = None
        self._next += 1

    def _entry(self) -> tuple[str, torch.dtype, tuple[int, ...]]:
        if self._open is not None:
            raise RuntimeError(f"{self.path}: {self._entries[self._next][0]} is still open")
        if self._next >= len(self._entries):
            raise RuntimeError(f"{self.path}: every tensor of the header is already written")
        return self._entries[self._next]

    def copy_from(self, name: str, source: Path, offset: int, nbytes: int) -> None:
        """Copy a tensor's bytes straight from another file (kernel-side, or into the direct-I/O staging buffer)."""
        expected_name, dtype, shape = self._entry()
        if name != expected_name or nbytes != math.prod(shape) * dtype_size(dtype):
            raise RuntimeError(f"writer expected {expected_name} ({math.prod(shape) * dtype_size(dtype)} bytes), "
                               f"got {name} ({nbytes} bytes)")
        if self._fh.copy_range(source, offset, nbytes) != nbytes:
            raise D2MergeError("file ended while copying", path=source, tensor=name)
        self._next += 1

    def convert_from(self, name: str, source: Path, offset: int, in_dtype: torch.dtype,
                     chunk_elements: int = 1 << 20) -> None:
        """Copy a tensor from another file while casting it to this entry's dtype, a chunk at a time.

        Memory stays at two small chunks whatever the tensor's size (an fp32 output of
        a bf16 embedding would otherwise hold the whole tensor twice); the cast is
        torch's, the one ``Tensor.copy_`` does, so the bytes are the same.
        """
        self.begin(name)
        dtype, nbytes = self._open  # type: ignore[misc]
        count = nbytes // dtype_size(dtype)
        in_size = dtype_size(in_dtype)
        step = max(1, min(count, chunk_elements))
        raw = torch.empty(step * in_size, dtype=torch.uint8)
        with open(source, "rb", buffering=0) as src:
            done = 0
            while done < count:
                n = min(step, count - done)
                got = os.preadv(src.fileno(), [memoryview(raw.numpy())[: n * in_size]], offset + done * in_size)
                if got != n * in_size:
                    raise D2MergeError("file ended while copying", path=source, tensor=name)
                self.append_cast(raw[: n * in_size].view(in_dtype))
                done += n
        self.end()

    def close(self) -> None:
        if self._next != len(self._entries) or self._open is not None:
            self._fh.abandon()
            raise RuntimeError(f"{self.path}: {len(self._entries) - self._next} tensors were never written")
        self._fh.close()

    def abandon(self) -> None:
        """Close without completing (the caller deletes the partial file with its temp folder)."""
        # Never raises: a failure here (disk full) is moot for a discarded file, and raising
        # would replace the error that made the caller abandon it.
        self._fh.abandon()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def rewrite_metadata(path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                     metadata: Mapping[str, str]) -> None:
    """Replace a written file's header metadata in place; the new header must have the same length.

    Lets a streaming writer record facts known only at the end (source hashes)
    by reserving fixed-width placeholders up front.
    """
    header, _ = encode_header(entries, metadata)
    with open(path, "r+b") as fh:
        old_len = struct.unpack("<Q", fh.read(8))[0]
        if old_len + 8 != len(header):
            raise RuntimeError(f"{path}: new header is {len(header) - 8} bytes, the file reserves {old_len}")
        fh.seek(0)
        fh.write(header)
        fh.flush()
        os.fsync(fh.fileno())


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a small dict of tensors (adapters, single-file exports) with the streaming writer."""
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with StreamingWriter(path, entries, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
