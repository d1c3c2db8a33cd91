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
from d2merge.options import MergeOptions, MergeRunOptions
from d2merge.options.merge import OUTPUT_FORMATS

__all__ = ["FORMATS", "ExportOutcome", "merge_as"]

FORMATS = format_names()


def merge_as(base: Any, adapter: Any, out: str | Path, *, format: str = "hf", options: MergeOptions | None = None,
             progress: bool = False, genai_precision: str = "fp32", gguf_type: str = "f16", gguf_modelfile: bool = False,
             gguf_imatrix: str | Path | None = None, genai_int4: Any = None) -> ExportOutcome:
    """Merge and write ``out`` in the chosen format (``genai_precision``: fp32, fp16 or int4 for onnx-genai,
    ``genai_int4`` its ``Int4Options`` for int4; ``gguf_type``, ``gguf_modelfile`` and ``gguf_imatrix`` for gguf)."""
    options = options or MergeOptions()
    plugin = get_format(format)  # an unknown name: one line listing the registry's formats
    # A format's own setting given with another format is refused (d2merge.options.merge says which goes with
    # which); a format registered beyond the built-in ones takes none of them.
    MergeRunOptions(format=format if format in OUTPUT_FORMATS else None, genai_precision=genai_precision,
                    gguf_type=gguf_type, gguf_imatrix=gguf_imatrix, gguf_modelfile=gguf_modelfile)
    if genai_int4 is not None and (format != "onnx-genai" or genai_precision != "int4"):
        raise D2MergeError("genai_int4 settings apply only with format='onnx-genai' and genai_precision='int4'",
                           hint="add genai_precision='int4', or drop genai_int4")
    choices = FormatChoices(genai_precision=genai_precision, gguf_type=gguf_type, gguf_modelfile=gguf_modelfile,
                            gguf_imatrix=gguf_imatrix, genai_int4=genai_int4)
    return plugin.merge(base, adapter, out, options, progress=progress, choices=choices)
