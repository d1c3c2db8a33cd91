"""The one place d2merge hands a model folder to transformers: models, tokenizers, configs.

A folder whose config.json or tokenizer_config.json has an ``auto_map`` ships its own
Python (``configuration_*.py``, ``modeling_*.py``, ``tokenization_*.py``) that transformers
would import, or ask about on stdin. d2merge never runs code from a model folder, so such a
folder is refused before transformers sees it, and every call passes
``trust_remote_code=False`` so that nothing slips past the check either.
Nothing else in d2merge calls ``from_pretrained`` (tests/system/test_security.py checks).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from d2merge.errors import D2MergeError

CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
CODE_HINT = ("d2merge never runs code from a model folder; use a model whose architecture transformers "
             "supports natively, or remove auto_map if the folder works without its code")


def refuse_custom_code(folder: Path) -> None:
    """Refuse a folder that asks transformers to import its own Python (an ``auto_map``)."""
    from d2merge.io.json_file import read_json

    for name in CODE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = read_json(path, name)
        configs = [data] if isinstance(data, dict) else []
        if isinstance(data, dict):  # composite models nest their parts' configs
            configs += [v for v in data.values() if isinstance(v, dict)]
        if any("auto_map" in c for c in configs):
            raise D2MergeError(f"{name} has an auto_map: the folder ships its own code", path=path, hint=CODE_HINT)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars from transformers inside the block.

    d2merge prints its own progress; transformers' bars would interleave with it
    and with one-line errors on stderr. It lives here, beside the calls into transformers,
    so that io never imports the runtime.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _folder_of(location: str | Path) -> Path:
    location = Path(location)
    return location if location.is_dir() else location.parent


def load_model(location: str | Path, *, dtype: torch.dtype = torch.float32, gguf_file: str | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` without remote code, safetensors (or GGUF) only."""
    from transformers import AutoModelForCausalLM

    folder = _folder_of(location)
    refuse_custom_code(folder)
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False, **extra)


def load_dequantized_model(checkpoint: Any, *, dtype: torch.dtype = torch.float32) -> Any:
    """A quantized base (io/quantized.py) as the plain model it stands for: built from its config
    without ``quantization_config``, its weights the dequantized tensors.

    transformers would load it with its quantizer (bitsandbytes layers that repack and round on
    some CPUs, or FP8 kernels CPUs lack); verify and the unmerged runtime need the weights the
    merge starts from, so both read them through the same dequantizer as the merge.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    refuse_custom_code(checkpoint.folder)
    config = dict(checkpoint.config)
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str):
        raise D2MergeError("config.json has no model_type", path=checkpoint.folder / "config.json")
    with quiet_transformers():
        hf_config = AutoConfig.for_model(model_type, **config)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
    tensors = checkpoint.tensors
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name in tensors.keys():
            target = params.get(name, buffers.get(name))
            if target is None:
                continue  # stored extras transformers would also ignore (rotary caches, ...)
            value = tensors.read(name)
            if tuple(value.shape) != tuple(target.shape):
                raise D2MergeError(f"stored shape {list(value.shape)} does not match the model's "
                                   f"{list(target.shape)}", path=tensors.file_of(name), tensor=name,
                                   hint="the quantized base does not fit its config.json")
            target.copy_(value.to(target.dtype))
    known = set(tensors.keys())
    missing = [n for n in params if n not in known]
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
        tied = {id(p) for n, p in model.named_parameters() if n in known}
        missing = [n for n, p in model.named_parameters(remove_duplicate=False) if n not in known and id(p) not in tied]
    if missing:
        raise D2MergeError("the checkpoint lacks a weight the model needs", path=checkpoint.location,
                           tensor=missing[0], hint="the quantized base is incomplete")
    return model


def load_tokenizer(location: str | Path, *, fast_generic: bool = False, gguf_file: str | None = None) -> Any:
    """The folder's tokenizer without remote code; ``fast_generic`` skips AutoTokenizer's class lookup."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = _folder_of(location)
    refuse_custom_code(folder)
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    with quiet_transformers():
        if fast_generic:
            return PreTrainedTokenizerFast.from_pretrained(folder, trust_remote_code=False, **extra)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **extra)


def load_config(location: str | Path) -> Any:
    """The folder's transformers config without remote code."""
    from transformers import AutoConfig

    folder = _folder_of(location)
    refuse_custom_code(folder)
    return AutoConfig.from_pretrained(folder, trust_remote_code=False)
