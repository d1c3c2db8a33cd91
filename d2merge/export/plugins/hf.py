"""``--format hf``: the Hugging Face folder the engine streams (``export.hf_folder``); bench's ``merged``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2merge.export.protocol import ExportOutcome, FormatChoices, OutputFormat


class HFFolder(OutputFormat):
    name = "hf"
    many = True
    bench_variant = "merged"

    def merge(self, base: Any, adapter: Any, out: str | Path, options: Any, *, progress: bool,
              choices: FormatChoices) -> ExportOutcome:
        from d2merge.export.hf_folder import merge_to_hf_folder

        result = merge_to_hf_folder(base, adapter, out, options, progress=progress)
        return ExportOutcome(self.name, result.output, result)

    def engine_output(self) -> Any:
        from d2merge.export.hf_folder import FOLDER

        return FOLDER


FORMAT = HFFolder()
