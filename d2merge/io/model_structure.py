"""The base model as transformers builds it (meta device): its GPT-2 style ``Conv1D`` layers, its tied
parameters, and the in-memory parameter names and shapes, asked of transformers itself.

A Conv1D stores its weight (in, out), the transpose of ``nn.Linear``, and PEFT's
``fan_in_fan_out`` must say so. Guessing from module names (``c_attn``) misses other
architectures and, for a square weight, a wrong orientation merges silently into a
wrong model. transformers builds the architecture from ``config.json`` on the meta
device (no memory, no weights, no code from the folder: a config with an
``auto_map`` is never built) and the module types answer exactly. The same model says which
parameters transformers ties (one tensor under two names after ``tie_weights``, e.g. a
``lm_head`` that reads the input embedding): config keys alone (``tie_word_embeddings``
absent, in a ``text_config``, or overridden by the model class) are a guess.

Importing transformers' model code costs about 3 CPU-seconds, most of a 1.1B merge's
non-arithmetic time, so the common Conv1D answer comes first from transformers' source
instead: only a module that names ``Conv1D`` can build one, so an architecture whose
modeling files neither name it nor reach any other model's code (``from ..other``,
``Auto*``, ``from_config``) has none. That reads ~50 ms of source text with ``ast``;
anything less clear-cut is built. One build per distinct config per process (cached): a
merge, its verify and its export ask the same base and share the answer.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


def conv1d_modules(config: Mapping[str, Any] | None) -> frozenset[str] | None:
    """Names of the Conv1D modules of the model ``config`` describes; None when transformers cannot build it.

    None (an architecture transformers does not know, or a config it refuses) leaves the
    caller to its name rules. The result is cached per config.
    """
    key = _buildable_key(config)
    if config is None or key is None:
        return None
    if _source_builds_no_conv1d(config["model_type"]):
        return frozenset()
    return _built_conv1d_modules(key)


def _built_conv1d_modules(config_json: str) -> frozenset[str] | None:
    """The Conv1D module names of the model transformers builds on the meta device (None if it cannot)."""
    structure = _model_structure(config_json)
    return None if structure is None else structure.conv1d


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
    key = _buildable_key(config)
    return None if key is None else _model_structure(key)


@functools.lru_cache(maxsize=16)
def _model_structure(config_json: str) -> ModelStructure | None:
    model = _meta_model(config_json)
    if model is None:
        return None
    from transformers.pytorch_utils import Conv1D

    conv1d = frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))
    sharing: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        sharing.setdefault(id(param), []).append(name)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_name = next((f"{name}.weight" for name, module in model.named_modules() if module is output), None)
    return ModelStructure(conv1d, tuple(frozenset(names) for names in sharing.values() if len(names) > 1),
                          output_name if output is not None else None)


def meta_model(config: Mapping[str, Any] | None) -> Any:
    """The model transformers builds from ``config``, on the meta device (no memory); None when it cannot.

    Its parameter names and shapes are the ones transformers holds in memory, which PEFT's
    names follow (fused MoE experts included). Cached per config.
    """
    key = _buildable_key(config)
    return None if key is None else _meta_model(key)


def _buildable_key(config: Mapping[str, Any] | None) -> str | None:
    """The config as the caches' key (canonical JSON); None for one never handed to transformers.

    No ``model_type``, a config that ships code (``auto_map``), or one JSON cannot write.
    """
    if not config or not isinstance(config.get("model_type"), str) or _ships_code(config):
        return None
    try:
        return json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):
        return None


def _ships_code(config: Mapping[str, Any]) -> bool:
    return "auto_map" in config or any(isinstance(v, dict) and "auto_map" in v for v in config.values())


@functools.lru_cache(maxsize=16)
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


@functools.lru_cache(maxsize=16)
def _source_builds_no_conv1d(model_type: str) -> bool:
    """True when transformers' own modeling source for ``model_type`` can build no Conv1D module.

    Read, never imported: the package is located with ``find_spec`` (which runs none
    of it). The folder must be the one whose configuration declares this
    ``model_type``, and no modeling file in it may name ``Conv1D`` or reach code
    that could (another model's package, an ``Auto*`` class, ``from_config``).
    Shared modules (``from ...activations``) build no Conv1D: only
    ``transformers.pytorch_utils`` defines it. Any doubt returns False.
    """
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    folder = Path(spec.origin).parent / "models" / model_type.replace("-", "_")
    declares = re.compile(r"^\s+model_type\s*=\s*[\"']" + re.escape(model_type) + r"[\"']", re.M)
    try:
        if not any(declares.search(f.read_text(encoding="utf-8")) for f in folder.glob("configuration_*.py")):
            return False
        modeling = sorted(folder.glob("modeling_*.py"))
        trees = [ast.parse(f.read_text(encoding="utf-8")) for f in modeling]
    except (OSError, SyntaxError, ValueError):
        return False
    return bool(trees) and not any(_may_build_conv1d(node) for tree in trees for node in ast.walk(tree))


def _may_build_conv1d(node: ast.AST) -> bool:
    def suspicious(name: str) -> bool:
        return name == "Conv1D" or name.startswith("Auto") or "backbone" in name.lower()

    if isinstance(node, ast.ImportFrom):
        reaches_other_model = node.level == 2 or (node.level == 0 and (node.module or "").startswith("transformers.models"))
        return reaches_other_model or any(suspicious(a.name) for a in node.names)
    if isinstance(node, ast.Import):
        return any(a.name.startswith("transformers") for a in node.names)
    if isinstance(node, ast.Name):
        return suspicious(node.id)
    if isinstance(node, ast.Attribute):
        return suspicious(node.attr) or node.attr in ("from_config", "_from_config")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id in ("__import__", "import_module")
    return False


def is_listed(module: str, names: frozenset[str]) -> bool:
    """Whether checkpoint module ``module`` is one of ``names`` (the model's own names may lack or add a prefix)."""
    return any(module == n or module.endswith("." + n) or n.endswith("." + module) for n in names)
