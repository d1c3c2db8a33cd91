"""llama.cpp's importance matrix (``--imatrix FILE``): the per-column weights its quantizer rounds by.

Two layouts, as llama.cpp's own loader (common/imatrix-loader.cpp) reads them:

- GGUF (what ``llama-imatrix`` writes today): tensors ``NAME.in_sum2`` (F32, the summed squared
  activations of each input column, per expert) and ``NAME.counts`` (F32, how many tokens each
  sum holds), with the keys ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``
  (llama-quantize refuses a GGUF imatrix without them);
- the legacy ``.dat``: int32 entry count, then per entry int32 name length, name, int32 calls,
  int32 value count and that many float32 sums; optionally int32 chunk count, int32 dataset name
  length and the name.

Why our own reader: llama-cpp-python exposes the quantizer, which takes the imatrix as an array
of (name, values), not llama-quantize's file loader. The values handed over are llama-quantize's:
sums divided by their count (GGUF, per expert; a count of 0 gives 1s) or by the calls (legacy), in
float32. Stricter than llama.cpp: every length is checked against the file's size, trailing bytes
and non-finite values are refused in one line (llama.cpp aborts the quantization on the latter).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from d2merge.errors import escaped, option_error
from d2merge.io.gguf_file import GGUF_MAGIC, read_gguf_header

GGUF_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
SUMS, COUNTS = ".in_sum2", ".counts"
NOT_AN_IMATRIX = "not an importance matrix in llama.cpp's format (GGUF from llama-imatrix, or its legacy .dat)"
HINT = "{imatrix} takes the file llama-imatrix wrote for this model"  # an OptionError's hint


def read_imatrix(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 importance per input column (x experts)}, as llama-quantize loads them."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise option_error(f"cannot read the importance matrix: {escaped(exc.strerror or exc)}", path=path,
                           hint=HINT) from None
    entries = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    for name, values in entries.items():
        if not np.isfinite(values).all():
            raise option_error("the importance matrix has non-finite values", path=path, tensor=name, hint=HINT)
    return entries


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    header = read_gguf_header(path)  # a malformed or truncated header: one line from the reader
    missing = [key for key in GGUF_KEYS if key not in header.metadata]
    if missing:
        raise option_error(f"GGUF without the imatrix keys {', '.join(missing)}: {NOT_AN_IMATRIX}", path=path, hint=HINT)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with open(path, "rb") as fh:
        for info in header.tensors.values():
            suffix = next((s for s in (SUMS, COUNTS) if info.name.endswith(s)), None)
            if suffix is None:
                continue
            if info.type_name != "F32":
                raise option_error(f"imatrix tensor is {info.type_name}, llama.cpp's are F32", path=path,
                                   tensor=info.name, hint=HINT)
            fh.seek(info.offset)
            values = np.frombuffer(fh.read(info.nbytes), dtype="<f4")
            pairs.setdefault(info.name[: -len(suffix)], {})[suffix] = values
    if not pairs:
        raise option_error(f"GGUF without .in_sum2/.counts tensors: {NOT_AN_IMATRIX}", path=path, hint=HINT)
    entries = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {SUMS, COUNTS}:
            raise option_error("imatrix entry without both its sums and counts", path=path, tensor=name, hint=HINT)
        sums, counts = pair[SUMS], _lround(pair[COUNTS])
        if not counts.size or sums.size % counts.size:
            raise option_error(f"imatrix entry has {sums.size} sums for {counts.size} counts", path=path, tensor=name, hint=HINT)
        per = sums.reshape(counts.size, -1)
        safe = np.where(counts > 0, counts, np.float32(1))[:, None]
        entries[name] = np.where(counts[:, None] > 0, per / safe, np.float32(1)).astype(np.float32).reshape(-1)
    return entries


def _lround(values: np.ndarray) -> np.ndarray:
    """C's lround (halves away from zero), as llama.cpp rounds the stored counts, back in float32."""
    return (np.sign(values) * np.floor(np.abs(values.astype(np.float64)) + 0.5)).astype(np.float32)


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    at = 0

    def take(nbytes: int, what: str) -> bytes:
        nonlocal at
        if nbytes < 0 or at + nbytes > len(data):
            raise option_error(f"{NOT_AN_IMATRIX}: the file ends inside {what} (truncated?)", path=path, hint=HINT)
        chunk = data[at: at + nbytes]
        at += nbytes
        return chunk

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    count = int32("the entry count")
    # each entry takes at least 16 bytes: a count beyond that is not this format
    if count < 1 or count > len(data) // 16:
        raise option_error(f"{NOT_AN_IMATRIX}: entry count {count}", path=path, hint=HINT)
    entries: dict[str, np.ndarray] = {}
    for index in range(count):
        what = f"entry {index + 1} of {count}"
        raw_name = take(int32(what), what)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise option_error(f"{NOT_AN_IMATRIX}: {what} has a name that is not UTF-8", path=path, hint=HINT) from None
        calls, values = int32(what), int32(what)
        if values < 1 or name in entries or not name:
            raise option_error(f"{NOT_AN_IMATRIX}: {what} ({escaped(repr(name))}) has {values} values", path=path,
                               hint=HINT)
        sums = np.frombuffer(take(4 * values, what), dtype="<f4")
        # llama-quantize divides the legacy sums by the calls (the int converts to float first)
        entries[name] = (sums / np.float32(calls)).astype(np.float32) if calls > 0 else sums.astype(np.float32)
    if at < len(data):  # the optional trailer: chunk count, dataset name; nothing after it
        int32("the chunk count")
        take(max(int32("the dataset name"), 0), "the dataset name")
        if at != len(data):
            raise option_error(f"{NOT_AN_IMATRIX}: {len(data) - at} bytes after its end", path=path, hint=HINT)
    return entries


def expected_sizes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """{GGUF tensor name: values its imatrix entry must have} for ggml shapes (row length x experts)."""
    return {name: shape[0] * (shape[2] if len(shape) > 2 else 1) for name, shape in shapes.items()
            if len(shape) >= 2 and math.prod(shape) > 0}
