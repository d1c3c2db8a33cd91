"""Output files written with O_DIRECT, with plain buffered writes where the filesystem refuses it.

Why our own writer: a merge writes every byte of the model once and never reads
it back, so the page cache only costs here. Buffered ``write()`` copies each
byte into freshly allocated cache pages and the kernel later writes them out
again: at 1.1B that was 4.2 s of system time and a 0.5 s ``fsync`` (measured,
docs/speed.md). With O_DIRECT the disk reads straight from our memory. Python
has no aligned-buffer writer, and neither safetensors nor the standard library
offers one, hence this module.

O_DIRECT wants the buffer address, the length and the file offset all aligned
to the device's logical block size. We stage bytes in a page-aligned anonymous
``mmap`` and write it only in whole aligned blocks; the unaligned tail (at most
one block) goes through an ordinary handle at the right offset. The file's bytes
are the same as a buffered write would give.

Direct I/O is chosen at run time: where opening or the first write with
O_DIRECT fails with EINVAL/EOPNOTSUPP (older tmpfs, some FUSE and network
filesystems), the same object carries on with buffered writes from the byte it
had reached. ``D2MERGE_DIRECT_IO=0`` turns it off everywhere.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from pathlib import Path

import d2merge.profile as profile

# 4 KiB covers the logical block size of every disk we know (512 or 4096); mmap gives page alignment.
ALIGNMENT = 4096
# A ring of staging buffers: the producer fills one while a flusher thread writes the others, so the
# disk never waits for a memory copy (one synchronous 32 MB buffer left it idle during every fill).
# 16 MB writes run the disk at the same rate as 8-64 MB ones (dd, O_DIRECT: 0.82-0.83 GB/s here);
# four of them (64 MB) are the most a merge holds for output, whatever the tensor sizes.
STAGING_BYTES = 16 * 1024 * 1024
STAGING_BUFFERS = 4
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def direct_io_enabled() -> bool:
    """False when the user turned direct I/O off (``D2MERGE_DIRECT_IO=0``) or the OS has no O_DIRECT."""
    return hasattr(os, "O_DIRECT") and os.environ.get("D2MERGE_DIRECT_IO", "1").lower() not in ("0", "false", "no", "off")


# Direct reads pay off when most of the base must come from disk anyway; page-cache hits are
# cheaper than any disk read (the prototype lost 0.8 s prefetching a warm 1.1B base).
DIRECT_READ_BELOW_RESIDENT = 0.5


def cold_enough(paths: list[Path] | tuple[Path, ...]) -> bool:
    """Whether reading ``paths`` with O_DIRECT should win: direct I/O on, and under half of them cached."""
    if not direct_io_enabled():
        return False
    resident = resident_fraction(paths)
    return resident is not None and resident < DIRECT_READ_BELOW_RESIDENT


def round_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


class OutputFile:
    """A file written once, front to back: ``write`` / ``reserve`` + ``commit``, ``copy_range``, then ``close``.

    Bytes are staged in a ring of page-aligned buffers (:data:`STAGING_BUFFERS` of
    :data:`STAGING_BYTES`); each full buffer goes to a flusher thread that writes it
    (O_DIRECT, or buffered where refused) while the caller fills the next, so a
    merge's compute and the disk overlap without a writer thread of the engine's
    own and without an output copy of each tensor. The caller waits only when all
    buffers are queued for the disk. A flusher failure (disk full) is raised in
    the caller's thread at its next call. ``close`` writes the rest and fsyncs.

    ``size_hint`` (the final size, when known) keeps small files to one buffer no
    larger than the file. ``direct=False`` forces buffered writes; :attr:`direct`
    says which mode the file ended up in. Only the caller's thread may call methods.
    """

    def __init__(self, path: str | Path, *, size_hint: int | None = None, direct: bool | None = None):
        self.path = Path(path)
        self.written = 0  # bytes handed to the kernel so far (the file offset of the next staged byte)
        want_direct = direct_io_enabled() if direct is None else direct
        self._fd = -1
        self.direct = False
        if want_direct:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | _CLOEXEC, 0o644)
                self.direct = True
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    raise
        if not self.direct:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _CLOEXEC, 0o644)
        self._size = STAGING_BYTES if size_hint is None else max(ALIGNMENT, min(STAGING_BYTES, round_up(size_hint)))
        one_buffer = size_hint is not None and size_hint <= self._size
        self._unallocated = 1 if one_buffer else max(1, STAGING_BUFFERS)
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._full: queue.Queue[tuple[memoryview, int] | None] = queue.Queue()
        self._flusher: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abort = False
        self._view: memoryview | None = self._next_buffer()
        self._fill = 0

    def fileno(self) -> int:
        return self._fd

    # -- the caller's side ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = min(view.nbytes, self._size - self._fill)
            self._staging()[self._fill:self._fill + n] = view[:n]
            view = view[n:]
            self.commit(n)

    def reserve(self, nbytes: int, align: int = 1) -> memoryview | None:
        """The next ``nbytes`` of staging to fill in place (then :meth:`commit`), or None.

        None when they would straddle two buffers or start off an ``align``-byte
        boundary (a typed view needs its element alignment): write those with :meth:`write`.
        """
        if nbytes <= 0 or self._fill + nbytes > self._size or self._fill % align:
            return None
        return self._staging()[self._fill:self._fill + nbytes]

    def commit(self, nbytes: int) -> None:
        """``nbytes`` more of the current buffer are filled (by :meth:`reserve`'s view or :meth:`write`)."""
        self._fill += nbytes
        if self._fill == self._size:
            self._hand_off()

    def copy_range(self, source: str | Path, offset: int, nbytes: int) -> int:
        """Append ``nbytes`` of ``source`` from ``offset``; returns the bytes copied (short only at its end).

        Direct mode reads straight into staging (one copy, no intermediate);
        buffered mode lets the kernel copy (``copy_file_range``) once the staged bytes are out.
        """
        with open(source, "rb", buffering=0) as src:
            if not self.direct:
                self._drain()
                return self._kernel_copy(src, offset, nbytes)
            done = 0
            while done < nbytes:
                room = min(nbytes - done, self._size - self._fill)
                got = os.preadv(src.fileno(), [self._staging()[self._fill:self._fill + room]], offset + done)
                if got <= 0:
                    break
                done += got
                self.commit(got)
            return done

    def close(self) -> None:
        """Write what is staged, fsync, close. Raises if the disk refuses (ENOSPC, EIO)."""
        if self._fd < 0:
            return
        try:
            self._wait_for_flusher()
            if self._view is not None and self._fill:
                staged, self._fill = self._view[: self._fill], 0
                aligned = staged.nbytes - staged.nbytes % ALIGNMENT if self.direct else 0
                if aligned:
                    self._write_staged(staged[:aligned])
                tail = staged[aligned:]
                if tail.nbytes and self.direct:
                    # The last partial block cannot go through O_DIRECT: an ordinary handle, same offset.
                    fd = os.open(self.path, os.O_WRONLY | _CLOEXEC)
                    try:
                        while tail.nbytes:
                            n = os.pwrite(fd, tail, self.written)
                            self.written += n
                            tail = tail[n:]
                    finally:
                        os.close(fd)
                elif tail.nbytes:
                    self._write_all(tail)
                del tail, staged
            with profile.phase("fsync"):
                os.fsync(self._fd)
        finally:
            self._release()

    def abandon(self) -> None:
        """Close without flushing (the caller deletes the partial file); never raises."""
        self._abort = True
        self._release()

    def _staging(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"{self.path}: write to a closed output file")
        return self._view

    def _next_buffer(self) -> memoryview:
        if self._unallocated:
            self._unallocated -= 1
            self._maps.append(mmap.mmap(-1, self._size))
            self._views.append(memoryview(self._maps[-1]))
            return self._views[-1]
        with profile.phase("write (wait)"):  # every buffer is queued for the disk: the disk is the limit
            view = self._free.get()
        self._raise_flusher_error()
        return view

    def _hand_off(self) -> None:
        """Queue the full current buffer for the flusher thread and carry on in the next one."""
        self._raise_flusher_error()
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="d2merge-flush", daemon=True)
            self._flusher.start()
        self._full.put((self._staging(), self._fill))
        self._view, self._fill = None, 0
        self._view = self._next_buffer()

    def _wait_for_flusher(self) -> None:
        """Until every queued buffer is written; the flusher's error, if any, is raised here."""
        if self._flusher is not None:
            with profile.phase("write (wait)"):
                self._full.join()
        self._raise_flusher_error()

    def _drain(self) -> None:
        """Everything staged is handed to the kernel (buffered mode, before a kernel-side copy)."""
        self._wait_for_flusher()
        if self._view is not None and self._fill:
            staged, self._fill = self._view[: self._fill], 0
            self._write_all(staged)
            staged.release()

    def _raise_flusher_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _kernel_copy(self, src, offset: int, nbytes: int) -> int:
        done = 0
        while done < nbytes:
            try:
                copied = os.copy_file_range(src.fileno(), self._fd, nbytes - done, offset + done)
            except (AttributeError, OSError):
                copied = -1
            if copied == 0:
                break
            if copied < 0:  # not supported across these filesystems: plain reads
                block = bytearray(min(nbytes - done, 16 * 1024 * 1024))
                while done < nbytes:
                    got = os.preadv(src.fileno(), [memoryview(block)[: min(len(block), nbytes - done)]], offset + done)
                    if got <= 0:
                        return done
                    self._write_all(memoryview(block)[:got])
                    done += got
                return done
            done += copied
            self.written += copied
        return done

    # -- the flusher's side (and the caller's, once the flusher is idle) ---------------------

    def _flush_loop(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                self._full.task_done()
                return
            view, nbytes = item
            try:
                if self._error is None and not self._abort:
                    with profile.phase("write (disk)"):
                        self._write_staged(view[:nbytes])
            except BaseException as exc:  # raised in the caller's thread at its next call
                self._error = exc
            finally:
                self._free.put(view)
                self._full.task_done()

    def _write_staged(self, view: memoryview) -> None:
        """Write staged bytes: O_DIRECT in whole blocks, or buffered once direct writes were refused."""
        if not self.direct:
            self._write_all(view)
            return
        try:
            while view.nbytes:
                n = os.write(self._fd, view)
                self.written += n
                view = view[n:]
                if n % ALIGNMENT and view.nbytes:  # a short, unaligned direct write: finish buffered
                    self._become_buffered()
                    self._write_all(view)
                    return
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            # Opened fine but the write was refused (e.g. a block size above 4 KiB): carry on buffered.
            self._become_buffered()
            self._write_all(view)

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            n = os.write(self._fd, view)
            view = view[n:]
            self.written += n

    def _become_buffered(self) -> None:
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | _CLOEXEC)
        os.lseek(self._fd, self.written, os.SEEK_SET)
        self.direct = False

    def _release(self) -> None:
        if self._flusher is not None:
            self._full.put(None)
            self._flusher.join()
            self._flusher = None
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass  # moot for a file being discarded; the first error is the one reported
            self._fd = -1
        self._view = None
        for view in self._views:
            view.release()
        for staging in self._maps:
            try:
                staging.close()
            except BufferError:
                pass  # a slice still exported (an exception unwinding): freed with its last reference
        self._views, self._maps = [], []

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def resident_fraction(paths: list[Path] | tuple[Path, ...]) -> float | None:
    """Share of the files' pages now in the page cache (mincore on a read-only mapping); None if unknown.

    Tells a cold base (worth O_DIRECT reads) from a warm one (page-cache hits are
    cheaper than any disk read), and lets the benchmark check its eviction worked.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = -(-size // page)
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                resident += pages - bytes(vec).count(0)  # Linux sets only bit 0 (resident)
                total += pages
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else 1.0
