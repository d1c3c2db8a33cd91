"""``--format safetensors``: one ``.safetensors`` file, provenance in its header (``export.single_file``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2merge.export.protocol import ExportOutcome, FormatChoices, OutputFormat


class SingleFile(OutputFormat):
    name = "safetensors"
    is_file = True
    many = True

    def merge(self, base: Any, adapter: Any, out: str | Path, options: Any, *, progress: bool,
              choices: FormatChoices) -> ExportOutcome:
        from d2merge.export.single_file import merge_to_safetensors

        result = merge_to_safetensors(base, adapter, out, options, progress=progress)
        return ExportOutcome(self.name, result.output, result)

    def engine_output(self) -> Any:
        from d2merge.export.single_file import SINGLE_FILE

        return SINGLE_FILE

    def plan_overrides(self) -> dict[str, Any]:
        return {"max_shard_size": 2**62}  # one file: every tensor in shard 0

    def output_name(self, name: str) -> str:
        return f"{name}.safetensors"


FORMAT = SingleFile()
