"""A GGUF read back: its header (key/values, tensor table) and the model transformers loads from it.

The header comes from ``d2merge.io.gguf_file`` (gguf-py's reader walks every tokenizer string in
Python: seconds per file for a 49k-token vocabulary); the model from transformers' GGUF loader,
dequantized and with llama.cpp's q/k permutation undone: what verify runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from d2merge.errors import D2MergeError
from d2merge.export.gguf.library import gguf_py


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A GGUF as a transformers model (dequantized, q/k permutation undone): what verify runs."""
    from d2merge.io.transformers_folder import load_model

    path = Path(path)
    if not path.is_file():
        raise D2MergeError("GGUF file not found", path=path)
    gguf_py()
    return load_model(path, gguf_file=path.name, dtype=dtype).eval()


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], str]]]:
    """(every key/value, {tensor name: (ggml shape, type name)}) from the file's header alone.

    Read by d2merge.io.gguf_file (gguf-py's reader walks every tokenizer string in Python:
    seconds per file for a 49k-token vocabulary); a malformed file is refused in one line.
    """
    from d2merge.io.gguf_file import read_gguf_header

    gguf_py()  # the GGML type tables come from gguf-py: the extra's one-line hint if it is missing
    header = read_gguf_header(path)
    return header.metadata, {name: (t.shape, t.type_name) for name, t in header.tensors.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every key/value of a GGUF file (arrays as lists), for comparisons and inspection."""
    return read_gguf(path)[0]


def tensor_table(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """{GGUF tensor name: (ggml shape, type name)}."""
    return read_gguf(path)[1]

