"""Many adapters over one base: one pass over the base writes every merge (``d2merge merge-many``).

    from d2merge.many import merge_many
    report = merge_many("./base", "adapters.yaml", "./merged", dtype="bf16")

Names are imported on first use, so ``d2merge.options.many`` stays light for the CLI.
"""

from __future__ import annotations

from typing import Any

_WHERE = {"Job": "d2merge.many.manifest", "load_manifest": "d2merge.many.manifest",
          "ManyOptions": "d2merge.options.many", "JobOutcome": "d2merge.many.report",
          "ManyReport": "d2merge.many.report", "merge_many": "d2merge.many.driver"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'd2merge.many' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
