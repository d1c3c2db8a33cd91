"""Adapter folders in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<tensor>[.weight]``. The loader sorts
every key into one of: a method factor of a module, a ``modules_to_save``
replacement, an embedding ``base_layer`` replacement, or unknown (the planner
refuses unknown keys, so nothing in an adapter is silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2merge.errors import D2MergeError, option_error
from d2merge.io.checkpoint import PICKLE_HINT, PickleFiles, SafetensorsFiles, TensorSource, read_json, resolve_location
from d2merge.methods import EMBEDDING, LINEAR, AdapterConfig, Method, parse_adapter_config, trainable_tokens
from d2merge.methods.base import TOKENS
from d2merge.methods import method_for_config

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterModule:
    """The factors of one adapted module: tensor name -> stored key."""

    module: str
    layer_kind: str
    keys: dict[str, str]


@dataclass(frozen=True)
class Adapter:
    """A parsed adapter: config, method and where each tensor is (data read lazily)."""

    path: Path
    config: AdapterConfig
    method: Method
    tensors: TensorSource
    weights_file: Path
    modules: dict[str, AdapterModule]
    # Full tensors that replace base tensors: base tensor name -> stored key.
    replacements: dict[str, str] = field(default_factory=dict)
    unknown_keys: tuple[str, ...] = ()

    def factors(self, module: str) -> dict[str, torch.Tensor]:
        """All factors of one module, read from disk."""
        entry = self.modules[module]
        return {name: self.tensors.read(key) for name, key in entry.keys.items()}

    def num_parameters(self) -> int:
        total = 0
        for entry in self.modules.values():
            for key in entry.keys.values():
                shape = self.tensors.info(key)[1]
                count = 1
                for d in shape:
                    count *= d
                total += count
        return total


def load_adapter(spec: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Open an adapter folder: parse and validate its config, index its tensors (no data read)."""
    folder = resolve_location(spec)
    if folder.is_file():
        folder = folder.parent
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        hint = ("this looks like a base model, not an adapter: pass the folder that holds adapter_config.json "
                "(merge and verify take BASE first, then ADAPTER)"
                if (folder / "config.json").exists() else "an adapter folder holds adapter_config.json")
        raise D2MergeError(f"{CONFIG_NAME} not found", path=folder, hint=hint)
    raw = read_json(config_path, CONFIG_NAME)
    config = parse_adapter_config(raw, str(config_path))
    method = method_for_config(raw, str(config_path))
    weights = folder / WEIGHTS_NAME
    if weights.exists():
        source: TensorSource = SafetensorsFiles([weights])
    elif (folder / PICKLE_NAME).exists():
        weights = folder / PICKLE_NAME
        if not allow_pickle:
            raise option_error("adapter weights are a pickle file", path=weights, hint=PICKLE_HINT, allow_pickle=True)
        source = PickleFiles([weights])
    else:
        raise D2MergeError(f"no adapter weights ({WEIGHTS_NAME}) in the folder", path=folder,
                           hint=f"an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}; copy or download it again")
    modules, replacements, unknown = _sort_keys(source.keys(), method, config)
    if not modules and not replacements:
        raise D2MergeError("the adapter holds no tensors d2merge recognises for "
                           f"{method.name} (expected keys like {PREFIX}<module>.{method.linear_tensors[0]}.weight)",
                           path=weights, hint="is adapter_config.json's peft_type right for these weights?")
    return Adapter(folder, config, method, source, weights, modules, replacements, tuple(unknown))


def _sort_keys(keys: list[str], method: Method, config: AdapterConfig
               ) -> tuple[dict[str, AdapterModule], dict[str, str], list[str]]:
    modules: dict[str, AdapterModule] = {}
    replacements: dict[str, str] = {}
    unknown: list[str] = []
    # (key suffix, tensor name); a name may belong to linear and embedding modules alike (DoRA's
    # magnitude), so a module's kind is settled once all its tensors are known.
    kinds_of: dict[str, set[str]] = {}
    suffixes: list[tuple[str, str]] = []
    if method.peft_type == "LORA" and config.raw.get("trainable_token_indices") not in (None, [], {}):
        suffixes.append((f".{trainable_tokens.STORED_SUFFIX}", trainable_tokens.DELTA))
        kinds_of[trainable_tokens.DELTA] = {TOKENS}
    for name, stored in method.optional_linear_tensors.items():
        suffixes.append((f".{stored}", name))
        kinds_of.setdefault(name, set()).add(LINEAR)
    for kind in (LINEAR, EMBEDDING):
        for name in method.linear_tensors if kind == LINEAR else method.embedding_tensors:
            suffixes += [(f".{name}.weight", name), (f".{name}", name)]
            kinds_of.setdefault(name, set()).add(kind)
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        if not key.startswith(PREFIX):
            unknown.append(key)
            continue
        rest = key[len(PREFIX):]
        for suffix, name in suffixes:
            if rest.endswith(suffix):
                entry = found.setdefault(rest[: -len(suffix)], {})
                if name in entry:
                    unknown.append(key)
                else:
                    entry[name] = key
                break
        else:
            if ".base_layer." in rest:
                replacements[rest.replace(".base_layer.", ".")] = key
            elif _is_module_to_save(rest, config.modules_to_save):
                replacements[rest.replace(".modules_to_save.", ".").replace(".original_module.", ".")] = key
            elif config.raw.get("bias") == "all" and rest.endswith(".bias"):
                # bias "all": PEFT saves every trained bias of the model under its own name.
                replacements[rest] = key
            else:
                unknown.append(key)
    for module, entry in found.items():
        kinds = set.intersection(*(kinds_of[name] for name in entry))
        if not kinds:
            unknown.extend(entry.values())  # tensors of a linear and of an embedding module under one name
            continue
        kind = LINEAR if LINEAR in kinds else kinds.pop()
        modules[module] = AdapterModule(module, kind, dict(entry))
    return modules, replacements, unknown


def _is_module_to_save(rest: str, modules_to_save: tuple[str, ...]) -> bool:
    """PEFT's ``_set_trainable`` match up to 0.21: the module name ends with the entry, a plain suffix.

    So ``"norm"`` names ``model.norm`` and every ``*_layernorm`` too, and PEFT 0.21 saves them all;
    PEFT 0.22 matches a dotted suffix only, a subset, so its saved tensors are recognised too.
    """
    module, _, param = rest.rpartition(".")
    if param not in ("weight", "bias") or not module:
        return False
    module = module.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
    return any(module.endswith(m) for m in modules_to_save)


def write_adapter(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter folder in PEFT's layout (config + safetensors), atomically.

    ``tensors`` maps stored keys (``base_model.model.<module>.<tensor>[.weight]``) to tensors.
    """
    from d2merge.io.output import AtomicFolder, check_output_location, write_json
    from d2merge.io.safetensors_file import save_tensors

    folder = check_output_location(Path(folder), [], overwrite=True)
    with AtomicFolder(folder, overwrite=True) as out:
        write_json(out.path(CONFIG_NAME), config)
        save_tensors(out.path(WEIGHTS_NAME), {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())},
                     {"format": "pt"})
        out.commit()
    return folder
