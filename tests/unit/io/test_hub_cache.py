"""A base given as a Hub repo id resolves through the local Hugging Face cache, never the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from d2merge.api import merge
from d2merge.cli import main
from d2merge.io.checkpoint import open_base
from d2merge.synthetic import save_random_adapter, save_tiny_base

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache laid out as `hf download` leaves it: models--org--name/{refs/main, snapshots/<commit>/}."""
    cache = tmp_path / "hub-cache"
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    save_tiny_base(tmp_path / "src", "llama")
    shutil.copytree(tmp_path / "src", snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_repo_id_resolves_to_the_cached_snapshot(hub_cache: Path, tmp_path: Path) -> None:
    base = open_base(REPO)
    assert base.location == hub_cache
    adapter = save_random_adapter(hub_cache, tmp_path / "adapter", "lora", base_model_name_or_path=REPO)
    out = merge(REPO, adapter, tmp_path / "merged").output
    card = (out / "README.md").read_text()
    assert f'base_model:\n- "{REPO}"' in card  # the Hub id, not the snapshot path
    reference = merge(hub_cache, adapter, tmp_path / "from-path").output
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert torch.equal(open_base(out).tensors.read("model.norm.weight"),
                       open_base(hub_cache).tensors.read("model.norm.weight"))


def test_repo_id_not_in_cache_says_how_to_download(hub_cache: Path, tmp_path: Path, capsys) -> None:
    adapter = save_random_adapter(hub_cache, tmp_path / "adapter", "lora")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "other-org/not-cached", str(adapter), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "hf download other-org/not-cached" in err[0]
    assert not (tmp_path / "out").exists()
