"""The GGUF file types d2merge writes (``gguf_type``): gguf-py's, then llama.cpp's quantizer's.

One table each: :data:`GGUF_TYPES` (written by gguf-py in numpy) and ``quant.LLAMA_CPP_TYPES``
(written by llama.cpp's own quantizer from an f32 temp, the ``gguf-llama`` extra), and the checks
a caller runs before any work: is the type known, and does an importance matrix apply to it.
Their refusals are ``OptionError``s naming the options (``gguf_type``, ``gguf_imatrix``, as
``MergeRunOptions`` calls them); the CLI prints them with the flags (``--gguf-type``, ``--imatrix``).
"""

from __future__ import annotations

import os

from d2merge.export.gguf.quant import LLAMA_CPP_TYPES
from d2merge.options.base import option_error
from d2merge.options.merge import MergeRunOptions

# --gguf-type written by gguf-py in numpy -> (GGML type of 2-D weights, llama.cpp's general.file_type);
# 1-D tensors (norms, biases) always stay F32, as in llama.cpp. Each is llama.cpp's file byte for
# byte (tests/unit/export/test_gguf_quant.py): q8_0 is llama.cpp's Q8_0 (whose mix is Q8_0 everywhere); the
# ``_pure`` types are ``llama-quantize --pure`` (every 2-D weight in that type), not llama.cpp's
# Q4_0..Q5_1 mix, which keeps the output/embedding at Q6_K: those are the llama.cpp types below.
GGUF_TYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
    "q4_0_pure": ("Q4_0", 2), "q4_1_pure": ("Q4_1", 3), "q5_0_pure": ("Q5_0", 8), "q5_1_pure": ("Q5_1", 9),
}


def all_gguf_types() -> tuple[str, ...]:
    """Every ``gguf_type``: gguf-py's, then those llama.cpp's quantizer writes (the gguf-llama extra)."""
    return (*GGUF_TYPES, *LLAMA_CPP_TYPES)


def check_gguf_type(gguf_type: str) -> str:
    """``gguf_type`` if it is a type d2merge writes; one line otherwise. (Whether llama.cpp's quantizer
    is installed for a llama.cpp type is checked with the other inputs, before any work.)"""
    if gguf_type not in GGUF_TYPES and gguf_type not in LLAMA_CPP_TYPES:
        # the value is shown quoted, as typed; one holding braces goes through the option's value instead,
        # so that no part of it is read as a placeholder
        shown = "{gguf_type=}" if "{" in gguf_type or "}" in gguf_type else "{gguf_type} " + repr(gguf_type)
        raise option_error(f"unknown {shown}; choose one of {', '.join(all_gguf_types())}",
                           hint="docs/gguf.md says what each type is", model=MergeRunOptions, gguf_type=gguf_type)
    return gguf_type


def file_type_code(gguf_type: str) -> int:
    """llama.cpp's ``general.file_type`` of ``gguf_type``."""
    return GGUF_TYPES[gguf_type][1] if gguf_type in GGUF_TYPES else LLAMA_CPP_TYPES[gguf_type]


def by_llama_cpp(gguf_type: str, imatrix: str | os.PathLike | None) -> bool:
    """Whether llama.cpp's quantizer writes ``gguf_type`` (from an f32 temp): the only types an importance
    matrix applies to."""
    if imatrix is not None and gguf_type not in LLAMA_CPP_TYPES:  # gguf_type: a known type (check_gguf_type)
        raise option_error(f"{{gguf_imatrix}} applies to the types llama.cpp's quantizer writes, not {gguf_type}",
                           hint=f"use one of {', '.join(LLAMA_CPP_TYPES)}, or drop {{gguf_imatrix}}",
                           model=MergeRunOptions, gguf_imatrix=imatrix)
    return gguf_type in LLAMA_CPP_TYPES
