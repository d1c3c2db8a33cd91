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

The names below load their module on first use (``d2merge.lazy_names``), so that importing one
module of the package (the CLI's ``check_gguf_type``) loads no other; d2merge's own modules import
the module they need.
"""

from d2merge.lazy_names import lazy_attributes

_LAZY = {
    **dict.fromkeys(("ARCH_SPECS", "ArchSpec", "check_config"), "d2merge.export.gguf.architectures"),
    **dict.fromkeys(("GGUF_TYPES", "all_gguf_types", "check_gguf_type"), "d2merge.export.gguf.file_types"),
    "export_gguf": "d2merge.export.gguf.folder",
    **dict.fromkeys(("LLAMA_FILE_TYPES", "QUANTIZED_GATES", "GGUFForVerify", "QuantizedGate",
                     "file_type_from_tensors", "gguf_for_verify"), "d2merge.export.gguf.for_verify"),
    **dict.fromkeys(("GGUFLoraResult", "convert_to_gguf_lora"), "d2merge.export.gguf.lora_adapter"),
    "merge_to_gguf": "d2merge.export.gguf.merge",
    "LLAMA_CPP_TYPES": "d2merge.export.gguf.quant",
    **dict.fromkeys(("load_gguf_model", "read_gguf", "read_metadata", "tensor_table"), "d2merge.export.gguf.reader"),
    "permute_for_llama_cpp": "d2merge.export.gguf.tensors",
    **dict.fromkeys(("add_tokenizer", "sentencepiece_scores"), "d2merge.export.gguf.tokenizer"),
    **dict.fromkeys(("PROVENANCE_PREFIX", "GGUFExportResult", "write_modelfile"), "d2merge.export.gguf.writer"),
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
