"""``--format onnx``: an ONNX graph of the fp32 merge, validated with ONNX Runtime (``export.onnx``);
bench's ``onnx``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

from d2merge.errors import option_error
from d2merge.export.protocol import ExportOutcome, FormatChoices, OutputFormat, merge_then_convert


class Onnx(OutputFormat):
    name = "onnx"
    is_file = True
    bench_variant = "onnx"

    def merge(self, base: Any, adapter: Any, out: str | Path, options: Any, *, progress: bool,
              choices: FormatChoices) -> ExportOutcome:
        from d2merge.export.onnx import _destination, export_onnx
        from d2merge.io.output import check_output_location

        onnx_dtype = {"auto": "fp32", "fp32": "fp32", "fp16": "fp16"}.get(options.dtype)
        if onnx_dtype is None:
            raise option_error("ONNX Runtime on CPU cannot run bf16 graphs",
                               hint="use {dtype=fp32} or {dtype=fp16} with {format=onnx}")
        # The output is the graph file (OUT itself, or OUT/model.onnx): a folder a killed run
        # created stays usable, and the fp32 merge lives in a marked work folder beside the graph.
        out_path = _destination(out)
        check_output_location(out_path, [Path(str(base)), Path(str(adapter))], overwrite=options.overwrite,
                              is_file=True, missing_parents=True)
        new_folders = [f for f in (out_path.parent, *out_path.parent.parents) if not f.exists()]
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            result, exported = merge_then_convert(
                base, adapter, out_path, options, progress=progress,
                convert=lambda merged: export_onnx(merged, out_path, dtype=onnx_dtype, overwrite=options.overwrite))
        except BaseException:
            for folder in new_folders:  # a failed export leaves no trace, not even the folders it created
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return ExportOutcome(self.name, exported.onnx_path, result, exported)

    def export_for_bench(self, merged: Path, scratch: Path, *, say: Callable[[str], None],
                         choice: str | None = None) -> Path:
        from d2merge.export.onnx import export_onnx

        say("exporting ONNX (fp32, no past) into a temp folder ...")
        return export_onnx(merged, scratch / "onnx", dtype="fp32").onnx_path


FORMAT = Onnx()
