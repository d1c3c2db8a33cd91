"""kill -9 at random points of merge, merge --overwrite, merge --format onnx and export-onnx.

Each run is a real CLI process (tests/kill_driver.py) killed either right after a chosen rename
of a d2merge work path (the states between the two renames of a commit: previous output set
aside, new one not yet in place) or after a random delay drawn from [0, the command's own
duration], so it lands anywhere: reading, merging, exporting, validating, committing.

After every kill: what stands at the output path is the previous output or the complete new one,
never anything else; once a d2merge run has recovered the path (what every run does first),
the previous output is back if the new one had not arrived (never lost). A rerun of the same
command then cleans up and succeeds: output byte-identical to an uninterrupted run, no temp,
set-aside or lock file left beside it. ``D2MERGE_KILL_RANDOM=N`` multiplies the random kills.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import d2merge.cli
from d2merge.io.output import WORK_MARKERS, recover_output
from helpers import TESTS_DIR, checkout_env
from malformed import adapter_tensors, write_adapter, write_nf4_base, write_templates

DRIVER = TESTS_DIR / "kill_driver.py"
RANDOM_SCALE = int(os.environ.get("D2MERGE_KILL_RANDOM", "1"))
OUTCOMES: Counter[str] = Counter()


@dataclass(frozen=True)
class Scenario:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (inputs, output path) -> CLI arguments
    output: str  # the output path's name inside a run's folder
    graph: bool  # the output is an ONNX graph file (else a merged folder)
    overwrite: bool  # a previous output is there and --overwrite is given
    gap_points: tuple[int, ...]  # replace:N kill points inside the commit
    random_kills: int


def _merge(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", str(inputs / "base"), str(inputs / "adapter"), "-o", str(out), "-q", "--max-shard-size", "8KB",
            *extra]


SCENARIOS = [
    # Random kills are kept few for CI's two cores; D2MERGE_KILL_RANDOM=3 gives the closing note's runs.
    Scenario("merge", lambda i, o: _merge(i, o), "out", False, False, (1,), 2),
    # renames: 1 the previous folder aside, 2 the new one in
    Scenario("merge-overwrite", lambda i, o: _merge(i, o, "--overwrite"), "out", False, True, (1, 2), 2),
    # a quantized (nf4) base: the dequantizing reads change nothing in how the output is committed
    Scenario("merge-nf4-base-overwrite", lambda i, o: ["merge", str(i / "nf4"), str(i / "adapter"), "-o", str(o), "-q",
                                                       "--max-shard-size", "8KB", "--overwrite"],
             "out", False, True, (2,), 1),
    # renames: 1 the fp32 scratch merge's commit, 2 the previous graph aside, 3 the new graph in. The
    # graph's commit is the export-onnx scenario's (one AtomicFiles), which kills at both of its renames;
    # here the kill between the renames is enough, and each point costs two dynamo exports.
    Scenario("merge-format-onnx", lambda i, o: _merge(i, o, "--format", "onnx", "--overwrite"), "model.onnx", True,
             True, (2,), 0),
    # adapter outputs (issue 26; combine and extract write through the same io/adapter_writer.py): the
    # AtomicFolder commit, renames 1 (previous aside) and 2 (new in)
    Scenario("convert-overwrite", lambda i, o: ["convert", str(i / "adapter"), "--base", str(i / "base"), "-o",
                                                str(o), "--overwrite"], "out", False, True, (1, 2), 1),
    Scenario("export-onnx", lambda i, o: ["export-onnx", str(i / "merged"), "-o", str(o), "--exporter", "legacy",
                                          "--opset", "17", "--overwrite"], "model.onnx", True, True, (1, 2), 1),
]

SCENARIOS_BY_ID = {s.id: s for s in SCENARIOS}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from d2merge.api import merge

    root = write_templates(tmp_path_factory.mktemp("kill9-inputs"))
    write_adapter(root / "adapter2", tensors={k: 2 * v for k, v in adapter_tensors().items()})
    write_nf4_base(root / "nf4")
    merge(root / "base", root / "adapter", root / "merged")
    merge(root / "base", root / "adapter2", root / "merged2")
    return root


def run_inprocess(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                  ) -> tuple[int, str]:
    monkeypatch.setitem(d2merge.cli._DEBUG, "on", False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        d2merge.cli.main(argv)
    return int(exited.value.code or 0), capsys.readouterr().err


def state(path: Path, graph: bool) -> dict[str, bytes] | None:
    """The output as a user sees it: every file of the folder, or the graph and its data file."""
    if graph:
        files = [p for p in (path, path.with_name(path.name + ".data")) if p.is_file()]
        return {p.name: p.read_bytes() for p in files} or None
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def work_leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if any(m in p.name for m in WORK_MARKERS))


def drive(point: str, argv: list[str], cwd: Path) -> tuple[int, str, float]:
    env = checkout_env(PYTHONDONTWRITEBYTECODE="1")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(DRIVER), point, "--", *argv], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)
    return proc.returncode, proc.stderr, time.perf_counter() - started


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_kill9_never_loses_the_previous_output_and_a_rerun_succeeds(
        scenario: Scenario, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    # The new output (an uninterrupted run of the very command) and the previous one it replaces.
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    code, err, _ = drive("delay:100000", scenario.argv(inputs, reference_dir / scenario.output), reference_dir)
    assert code == 0, err
    duration = float(err.splitlines()[-1].split()[-2])
    new = state(reference_dir / scenario.output, scenario.graph)
    assert new is not None
    previous_dir = tmp_path / "previous"
    previous_dir.mkdir()
    if scenario.overwrite:
        if scenario.graph:
            # Any graph of another merge is a previous output to keep; the legacy exporter makes one in
            # seconds, where merge --format onnx would add a dynamo export (its costliest step) to the test.
            argv = SCENARIOS_BY_ID["export-onnx"].argv(inputs, previous_dir / scenario.output)
            argv[1] = str(inputs / "merged2")
        else:
            argv = [a.replace(str(inputs / "adapter"), str(inputs / "adapter2")) if a == str(inputs / "adapter")
                    else a for a in scenario.argv(inputs, previous_dir / scenario.output)]
        assert run_inprocess(argv, monkeypatch, capsys)[0] == 0
    previous = state(previous_dir / scenario.output, scenario.graph)
    assert previous != new

    rng = random.Random(scenario.id)
    points = [f"replace:{n}" for n in scenario.gap_points]
    points += [f"delay:{rng.uniform(0, duration):.3f}" for _ in range(scenario.random_kills * RANDOM_SCALE)]
    outcomes = []
    for i, point in enumerate(points):
        run_dir = tmp_path / f"run-{i}"
        shutil.copytree(previous_dir, run_dir, symlinks=True)
        out = run_dir / scenario.output
        argv = scenario.argv(inputs, out)
        code, err, _ = drive(point, argv, run_dir)
        assert code in (-9, 0), f"{point}: {err}"
        killed = code == -9
        seen = state(out, scenario.graph)
        # Nothing (between the renames), the previous output, or the complete new one: never a partial one.
        assert seen in (None, previous, new), f"{point}: the output path holds a partial output"
        recover_output(out)  # what every d2merge run does before any work
        recovered = state(out, scenario.graph)
        assert recovered in (previous, new), f"{point}: the previous output was lost"
        if seen is None and previous is not None:
            outcome = "killed between the renames: previous output set aside, put back by recovery"
            assert recovered == previous
        elif not killed or seen == new:
            outcome = "finished before the kill" if not killed else "killed after the commit: new output complete"
        else:
            outcome = "killed before the commit: previous output intact" if previous else \
                "killed before the commit: no output"
        if seen == new and not scenario.overwrite:
            code, err = run_inprocess(argv, monkeypatch, capsys)  # already there: refused, not replaced
            assert code == 2 and "output already exists" in err, err
        else:
            code, err = run_inprocess(argv, monkeypatch, capsys)
            assert code == 0, f"{point}: the rerun failed: {err}"
        assert state(out, scenario.graph) == new, f"{point}: the rerun's output differs from an uninterrupted run"
        assert work_leftovers(run_dir) == [], f"{point}: left {work_leftovers(run_dir)}"
        outcomes.append(f"{point}: {outcome}")
        OUTCOMES[f"{scenario.id}: {outcome}"] += 1
    print(f"\n{scenario.id}: {len(points)} kill -9 runs, all recovered", *outcomes, sep="\n  ")
    assert len(outcomes) == len(points)
