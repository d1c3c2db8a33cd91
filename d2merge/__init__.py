"""d2merge: merge low-rank adapters into base weights exactly, verify, export, publish.

The Python API is what the command line uses::

    import d2merge
    d2merge.plan("./base", "./adapter").describe()          # what would change
    d2merge.merge("./base", "./adapter", "./merged", dtype="bf16")
    d2merge.merge("./base", d2merge.AdapterMix(("./a", "./b"), (0.7, 0.5)), "./merged")  # several at once
    d2merge.convert("./dora-adapter", "./base", "./as-lora")   # a plain LoRA (to="gguf-lora": llama.cpp's)
    d2merge.combine(["./a", "./b"], "./ab", [0.6, 0.4], combination="linear")    # PEFT's add_weighted_adapter
    d2merge.load_adapter("./adapter").config

The names below are imported on first use (PEP 562): ``import d2merge`` and
``d2merge --help`` stay fast because torch loads only when a merge needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2merge.errors import D2MergeError, VerificationFailed
from d2merge.lazy_names import lazy_attributes
from d2merge.version import __version__

# name -> module that defines it
_LAZY = {"load_adapter": "d2merge.io", "open_base": "d2merge.io", "MergeOptions": "d2merge.options",
         "MergeResult": "d2merge.api", "merge": "d2merge.api", "plan": "d2merge.api",
         "AdapterMix": "d2merge.adapter_ops.mix", "convert": "d2merge.export.adapter_outputs",
         "combine": "d2merge.export.adapter_outputs", "extract": "d2merge.export.adapter_outputs",
         "ConvertOptions": "d2merge.options.adapter_ops"}

__all__ = ["AdapterMix", "ConvertOptions", "D2MergeError", "MergeOptions", "MergeResult", "VerificationFailed",
           "__version__", "combine", "convert", "extract", "load_adapter", "merge", "open_base", "plan"]

if TYPE_CHECKING:
    from d2merge.adapter_ops.mix import AdapterMix
    from d2merge.api import MergeResult, merge, plan
    from d2merge.export.adapter_outputs import combine, convert, extract
    from d2merge.io import load_adapter, open_base
    from d2merge.options import MergeOptions
    from d2merge.options.adapter_ops import ConvertOptions

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

