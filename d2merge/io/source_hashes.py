"""The sha256 of a merge's source files, hashed on another core while the merge streams.

The model card and the single-file header record these digests so a reader
can check which base and adapter a merged model came from.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping

from d2merge.io.output import sha256_file


class BackgroundHashes:
    """Start hashing ``files`` (label -> path) now; :meth:`result` waits for the digests.

    hashlib releases the GIL, so the hashing overlaps the merge's compute and
    write threads. A file that cannot be read is recorded as ``unreadable``:
    the merge itself reports unreadable weights with a better message.
    """

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._files = dict(files)
        self._hashes: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="d2merge-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for label, path in self._files.items():
            try:
                self._hashes[label] = sha256_file(path)
            except OSError:
                self._hashes[label] = "unreadable"

    def result(self) -> dict[str, str]:
        self._thread.join()
        return dict(self._hashes)
