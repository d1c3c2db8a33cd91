"""The registry of ``d2merge convert``'s outputs: one line per ``--to`` target, one call that dispatches.

``--to lora`` writes a plain PEFT LoRA folder (``adapter_ops.convert.convert_to_lora``);
``--to gguf-lora`` writes llama.cpp's LoRA adapter GGUF (``export.gguf.lora_adapter``). The CLI and
``d2merge.convert`` both go through :func:`convert`, so ``ConvertOptions(to=...)`` picks the output
wherever it is given, and a new target is one writer plus one line in :func:`_targets`.

Why a module of its own: the PEFT writer lives with the adapter operations (``adapter_ops``,
below ``export``) and the GGUF writer with the GGUF exporter (``export.gguf``); only a module
above both can name them, and it imports each when it runs (this one is torch-free at import).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from d2merge.options.adapter_ops import CONVERT_TARGETS, ConvertOptions

if TYPE_CHECKING:
    from d2merge.adapter_ops.convert import ConvertResult


@dataclass(frozen=True)
class AdapterOutput:
    """One ``--to`` target: its name and its writer (each writer checks its own output's location and suffix).

    ``write(adapter, base, out, options, allow_pickle=, report=)`` writes ``out`` atomically
    and returns the conversion's per-module report; nothing is written on a refusal.
    """

    name: str
    write: Callable[..., ConvertResult]


def _lora(*args: Any, **kwargs: Any) -> ConvertResult:
    from d2merge.adapter_ops.convert import convert_to_lora

    return convert_to_lora(*args, **kwargs)


def _gguf_lora(*args: Any, **kwargs: Any) -> ConvertResult:
    from d2merge.export.gguf.lora_adapter import convert_to_gguf_lora

    return convert_to_gguf_lora(*args, **kwargs)


def _targets() -> tuple[AdapterOutput, ...]:
    return (  # one line per target, in the order --to lists them (options.adapter_ops.CONVERT_TARGETS)
        AdapterOutput("lora", _lora),
        AdapterOutput("gguf-lora", _gguf_lora),
    )


REGISTRY: dict[str, AdapterOutput] = {target.name: target for target in _targets()}
assert tuple(REGISTRY) == CONVERT_TARGETS, "ConvertOptions.to's choices and the registry must agree"


def convert(adapter: Any, base: str | Path, out: str | Path, options: ConvertOptions | None = None, *,
            allow_pickle: bool = False, report: str | Path | None = None, **overrides: Any) -> ConvertResult:
    """``adapter`` (on ``base``) written as ``options.to`` says: a plain LoRA folder or a LoRA GGUF.

    Keyword overrides are ConvertOptions fields: ``convert(adapter, base, "a.gguf", to="gguf-lora")``.
    """
    options = (options or ConvertOptions()).with_overrides(**overrides)
    return REGISTRY[options.to].write(adapter, base, out, options, allow_pickle=allow_pickle, report=report)
