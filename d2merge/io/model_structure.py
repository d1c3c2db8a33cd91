"""A base model's structure as transformers builds it: its Conv1D layers and its tied parameters.

A Conv1D stores its weight (in, out), the transpose of ``nn.Linear``, and PEFT's
``fan_in_fan_out`` must say so. Guessing from module names (``c_attn``) misses other
architectures and, for a square weight, a wrong orientation merges silently into a
wrong model. transformers builds the architecture from ``config.json`` on the meta
device (no memory, no weights, no code from the folder: a config with an
``auto_map`` is never built) and the module types answer exactly. The same model says which
parameters transformers ties (one tensor under two names after ``tie_weights``, e.g. a
``lm_head`` that reads the input embedding): config keys alone (``tie_word_embeddings``
absent, in a ``text_config``, or overridden by the model class) are a guess.

One build per distinct config per process (cached): a merge, its verify and its export ask
the same base and share the answer.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelStructure:
    """What transformers' own model class says about a base, built on the meta device."""

    conv1d: frozenset[str]  # module names of GPT-2 style Conv1D layers
    tied: tuple[frozenset[str], ...]  # parameter names sharing one tensor after transformers ties them
    output_embedding: str | None  # the parameter name of the output embedding (``lm_head.weight``), if any


def model_structure(config: Mapping[str, Any] | None) -> ModelStructure | None:
    """The structure of the model ``config`` describes; None when transformers cannot build it.

    None (an architecture transformers does not know, or a config it refuses) leaves the
    caller to its config rules.
    """
    if not config or not isinstance(config.get("model_type"), str) or _ships_code(config):
        return None
    try:
        text = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return _model_structure(text)


def conv1d_modules(config: Mapping[str, Any] | None) -> frozenset[str] | None:
    """Names of the Conv1D modules of the model ``config`` describes; None when transformers cannot build it.

    None (an architecture transformers does not know, or a config it refuses) leaves the
    caller to its name rules.
    """
    structure = model_structure(config)
    return None if structure is None else structure.conv1d


def _ships_code(config: Mapping[str, Any]) -> bool:
    return "auto_map" in config or any(isinstance(v, dict) and "auto_map" in v for v in config.values())


@functools.lru_cache(maxsize=16)
def _model_structure(config_json: str) -> ModelStructure | None:
    import torch

    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D
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
    conv1d = frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))
    sharing: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        sharing.setdefault(id(param), []).append(name)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_name = next((f"{name}.weight" for name, module in model.named_modules() if module is output), None)
    return ModelStructure(conv1d, tuple(frozenset(names) for names in sharing.values() if len(names) > 1),
                          output_name if output is not None else None)


def is_listed(module: str, names: frozenset[str]) -> bool:
    """Whether checkpoint module ``module`` is one of ``names`` (the model's own names may lack or add a prefix)."""
    return any(module == n or module.endswith("." + n) or n.endswith("." + module) for n in names)
