"""AtomicFolder's recovery from a run killed between commit's two renames (with --overwrite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from d2merge.io.output import OLD_MARKER, AtomicFolder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_previous_output_restored_when_nothing_replaced_it(tmp_path: Path) -> None:
    final = tmp_path / "merged"
    aside = tmp_path / f".merged{OLD_MARKER}{_dead_pid()}"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    with AtomicFolder(final, overwrite=True):
        assert (final / "config.json").read_text() == "{}"  # restored before the new run writes
    assert not aside.exists()


def test_superseded_previous_output_removed(tmp_path: Path) -> None:
    final = tmp_path / "merged"
    final.mkdir()
    (final / "config.json").write_text('{"new": 1}')
    aside = tmp_path / f".merged{OLD_MARKER}{_dead_pid()}"
    aside.mkdir()
    with AtomicFolder(final, overwrite=True):
        pass
    assert not aside.exists()
    assert (final / "config.json").read_text() == '{"new": 1}'


def test_live_process_left_alone(tmp_path: Path) -> None:
    final = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        aside = tmp_path / f".merged{OLD_MARKER}{proc.pid}"
        aside.mkdir()
        with AtomicFolder(final, overwrite=True):
            pass
        assert aside.exists() and not final.exists()
    finally:
        proc.kill()
        proc.wait()


def test_single_file_output_removes_a_killed_runs_temp_file(tmp_path: Path) -> None:
    from d2merge.export.single_file import merge_to_safetensors
    from d2merge.io.output import TEMP_MARKER
    from d2merge.synthetic import save_random_adapter, save_tiny_base

    base = save_tiny_base(tmp_path / "base", "llama")
    adapter = save_random_adapter(base, tmp_path / "adapter", "lora")
    stale = tmp_path / f".merged.safetensors{TEMP_MARKER}{_dead_pid()}"
    stale.write_bytes(b"partial")
    merge_to_safetensors(base, adapter, tmp_path / "merged.safetensors")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged.safetensors"]
