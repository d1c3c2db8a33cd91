"""Unmerged adapters inside transformers models: for verification, training and saving.

Three modules, one job each: ``loading`` (the base model, any folder upcast to fp32),
``attaching`` (a stored adapter's runtime modules put into a model: ``load_unmerged``)
and ``trainable`` (fresh trainable adapters: ``attach``, ``save_adapter``). This face
keeps the names scripts use (``d2merge.runtime.attach``); the library imports the modules.
"""

from d2merge.runtime.attaching import WeightedAdapters, attach_adapter, load_unmerged
from d2merge.runtime.loading import collecting_new_objects_only, load_base_model, load_fp32_model
from d2merge.runtime.trainable import adapter_layers, adapter_state, attach, save_adapter

__all__ = ["WeightedAdapters", "adapter_layers", "adapter_state", "attach", "attach_adapter", "collecting_new_objects_only",
           "load_base_model", "load_fp32_model", "load_unmerged", "save_adapter"]
