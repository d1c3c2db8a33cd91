"""Package attributes imported on first use (PEP 562), for ``d2merge``, ``d2merge.io`` and ``d2merge.export.gguf``.

Why: ``d2merge --help``, flag errors and the CLI's early hash of a warm base must
not wait for torch (1.2-2 s to import), yet ``d2merge.merge`` and
``d2merge.io.load_adapter`` should read as ordinary package names. A package
calls :func:`lazy_attributes` with ``{name: defining module}`` and binds the two
functions it returns as its module-level ``__getattr__`` and ``__dir__``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package``: each name in ``names`` loads its module when first used."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups are ordinary attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
