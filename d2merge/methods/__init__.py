"""The adapter methods d2merge knows, one module each, and how a config picks one."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from d2merge.errors import D2MergeError
from d2merge.methods.base import EMBEDDING, LINEAR, AdapterConfig, Method, ModuleAnswer, ModuleSettings
from d2merge.methods.d2lora import D2LoRA
from d2merge.methods.dora import DoRA
from d2merge.methods.dual_lora import DualLoRA
from d2merge.methods.fields import check_fields
from d2merge.methods.lora import LoRA

METHODS: dict[str, Method] = {m.name: m for m in (D2LoRA(), DualLoRA(), LoRA(), DoRA())}
CONFIG_HINT = "set it in adapter_config.json to the value the adapter was trained with"

__all__ = ["METHODS", "AdapterConfig", "Method", "ModuleAnswer", "ModuleSettings", "LINEAR", "EMBEDDING", "get_method",
           "method_for_config", "parse_adapter_config"]


def get_method(name: str) -> Method:
    """The method by its d2merge name (``d2lora``, ``dual_lora``, ``lora``, ``dora``)."""
    try:
        return METHODS[name]
    except KeyError:
        raise D2MergeError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def method_for_config(raw: Mapping[str, Any], source: str) -> Method:
    """Pick the method from ``peft_type`` (and ``use_dora`` for PEFT's LoRA)."""
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise D2MergeError("missing required field 'peft_type'", path=source,
                           hint="one of D2LORA, DUAL_LORA, LORA")
    if peft_type == "LORA":
        return METHODS["dora"] if raw.get("use_dora") is True else METHODS["lora"]
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method
    raise D2MergeError(f"unsupported peft_type {peft_type!r}", path=source,
                       hint="d2merge reads D2LORA, DUAL_LORA, LORA (with use_dora for DoRA)")


def parse_adapter_config(raw: Mapping[str, Any], source: str = "adapter_config.json") -> AdapterConfig:
    """Validate a parsed ``adapter_config.json`` and return the method's config."""
    if not isinstance(raw, Mapping):
        raise D2MergeError("adapter config must be a JSON object", path=source, hint=CONFIG_HINT)
    try:
        method = method_for_config(raw, source)
        honoured = check_fields(raw, method.peft_type, source)
        return replace(method.parse_config(raw, source), honoured_fields=honoured)
    except D2MergeError as exc:
        if exc.hint:
            raise
        # Every field error has the same remedy; the methods' checks need not repeat it.
        raise D2MergeError(exc.reason, path=exc.path, tensor=exc.tensor, hint=CONFIG_HINT) from None
