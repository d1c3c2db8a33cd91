"""The header of a GGUF file: its key/values and tensor table, without the tensor data.

Why our own reader and not gguf-py's ``GGUFReader``: that one builds a numpy view for every
value of every array, in Python, so a file with a 49k-token vocabulary and its merges took
8-10 s to open (measured on the SmolLM2 file, 2-core machine), and ``d2merge verify`` opened
each GGUF once just for its tensor table. This reads the same bytes with ``struct`` from one
read-only mapping, in a fraction of a second, and is stricter: every length and count is
checked against the file's size before it is used, every tensor's data must lie inside the
file, and a value type, duplicate key or tensor, or byte order it does not know is refused
with one line, never skipped. The GGML type names and block sizes come from gguf-py's tables.
Tensor data is never read here (verify loads the model through transformers' own reader).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2merge.errors import D2MergeError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF value types (gguf.GGUFValueType): the struct format of each fixed-size one.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table (the data stays in the file)."""

    name: str
    shape: tuple[int, ...]  # ggml order: ne[0], the length of a row, first
    type_name: str  # the GGML type: F32, F16, BF16, Q8_0, ...
    offset: int  # where the data starts in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything a GGUF file says about itself before its tensor data."""

    path: Path
    version: int
    metadata: dict[str, Any]  # key -> str, int, float, bool, or a list of those (arrays)
    tensors: dict[str, GGUFTensorInfo]  # in file order
    data_offset: int


class _Malformed(Exception):
    """A reason the file cannot be read (becomes one D2MergeError line naming the file)."""


class _Cursor:
    """Little-endian reads from a mapping, each checked against the end of the file first."""

    def __init__(self, data: mmap.mmap):
        self.data, self.pos, self.size = data, 0, len(data)

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.pos + nbytes > self.size:
            raise _Malformed(f"the file ends inside {what} (at byte {self.pos}, {nbytes} more needed)")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def many(self, fmt: str, count: int, what: str) -> tuple[Any, ...]:
        """``count`` values of the one-letter struct format ``fmt``, in one unpack."""
        width = struct.calcsize("<" + fmt)
        self.need(count * width, what)
        values = struct.unpack_from(f"<{count}{fmt}", self.data, self.pos)
        self.pos += count * width
        return values

    def string(self, what: str) -> str:
        length = self.unpack("Q", what)
        self.need(length, what)
        raw = self.data[self.pos: self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} at byte {self.pos - length} is not UTF-8") from None

    def value(self, kind: int, what: str) -> Any:
        if kind in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[kind], what)
        if kind == _BOOL:
            return self.boolean(self.unpack("B", what), what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            return self.array(what)
        raise _Malformed(f"{what} has value type {kind}, which GGUF does not define")

    @staticmethod
    def boolean(byte: int, what: str) -> bool:
        if byte not in (0, 1):
            raise _Malformed(f"{what} is a bool stored as {byte} (0 or 1 expected)")
        return bool(byte)

    def array(self, what: str) -> list[Any]:
        kind, count = self.unpack("IQ", what)
        if kind == _ARRAY:
            raise _Malformed(f"{what} is an array of arrays, which d2merge does not read")
        if kind in _SCALAR_FORMATS or kind == _BOOL:
            values = self.many(_SCALAR_FORMATS.get(kind, "B"), count, what)
            return [self.boolean(v, what) for v in values] if kind == _BOOL else list(values)
        if kind == _STRING:
            self.need(count * 8, what)  # every string has at least its 8-byte length
            return [self.string(what) for _ in range(count)]
        raise _Malformed(f"{what} is an array of value type {kind}, which GGUF does not define")


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """The key/values and tensor table of the GGUF file at ``path``; one-line refusal if malformed."""
    path = Path(path)
    if not path.is_file():
        raise D2MergeError("GGUF file not found", path=path)
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise _Malformed("the file is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, _Cursor(data))
    except _Malformed as why:
        raise D2MergeError(f"not a readable GGUF file: {why}", path=path,
                           hint="re-export it, or check that the download completed") from None
    except OSError as exc:
        raise D2MergeError(f"cannot read the GGUF file: {exc.strerror or exc}", path=path) from None


def _parse(path: Path, cursor: _Cursor) -> GGUFHeader:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    cursor.need(4, "the magic number")
    if cursor.data[:4] != GGUF_MAGIC:
        raise _Malformed("it does not start with the GGUF magic number")
    cursor.pos = 4
    version = cursor.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        if version and version & 0xFFFF == 0:  # 2 or 3 written big-endian reads as 0x0N000000
            raise _Malformed("it is a big-endian GGUF file, which d2merge does not read")
        raise _Malformed(f"GGUF version {version}; d2merge reads versions {', '.join(map(str, SUPPORTED_VERSIONS))}")
    tensor_count, kv_count = cursor.unpack("QQ", "the header")
    # Every key/value takes at least 12 bytes and every tensor entry 24: refuse absurd counts at once.
    cursor.need(kv_count * 12 + tensor_count * 24, "the key/value and tensor tables")

    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = cursor.string(f"key {index}")
        if key in metadata:
            raise _Malformed(f"key {key!r} appears twice")
        kind = cursor.unpack("I", f"the type of {key!r}")
        if key == "general.alignment" and kind != 4:  # llama.cpp and gguf-py read it as a uint32 only
            raise _Malformed(f"general.alignment has value type {kind} (4, uint32, expected)")
        metadata[key] = cursor.value(kind, f"value of {key!r}")

    entries = []
    for index in range(tensor_count):
        name = cursor.string(f"tensor name {index}")
        n_dims = cursor.unpack("I", f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Malformed(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} expected)")
        shape = cursor.many("Q", n_dims, f"the shape of tensor {name!r}")
        raw_type, offset = cursor.unpack("IQ", f"the type and offset of tensor {name!r}")
        entries.append((name, shape, raw_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise _Malformed(f"general.alignment is {alignment!r} (a power of two expected)")
    data_offset = -(-cursor.pos // alignment) * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, raw_type, offset in entries:
        if name in tensors:
            raise _Malformed(f"tensor {name!r} appears twice")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise _Malformed(f"tensor {name!r} has GGML type {raw_type}, which gguf-py does not know") from None
        if shape[0] % block:
            raise _Malformed(f"tensor {name!r}: rows of {shape[0]} values do not fill {ggml_type.name} "
                             f"blocks of {block}")
        nbytes = math.prod(shape) // block * block_bytes
        start = data_offset + offset
        if start + nbytes > cursor.size:
            raise _Malformed(f"tensor {name!r} ({nbytes} bytes at {start}) runs past the end of the file "
                             f"({cursor.size} bytes)")
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type.name, start, nbytes)
    return GGUFHeader(path, version, metadata, tensors, data_offset)

