"""The engine's I/O: copies stream file to file (also when cast), output equal whatever the I/O mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2merge.api import merge, plan
from d2merge.io.tensor_reader import TensorReader


def test_fp32_output_streams_copies_never_whole(tiny_bases, make_adapter, read_tensors, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 base merged to fp32: unchanged tensors are cast chunk by chunk in the writer.

    Memory then depends on the largest *merged* tensor only (the embedding and
    lm_head used to be held whole, twice, at fp32).
    """
    base = tiny_bases("llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, "lora")
    merge_plan = plan(base, adapter, dtype="fp32")
    copies = {t.source for t in merge_plan.tensors if t.action == "copy"}
    assert copies and all(t.in_dtype == torch.bfloat16 for t in merge_plan.tensors if t.action == "copy")
    read: list[str] = []
    real_read = TensorReader.read
    monkeypatch.setattr(TensorReader, "read", lambda self, source, name: read.append(name) or real_read(self, source, name))
    out = read_tensors(merge(base, adapter, tmp_path / "out", dtype="fp32").output)
    assert not copies & set(read)
    source = read_tensors(base)
    for name in copies:
        assert out[name].dtype == torch.float32 and torch.equal(out[name], source[name].float()), name


@pytest.mark.parametrize("sharded", [False, True])
def test_output_identical_with_and_without_direct_io(tiny_bases, make_adapter, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, sharded: bool) -> None:
    base = tiny_bases("llama", sharded=sharded)
    adapter = make_adapter(base, "lora")
    direct = merge(base, adapter, tmp_path / "direct").output
    monkeypatch.setenv("D2MERGE_DIRECT_IO", "0")
    buffered = merge(base, adapter, tmp_path / "buffered").output
    names = sorted(p.name for p in direct.iterdir())
    assert names == sorted(p.name for p in buffered.iterdir())
    for name in names:
        assert (direct / name).read_bytes() == (buffered / name).read_bytes(), name


def _force_direct_reads(monkeypatch: pytest.MonkeyPatch) -> list[TensorReader]:
    """Take the cold-base path (prefetch thread, O_DIRECT reads) whatever the page cache holds."""
    from d2merge.io import direct_io

    monkeypatch.setattr(direct_io, "DIRECT_READ_BELOW_RESIDENT", 1.01)
    readers: list[TensorReader] = []
    real_init = TensorReader.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, *args, **kwargs)
        if kwargs.get("schedule"):
            readers.append(self)

    monkeypatch.setattr(TensorReader, "__init__", init)
    return readers


@pytest.mark.parametrize("refuse", [False, True])
def test_direct_prefetched_reads_give_the_same_output(tiny_bases, make_adapter, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, refuse: bool) -> None:
    import os

    base = tiny_bases("llama", sharded=True)
    adapter = make_adapter(base, "dora")
    reference = merge(base, adapter, tmp_path / "reference")
    readers = _force_direct_reads(monkeypatch)
    if refuse:  # a filesystem that refuses O_DIRECT: the prefetch thread reads the ordinary way
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda path, flags, *a: (_ for _ in ()).throw(OSError(22, "EINVAL"))
                            if flags & os.O_DIRECT and not flags & os.O_WRONLY else real_open(path, flags, *a))
    result = merge(base, adapter, tmp_path / "direct")
    assert result.source_hashes == reference.source_hashes
    for path in reference.output.iterdir():
        assert (result.output / path.name).read_bytes() == path.read_bytes(), path.name
    assert len(readers) == 1 and (readers[0].direct_bytes == 0) == refuse


def test_direct_reads_report_a_truncated_base_in_one_line(tiny_bases, make_adapter, writable_copy, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from d2merge.errors import D2MergeError
    from d2merge.io.checkpoint import open_base

    base = writable_copy(tiny_bases("llama"))
    adapter = make_adapter(tiny_bases("llama"), "lora")
    opened = open_base(base)  # headers checked while the file is whole
    _force_direct_reads(monkeypatch)
    weights = base / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 1000)
    with pytest.raises(D2MergeError, match="file ended") as caught:
        merge(opened, adapter, tmp_path / "out")
    assert "model.safetensors" in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("staging", [1, 3])  # staging buffers of 1 and 3 blocks: most row blocks straddle two
def test_merged_rows_go_straight_to_staging_with_the_same_bytes(tiny_bases, make_adapter, read_tensors,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               dtype: str, staging: int) -> None:
    """Row blocks cast into the file's staging buffers equal the whole-tensor computation, byte for byte.

    Blocks are made small (3 rows) so every tensor is many blocks, many of them
    straddling two staging buffers.
    And no merged tensor of a row-separable method is ever held whole (that is what
    keeps a 7B fp32 output's memory at the read buffers).
    """
    import d2merge.engine as engine
    from d2merge.io import direct_io

    base = tiny_bases("llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, "lora")
    merge_plan = plan(base, adapter, dtype=dtype)
    cols = {t.shape[-1] for t in merge_plan.tensors if t.action == "merge"}
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 3 * max(cols))
    expected = {item.name: engine.compute_tensor(merge_plan, item).clone() for item in merge_plan.tensors}
    monkeypatch.setattr(direct_io, "STAGING_BYTES", staging * direct_io.ALIGNMENT)
    whole: list[int] = []
    real_output = engine.ScratchBuffers.output
    monkeypatch.setattr(engine.ScratchBuffers, "output", lambda self, n: whole.append(n) or real_output(self, n))
    out = read_tensors(merge(base, adapter, tmp_path / "out", dtype=dtype).output)
    assert sorted(out) == sorted(expected)
    for name, tensor in expected.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name].view(torch.uint8), tensor.view(torch.uint8)), name
    merged = [t for t in merge_plan.tensors if t.action == "merge"]
    assert merged and not whole, "merged tensors must not be staged whole"


def test_non_finite_merged_rows_are_refused_with_the_whole_count(tiny_bases, make_adapter, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN in the merged rows: one line with the tensor's whole NaN count, and no output."""
    from d2merge.errors import D2MergeError
    from d2merge.io import direct_io
    from d2merge.methods.lora import LoRA

    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    merge_plan = plan(base, adapter)
    target = next(t for t in merge_plan.tensors if t.action == "merge")
    real_rows = LoRA.merge_rows_
    monkeypatch.setattr(direct_io, "STAGING_BYTES", direct_io.ALIGNMENT)
    import d2merge.engine as engine

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 5 * target.shape[1])  # many blocks

    def poisoned(self, w, factors, settings, rows):  # type: ignore[no-untyped-def]
        merged = real_rows(self, w, factors, settings, rows)
        merged[:, 0] = float("nan")  # one NaN per row, in every block: the first merged tensor fails
        return merged

    monkeypatch.setattr(LoRA, "merge_rows_", poisoned)
    with pytest.raises(D2MergeError, match=rf"merged weight has {target.shape[0]} NaN/Inf value\(s\)") as caught:
        merge(base, adapter, tmp_path / "out")
    assert target.name in str(caught.value)
    assert not (tmp_path / "out").exists()

