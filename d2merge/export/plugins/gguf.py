"""``--format gguf``: one GGUF for llama.cpp / Ollama, fed tensor by tensor by the engine (``export/gguf/``);
verify's ``gguf-<type>`` column; bench's ``llama_cpp``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from d2merge.export.protocol import ExportOutcome, FormatChoices, OutputFormat


class GGUF(OutputFormat):
    name = "gguf"
    is_file = True
    bench_variant = "llama_cpp"

    def merge(self, base: Any, adapter: Any, out: str | Path, options: Any, *, progress: bool,
              choices: FormatChoices) -> ExportOutcome:
        from d2merge.export.gguf.merge import merge_to_gguf

        result, exported = merge_to_gguf(base, adapter, out, options, gguf_type=choices.gguf_type,
                                         progress=progress, modelfile=choices.gguf_modelfile,
                                         imatrix=choices.gguf_imatrix)
        return ExportOutcome(self.name, exported.output, result, gguf=exported)

    def claims(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    def open_for_verify(self, path: Path) -> Any:
        from d2merge.export.gguf.for_verify import gguf_for_verify

        return gguf_for_verify(path)

    def export_for_bench(self, merged: Path, scratch: Path, *, say: Callable[[str], None],
                         choice: str | None = None) -> Path:
        from d2merge.export.gguf.folder import export_gguf

        gguf_type = choice or "f16"
        say(f"exporting GGUF ({gguf_type}) into a temp folder ...")
        return export_gguf(merged, scratch / "model.gguf", gguf_type=gguf_type).output


FORMAT = GGUF()
