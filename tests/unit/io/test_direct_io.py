"""O_DIRECT output: the same bytes as buffered writes, and buffered writes where O_DIRECT is refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from d2merge.io import direct_io
from d2merge.io.direct_io import ALIGNMENT, OutputFile
from d2merge.io.safetensors_file import SafetensorsFile, StreamingWriter

needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this OS")


def _pieces(seed: int) -> list[bytes]:
    """Writes of awkward sizes: empty, sub-block, straddling the staging buffer, a whole block."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [0, 1, 7, ALIGNMENT - 1, ALIGNMENT, 3 * ALIGNMENT + 5, 70_000, 1, 200_003]
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).numpy().tobytes() for n in sizes]


def _write(path: Path, pieces: list[bytes], *, direct: bool, staging: int | None = None,
           monkeypatch: pytest.MonkeyPatch | None = None) -> OutputFile:
    if staging is not None and monkeypatch is not None:
        monkeypatch.setattr(direct_io, "STAGING_BYTES", staging)
    with OutputFile(path, direct=direct) as out:
        for piece in pieces:
            out.write(piece)
    return out


@needs_o_direct
@pytest.mark.parametrize("staging", [ALIGNMENT, 4 * ALIGNMENT, direct_io.STAGING_BYTES])
def test_direct_output_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: int) -> None:
    pieces = _pieces(0)
    buffered = _write(tmp_path / "buffered", pieces, direct=False)
    direct = _write(tmp_path / "direct", pieces, direct=True, staging=staging, monkeypatch=monkeypatch)
    assert not buffered.direct
    assert (tmp_path / "direct").read_bytes() == (tmp_path / "buffered").read_bytes() == b"".join(pieces)
    if direct.direct:  # the worktree's filesystem took O_DIRECT: the tail went through the second handle
        assert sum(map(len, pieces)) % ALIGNMENT != 0


@needs_o_direct
def test_copy_range_reads_into_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_io, "STAGING_BYTES", 2 * ALIGNMENT)
    source = tmp_path / "source"
    data = b"".join(_pieces(1))
    source.write_bytes(data)
    for direct in (True, False):
        path = tmp_path / f"copy-{direct}"
        with OutputFile(path, direct=direct) as out:
            out.write(b"head")
            assert out.copy_range(source, 5, len(data) - 9) == len(data) - 9
            assert out.copy_range(source, len(data) - 3, 10) == 3  # short at the source's end
        assert path.read_bytes() == b"head" + data[5:-4] + data[-3:]


def test_refused_open_falls_back_to_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses O_DIRECT at open (tmpfs before Linux 6.6, many FUSE mounts)."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    pieces = _pieces(2)
    out = _write(tmp_path / "f", pieces, direct=True)
    assert not out.direct
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


@needs_o_direct
def test_refused_write_carries_on_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Open accepted but the second direct write refused: the file continues from the byte reached."""
    monkeypatch.setattr(direct_io, "STAGING_BYTES", ALIGNMENT)
    real_write, calls = os.write, []

    def flaky_write(fd, data):
        calls.append(fd)
        if len(calls) == 2 and os.get_blocking(fd) and fcntl_flags(fd) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky_write)
    pieces = _pieces(3)
    out = _write(tmp_path / "f", pieces, direct=True)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)
    assert not out.direct or len(calls) < 2


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_disk_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only 'O_DIRECT not supported' falls back; a full disk is still an error."""
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io, "STAGING_BYTES", ALIGNMENT)
    out = OutputFile(tmp_path / "f", direct=True)
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as caught:
        out.write(b"x" * (3 * ALIGNMENT))
        out.close()
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "write", real_write)
    out.abandon()
    assert out.closed


def test_switch_off_with_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("D2MERGE_DIRECT_IO", "0")
    assert not direct_io.direct_io_enabled()
    out = _write(tmp_path / "f", [b"abc"], direct=None)  # type: ignore[arg-type]
    assert not out.direct and (tmp_path / "f").read_bytes() == b"abc"


@needs_o_direct
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_tmpfs_output_identical_whatever_mode(tmp_path: Path) -> None:
    """tmpfs refuses O_DIRECT before Linux 6.6 and takes it after: either way the bytes match."""
    import tempfile

    pieces = _pieces(4)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        _write(Path(shm) / "f", pieces, direct=True)
        assert (Path(shm) / "f").read_bytes() == b"".join(pieces)


