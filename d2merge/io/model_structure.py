"""The base model as transformers builds it (meta device): which layers are GPT-2 style ``Conv1D``, and the
in-memory parameter names and shapes, asked of transformers itself.

A Conv1D stores its weight (in, out), the transpose of ``nn.Linear``, and PEFT's
``fan_in_fan_out`` must say so. Guessing from module names (``c_attn``) misses other
architectures and, for a square weight, a wrong orientation merges silently into a
wrong model. transformers builds the architecture from ``config.json`` on the meta
device (no memory, no weights, no code from the folder: a config with an
``auto_map`` is never built) and the module types answer exactly.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping


def conv1d_modules(config: Mapping[str, Any] | None) -> frozenset[str] | None:
    """Names of the Conv1D modules of the model ``config`` describes; None when transformers cannot build it.

    None (an architecture transformers does not know, or a config it refuses) leaves the
    caller to its name rules. The result is cached per config.
    """
    model = meta_model(config)
    if model is None:
        return None
    from transformers.pytorch_utils import Conv1D

    return frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))


def meta_model(config: Mapping[str, Any] | None) -> Any:
    """The model transformers builds from ``config``, on the meta device (no memory); None when it cannot.

    Its parameter names and shapes are the ones transformers holds in memory, which PEFT's
    names follow (fused MoE experts included). Cached per config.
    """
    if not config or not isinstance(config.get("model_type"), str) or _ships_code(config):
        return None
    try:
        text = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return _meta_model(text)


def _ships_code(config: Mapping[str, Any]) -> bool:
    return "auto_map" in config or any(isinstance(v, dict) and "auto_map" in v for v in config.values())


@functools.lru_cache(maxsize=4)
def _meta_model(config_json: str) -> Any:
    import torch

    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    fields = json.loads(config_json)
    model_type = fields.pop("model_type")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config sanity warnings are the base's business, not this check's
    try:
        config = AutoConfig.for_model(model_type, **fields)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            except ValueError:  # not a causal LM (BERT-style bases): the bare model
                model = AutoModel.from_config(config, trust_remote_code=False)
    except Exception:  # any config transformers cannot build: fall back to the caller's rules
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def is_listed(module: str, names: frozenset[str]) -> bool:
    """Whether checkpoint module ``module`` is one of ``names`` (the model's own names may lack or add a prefix)."""
    return any(module == n or module.endswith("." + n) or n.endswith("." + module) for n in names)
