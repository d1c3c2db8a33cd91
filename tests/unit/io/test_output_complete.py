"""One definition of a finished output (``io.output.check_complete``), shared by push and merge-many's reruns.

Each damaged copy of a real merge output is refused by the function itself, by ``d2merge push``'s
check (``hub.check_folder_complete``) and by merge-many's rerun check (``provenance.output_matches``);
the undamaged output is accepted by all three.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from d2merge.errors import D2MergeError
from d2merge.export.hf_folder import merge_to_hf_folder
from d2merge.export.pipeline import MergeResult
from d2merge.export.provenance import output_matches
from d2merge.export.single_file import merge_to_safetensors
from d2merge.hub import check_folder_complete
from d2merge.io.output import OUTPUT_MARKER, TEMP_MARKER, check_complete
from d2merge.options import MergeOptions


@pytest.fixture(scope="module")
def finished(tiny_bases: Any, make_adapter: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
             ) -> MergeResult:
    """A sharded HF folder as ``d2merge merge`` writes it (index, shards, config, tokenizer, card, marker)."""
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora", seed=5)
    result = merge_to_hf_folder(base, adapter, tmp_path_factory.mktemp("complete") / "merged",
                                MergeOptions(max_shard_size="20KB"))
    assert len(result.plan.shard_names) > 1, "the fixture must be sharded"
    return result


def _drop_a_shard(folder: Path) -> str:
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    return shard.name


def _drop_the_marker(folder: Path) -> str:
    (folder / OUTPUT_MARKER).unlink()
    return OUTPUT_MARKER


def _leave_a_temp(folder: Path) -> str:
    name = f".model-00001.safetensors{TEMP_MARKER}4242"
    (folder / name).write_bytes(b"half")
    return name


def _truncate_a_shard(folder: Path) -> str:
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    return shard.name


def _drop_a_file_only_the_marker_names(folder: Path) -> str:
    (folder / "tokenizer.json").unlink()  # no index names it: only the marker knows it belongs there
    return "tokenizer.json"


DAMAGES = {"missing-shard": _drop_a_shard, "missing-marker": _drop_the_marker, "half-written": _leave_a_temp,
           "truncated-shard": _truncate_a_shard, "missing-listed-file": _drop_a_file_only_the_marker_names}


def test_the_finished_output_is_accepted_by_all(finished: MergeResult) -> None:
    check_complete(finished.output, written_by_d2merge=True)
    check_folder_complete(finished.output)
    assert output_matches(finished.plan, finished.output, finished.source_hashes, is_file=False)


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_a_damaged_output_is_refused_by_the_one_function_and_both_callers(finished: MergeResult, tmp_path: Path,
                                                                          damage: str) -> None:
    folder = tmp_path / "merged"
    shutil.copytree(finished.output, folder)
    assert output_matches(finished.plan, folder, finished.source_hashes, is_file=False)  # the copy is whole
    named = DAMAGES[damage](folder)

    with pytest.raises(D2MergeError) as refused:
        check_complete(folder, written_by_d2merge=True)
    assert named in str(refused.value) and "\n" not in str(refused.value)
    assert not output_matches(finished.plan, folder, finished.source_hashes, is_file=False)
    if damage == "missing-marker":
        # push takes folders made elsewhere (a Hub snapshot, a training run's): the marker is not asked of them
        check_complete(folder)
        check_folder_complete(folder)
        return
    with pytest.raises(D2MergeError) as pushed:
        check_folder_complete(folder)
    assert str(pushed.value) == str(refused.value)  # push says what the one function says


def test_a_single_file_output_cut_short_is_refused(tiny_bases: Any, make_adapter: Callable[..., Path],
                                                   tmp_path: Path) -> None:
    base = tiny_bases("llama")
    result = merge_to_safetensors(base, make_adapter(base, "lora", seed=6), tmp_path / "merged.safetensors")
    check_complete(result.output, written_by_d2merge=True)
    assert output_matches(result.plan, result.output, result.source_hashes, is_file=True)
    assert not output_matches(result.plan, result.output, result.source_hashes, is_file=False)  # not a folder

    result.output.write_bytes(result.output.read_bytes()[:-10])
    with pytest.raises(D2MergeError):
        check_complete(result.output, written_by_d2merge=True)
    assert not output_matches(result.plan, result.output, result.source_hashes, is_file=True)
    result.output.unlink()
    with pytest.raises(D2MergeError, match="no such output"):
        check_complete(result.output)


def test_the_merge_of_a_base_without_config_is_finished_without_one(tiny_bases: Any, make_adapter: Callable[..., Path],
                                                                       tmp_path: Path) -> None:
    """A base with no config.json merges into a folder with none: merge-many's rerun still takes it as done
    (push, which needs a model folder, still refuses it)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_bases("llama"), base)
    adapter = make_adapter(base, "lora", seed=6)
    (base / "config.json").unlink()
    result = merge_to_hf_folder(base, adapter, tmp_path / "merged", MergeOptions())
    assert not (result.output / "config.json").exists()
    assert output_matches(result.plan, result.output, result.source_hashes, is_file=False)
    with pytest.raises(D2MergeError, match="no config.json"):
        check_folder_complete(result.output)
