"""GGUF for llama.cpp, Ollama and LM Studio: the package's face (what scripts, tests and docs import).

One module per job, each importing only those below it:

- ``library``: gguf-py, imported on first use;
- ``quant``: llama.cpp's own quantizer (K-quants, IQ4, the q4_0..q5_1 mix) from an f32 temp;
- ``file_types``: the ``gguf_type`` names d2merge writes and their checks;
- ``architectures``: how llama.cpp's converter writes each HF architecture, its refusals, its keys;
- ``tokenizer``: the tokenizer keys from tokenizer.json (byte-level and sentencepiece BPE);
- ``tensors``: every GGUF tensor planned from shapes, then encoded a block of rows at a time;
- ``writer``: the file (header from the plan, tensors as they come, the hashes filled in at the end);
- ``folder``: ``export_gguf``, a merged HF folder to one GGUF;
- ``merge``: ``merge_to_gguf``, the engine's stream through the one merge pipeline into one GGUF;
- ``reader`` and ``for_verify``: a GGUF read back, and judged as verify's MERGED;
- ``lora_adapter``: llama.cpp's LoRA adapter GGUF (``convert --to gguf-lora``).

Modules of d2merge import the module they need, not this face (it loads them all).
"""

from d2merge.export.gguf.architectures import ARCH_SPECS, ArchSpec, check_config
from d2merge.export.gguf.file_types import GGUF_TYPES, all_gguf_types, check_gguf_type
from d2merge.export.gguf.folder import export_gguf
from d2merge.export.gguf.for_verify import (LLAMA_FILE_TYPES, QUANTIZED_GATES, GGUFForVerify, QuantizedGate,
                                            file_type_from_tensors, gguf_for_verify)
from d2merge.export.gguf.lora_adapter import GGUFLoraResult, convert_to_gguf_lora
from d2merge.export.gguf.merge import merge_to_gguf
from d2merge.export.gguf.quant import LLAMA_CPP_TYPES
from d2merge.export.gguf.reader import load_gguf_model, read_gguf, read_metadata, tensor_table
from d2merge.export.gguf.tensors import permute_for_llama_cpp
from d2merge.export.gguf.tokenizer import add_tokenizer, sentencepiece_scores
from d2merge.export.gguf.writer import PROVENANCE_PREFIX, GGUFExportResult, write_modelfile

__all__ = [
    "ARCH_SPECS", "ArchSpec", "GGUFExportResult", "GGUFForVerify", "GGUFLoraResult", "GGUF_TYPES", "LLAMA_CPP_TYPES",
    "LLAMA_FILE_TYPES", "PROVENANCE_PREFIX", "QUANTIZED_GATES", "QuantizedGate", "add_tokenizer", "all_gguf_types",
    "check_config", "check_gguf_type", "convert_to_gguf_lora", "export_gguf", "file_type_from_tensors",
    "gguf_for_verify", "load_gguf_model", "merge_to_gguf", "permute_for_llama_cpp", "read_gguf", "read_metadata",
    "sentencepiece_scores", "tensor_table", "write_modelfile",
]
