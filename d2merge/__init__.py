"""d2merge: merge low-rank adapters into base weights exactly, verify, export, publish.

The Python API is what the command line uses::

    import d2merge
    d2merge.plan("./base", "./adapter").describe()          # what would change
    d2merge.merge("./base", "./adapter", "./merged", dtype="bf16")
    d2merge.load_adapter("./adapter").config
"""

from __future__ import annotations

__version__ = "0.1.0"

from d2merge.errors import D2MergeError, VerificationFailed  # noqa: E402
from d2merge.io import load_adapter, open_base  # noqa: E402
from d2merge.merge import MergeOptions, MergeResult, merge, plan  # noqa: E402

__all__ = ["D2MergeError", "MergeOptions", "MergeResult", "VerificationFailed", "__version__", "load_adapter",
           "merge", "open_base", "plan"]
