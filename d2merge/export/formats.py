"""One entry point for every output format of ``d2merge merge --format``.

``hf`` is the engine's own folder; ``safetensors`` one file with provenance
metadata; ``onnx`` a merged folder (in a temp place) exported and validated
with ONNX Runtime; ``onnx-genai`` the same merged folder built by onnxruntime-genai's model
builder and validated with its Generator (``d2merge.export.onnx_genai``); ``gguf`` the engine's stream
written as llama.cpp's file. Each is a plug-in listed by ``d2merge.export.registry``; :func:`merge_as`
looks it up. The CLI calls :func:`merge_as`; so can scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2merge.errors import D2MergeError
from d2merge.export.protocol import ExportOutcome, FormatChoices
from d2merge.export.registry import format_names, get_format
from d2merge.options import MergeOptions

__all__ = ["FORMATS", "ExportOutcome", "merge_as"]

FORMATS = format_names()


def merge_as(base: Any, adapter: Any, out: str | Path, *, format: str = "hf", options: MergeOptions | None = None,
             progress: bool = False, genai_precision: str = "fp32", gguf_type: str = "f16", gguf_modelfile: bool = False,
             gguf_imatrix: str | Path | None = None) -> ExportOutcome:
    """Merge and write ``out`` in the chosen format (``genai_precision``: fp32, fp16 or int4 for onnx-genai;
    ``gguf_type``, ``gguf_modelfile`` and ``gguf_imatrix`` for gguf)."""
    options = options or MergeOptions()
    if genai_precision != "fp32" and format != "onnx-genai":
        raise D2MergeError("--precision is for --format onnx-genai", hint="use --dtype for the other formats")
    choices = FormatChoices(genai_precision=genai_precision, gguf_type=gguf_type, gguf_modelfile=gguf_modelfile,
                            gguf_imatrix=gguf_imatrix)
    return get_format(format).merge(base, adapter, out, options, progress=progress, choices=choices)
