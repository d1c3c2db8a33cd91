"""``--format onnx-genai``: an onnxruntime-genai folder built from the fp32 merge, checked with its Generator
(``export.onnx_genai``); verify's ``genai-<precision>`` column; bench's ``genai``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from d2merge.errors import D2MergeError, OneOf, option_error
from d2merge.export.protocol import ExportOutcome, FormatChoices, OutputFormat, merge_then_convert
from d2merge.options.merge import MergeRunOptions


class OnnxGenai(OutputFormat):
    name = "onnx-genai"
    bench_variant = "genai"

    def merge(self, base: Any, adapter: Any, out: str | Path, options: Any, *, progress: bool,
              choices: FormatChoices) -> ExportOutcome:
        from d2merge.export.onnx_genai import PRECISIONS, export_genai, import_genai
        from d2merge.io.output import check_output_location

        precision = choices.genai_precision
        if precision not in PRECISIONS:
            raise D2MergeError(f"unknown genai precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
        if options.dtype not in ("auto", "fp32"):
            raise option_error("{format=onnx-genai} merges in fp32 and takes its precision from {genai_precision}",
                               hint="drop {dtype}; use {genai_precision=}", model=MergeRunOptions,
                               genai_precision=OneOf(PRECISIONS))
        import_genai()  # before the merge: a missing extra should not cost a merge
        out_path = Path(out)
        check_output_location(out_path, [Path(str(base)), Path(str(adapter))], overwrite=options.overwrite)
        result, built = merge_then_convert(
            base, adapter, out_path, options, progress=progress,
            convert=lambda merged: export_genai(merged, out_path, precision=precision, overwrite=options.overwrite,
                                               int4=choices.genai_int4))
        return ExportOutcome(self.name, built.output, result, built)

    def claims(self, path: Path) -> bool:
        from d2merge.export.onnx_genai import GENAI_CONFIG

        return path.is_dir() and (path / GENAI_CONFIG).is_file()

    def open_for_verify(self, path: Path) -> Any:
        from d2merge.export.onnx_genai import genai_for_verify

        return genai_for_verify(path)

    def export_for_bench(self, merged: Path, scratch: Path, *, say: Callable[[str], None],
                         choice: str | None = None) -> Path:
        from d2merge.export.onnx_genai import export_genai

        precision = choice or "int4"
        say(f"building onnxruntime-genai ({precision}) into a temp folder ...")
        return export_genai(merged, scratch / "genai", precision=precision, validate=False).output


FORMAT = OnnxGenai()
