"""Test helper: gguf-py parses each GGUF file once inside ``gguf_parsed_once()``, whoever reads it."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Any, Iterator

import pytest


@contextlib.contextmanager
def gguf_parsed_once(keep: int = 2) -> Iterator[None]:
    """Inside, gguf-py parses each GGUF file once, whoever reads it (the last ``keep`` parses are kept).

    gguf-py's reader walks the 49k tokenizer strings and merges in Python (4.5 s per parse of the
    SmolLM2 file on the idle machine, 10-17 s on a loaded one, ~160 MB of small arrays), and
    transformers parses a file twice per ``from_pretrained`` (config, then weights) and again to
    rebuild the tokenizer. The parse of a file is the same whoever asks, so it is kept, keyed by
    the file's identity (inode, size, mtime: a rewritten file is parsed again). What is read is
    unchanged: every check still goes through transformers' own reader (d2merge's ``read_gguf``
    reads only the header, with d2merge.io.gguf_file, and is not affected).
    """
    import gguf

    original = gguf.GGUFReader
    kept: OrderedDict[tuple, object] = OrderedDict()

    def reader(path: Any, mode: str = "r") -> Any:
        if mode != "r":
            return original(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in kept:
            kept[key] = original(path)
            while len(kept) > keep:
                kept.popitem(last=False)
        kept.move_to_end(key)
        return kept[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield
    kept.clear()
