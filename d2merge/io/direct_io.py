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
from pathlib import Path

import d2merge.profile as profile

# 4 KiB covers the logical block size of every disk we know (512 or 4096); mmap gives page alignment.
ALIGNMENT = 4096
# Big enough that one write() per 32 MB keeps the disk busy, small enough to be noise beside the tensors
# (was 64 MB; halved for the 0.5 GB peak-RSS goal of a 1.1B fp32 output, not timed separately).
STAGING_BYTES = 32 * 1024 * 1024
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
    """A file written once, front to back: ``write``, ``copy_range``, then ``close`` (which fsyncs).

    ``size_hint`` (the final size, when known) keeps the staging buffer no larger
    than the file. ``direct=False`` forces buffered writes; :attr:`direct` says
    which mode the file ended up in.
    """

    def __init__(self, path: str | Path, *, size_hint: int | None = None, direct: bool | None = None):
        self.path = Path(path)
        self.written = 0  # bytes handed to the kernel so far (the file offset of the staging buffer)
        want_direct = direct_io_enabled() if direct is None else direct
        self._fd = -1
        self._staging: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._fill = 0
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
        if self.direct:
            size = STAGING_BYTES if size_hint is None else max(ALIGNMENT, min(STAGING_BYTES, round_up(size_hint)))
            self._staging = mmap.mmap(-1, size)
            self._view = memoryview(self._staging)

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not self.direct:
            self._drain_staging()
            self._write_all(view)
            return
        assert self._view is not None
        while view.nbytes:
            n = min(view.nbytes, len(self._view) - self._fill)
            self._view[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == len(self._view):
                self._flush_staging()

    def copy_range(self, source: str | Path, offset: int, nbytes: int) -> int:
        """Append ``nbytes`` of ``source`` from ``offset``; returns the bytes copied (short only at its end).

        Direct mode reads straight into the staging buffer (one copy, no
        intermediate); buffered mode lets the kernel copy (``copy_file_range``).
        """
        with open(source, "rb", buffering=0) as src:
            if not self.direct:
                self._drain_staging()
                return self._kernel_copy(src, offset, nbytes)
            assert self._view is not None
            done = 0
            while done < nbytes:
                room = min(nbytes - done, len(self._view) - self._fill)
                got = os.preadv(src.fileno(), [self._view[self._fill:self._fill + room]], offset + done)
                if got <= 0:
                    break
                self._fill += got
                done += got
                if self._fill == len(self._view):
                    self._flush_staging()
            return done

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

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            n = os.write(self._fd, view)
            view = view[n:]
            self.written += n

    def _flush_staging(self, nbytes: int | None = None) -> None:
        """Write the first ``nbytes`` (aligned; default all) of the staging buffer with O_DIRECT."""
        assert self._view is not None
        nbytes = self._fill if nbytes is None else nbytes
        view = self._view[:nbytes]
        try:
            while view.nbytes:
                n = os.write(self._fd, view)
                self.written += n
                view = view[n:]
                if n % ALIGNMENT and view.nbytes:  # a short, unaligned direct write: finish buffered
                    self._become_buffered()
                    self._write_all(view)
                    break
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            # Opened fine but the write was refused (e.g. a block size above 4 KiB): carry on buffered.
            self._become_buffered()
            self._write_all(view)
        rest = self._view[nbytes:self._fill]
        self._view[: rest.nbytes] = rest
        self._fill = rest.nbytes
        rest.release()
        view.release()

    def _drain_staging(self) -> None:
        """After a switch to buffered writes, the staged bytes go first."""
        if self._view is not None and self._fill:
            staged, self._fill = self._view[: self._fill], 0
            self._write_all(staged)
            staged.release()

    def _become_buffered(self) -> None:
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | _CLOEXEC)
        os.lseek(self._fd, self.written, os.SEEK_SET)
        self.direct = False

    def close(self) -> None:
        """Write what is staged, fsync, close. Raises if the disk refuses (ENOSPC, EIO)."""
        if self._fd < 0:
            return
        try:
            if self._view is not None and self._fill:
                aligned = self._fill - self._fill % ALIGNMENT
                if self.direct and aligned:
                    self._flush_staging(aligned)
                tail, self._fill = self._view[: self._fill], 0
                if tail.nbytes:
                    if self.direct:
                        # The last partial block cannot go through O_DIRECT: an ordinary handle, same offset.
                        fd = os.open(self.path, os.O_WRONLY | _CLOEXEC)
                        try:
                            while tail.nbytes:
                                n = os.pwrite(fd, tail, self.written)
                                self.written += n
                                tail = tail[n:]
                        finally:
                            os.close(fd)
                    else:
                        self._write_all(tail)
                del tail
            with profile.phase("fsync"):
                os.fsync(self._fd)
        finally:
            self._release()

    def abandon(self) -> None:
        """Close without flushing (the caller deletes the partial file)."""
        self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass  # moot for a file being discarded; the first error is the one reported
            self._fd = -1
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._staging is not None:
            try:
                self._staging.close()
            except BufferError:
                pass  # a slice still exported (an exception unwinding): freed with its last reference
            self._staging = None

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
