"""gguf-py, the library that writes and names the format, imported on first use.

It is maintained with llama.cpp, so its key names, tensor names (``get_tensor_name_map``) and
quantization formats (``gguf.quants``) are the ones llama.cpp reads. Imported when a GGUF is
made or read, so that the CLI's ``--help`` loads none of it, and with the extra's one-line hint
when it is missing.
"""

from __future__ import annotations

from typing import Any

from d2merge.errors import D2MergeError


def gguf_py(purpose: str = "GGUF export") -> Any:
    """The ``gguf`` module, or one line naming the extra that installs it (``purpose`` says what needs it)."""
    try:
        import gguf
    except ImportError:
        raise D2MergeError(f"{purpose} needs the 'gguf' package", hint="pip install 'd2merge[gguf]'") from None
    return gguf
