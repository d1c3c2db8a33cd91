"""d2merge's own safetensors reader against the reference implementation, safetensors.safe_open.

d2merge keeps its own reader (it streams and copies byte ranges, see
d2merge/io/safetensors_file.py), so it must agree with the format's own library: every
corrupt safetensors file of the malformed corpus (tests/malformed.py) is refused by both,
and every valid file of the corpus reads to the same tensors and metadata in both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from d2merge.errors import D2MergeError
from d2merge.io.safetensors_file import SafetensorsFile
from malformed import CASES, build_case, write_templates

# The cases that break the bytes of a safetensors file (header, offsets, dtypes, truncation).
CORRUPT = [c for c in CASES if "-st-" in c.id and c.file.endswith(".safetensors")]


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_templates(tmp_path_factory.mktemp("templates"))


def read_ours(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sf = SafetensorsFile(path)
    return {name: sf.read(name).clone() for name in sf.keys()}, dict(sf.metadata or {})


def read_reference(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})


def test_the_corpus_has_corrupt_files_for_both_inputs():
    assert {c.id.split("-st-")[0] for c in CORRUPT} == {"base", "adapter"} and len(CORRUPT) >= 30


@pytest.mark.parametrize("case", CORRUPT, ids=[c.id for c in CORRUPT])
def test_every_corrupt_file_is_refused_by_both_readers(case, templates, tmp_path):
    ws, _ = build_case(case, tmp_path / "case", templates)
    path = ws.root / case.file
    with pytest.raises(D2MergeError):
        read_ours(path)
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises SafetensorError, OSError, ValueError...
        read_reference(path)


def test_every_valid_file_reads_the_same(templates):
    files = sorted(templates.rglob("*.safetensors"))
    assert len(files) == 1 + 3 + 1  # the base, the three shards, the adapter
    for path in files:
        ours, our_metadata = read_ours(path)
        reference, reference_metadata = read_reference(path)
        assert sorted(ours) == sorted(reference), path
        assert our_metadata == reference_metadata, path
        for name, tensor in reference.items():
            assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, (path, name)
            assert torch.equal(ours[name], tensor), (path, name)
