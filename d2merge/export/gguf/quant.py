"""llama.cpp's file types made by llama.cpp's own quantizer: K-quants, IQ4 and the legacy-type mix.

Why call llama.cpp instead of porting it: a type named like llama.cpp's must be llama.cpp's file.
Its quantizer (``llama_model_quantize``, src/llama-quant.cpp) chooses a type per tensor (the
output / tied embedding at Q6_K, attn_v and ffn_down at more bits in some layers, fallbacks for
rows that are not whole 256-value blocks) and K-quants search their scales per block; both change
between llama.cpp releases. Calling it through llama-cpp-python (the ``gguf-llama`` extra) gives
the bytes ``llama-quantize`` writes from the same f32 file, which the tests check tensor by tensor.

The cost is an f32 GGUF of the merge written beside the output first (stated and checked against
the free space before any work), read once by llama.cpp, and removed on every exit path (a
killed run's is removed by the next run, as every ``.d2merge-tmp-`` folder is).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from d2merge.errors import D2MergeError
from d2merge.options.base import option_error
from d2merge.options.merge import MergeRunOptions
from d2merge.sizes import format_size

# --gguf-type -> llama.cpp's file type (enum llama_ftype). q8_0 is not here: gguf-py's Q8_0 is
# llama.cpp's byte for byte and llama.cpp's Q8_0 mix puts every 2-D weight in Q8_0 (tested).
LLAMA_CPP_TYPES: dict[str, int] = {
    "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30,
}
# The most bytes a GGML weight type takes per value in these mixes: F16, llama.cpp's last fallback.
_OUTPUT_BYTES_PER_VALUE = 2
_GGML_LOG_ERROR = 3
_quantize_lock = threading.Lock()  # llama.cpp's log callback is process-wide


def llama_cpp_module(gguf_type: str) -> Any:
    """llama-cpp-python, or one line naming the package that makes ``gguf_type``."""
    try:
        import llama_cpp
    except ImportError:
        raise option_error("{gguf_type=} is written by llama.cpp's own quantizer, and llama-cpp-python is not "
                           "installed", hint="pip install 'd2merge[gguf-llama]' (builds llama.cpp, ~11 min)",
                           model=MergeRunOptions, gguf_type=gguf_type) from None
    return llama_cpp


def needed_bytes(shapes: Iterable[tuple[int, ...]]) -> tuple[int, int]:
    """(bytes of the f32 temp, most bytes the quantized output can take) for these tensor shapes."""
    shapes = list(shapes)
    values = [math.prod(shape) for shape in shapes]
    matrices = sum(v for v, shape in zip(values, shapes) if len(shape) >= 2)
    return 4 * sum(values), _OUTPUT_BYTES_PER_VALUE * matrices + 4 * (sum(values) - matrices)


def check_free_space(folder: Path, temp: int, output: int, out_path: Path) -> None:
    """Refuse before any work when the f32 temp and the output cannot both fit beside ``out_path``."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise D2MergeError(f"cannot read the free space: {exc.strerror or exc}", path=folder) from None
    margin = 64 << 20  # headers, padding, the tokenizer scratch
    if free < temp + output + margin:
        raise D2MergeError(f"needs {format_size(temp + output + margin)} free beside the output (an f32 GGUF temp "
                           f"of {format_size(temp)} for llama.cpp's quantizer, then the output, at most "
                           f"{format_size(output)}); {format_size(free)} is free", path=out_path,
                           hint="free some space, or write the output to another disk")