def test_streaming_writer_direct_equals_buffered(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    tensors = {"a": torch.randn(33, 17, generator=gen).to(torch.bfloat16), "b": torch.randn(5, generator=gen),
               "c": torch.arange(11, dtype=torch.int64), "empty": torch.zeros(0, 3)}
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    source = tmp_path / "source.safetensors"
    with StreamingWriter(source, entries, {"format": "pt"}, direct=False) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    info = SafetensorsFile(source).tensors["c"]
    for direct in (True, False):
        path = tmp_path / f"out-{direct}.safetensors"
        with StreamingWriter(path, entries, {"format": "pt"}, direct=direct) as writer:
            for name, tensor in tensors.items():
                if name == "c":
                    writer.copy_from(name, source, info.start, info.nbytes)
                else:
                    writer.write(name, tensor)
        assert path.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_convert_from_equals_torch_cast(tmp_path: Path, out_dtype: torch.dtype) -> None:
    """Chunked cast while copying (fp32 output of a bf16 base): the bytes torch's copy_ gives."""
    gen = torch.Generator().manual_seed(6)
    tensor = (torch.randn(1001, 7, generator=gen) * 100).to(torch.bfloat16)
    source = tmp_path / "source.safetensors"
    with StreamingWriter(source, [("w", tensor.dtype, tuple(tensor.shape))], direct=False) as writer:
        writer.write("w", tensor)
    info = SafetensorsFile(source).tensors["w"]
    path = tmp_path / "out.safetensors"
    with StreamingWriter(path, [("w", out_dtype, tuple(tensor.shape))]) as writer:
        writer.convert_from("w", source, info.start, torch.bfloat16, chunk_elements=1000)  # chunks straddle rows
    assert torch.equal(SafetensorsFile(path).read("w"), torch.empty(tensor.shape, dtype=out_dtype).copy_(tensor))


def test_resident_fraction_sees_eviction(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * 4096))
    path.read_bytes()
    assert direct_io.resident_fraction([path]) == 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert direct_io.resident_fraction([path]) < 0.5  # the kernel may keep a page or two it is using
    assert direct_io.resident_fraction([tmp_path / "missing"]) is None


@pytest.mark.parametrize("direct", [True, False])
def test_reserve_and_commit_fill_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    """In-place fills and copies interleave in order; a region is refused where it would straddle or misalign."""
    monkeypatch.setattr(direct_io, "STAGING_BYTES", 2 * ALIGNMENT)
    data = b"".join(_pieces(5))
    path = tmp_path / "f"
    expected = bytearray()
    with OutputFile(path, direct=direct) as out:
        out.write(b"abc")
        expected += b"abc"
        assert out.reserve(8, align=4) is None  # offset 3 is not 4-byte aligned
        assert out.reserve(2 * ALIGNMENT) is None  # would straddle into the next buffer
        region = out.reserve(5)
        assert region is not None and region.nbytes == 5
        region[:] = b"12345"
        out.commit(5)
        expected += b"12345"
        for start in range(0, len(data), 3000):  # in-place where it fits, else through write()
            piece = data[start:start + 3000]
            region = out.reserve(len(piece))
            if region is None:
                out.write(piece)
            else:
                region[:] = piece
                out.commit(len(piece))
            expected += piece
    assert path.read_bytes() == bytes(expected)


def test_flusher_failure_is_raised_in_the_callers_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error on the flusher thread reaches the caller at its next call; the thread does not outlive it."""
    import threading

    monkeypatch.setattr(direct_io, "STAGING_BYTES", ALIGNMENT)
    real_write, calls = os.write, []

    def full_after_one(fd, data):
        calls.append(threading.current_thread().name)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_after_one)
    out = OutputFile(tmp_path / "f", direct=False)
    with pytest.raises(OSError) as caught:
        for _ in range(64):  # 64 buffers: the flusher fails on the second; the caller hears of it
            out.write(b"x" * ALIGNMENT)
        out.close()
    assert caught.value.errno == errno.ENOSPC
    assert calls[0] == "d2merge-flush"
    out.abandon()
    assert out.closed and not [t for t in threading.enumerate() if t.name == "d2merge-flush"]


def test_append_cast_screens_before_writing(tmp_path: Path) -> None:
    """A piece the screen refuses is not written; the count comes back to the caller."""
    entries = [("w", torch.float16, (4, 3))]
    writer = StreamingWriter(tmp_path / "f.safetensors", entries)
    writer.begin("w")
    assert writer.append_cast(torch.ones(2, 3), lambda cast: int((~torch.isfinite(cast)).sum())) == 0
    too_big = torch.full((2, 3), 1e6)  # finite in fp32, inf in fp16: the screen sees the cast values
    assert writer.append_cast(too_big, lambda cast: int((~torch.isfinite(cast)).sum())) == 6
    with pytest.raises(RuntimeError, match="ended early"):
        writer.end()
    writer.append_cast(torch.zeros(2, 3))
    writer.end()
    writer.close()
    loaded = SafetensorsFile(tmp_path / "f.safetensors").read("w")
    assert torch.equal(loaded, torch.cat([torch.ones(2, 3), torch.zeros(2, 3)]).half())
