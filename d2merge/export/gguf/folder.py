"""A merged Hugging Face folder exported to one GGUF (``d2merge export-gguf``, bench's ``llama_cpp``).

The folder's shards are read a block of rows at a time, straight from their byte ranges, so
memory does not grow with the model; the bytes are those ``merge --format gguf`` streams from the
engine for the same merge (tests/unit/export/test_gguf.py compares them).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from d2merge.errors import D2MergeError
from d2merge.export.gguf.architectures import check_config
from d2merge.export.gguf.file_types import by_llama_cpp, check_gguf_type
from d2merge.export.gguf.quant import prepare_llama_cpp, written_by
from d2merge.export.gguf.tensors import TensorData, plan_tensors, stream_order
from d2merge.export.gguf.writer import GGUFExportResult, check_gguf_path, write_gguf, write_modelfile
from d2merge.output_names import modelfile_for


def export_gguf(merged: str | os.PathLike, out: str | os.PathLike, *, gguf_type: str = "f16",
                overwrite: bool = False, provenance: Mapping[str, str] | None = None, name: str | None = None,
                modelfile: bool = False, progress: bool = False, imatrix: str | os.PathLike | None = None
                ) -> GGUFExportResult:
    """Write the causal LM in the HF folder ``merged`` as one GGUF file at ``out``.

    ``provenance`` (method, settings, sources, ...) lands under ``d2merge.*`` keys beside
    ``d2merge.version``; without it the sha256 of the folder's weight files is recorded.
    ``modelfile`` also writes an Ollama ``<stem>.Modelfile`` next to the GGUF. The folder's shards are
    read a block of rows at a time: memory does not grow with the model. A type llama.cpp's
    quantizer writes (K-quants, q4_0..q5_1) goes through an f32 temp beside ``out``; ``imatrix``
    is its importance matrix (llama.cpp's format, checked against this model).
    """
    from d2merge.io.checkpoint import open_base
    from d2merge.io.output import AtomicFiles, check_output_location, disk_error

    check_gguf_type(gguf_type)
    llama_cpp = by_llama_cpp(gguf_type, imatrix)
    started = time.perf_counter()
    folder = Path(merged)
    out_path = Path(out)
    check_gguf_path(out_path)
    checkpoint = open_base(folder)
    if checkpoint.folder is None or checkpoint.config is None:
        raise D2MergeError("GGUF export needs a Hugging Face folder with config.json", path=folder)
    config = checkpoint.config
    arch, permute = check_config(config, folder / "config.json")
    out_path = check_output_location(out_path, [folder], overwrite=overwrite, is_file=True,
                                     sidecars=(modelfile_for(out_path).name,) if modelfile else ())
    names = sorted(checkpoint.tensors.keys())
    planned = plan_tensors([(n, tuple(checkpoint.tensors.info(n)[1])) for n in names], config, arch,
                           "f32" if llama_cpp else gguf_type, folder)
    entries, temp_bytes = (prepare_llama_cpp([(p.name, p.shape) for p in planned], out_path, gguf_type, imatrix)
                           if llama_cpp else (None, 0))
    sources = stream_order(planned)
    sidecars = (modelfile_for(out_path).name,) if modelfile else ()
    with AtomicFiles(out_path, overwrite=overwrite, sidecars=sidecars) as staging:
        try:
            with written_by(staging.staged, out_path, gguf_type if llama_cpp else None, entries) as target:
                write_gguf(target, arch=arch, permute=permute, config=config,
                           tokenizer_folder=checkpoint.folder, planned=planned,
                           tensors=folder_tensors(checkpoint, sources), gguf_type=gguf_type,
                           name=name or out_path.stem, provenance=provenance or provenance_from_folder(folder),
                           progress=progress)
            if modelfile:
                write_modelfile(staging.staged, checkpoint.folder)
        except OSError as exc:
            raise disk_error(exc, out_path) from None
        staging.commit()
    written_modelfile = modelfile_for(out_path) if modelfile else None
    return GGUFExportResult(out_path, gguf_type, arch, len(planned), out_path.stat().st_size,
                            time.perf_counter() - started, written_modelfile, temp_bytes)


def provenance_from_folder(folder: Path) -> dict[str, str]:
    """What an export from a merged folder can say about its source: the sha256 of its weights."""
    from d2merge.io.output import sha256_file

    hashes = {f"merged/{p.name}": sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    return {"sources": json.dumps(hashes, sort_keys=True)}


def folder_tensors(checkpoint: Any, names: list[str]) -> Iterator[TensorData]:
    """A merged folder's tensors: safetensors as file ranges (never whole in memory), others as read."""
    tensors = checkpoint.tensors
    byte_range = getattr(tensors, "byte_range", None)
    for name in names:
        dtype, shape = tensors.info(name)
        raw = byte_range(name) if byte_range is not None else None  # None: computed (a dequantized weight)
        if raw is not None:
            yield TensorData(name, dtype, tuple(shape), raw=raw)
        else:
            yield TensorData(name, dtype, tuple(shape), tensor=tensors.read(name))
