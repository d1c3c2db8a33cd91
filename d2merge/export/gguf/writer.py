"""The GGUF writer: header, metadata and tensor table from the plan, then the tensors as they come.

Streaming: every tensor's header entry is computed from shapes alone (``tensors.plan_tensors``),
the header is written, then tensors are read, converted and quantized one at a time, so memory
holds one tensor. The bytes depend only on the inputs (no timestamps, sorted tensor order); the
file is written into its atomic output's temp (``io.output.AtomicFiles``) by the caller. A merge
hashes its sources while the tensors stream: the metadata holds a placeholder of the hashes'
width, which :func:`fill_in_header` overwrites once they are known.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from d2merge.errors import D2MergeError
from d2merge.export.gguf.architectures import add_hyperparameters
from d2merge.export.gguf.file_types import file_type_code
from d2merge.export.gguf.library import gguf_py
from d2merge.export.gguf.tensors import PlannedTensor, TensorData, encoded_blocks
from d2merge.export.gguf.tokenizer import add_tokenizer
from d2merge.output_names import modelfile_for
from d2merge.sizes import format_size
from d2merge.version import __version__

PROVENANCE_PREFIX = "d2merge."
SOURCES_KEY = PROVENANCE_PREFIX + "sources"


@dataclass(frozen=True)
class GGUFExportResult:
    """What a GGUF export or merge wrote: the file, its type and architecture, sizes and time."""

    output: Path
    gguf_type: str
    architecture: str
    tensors: int
    bytes: int
    seconds: float
    modelfile: Path | None = None
    f32_temp_bytes: int = 0  # the f32 GGUF llama.cpp's quantizer read (removed); 0: written directly

    def describe(self) -> str:
        extra = f" + {self.modelfile.name}" if self.modelfile else ""
        via = (f", by llama.cpp's quantizer from a {format_size(self.f32_temp_bytes)} f32 temp"
               if self.f32_temp_bytes else "")
        return (f"wrote {self.output}{extra} ({self.architecture}, {self.gguf_type}, {self.tensors} tensors, "
                f"{format_size(self.bytes)}{via}) in {self.seconds:.1f}s")


def check_gguf_path(out_path: Path) -> None:
    """A GGUF output's name ends in .gguf (llama.cpp and Ollama go by it)."""
    if out_path.suffix != ".gguf":
        raise D2MergeError("a GGUF output must end in .gguf", path=out_path, hint="name it like model.gguf")


def _kv_entry(key: str, value: str) -> bytes:
    """A string key/value as gguf-py packs it (little endian): for finding it in the written header."""
    gguf = gguf_py()
    raw_key, raw_value = key.encode(), value.encode()
    return (struct.pack("<Q", len(raw_key)) + raw_key + struct.pack("<I", gguf.GGUFValueType.STRING)
            + struct.pack("<Q", len(raw_value)) + raw_value)


def write_gguf(target: Path, *, arch: str, permute: bool, config: Mapping[str, Any], tokenizer_folder: Path,
               planned: list[PlannedTensor], tensors: Iterator[TensorData], gguf_type: str, name: str,
               provenance: Mapping[str, str], progress: bool = False) -> tuple[int, int]:
    """The GGUF at ``target``: header, metadata and tensor table from shapes, then the tensors as they come.

    ``tensors`` yields the planned tensors (rope_freqs excepted) in plan order, one at a time.
    Returns the byte range of the key/value metadata, where :func:`fill_in_header` replaces a
    placeholder ``provenance`` held (the sources' hashes, computed while the tensors streamed).
    """
    gguf = gguf_py()
    writer = gguf.GGUFWriter(target, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        total = sum(math.prod(p.shape) for p in planned if p.source is not None)
        writer.add_size_label(gguf.size_label(total, total, 0, 0))
        add_hyperparameters(writer, config, arch)
        writer.add_file_type(file_type_code(gguf_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer_folder, config["vocab_size"])
        writer.add_string(PROVENANCE_PREFIX + "version", __version__)
        writer.add_string(PROVENANCE_PREFIX + "gguf_type", gguf_type)
        for key, value in sorted(provenance.items()):
            writer.add_string(PROVENANCE_PREFIX + key, str(value))
        for item in planned:
            writer.add_tensor_info(item.name, item.shape, np.float32, item.nbytes, raw_dtype=item.qtype)
        writer.write_header_to_file()
        header_end = writer.fout[0].tell()
        writer.write_kv_data_to_file()
        kv_end = writer.fout[0].tell()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for item in _progress(planned, progress):
            parts = [next(tensors) for _ in item.parts] or [None]  # [None]: generated (rope_freqs)
            for data, source in zip(parts, item.parts):
                if data is None or data.name != source:
                    raise D2MergeError(f"tensor stream out of order: got {data and data.name}", tensor=source)
            writer.write_padding(fout, fout.tell())
            written = 0
            for data in parts:
                for block in encoded_blocks(item, data, config, permute):
                    block.tofile(fout)
                    written += block.nbytes
            if written != item.nbytes:
                raise D2MergeError(f"encoded {written} bytes, planned {item.nbytes}", tensor=item.source)
            writer.write_padding(fout, item.nbytes)
        writer.flush()
    finally:
        writer.close()
    return header_end, kv_end


def fill_in_header(path: Path, region: tuple[int, int], key: str, old: str, new: str) -> None:
    """Overwrite a string value in a written GGUF's metadata (``region``, from :func:`write_gguf`) with one of
    the same length: no byte moves."""
    if new == old:
        return
    if len(new.encode()) != len(old.encode()):
        raise D2MergeError(f"{key} changed length while streaming ({len(old)} -> {len(new)} bytes)")
    start, end = region
    with open(path, "r+b") as fh:
        fh.seek(start)
        metadata = fh.read(end - start)
        entry = _kv_entry(key, old)
        at = metadata.find(entry)
        if at < 0 or metadata.find(entry, at + 1) >= 0:
            raise D2MergeError(f"{key} not found once in the written metadata")
        fh.seek(start + at + len(entry) - len(old.encode()))
        fh.write(new.encode())


def _progress(items: list[PlannedTensor], enabled: bool) -> Iterator[PlannedTensor]:
    """The tensors, with elapsed time and time left (``d2merge.console``: on a terminal, or now and then
    in a log)."""
    from d2merge.console import Progress

    with Progress("writing GGUF", len(items), "tensor") as bar:
        bar.enabled = bar.enabled and enabled
        for item in items:
            yield item
            bar.advance()


def write_modelfile(gguf_path: Path, folder: Path) -> Path:
    """An Ollama Modelfile beside the GGUF (``<stem>.Modelfile``): FROM it; Ollama reads the chat template
    from the GGUF."""
    from d2merge.io.output import write_text

    target = modelfile_for(gguf_path)
    lines = [f"FROM ./{gguf_path.name}"]
    generation = folder / "generation_config.json"
    if generation.is_file():
        from d2merge.io.json_file import read_json

        settings = read_json(generation, "generation_config.json")
        if not isinstance(settings, dict):
            settings = {}
        for key in ("temperature", "top_p", "top_k"):
            if isinstance(settings.get(key), (int, float)) and settings.get("do_sample"):
                lines.append(f"PARAMETER {key} {settings[key]}")
    write_text(target, "\n".join(lines) + "\n")
    return target
