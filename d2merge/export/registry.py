"""The registry of output formats: one line per format, and the lookups everything per-format loops over.

A format is one small module under ``d2merge/export/plugins/`` holding one
:class:`~d2merge.export.protocol.OutputFormat` instance, and one line in :func:`_plugins` below.
``merge --format`` (``export.formats.merge_as``), verify's exported columns
(``verify.columns.open_exported``), bench's export variants (``bench.bench``) and merge-many's job
outputs (``many/``) loop over :data:`REGISTRY` instead of naming formats. docs/architecture.md
("Adding an output format") walks through one.

This module and the plug-ins import no torch and no exporter at import time (the CLI reads the
names for ``--format``); a plug-in imports its exporter when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2merge.errors import D2MergeError
from d2merge.export.protocol import OutputFormat


def _plugins() -> tuple[OutputFormat, ...]:
    from d2merge.export.plugins import gguf, hf, onnx, onnx_genai, safetensors

    return (  # one line per format, in the order --format lists them
        hf.FORMAT,
        safetensors.FORMAT,
        onnx.FORMAT,
        onnx_genai.FORMAT,
        gguf.FORMAT,
    )


REGISTRY: dict[str, OutputFormat] = {plugin.name: plugin for plugin in _plugins()}


def format_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_format(name: str) -> OutputFormat:
    """The plug-in of ``--format name``; one line naming the formats otherwise."""
    if name not in REGISTRY:
        raise D2MergeError(f"unknown format {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def register(plugin: OutputFormat) -> OutputFormat:
    """Add a format at run time (a format shipped outside d2merge, or a test's); the same as its line above."""
    if not plugin.name or plugin.name in REGISTRY:
        raise D2MergeError(f"format {plugin.name!r} is empty or already registered")
    REGISTRY[plugin.name] = plugin
    return plugin


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def exported_for_verify(path: str | Path) -> Any | None:
    """The verify adapter of the format that claims ``path`` (a GGUF file, a genai folder), None for none."""
    path = Path(path)
    for plugin in REGISTRY.values():
        if plugin.claims(path):
            return plugin.open_for_verify(path)
    return None


def bench_format(variant: str) -> OutputFormat | None:
    """The format whose runtime bench's ``variant`` measures."""
    return next((p for p in REGISTRY.values() if p.bench_variant == variant), None)
