"""The engine's I/O: copies stream file to file (also when cast), output equal whatever the I/O mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2merge.io.tensor_reader import TensorReader
from d2merge.merge import merge, plan


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
