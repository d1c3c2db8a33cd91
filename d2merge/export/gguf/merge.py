"""``merge --format gguf``: a merge streamed by the engine straight into one GGUF (``merge_to_gguf``).

It runs the one merge pipeline (``export.pipeline.run_merge``), as the HF folder and the single
file do: plan, output checks, source hashes, the atomic output, the engine, the finish. The GGUF
is the pipeline's output (:class:`GGUFOutput`): it plans its tensors from the merge plan's shapes,
writes the engine's stream through the GGUF writer instead of safetensors shards, and at the end
writes the sources' hashes into the space its metadata reserved (``export.provenance``), hands an
f32 temp to llama.cpp's quantizer for a llama.cpp type, writes the Modelfile and commits.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from d2merge.device import ComputeDevice
from d2merge.engine import StreamedTensor, stream_tensors
from d2merge.errors import D2MergeError
from d2merge.export.gguf.architectures import check_config
from d2merge.export.gguf.file_types import by_llama_cpp, check_gguf_type
from d2merge.export.gguf.quant import f32_temp, prepare_llama_cpp, quantize
from d2merge.export.gguf.tensors import PlannedTensor, TensorData, plan_tensors, stream_order
from d2merge.export.gguf.writer import (SOURCES_KEY, GGUFExportResult, check_gguf_path, fill_in_header, write_gguf,
                                        write_modelfile)
from d2merge.export.hf_folder import merged_config
from d2merge.export.pipeline import MergeResult, Staged, run_merge
from d2merge.export.provenance import filled, gguf_provenance, reserved
from d2merge.io.output import (AtomicFiles, check_output_location, copy_support_files, disk_error, scratch_beside,
                               write_json)
from d2merge.io.source_hashes import BackgroundHashes
from d2merge.options import MergeOptions
from d2merge.output_names import modelfile_for
from d2merge.planning import MergePlan, TensorPlan


def merge_to_gguf(base: Any, adapter: Any, out: str | os.PathLike, options: MergeOptions | None = None, *,
                  gguf_type: str = "f16", progress: bool = False, modelfile: bool = False,
                  imatrix: str | os.PathLike | None = None) -> tuple[MergeResult, GGUFExportResult]:
    """Merge in fp32 straight into a GGUF: the engine hands each merged tensor to the writer.

    Nothing of the model is held or written twice: each tensor is merged (fp32, as
    ``merge --dtype fp32`` writes it), permuted and quantized a block of rows at a time, and
    unchanged tensors are read from the base in blocks. The sha256 of the sources, computed
    from the engine's reads, is written at the end into space the metadata reserved. The bytes
    are those of ``export_gguf`` on the fp32 merged folder with this provenance. A type
    llama.cpp's quantizer writes is streamed into an f32 temp beside ``out`` first (``imatrix``:
    its importance matrix).
    """
    check_gguf_type(gguf_type)
    llama_cpp = by_llama_cpp(gguf_type, imatrix)
    options = options or MergeOptions()
    out_path = Path(out)
    check_gguf_path(out_path)
    sidecars = (modelfile_for(out_path).name,) if modelfile else ()
    # an output in the way is refused before any planning, the Modelfile beside it included
    # (check_location, after the plan, checks the GGUF's path against the plan's sources)
    check_output_location(out_path, [Path(str(base)), Path(str(adapter))], overwrite=options.overwrite,
                          is_file=True, sidecars=sidecars)
    output = GGUFOutput(gguf_type, llama_cpp_type=gguf_type if llama_cpp else None, imatrix=imatrix,
                        modelfile=modelfile, hash_sources=options.hash_sources)
    result = run_merge(base, adapter, out_path, options.with_overrides(dtype="fp32"), output, progress=progress)
    exported = GGUFExportResult(result.output, gguf_type, output.arch, len(output.planned),
                                result.output.stat().st_size, result.seconds,
                                modelfile_for(result.output) if modelfile else None, output.temp_bytes)
    return result, exported


class GGUFOutput:
    """One GGUF as the merge pipeline's output; made per merge, it keeps what ``check_location`` found
    (architecture, planned GGUF tensors, the checked importance matrix) for ``write``.

    ``begin`` puts the config and tokenizer files the merged folder would have in a scratch folder
    (the files the two-step export reads: a few small files, no weights) and opens the atomic file
    (and, for a llama.cpp type, the f32 temp); ``finish`` fills the hashes, quantizes, writes the
    Modelfile and commits.
    """

    is_file = True

    def __init__(self, gguf_type: str, *, llama_cpp_type: str | None, imatrix: str | os.PathLike | None,
                 modelfile: bool, hash_sources: bool):
        self.gguf_type = gguf_type
        self.llama_cpp_type = llama_cpp_type
        self.imatrix = imatrix
        self.modelfile = modelfile
        self.hash_sources = hash_sources  # without hashes the metadata records none (no placeholder)
        self.arch = ""
        self.permute = False
        self.config: dict[str, Any] = {}
        self.planned: list[PlannedTensor] = []
        self.entries: dict[str, np.ndarray] | None = None
        self.temp_bytes = 0

    def check_location(self, out: Path, merge_plan: MergePlan, overwrite: bool) -> Path:
        """The architecture and the GGUF tensors refused or planned, the output checked, llama.cpp prepared."""
        config = merged_config(merge_plan)
        if merge_plan.base.folder is None or config is None:
            raise D2MergeError("GGUF export needs a Hugging Face base folder with config.json",
                               path=merge_plan.base.location)
        self.arch, self.permute = check_config(config, merge_plan.base.folder / "config.json")
        out = check_output_location(out, [merge_plan.base.location, *(a.path for a in merge_plan.adapters)],
                                    overwrite=overwrite, is_file=True)
        shapes = {t.name: tuple(t.shape) for t in merge_plan.tensors}
        self.config = config
        self.planned = plan_tensors(sorted(shapes.items()), config, self.arch,
                                    "f32" if self.llama_cpp_type else self.gguf_type, merge_plan.base.folder)
        if self.llama_cpp_type is not None:
            self.entries, self.temp_bytes = prepare_llama_cpp([(p.name, p.shape) for p in self.planned], out,
                                                              self.gguf_type, self.imatrix)
        return out

    @contextmanager
    def begin(self, merge_plan: MergePlan, out: Path, overwrite: bool) -> Iterator[Staged]:
        labels = merge_plan.source_files()
        provenance = gguf_provenance(merge_plan, reserved(labels) if self.hash_sources else {})
        assert merge_plan.base.folder is not None  # check_location refused a base without one
        with ExitStack() as stack:
            support = Path(stack.enter_context(scratch_beside(out, "tokenizer")))
            write_json(support / "config.json", self.config)
            copy_support_files(merge_plan.base.folder, support, merge_plan.base.weight_files)
            staging = stack.enter_context(AtomicFiles(out, overwrite=overwrite,
                                                      sidecars=(modelfile_for(out).name,) if self.modelfile else ()))
            target = staging.staged if self.llama_cpp_type is None else stack.enter_context(f32_temp(out))
            yield Staged(staging.temp, None, None, staging,
                         extra={"support": support, "target": target, "provenance": provenance})

    def write(self, staged: Staged, merge_plan: MergePlan, *, device: ComputeDevice, hasher: BackgroundHashes | None,
              progress: bool, on_tensor: Callable[[TensorPlan], None] | None) -> list[str]:
        """The engine's tensors in the GGUF's order (an expert stack's members together), through the writer."""
        by_name = {t.name: t for t in merge_plan.tensors}
        items = [by_name[name] for name in stream_order(self.planned)]
        final = staged.atomic.final
        stream = stream_tensors(merge_plan, items, device=device, hasher=hasher)
        with closing(stream):
            try:
                staged.extra["region"] = write_gguf(
                    staged.extra["target"], arch=self.arch, permute=self.permute, config=self.config,
                    tokenizer_folder=staged.extra["support"], planned=self.planned, tensors=_tensor_data(stream),
                    gguf_type=self.gguf_type, name=final.stem, provenance=staged.extra["provenance"],
                    progress=progress)
            except OSError as exc:
                raise disk_error(exc, final) from None
            # The writer took every planned tensor; the stream must end here, not be closed part way
            # (a stream closed early abandons the hashes it fed, as a failed one does).
            extra = next(stream, None)
            if extra is not None:
                raise D2MergeError("tensor stream longer than the GGUF's plan", tensor=extra.item.name)
        return [final.name]

    def finish(self, staged: Staged, merge_plan: MergePlan, hashes: dict[str, str], written: list[str]
               ) -> list[str]:
        """The hashes into their placeholder (same length: no byte moves), llama.cpp's quantizer, the
        Modelfile, then the rename."""
        final = staged.atomic.final
        target = staged.extra["target"]
        try:
            if self.hash_sources:
                sources = gguf_provenance(merge_plan, filled(merge_plan.source_files(), hashes)).get("sources", "")
                fill_in_header(target, staged.extra["region"], SOURCES_KEY,
                               str(staged.extra["provenance"].get("sources", "")), sources)
            if self.llama_cpp_type is not None:
                quantize(target, staged.atomic.staged, self.llama_cpp_type, imatrix=self.entries)
            if self.modelfile:
                write_modelfile(staged.atomic.staged, staged.extra["support"])
        except OSError as exc:
            raise disk_error(exc, final) from None
        staged.atomic.commit()
        return written


def _tensor_data(stream: Iterator[StreamedTensor]) -> Iterator[TensorData]:
    """The engine's stream as the writer reads it: a merged tensor in memory, an unchanged one as its byte range."""
    for part in stream:
        item = part.item
        if part.tensor is not None:
            yield TensorData(item.name, item.out_dtype, tuple(item.shape), tensor=part.tensor)
        else:
            yield TensorData(item.name, item.in_dtype, tuple(item.shape), raw=part.raw)