def check_imatrix(entries: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Every entry names a 2-D weight of this model with one value per input column; one line otherwise.

    llama.cpp skips an entry it finds no tensor for and aborts on a size mismatch mid-way: an
    imatrix of another model would then quantize with no importance data at all, unannounced.
    """
    from d2merge.io.imatrix_file import expected_sizes

    sizes = expected_sizes(shapes)
    for name, values in entries.items():
        if name not in sizes:
            raise option_error("the importance matrix names a tensor this model does not have (another model's "
                               "imatrix?)", path=path, tensor=name, model=MergeRunOptions,
                               hint="{gguf_imatrix} takes the file llama-imatrix wrote for this model")
        if values.size != sizes[name]:
            raise option_error(f"the importance matrix has {values.size} values for a tensor with rows of "
                               f"{sizes[name]} (another model's imatrix?)", path=path, tensor=name,
                               model=MergeRunOptions, hint="{gguf_imatrix} takes the file llama-imatrix wrote for "
                                                           "this model")


def quantize(f32_path: Path, out_path: Path, gguf_type: str, *, imatrix: dict[str, np.ndarray] | None = None,
             threads: int | None = None) -> None:
    """llama.cpp's ``gguf_type`` file of the f32 GGUF at ``f32_path``, written at ``out_path``.

    Exactly what ``llama-quantize [--imatrix] F32 OUT TYPE`` does (the default parameters, the
    importance values as llama-quantize loads them); the thread count does not change the bytes
    (rows are quantized independently). llama.cpp's log is kept and its error is the one line.
    """
    llama_cpp = llama_cpp_module(gguf_type)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_TYPES[gguf_type]
    params.nthread = threads or os.cpu_count() or 1
    keep: list[Any] = []
    if imatrix:
        table = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for row, (name, values) in enumerate(sorted(imatrix.items())):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(data)
            table[row].name = name.encode()
            table[row].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            table[row].size = data.size
        table[len(imatrix)].name = None  # the list ends at a null name
        keep.append(table)
        params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data: Any) -> None:
        if level == _GGML_LOG_ERROR:
            errors.append(text.decode("utf-8", "replace").strip())

    with _quantize_lock:
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
        try:
            failed = llama_cpp.llama_model_quantize(str(f32_path).encode(), str(out_path).encode(),
                                                    ctypes.byref(params))
        finally:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if failed:
        reason = next((e.split("failed to quantize:", 1)[1].strip() for e in errors if "failed to quantize:" in e),
                      "; ".join(e for e in errors if e) or "no reason given")
        raise D2MergeError(f"llama.cpp's quantizer failed ({gguf_type}): {reason}", path=out_path)


def prepare_llama_cpp(tensors: Iterable[tuple[str, tuple[int, ...]]], out_path: Path, gguf_type: str,
                      imatrix: str | os.PathLike | None) -> tuple[dict[str, np.ndarray] | None, int]:
    """Before any work: the checked importance matrix, the f32 temp's size against the free space, llama.cpp.

    ``tensors``: the planned GGUF tensors' (name, shape); returns (the importance matrix's entries or
    None, the f32 temp's bytes).
    """
    shapes = {name: tuple(reversed(shape)) for name, shape in tensors}  # ggml order: row length first
    entries = None
    if imatrix is not None:
        from d2merge.io.imatrix_file import read_imatrix

        entries = read_imatrix(imatrix)
        check_imatrix(entries, shapes, Path(imatrix))
    temp, output = needed_bytes(shapes.values())
    check_free_space(out_path.absolute().parent, temp, output, out_path)
    llama_cpp_module(gguf_type)
    return entries, temp


@contextmanager
def f32_temp(out_path: Path) -> Iterator[Path]:
    """Where the f32 GGUF llama.cpp's quantizer reads is written.

    The temp lives in a ``.d2merge-tmp-`` folder beside the output: removed when this block
    ends, however it ends, and by the next run after a kill.
    """
    from d2merge.io.output import scratch_beside

    with scratch_beside(out_path, "f32") as scratch:
        yield Path(scratch) / out_path.name


@contextmanager
def written_by(staged: Path, out_path: Path, llama_cpp_type: str | None, imatrix: dict[str, np.ndarray] | None
               ) -> Iterator[Path]:
    """Where the GGUF writer writes: the staged output, or an f32 temp that llama.cpp then quantizes into it."""
    if llama_cpp_type is None:
        yield staged
        return
    with f32_temp(out_path) as f32:
        yield f32
        quantize(f32, staged, llama_cpp_type, imatrix=imatrix)
