"""Source hashes from the reader's bytes: always hashlib's sha256 of the whole file, every byte read once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from d2merge.io.checkpoint import SafetensorsFiles
from d2merge.io import source_hashes
from d2merge.io.source_hashes import UNREADABLE, BackgroundHashes, hash_ahead, hash_ahead_of_merge, hub_blob_sha256
from d2merge.io.tensor_reader import TensorReader
from d2merge.io.safetensors_file import save_tensors
from helpers import run_python


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(17 + i, 9, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32)
               for i in range(6)}
    path = tmp_path / "model.safetensors"
    save_tensors(path, tensors, {"format": "pt"})
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _offset_order(source: SafetensorsFiles) -> list[str]:
    return sorted(source.keys(), key=lambda n: source.byte_range(n)[1])


@pytest.mark.parametrize("order", ["file", "reversed", "repeated", "partial", "none"])
def test_digest_equals_hashlib_whatever_the_reads(weights: Path, order: str) -> None:
    source = SafetensorsFiles([weights])
    names = _offset_order(source)
    reads = {"file": names, "reversed": names[::-1], "repeated": names[:3] + names[:2] + names[2:],
             "partial": names[1::2], "none": []}[order]
    hasher = BackgroundHashes({"base/model.safetensors": weights}, read_ahead=False)
    reader = TensorReader(hasher, slots=2)
    for name in reads:
        expected = source.read(name).clone()
        assert torch.equal(reader.read(source, name), expected)  # the reader's bytes are the tensor's
    assert hasher.result() == {"base/model.safetensors": _digest(weights)}
    if order == "file":
        # Only the header was read by the hasher itself: every tensor byte was read once.
        header = source.byte_range(names[0])[1]
        assert hasher.stats.reread_bytes == header
        assert hasher.stats.hashed_bytes == weights.stat().st_size


def test_ring_buffers_are_not_overwritten_while_hashed(weights: Path) -> None:
    """With one slot the reader must wait for the hasher before reusing the buffer: digest still right."""
    source = SafetensorsFiles([weights])
    hasher = BackgroundHashes({"w": weights}, read_ahead=False)
    reader = TensorReader(hasher, slots=1)
    for name in _offset_order(source) * 2:
        reader.read(source, name)
    assert hasher.result()["w"] == _digest(weights)


def test_several_files_and_labels(weights: Path, tmp_path: Path) -> None:
    other = tmp_path / "adapter_config.json"
    other.write_text('{"r": 8}')
    hasher = BackgroundHashes({"base/model.safetensors": weights, "adapter/adapter_config.json": other})
    assert hasher.result() == {"base/model.safetensors": _digest(weights),
                               "adapter/adapter_config.json": _digest(other)}


def test_hub_cache_blob_name_is_used_not_rehashed(weights: Path, tmp_path: Path) -> None:
    """A Hub-cache file is a link to blobs/<sha256>: the name is the digest, nothing is read."""
    digest = _digest(weights)
    blobs = tmp_path / "models--org--name" / "blobs"
    snapshot = tmp_path / "models--org--name" / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    os.replace(weights, blobs / digest)
    (snapshot / "model.safetensors").symlink_to(blobs / digest)
    assert hub_blob_sha256(snapshot / "model.safetensors") == digest
    hasher = BackgroundHashes({"base/model.safetensors": snapshot / "model.safetensors"})
    assert not hasher.wants(snapshot / "model.safetensors")
    assert hasher.result() == {"base/model.safetensors": digest}
    assert hasher.stats.hashed_bytes == 0 and hasher.stats.blob_names_used == 1
    # a git blob (40-hex sha1 name) is not a sha256: hashed as usual
    (blobs / ("a" * 40)).write_bytes(b"{}")
    assert hub_blob_sha256(blobs / ("a" * 40)) is None


def test_unreadable_and_shrunk_files(weights: Path, tmp_path: Path) -> None:
    source = SafetensorsFiles([weights])
    names = _offset_order(source)
    hasher = BackgroundHashes({"gone": tmp_path / "missing.bin", "w": weights}, read_ahead=False)
    reader = TensorReader(hasher)
    reader.read(source, names[0])
    with open(weights, "r+b") as fh:  # shrinks under the merge: never a digest of half a file
        fh.truncate(source.byte_range(names[2])[1])
    reader.read(source, names[0])
    hashes = hasher.result()
    assert hashes["gone"] == UNREADABLE
    assert hashes["w"] == UNREADABLE


def test_abandon_releases_buffers(weights: Path) -> None:
    source = SafetensorsFiles([weights])
    hasher = BackgroundHashes({"w": weights}, read_ahead=False)
    reader = TensorReader(hasher, slots=1)
    for name in _offset_order(source):
        reader.read(source, name)
    hasher.abandon()
    reader.read(source, _offset_order(source)[0])  # would hang if a slot were never released


@pytest.mark.parametrize("sharded", [False, True])
def test_merge_records_hashlib_digests(tiny_bases, make_adapter, tmp_path: Path, sharded: bool) -> None:
    from d2merge.api import merge

    base = tiny_bases("llama", sharded=sharded)
    adapter = make_adapter(base, "lora")
    result = merge(base, adapter, tmp_path / "out")
    expected = {f"base/{p.name}": _digest(p) for p in Path(base).glob("*.safetensors")}
    expected.update({f"adapter/{p.name}": _digest(p) for p in (Path(adapter) / "adapter_model.safetensors",
                                                                Path(adapter) / "adapter_config.json")})
    assert result.source_hashes == expected
    card = (result.output / "README.md").read_text()
    assert all(digest in card for digest in expected.values())
    assert merge(base, adapter, tmp_path / "quiet", hash_sources=False).source_hashes == {}


@pytest.mark.parametrize("mapped", [True, False])
def test_read_ahead_hashes_alone_and_leaves_the_reader_free(weights: Path, monkeypatch: pytest.MonkeyPatch,
                                                            mapped: bool) -> None:
    """A warm base: the hasher reads (or maps) the file itself; the engine's buffers are never held for it."""
    monkeypatch.setattr(source_hashes, "_GAP_BLOCK", 1000)  # several blocks and a short last one
    monkeypatch.setattr(source_hashes, "_MAP_AT_LEAST", 0 if mapped else 1 << 40)
    if mapped:
        used = []
        real = source_hashes._hash_mapped
        monkeypatch.setattr(source_hashes, "_hash_mapped", lambda *a: used.append(1) or real(*a))
    source = SafetensorsFiles([weights])
    hasher = BackgroundHashes({"w": weights}, read_ahead=True)
    assert not hasher.wants(weights)
    reader = TensorReader(hasher, slots=1)
    for name in _offset_order(source):
        reader.read(source, name)
        assert reader._slots[0].users == 1  # only the engine holds it
    assert hasher.result() == {"w": _digest(weights)}
    assert hasher.stats.reread_bytes == weights.stat().st_size
    assert not mapped or used


