"""One entry point for every output format of ``d2merge merge --format``.

``hf`` is the engine's own folder; ``safetensors`` one file with provenance
metadata; ``onnx`` a merged folder (in a temp place) exported and validated
with ONNX Runtime; ``onnx-genai`` the same merged folder built by onnxruntime-genai's model
builder and validated with its Generator (``d2merge.export.onnx_genai``). The CLI calls :func:`merge_as`; so can scripts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2merge.errors import D2MergeError
from d2merge.options import MergeOptions, MergeRunOptions

if TYPE_CHECKING:
    from d2merge.export.hf_folder import MergeResult

FORMATS = ("hf", "safetensors", "onnx", "onnx-genai", "gguf")


@dataclass(frozen=True)
class ExportOutcome:
    format: str
    output: Path
    merge: MergeResult
    onnx: Any = None  # OnnxExportResult for format="onnx", GenaiExportResult for "onnx-genai"
    gguf: Any = None  # GGUFExportResult for format="gguf"

    def describe(self) -> str:
        merged = len(self.merge.plan.merged)
        methods = " + ".join(a.method.name for a in self.merge.plan.adapters)
        text = (f"merged {merged} tensors ({methods}) into {self.output} "
                f"[{self.format}] in {self.merge.seconds:.2f}s")
        if self.onnx is not None:
            text += "\n" + self.onnx.describe()
        if self.gguf is not None:
            text += "\n" + self.gguf.describe()
        return text


def merge_as(base: Any, adapter: Any, out: str | Path, *, format: str = "hf", options: MergeOptions | None = None,
             progress: bool = False, genai_precision: str = "fp32", gguf_type: str = "f16", gguf_modelfile: bool = False,
             gguf_imatrix: str | Path | None = None, genai_int4: Any = None) -> ExportOutcome:
    """Merge and write ``out`` in the chosen format (``genai_precision``: fp32, fp16 or int4 for onnx-genai,
    ``genai_int4`` its ``Int4Options`` for int4; ``gguf_type``, ``gguf_modelfile`` and ``gguf_imatrix`` for gguf)."""
    from d2merge.export.hf_folder import merge_to_hf_folder as merge

    options = options or MergeOptions()
    # A format's own setting given with another format is refused (d2merge.options.merge says which goes with which).
    MergeRunOptions(format=format, genai_precision=genai_precision, gguf_type=gguf_type, gguf_imatrix=gguf_imatrix,
                    gguf_modelfile=gguf_modelfile)
    if genai_int4 is not None and (format != "onnx-genai" or genai_precision != "int4"):
        raise D2MergeError("genai_int4 settings apply only with format='onnx-genai' and genai_precision='int4'",
                           hint="add genai_precision='int4', or drop genai_int4")
    if format == "hf":
        result = merge(base, adapter, out, options, progress=progress)
        return ExportOutcome(format, result.output, result)
    if format == "safetensors":
        from d2merge.export.single_file import merge_to_safetensors

        result = merge_to_safetensors(base, adapter, out, options, progress=progress)
        return ExportOutcome(format, result.output, result)
    if format == "onnx":
        from d2merge.export.onnx import _destination, export_onnx
        from d2merge.io.output import check_output_location, scratch_beside

        onnx_dtype = {"auto": "fp32", "fp32": "fp32", "fp16": "fp16"}.get(options.dtype)
        if onnx_dtype is None:
            raise D2MergeError("ONNX Runtime on CPU cannot run bf16 graphs",
                               hint="use --dtype fp32 or --dtype fp16 with --format onnx")
        # The output is the graph file (OUT itself, or OUT/model.onnx): a folder a killed run
        # created stays usable, and the fp32 merge lives in a marked work folder beside the graph.
        out_path = _destination(out)
        check_output_location(out_path, [Path(str(base)), Path(str(adapter))], overwrite=options.overwrite,
                              is_file=True, missing_parents=True)
        new_folders = [f for f in (out_path.parent, *out_path.parent.parents) if not f.exists()]
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            with scratch_beside(out_path, "merge") as scratch:
                fp32 = options.with_overrides(dtype="fp32", overwrite=False)
                result = merge(base, adapter, Path(scratch) / "merged", fp32, progress=progress)
                exported = export_onnx(result.output, out_path, dtype=onnx_dtype, overwrite=options.overwrite)
        except BaseException:
            for folder in new_folders:  # a failed export leaves no trace, not even the folders it created
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return ExportOutcome(format, exported.onnx_path, result, exported)
    if format == "onnx-genai":
        from d2merge.export.onnx_genai import PRECISIONS, export_genai, import_genai
        from d2merge.io.output import check_output_location, scratch_beside

        if genai_precision not in PRECISIONS:
            raise D2MergeError(f"unknown genai precision {genai_precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
        if options.dtype not in ("auto", "fp32"):
            raise D2MergeError("--format onnx-genai merges in fp32 and takes its precision from --precision",
                               hint="drop --dtype; use --precision fp32|fp16|int4")
        import_genai()  # before the merge: a missing extra should not cost a merge
        out_path = Path(out)
        check_output_location(out_path, [Path(str(base)), Path(str(adapter))], overwrite=options.overwrite)
        with scratch_beside(out_path, "merge") as scratch:
            fp32 = options.with_overrides(dtype="fp32", overwrite=False)
            result = merge(base, adapter, Path(scratch) / "merged", fp32, progress=progress)
            built = export_genai(result.output, out_path, precision=genai_precision, overwrite=options.overwrite,
                                 int4=genai_int4)
        return ExportOutcome(format, built.output, result, built)
    if format == "gguf":
        from d2merge.export.gguf import merge_to_gguf

        result, exported = merge_to_gguf(base, adapter, out, options, gguf_type=gguf_type, progress=progress,
                                         modelfile=gguf_modelfile, imatrix=gguf_imatrix)
        return ExportOutcome(format, exported.output, result, gguf=exported)
    raise D2MergeError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
