"""The protocol of an output format (a plug-in under ``d2merge/export/plugins/``) and what the plug-ins share.

Torch-free at import: the CLI lists the formats' names before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from d2merge.errors import option_error

if TYPE_CHECKING:
    from d2merge.export.hf_folder import MergeResult
    from d2merge.options import MergeOptions


@dataclass(frozen=True)
class ExportOutcome:
    """What ``merge --format`` wrote: the format, the output, the merge behind it and the exporter's result."""

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


@dataclass(frozen=True)
class FormatChoices:
    """The flags that belong to one format (``--precision``, ``--gguf-type``, ...), handed to every format:
    each reads its own."""

    genai_precision: str = "fp32"
    gguf_type: str = "f16"
    gguf_modelfile: bool = False
    gguf_imatrix: str | Path | None = None
    genai_int4: Any = None  # export.onnx_genai.Int4Options with genai_precision int4, else None (the defaults)


class OutputFormat:
    """The protocol of one output format (a plug-in is one instance of a subclass).

    ``name``: the ``--format`` value. ``is_file``: the output is one file (a folder otherwise).
    ``many``: merge-many writes it (as a job's ``format``). ``bench_variant``: the bench variant that
    measures this format's runtime, when one does.

    The steps, each optional but ``merge``:

    - ``merge``: write ``out`` from a base and an adapter. A format fed by the engine's stream
      (hf, safetensors, gguf) runs its own writer; one converted from a merged folder (onnx,
      onnx-genai) merges into an fp32 folder first (:func:`merge_then_convert`);
    - ``plan_overrides``: the plan settings this format fixes (one file: no shard limit);
    - ``engine_output``: for an output the engine streams as safetensors shards, its
      ``export.pipeline.EngineOutput`` (how it opens and finishes): merge-many writes through it;
    - ``claims`` / ``open_for_verify``: whether a path given to ``verify`` as MERGED is this
      format's output, and the exporter's verify adapter for it (a merged HF folder: None);
    - ``export_for_bench``: this format's output made from a merged fp32 folder, for bench.
    """

    name: str = ""
    is_file: bool = False
    many: bool = False
    bench_variant: str | None = None

    def merge(self, base: Any, adapter: Any, out: str | Path, options: MergeOptions, *, progress: bool,
              choices: FormatChoices) -> ExportOutcome:
        raise NotImplementedError

    def plan_overrides(self) -> dict[str, Any]:
        return {}

    def engine_output(self) -> Any:
        """The ``export.pipeline.EngineOutput`` of a format the engine streams as safetensors shards (what
        merge-many's jobs open and finish); None for the others."""
        return None

    def output_name(self, name: str) -> str:
        """A merge-many job's output name in OUTDIR (``name`` is the job's)."""
        return name

    def claims(self, path: Path) -> bool:
        return False

    def open_for_verify(self, path: Path) -> Any:
        return None

    def export_for_bench(self, merged: Path, scratch: Path, *, say: Callable[[str], None],
                         choice: str | None = None) -> Path:
        raise option_error("bench does not measure {format=}", format=self.name)


def merge_then_convert(base: Any, adapter: Any, out_path: Path, options: MergeOptions, *, progress: bool,
                       convert: Callable[[Path], Any]) -> tuple[MergeResult, Any]:
    """The fp32 merge a converted format starts from, in a marked work folder beside ``out_path``; then
    ``convert(merged_folder)``. The work folder goes when this returns, however it ends."""
    from d2merge.export.hf_folder import merge_to_hf_folder
    from d2merge.io.output import scratch_beside

    with scratch_beside(out_path, "merge") as scratch:
        fp32 = options.with_overrides(dtype="fp32", overwrite=False)
        result = merge_to_hf_folder(base, adapter, Path(scratch) / "merged", fp32, progress=progress)
        return result, convert(result.output)
