"""Adapter operations beyond one merge: combine adapters (PEFT's ``add_weighted_adapter``),
convert an adapter into a plain LoRA (or llama.cpp's LoRA GGUF), extract a LoRA from a
fine-tuned model.

The math takes tensors (``task_arithmetic.py``, ``factor.py``); the commands that read and
write files (``combine.py``, ``convert.py``, ``extract.py``) stream one module at a time.
Nothing here imports torch at import time (the options are in ``options.py``).
"""