def test_a_file_shorter_than_when_hashing_began_is_unreadable_mapped_or_not(weights: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_hashes, "_MAP_AT_LEAST", 0)
    entry = source_hashes._new_entry(weights.absolute())
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with open(weights, "rb") as fh:  # seen before the block is mapped: never a fault
        assert source_hashes._hash_mapped(entry, fh.fileno(), entry.size, source_hashes.HashStats(), None)
    assert entry.failed and entry.cursor == 0
    entry = source_hashes._new_entry(weights.absolute())
    weights.write_bytes(weights.read_bytes()[:100])
    source_hashes._fill_to(entry, None, source_hashes.HashStats())
    assert entry.failed


def test_early_hash_is_adopted_once_and_only_for_the_same_file(weights: Path, tmp_path: Path) -> None:
    hash_ahead([weights])
    hasher = BackgroundHashes({"w": weights}, read_ahead=False)
    assert not hasher.wants(weights) and hasher._early_stats  # adopted: the reader feeds nothing
    assert hasher.result() == {"w": _digest(weights)}
    assert weights.absolute() not in source_hashes._EARLY
    # rewritten after the early hash began: not adopted, hashed afresh (the new bytes' digest)
    hash_ahead([weights])
    weights.write_bytes(weights.read_bytes()[:-8] + b"x" * 8)
    os.utime(weights, ns=(1, 1))
    hasher = BackgroundHashes({"w": weights}, read_ahead=False)
    assert not hasher._early_stats
    assert hasher.result() == {"w": _digest(weights)}


def test_abandon_stops_a_read_ahead(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed merge must not wait for the whole base to be hashed: the read-ahead stops at its next block."""
    import threading
    import time

    monkeypatch.setattr(source_hashes, "_GAP_BLOCK", 64)  # many blocks
    calls: list[int] = []
    gate = threading.Event()
    real_preadv = os.preadv

    def held_preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        calls.append(offset)
        gate.wait(10)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", held_preadv)
    hasher = BackgroundHashes({"w": weights}, read_ahead=True)
    while not calls:
        time.sleep(0.001)
    stopper = threading.Thread(target=hasher.abandon)
    stopper.start()
    while not hasher._stop.is_set():
        time.sleep(0.001)
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive() and len(calls) == 1
    assert hasher.result() == {"w": UNREADABLE}


def test_cli_hashes_ahead_of_the_merge(tiny_bases, make_adapter, tmp_path: Path) -> None:
    from d2merge.api import merge

    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    hash_ahead_of_merge(base, adapter)
    early = {p for p in source_hashes._EARLY if p.parent in (Path(base).absolute(), Path(adapter).absolute())}
    assert {p.name for p in early} == {"model.safetensors", "adapter_model.safetensors", "adapter_config.json"}
    result = merge(base, adapter, tmp_path / "out")
    assert not early & set(source_hashes._EARLY)  # all adopted
    expected = {f"base/{p.name}": _digest(p) for p in Path(base).glob("*.safetensors")}
    expected.update({f"adapter/{p.name}": _digest(Path(adapter) / p.name)
                     for p in (Path("adapter_model.safetensors"), Path("adapter_config.json"))})
    assert result.source_hashes == expected


def test_the_early_hash_starts_before_torch_is_imported(tiny_bases, make_adapter) -> None:
    """What the CLI runs before importing torch imports no torch itself, or the hash would wait for the import."""
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    code = ("import sys\nfrom d2merge.io.source_hashes import _EARLY, hash_ahead_of_merge\n"
            f"hash_ahead_of_merge({str(base)!r}, {str(adapter)!r})\n"
            "print(len(_EARLY), sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))")
    done = run_python(["-c", code])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "[]"]
