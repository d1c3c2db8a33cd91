"""sha256 of the source files, computed from the bytes the merge reads anyway.

Why not hash each file on its own: a separate pass reads every base byte a
second time (2.3 s of a 4.1 s 1.1B merge; with direct reads it doubled the 7B
time, because nothing was left in page cache for it). Here the engine's reader
hands each tensor it read to :meth:`BackgroundHashes.saw`; a hashing thread feeds
those bytes to the file's sha256 in file order (hashlib releases the GIL, so
this runs on the other core while the main thread computes). Bytes the merge
never reads (headers, tensors copied kernel-side, or tensors read out of file
order) are read by the hashing thread itself when the hash reaches them, so the
digest is always that of the whole file, equal to ``hashlib.sha256(file)``.

A file in the Hugging Face cache is a symlink to ``blobs/<sha256>`` (LFS files):
that name already is the file's sha256, so such files are not hashed at all.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import d2merge.profile as profile

_BLOB_SHA256 = re.compile(r"[0-9a-f]{64}")
_GAP_BLOCK = 8 * 1024 * 1024
UNREADABLE = "unreadable"


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a Hub-cache LFS blob is named by, or None (git blobs are named by a 40-hex sha1)."""
    try:
        target = path.resolve(strict=True)
    except OSError:
        return None
    if target.parent.name == "blobs" and _BLOB_SHA256.fullmatch(target.name):
        return target.name
    return None


@dataclass
class _FileHash:
    path: Path
    sha: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    cursor: int = 0  # bytes of the file hashed so far
    known: str | None = None  # a Hub blob's own name
    failed: bool = False
    size: int = -1  # when hashing began: a file that shrinks or grows meanwhile gets no digest


@dataclass
class HashStats:
    """What hashing cost, for ``--profile``: thread CPU seconds and bytes the hasher read itself."""

    cpu_s: float = 0.0
    hashed_bytes: int = 0
    reread_bytes: int = 0
    blob_names_used: int = 0


class BackgroundHashes:
    """Hashes a fixed set of files from ranges the reader saw, in one background thread.

    ``files`` maps a label (``base/model.safetensors``) to the file. The engine
    calls :meth:`saw` for every range it read (with a callback that frees the
    buffer); :meth:`result` then gives ``{label: hex digest}``. A file that
    cannot be read is recorded as ``unreadable``: the merge itself reports
    unreadable weights with a better message.
    """

    def __init__(self, files: dict[str, Path]):
        self._labels = dict(files)
        self._files: dict[Path, _FileHash] = {}
        self.stats = HashStats()
        for path in files.values():
            key = Path(path).absolute()
            if key not in self._files:
                entry = _FileHash(key, known=hub_blob_sha256(key))
                try:
                    entry.size = key.stat().st_size
                except OSError:
                    entry.failed = True
                self.stats.blob_names_used += entry.known is not None
                self._files[key] = entry
        self._queue: queue.SimpleQueue[tuple[_FileHash, int, memoryview, Callable[[], None] | None] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="d2merge-hash", daemon=True)
        self._thread.start()
        self._done = False

    def wants(self, path: Path) -> bool:
        entry = self._files.get(Path(path).absolute())
        return entry is not None and entry.known is None

    def saw(self, path: Path, start: int, data: memoryview, release: Callable[[], None] | None = None) -> None:
        """``data`` was read from ``path`` at ``start``; ``release`` is called once the hasher is done with it."""
        entry = self._files.get(Path(path).absolute())
        if entry is None or entry.known is not None:
            if release is not None:
                release()
            return
        self._queue.put((entry, start, data, release))

    def _run(self) -> None:
        started = time.thread_time()
        while True:
            job = self._queue.get()
            if job is None:
                break
            entry, start, data, release = job
            try:
                self._feed(entry, start, data)
            finally:
                if release is not None:
                    release()
        for entry in self._files.values():
            if entry.known is None:
                self._fill_to(entry, None)
        self.stats.cpu_s = time.thread_time() - started
        profile.add("hash (thread)", 0.0, self.stats.cpu_s)

    def _feed(self, entry: _FileHash, start: int, data: memoryview) -> None:
        if entry.failed:
            return
        end = start + data.nbytes
        if end <= entry.cursor:
            return  # read again (a tied embedding): already hashed
        if start > entry.cursor:
            self._fill_to(entry, start)
            if entry.failed:
                return
        entry.sha.update(data[entry.cursor - start:])
        self.stats.hashed_bytes += end - entry.cursor
        entry.cursor = end

    def _fill_to(self, entry: _FileHash, end: int | None) -> None:
        """Hash the file from the cursor to ``end`` (None: its end) by reading it here."""
        if entry.failed:
            return
        try:
            with open(entry.path, "rb", buffering=0) as fh:
                if os.fstat(fh.fileno()).st_size != entry.size:
                    entry.failed = True  # changed while merging
                    return
                size = entry.size if end is None else end
                block = bytearray(min(_GAP_BLOCK, max(size - entry.cursor, 0)))
                view = memoryview(block)
                while entry.cursor < size:
                    got = os.preadv(fh.fileno(), [view[: min(len(block), size - entry.cursor)]], entry.cursor)
                    if got <= 0:
                        entry.failed = True  # shorter than the reads seen: changed while merging
                        return
                    entry.sha.update(view[:got])
                    entry.cursor += got
                    self.stats.reread_bytes += got
                    self.stats.hashed_bytes += got
        except OSError:
            entry.failed = True

    def result(self) -> dict[str, str]:
        """Wait for the hashing thread; ``{label: sha256 hex}`` (``unreadable`` for a file that failed)."""
        if not self._done:
            self._queue.put(None)
            self._done = True
        with profile.phase("hash"):
            self._thread.join()
        out = {}
        for label, path in self._labels.items():
            entry = self._files[Path(path).absolute()]
            out[label] = entry.known or (UNREADABLE if entry.failed else entry.sha.hexdigest())
        return out

    def abandon(self) -> None:
        """Stop without digests (the merge failed); buffers still queued are released."""
        if not self._done:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job[3] is not None:
                    job[3]()
            for entry in self._files.values():
                entry.failed = True
            self._queue.put(None)
            self._done = True
        self._thread.join()
