"""All reading and writing of checkpoints lives here; nothing else opens model files.

The names below are imported on first use (PEP 562), as in the top-level package:
the modules that need no torch (``source_hashes``, ``direct_io``, ``json_file``)
must import without it, because the CLI starts hashing a warm base before torch
loads, so that the hash (1.4 CPU-s at 1.1B) runs on the second core during the
import instead of after it (tests/unit/io/test_source_hashes.py checks that it does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2merge.lazy_names import lazy_attributes

# name -> module that defines it
_LAZY = {"Adapter": "d2merge.io.adapter", "AdapterModule": "d2merge.io.adapter", "load_adapter": "d2merge.io.adapter",
         "BaseCheckpoint": "d2merge.io.checkpoint", "open_base": "d2merge.io.checkpoint",
         "SafetensorsFile": "d2merge.io.safetensors_file", "StreamingWriter": "d2merge.io.safetensors_file",
         "save_tensors": "d2merge.io.safetensors_file"}

__all__ = ["Adapter", "AdapterModule", "BaseCheckpoint", "SafetensorsFile", "StreamingWriter", "load_adapter",
           "open_base", "save_tensors"]

if TYPE_CHECKING:
    from d2merge.io.adapter import Adapter, AdapterModule, load_adapter
    from d2merge.io.checkpoint import BaseCheckpoint, open_base
    from d2merge.io.safetensors_file import SafetensorsFile, StreamingWriter, save_tensors

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
