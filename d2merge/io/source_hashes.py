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

Where the bytes come from depends on the cache (``read_ahead``):

- a cold base is read by the engine with O_DIRECT (io/tensor_reader.py): its
  ranges feed the hash as above, so the disk is read once;
- a warm base (in page cache) is hashed *ahead*: the hashing thread reads the
  files itself from the start, at its own pace. Measured on the loaded 2-core
  machine, feeding it the engine's buffers made the engine wait for the hasher
  (the ring runs in step with it), which cost more than the page-cache copy the
  separate read costs (about 0.1 CPU-s per GB). The CLI goes further and starts
  it before importing torch (:func:`hash_ahead_of_merge`), so the hashing (1.5
  CPU-s at 1.1B) runs on the other core while the import (1.5-2.5 CPU-s) holds
  the first; :class:`BackgroundHashes` adopts those early hashes.

A file in the Hugging Face cache is a symlink to ``blobs/<sha256>`` (LFS files):
that name already is the file's sha256, so such files are not hashed at all.
"""

from __future__ import annotations

import hashlib
import mmap
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
# Large blocks: each costs the thread GIL hand-overs, and while the main thread runs Python
# (importing torch) each can wait a switch interval (5 ms). Measured on a 2.2 GB warm file hashed
# during the import: done 0.8 s after the import with 8 MB blocks, 0.6-0.8 with 16, 0.5-0.6 with 32,
# 0.5 with 64. Mapped pages count in RSS, so 32 MB (+24 MB of peak RSS over 8 MB).
_GAP_BLOCK = 32 * 1024 * 1024
_MAP_AT_LEAST = 4 * 1024 * 1024  # smaller gaps (headers, small tensors) are read
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
    stamp: tuple[int, int, int] | None = None  # (inode, size, mtime) when an early hash began
    done: threading.Event | None = None  # set by the early thread hashing this file (hash_ahead)


@dataclass
class HashStats:
    """What hashing cost, for ``--profile``: thread CPU seconds and bytes the hasher read itself."""

    cpu_s: float = 0.0
    hashed_bytes: int = 0
    reread_bytes: int = 0
    blob_names_used: int = 0


def _fill_to(entry: _FileHash, end: int | None, stats: HashStats, stop: threading.Event | None = None) -> None:
    """Hash the file from the cursor to ``end`` (None: its end) by reading it here (until ``stop`` is set)."""
    if entry.failed:
        return
    try:
        with open(entry.path, "rb", buffering=0) as fh:
            if os.fstat(fh.fileno()).st_size != entry.size:
                entry.failed = True  # changed while merging
                return
            size = entry.size if end is None else end
            if size - entry.cursor >= _MAP_AT_LEAST and _hash_mapped(entry, fh.fileno(), size, stats, stop):
                return
            block = bytearray(min(_GAP_BLOCK, max(size - entry.cursor, 0)))
            view = memoryview(block)
            while entry.cursor < size:
                if stop is not None and stop.is_set():
                    return
                got = os.preadv(fh.fileno(), [view[: min(len(block), size - entry.cursor)]], entry.cursor)
                if got <= 0:
                    entry.failed = True  # shorter than the reads seen: changed while merging
                    return
                entry.sha.update(view[:got])
                entry.cursor += got
                stats.reread_bytes += got
                stats.hashed_bytes += got
    except OSError:
        entry.failed = True


def _hash_mapped(entry: _FileHash, fd: int, size: int, stats: HashStats, stop: threading.Event | None) -> bool:
    """Hash ``[cursor, size)`` from read-only mappings; False if the file cannot be mapped (then read it).

    Why map: sha256 then reads the page-cache pages themselves. A ``read()`` copies
    them first, which measured 0.25-1.2 CPU-s per 2.2 GB on the loaded machine
    beside 1.5 CPU-s for the hash. One block is mapped at a time (mapped pages
    count in the process's RSS). The size is checked before every block: a file
    cut short under a mapping faults on access (SIGBUS) instead of reading short.
    """
    while entry.cursor < size:
        if stop is not None and stop.is_set():
            return True
        if os.fstat(fd).st_size < size:
            entry.failed = True  # shrunk while merging
            return True
        start = entry.cursor - entry.cursor % mmap.ALLOCATIONGRANULARITY
        n = min(_GAP_BLOCK, size - entry.cursor)
        try:
            mapping = mmap.mmap(fd, entry.cursor + n - start, prot=mmap.PROT_READ, offset=start)
        except (OSError, ValueError):
            return False  # not mappable here: the caller reads from the cursor on
        try:
            with memoryview(mapping) as view:
                entry.sha.update(view[entry.cursor - start:])
        finally:
            mapping.close()
        entry.cursor += n
        stats.reread_bytes += n
        stats.hashed_bytes += n
    return True


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _new_entry(key: Path) -> _FileHash:
    entry = _FileHash(key, known=hub_blob_sha256(key))
    stamp = _stamp(key)
    if stamp is None:
        entry.failed = True
    else:
        entry.size = stamp[1]
    return entry


# Files whose hash began before the merge knew its plan (hash_ahead), by absolute path; each is
# adopted by the first BackgroundHashes that lists it, if the file is still the one being hashed.
_EARLY: dict[Path, tuple[_FileHash, HashStats]] = {}
_EARLY_LOCK = threading.Lock()


def hash_ahead(paths: list[Path]) -> None:
    """Start hashing ``paths`` now, in a thread of their own, for a merge about to begin.

    Worth it only for files in page cache (a cold base is hashed from the engine's
    direct reads instead: see :func:`hash_ahead_of_merge`). Nothing waits for it:
    an early hash nobody adopts is dropped with the process.
    """
    entries = []
    for path in paths:
        key = Path(path).absolute()
        entry = _new_entry(key)
        if entry.known is not None or entry.failed:
            continue
        entry.stamp, entry.done = _stamp(key), threading.Event()
        entries.append(entry)
    if not entries:
        return
    stats = HashStats()
    with _EARLY_LOCK:
        for entry in entries:
            _EARLY[entry.path] = (entry, stats)

    def run() -> None:
        started = time.thread_time()
        for entry in entries:
            try:
                _fill_to(entry, None, stats)
            finally:
                stats.cpu_s = time.thread_time() - started
                entry.done.set()  # type: ignore[union-attr]

    threading.Thread(target=run, name="d2merge-hash-early", daemon=True).start()


def hash_ahead_of_merge(base: str | Path, adapter: str | Path) -> None:
    """What the CLI calls before importing torch: hash the files a merge of these paths will read, if warm.

    The file list is the usual layout (``*.safetensors`` of a base folder, or the
    file; the adapter's ``adapter_model.safetensors`` and ``adapter_config.json``);
    the merge adopts only the files its plan lists, so a wrong guess costs CPU, never
    a wrong digest. A repo id, a pickle base or a cold base is left to the merge.
    """
    from d2merge.io.direct_io import cold_enough

    base, adapter = Path(base), Path(adapter)
    if base.is_dir():
        weights = sorted(base.glob("*.safetensors"))
    elif base.is_file() and base.suffix == ".safetensors":
        weights = [base]
    else:
        return
    if not weights or cold_enough(weights):
        return
    hash_ahead([*weights, adapter / "adapter_model.safetensors", adapter / "adapter_config.json"])


def _adopt_early(key: Path) -> tuple[_FileHash, HashStats] | None:
    with _EARLY_LOCK:
        early = _EARLY.pop(key, None)
    if early is None or early[0].stamp != _stamp(key):
        return None  # changed since (or never hashed early): hashed afresh
    return early


class BackgroundHashes:
    """Hashes a fixed set of files in one background thread: ahead on its own, or from ranges the reader saw.

    ``files`` maps a label (``base/model.safetensors``) to the file. With
    ``read_ahead`` (default: unless the files are cold enough for the engine's
    O_DIRECT reads) the thread reads and hashes them itself from the start;
    otherwise the engine calls :meth:`saw` for every range it read (with a
    callback that frees the buffer). Files already being hashed by
    :func:`hash_ahead` are adopted. :meth:`result` then gives ``{label: hex
    digest}``. A file that cannot be read is recorded as ``unreadable``: the
    merge itself reports unreadable weights with a better message.
    """

    def __init__(self, files: dict[str, Path], *, read_ahead: bool | None = None):
        self._labels = dict(files)
        self._files: dict[Path, _FileHash] = {}
        self.stats = HashStats()
        self._early_stats: list[HashStats] = []
        for path in files.values():
            key = Path(path).absolute()
            if key not in self._files:
                early = _adopt_early(key)
                if early is not None:
                    entry = early[0]
                    if all(s is not early[1] for s in self._early_stats):
                        self._early_stats.append(early[1])
                else:
                    entry = _new_entry(key)
                self.stats.blob_names_used += entry.known is not None
                self._files[key] = entry
        if read_ahead is None:
            from d2merge.io.direct_io import cold_enough

            pending = [p for p, e in self._files.items() if e.known is None and e.done is None and not e.failed]
            read_ahead = bool(pending) and not cold_enough(pending)
        self.read_ahead = read_ahead
        self._stop = threading.Event()  # abandon(): a read-ahead stops at its next block
        self._queue: queue.SimpleQueue[tuple[_FileHash, int, memoryview, Callable[[], None] | None] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="d2merge-hash", daemon=True)
        self._thread.start()
        self._done = False

    def wants(self, path: Path) -> bool:
        """Whether the reader should show this file's ranges (not when hashed ahead or by its name)."""
        entry = self._files.get(Path(path).absolute())
        return entry is not None and entry.known is None and entry.done is None and not self.read_ahead

    def saw(self, path: Path, start: int, data: memoryview, release: Callable[[], None] | None = None) -> None:
        """``data`` was read from ``path`` at ``start``; ``release`` is called once the hasher is done with it."""
        entry = self._files.get(Path(path).absolute())
        if entry is None or not self.wants(path):
            if release is not None:
                release()
            return
        self._queue.put((entry, start, data, release))

    def _run(self) -> None:
        started = time.thread_time()
        if self.read_ahead:
            for entry in self._files.values():
                if entry.known is None and entry.done is None:
                    _fill_to(entry, None, self.stats, self._stop)
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
            if entry.known is None and entry.done is None:
                _fill_to(entry, None, self.stats)
        self.stats.cpu_s = time.thread_time() - started
        profile.add("hash (thread)", 0.0, self.stats.cpu_s)

    def _feed(self, entry: _FileHash, start: int, data: memoryview) -> None:
        if entry.failed:
            return
        end = start + data.nbytes
        if end <= entry.cursor:
            return  # read again (a tied embedding): already hashed
        if start > entry.cursor:
            _fill_to(entry, start, self.stats)
            if entry.failed:
                return
        entry.sha.update(data[entry.cursor - start:])
        self.stats.hashed_bytes += end - entry.cursor
        entry.cursor = end

    def result(self) -> dict[str, str]:
        """Wait for the hashing thread; ``{label: sha256 hex}`` (``unreadable`` for a file that failed)."""
        if not self._done:
            self._queue.put(None)
            self._done = True
        with profile.phase("hash"):
            self._thread.join()
            for entry in self._files.values():
                if entry.done is not None:
                    entry.done.wait()
        for stats in self._early_stats:
            self.stats.hashed_bytes += stats.hashed_bytes
            self.stats.reread_bytes += stats.reread_bytes
            profile.add("hash (early thread)", 0.0, stats.cpu_s)
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
            self._stop.set()
            self._queue.put(None)
            self._done = True
        self._thread.join()
