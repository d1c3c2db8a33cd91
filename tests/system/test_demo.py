"""The README's main job, `d2merge demo`, runs end to end (shortened: few training steps, and a zero
target time, so that it skips the ONNX export and the bench as it does on a crawling machine)."""

from __future__ import annotations

import pytest

from d2merge.cli import main


@pytest.mark.slow
def test_demo_quick_runs_and_passes_verification(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        # --seconds 0: past twice the target before the ONNX step, so it and the bench are skipped
        main(["demo", "--workdir", str(tmp_path), "--train-steps", "30", "--seconds", "0"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    for step in ("build base model", "train D2-LoRA adapter", "merge (streaming, fp32)", "check against fp64",
                 "verify merged vs unmerged"):
        assert step in out
    assert "merge gap (pp)" in out and "PASS" in out
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "eval.jsonl").is_file()
    # it ends with what it showed, in sentences, then what to do with one's own base and adapter
    from d2merge.demo_figures import THREE_COMMANDS

    assert "summary:" in out and "  verify  PASS in fp32 and bf16; merge gap" in out
    assert "skipped the ONNX export and the bench" in out and not (tmp_path / "onnx").exists()
    assert out.rstrip().splitlines()[-3:] == ["  " + line for line in THREE_COMMANDS]
    assert "demo finished in " in out
