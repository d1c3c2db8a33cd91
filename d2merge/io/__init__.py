"""All reading and writing of checkpoints lives here; nothing else opens model files."""

from d2merge.io.adapter import Adapter, AdapterModule, load_adapter
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.io.safetensors_file import SafetensorsFile, StreamingWriter, save_tensors

__all__ = ["Adapter", "AdapterModule", "BaseCheckpoint", "SafetensorsFile", "StreamingWriter", "load_adapter",
           "open_base", "save_tensors"]
