"""A merge killed (SIGKILL) or interrupted (SIGINT) at any point leaves nothing that looks complete.

tests/interrupt_driver.py runs the real CLI in a subprocess and signals itself at a chosen
point: after the 1st tensor, after a tensor in the second shard, after the last tensor (its
shard not yet closed), and just before the temp folder is renamed into place. The output is
sharded (4 shards and an index) so that "some shards written, no index yet" is a real state.

- SIGKILL: no output folder; the temp folder `.out.d2merge-tmp-<pid>` stays, holding no
  index, config or model card unless every shard was done; the next run removes it (its pid
  is dead) and writes output byte-identical to an uninterrupted run.
- SIGINT: exit 130 with "d2merge: interrupted", no output folder and no temp folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import d2merge.cli
from d2merge.io.output import OUTPUT_MARKER, TEMP_MARKER
from helpers import TESTS_DIR, checkout_env
from malformed import write_templates
DRIVER = TESTS_DIR / "interrupt_driver.py"
SHARD_SIZE = "8KB"  # the tiny base in 4 output shards
TENSORS = 21
POINTS = ("tensor:1", "tensor:11", f"tensor:{TENSORS}", "commit")
# Written only once every shard is complete (the model card and the files copied from the base).
METADATA = {"model.safetensors.index.json", "config.json", "README.md", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_templates(tmp_path_factory.mktemp("interrupt-inputs"))


def merge_args(inputs: Path) -> list[str]:
    return ["merge", str(inputs / "base"), str(inputs / "adapter"), "--max-shard-size", SHARD_SIZE, "-q"]


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setitem(d2merge.cli._DEBUG, "on", False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        d2merge.cli.main(argv)
    return int(exited.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """An uninterrupted run's output, file by file."""
    from d2merge import merge

    out = tmp_path_factory.mktemp("reference") / "out"
    merge(inputs / "base", inputs / "adapter", out, max_shard_size=SHARD_SIZE)
    files = read_folder(out)
    assert sum(name.endswith(".safetensors") for name in files) == 4
    assert METADATA <= set(files)
    return files


@dataclass
class DriverRun:
    workdir: Path
    proc: subprocess.Popen[str]
    result: tuple[int, str, list[dict]] | None = None

    def wait(self) -> tuple[int, str, list[dict]]:
        if self.result is None:
            _, err = self.proc.communicate(timeout=180)
            report = self.workdir / "report.jsonl"
            lines = report.read_text().splitlines() if report.exists() else []
            self.result = (self.proc.returncode, err, [json.loads(line) for line in lines])
        return self.result


def start_driver(workdir: Path, signal_name: str, points: tuple[str, ...], inputs: Path) -> DriverRun:
    workdir.mkdir(parents=True)
    env = checkout_env(PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(workdir / "report.jsonl"), signal_name, *points, "--",
                             *merge_args(inputs)], cwd=workdir, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return DriverRun(workdir, proc)


class Drivers:
    """One SIGKILL run per point and one SIGINT run through every point, started on demand: all
    together at the first request in a plain pytest run, each by the test that needs it under
    pytest-xdist (whose workers already run in parallel and may each get a share of the tests)."""

    def __init__(self, inputs: Path, root: Path):
        self.inputs, self.root = inputs, root
        self.plans = {f"KILL {point}": ("KILL", (point,)) for point in POINTS}
        self.plans["INT"] = ("INT", POINTS)
        self.runs: dict[str, DriverRun] = {}

    def __getitem__(self, key: str) -> DriverRun:
        if key not in self.runs:
            for k in ([key] if os.environ.get("PYTEST_XDIST_WORKER") else list(self.plans)):
                if k not in self.runs:
                    signal_name, points = self.plans[k]
                    self.runs[k] = start_driver(self.root / f"run-{len(self.runs)}", signal_name, points, self.inputs)
        return self.runs[key]

    def close(self) -> None:
        for run in self.runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
            run.proc.communicate()


@pytest.fixture(scope="module")
def drivers(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drivers]:
    runs = Drivers(inputs, tmp_path_factory.mktemp("interrupted"))
    try:
        yield runs
    finally:
        runs.close()


def temp_folders(parent: Path) -> list[Path]:
    return sorted(parent.glob(f".out{TEMP_MARKER}*"))


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_sigkill_leaves_no_output_and_a_rerun_matches(point: str, drivers: Drivers, inputs: Path,
                                                       reference: dict[str, bytes],
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = drivers[f"KILL {point}"]
    code, err, report = run.wait()
    assert code == -9, err
    assert [r["point"] for r in report] == [point], err
    fired = report[0]
    parent = run.workdir / "0"
    out = parent / "out"

    assert not out.exists(), "a killed merge must leave no output folder"
    temps = temp_folders(parent)
    assert [t.name for t in temps] == [f".out{TEMP_MARKER}{fired['pid']}"]
    left = {p.name for p in temps[0].iterdir()}
    assert left == set(fired["listing"])  # nothing was written after the signal
    if point == "commit":
        # complete, but hidden: only the rename makes it visible (the commit adds the output marker)
        assert left == set(reference) - {OUTPUT_MARKER}
    else:
        assert not left & METADATA, f"index/config/card written before every shard was done: {sorted(left)}"
        assert left <= {name for name in reference if name.endswith(".safetensors")}

    # The next run removes the dead run's temp folder and writes the same bytes.
    code, err = run_cli([*merge_args(inputs), "-o", str(out)], capsys, monkeypatch)
    assert (code, err) == (0, "")
    assert temp_folders(parent) == []
    assert read_folder(out) == reference


@pytest.mark.slow
def test_sigint_removes_the_temp_folder_at_every_point(drivers: Drivers, inputs: Path,
                                                      reference: dict[str, bytes],
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    code, err, report = drivers["INT"].wait()
    assert code == 0, err  # the driver itself finishes; each interrupted merge exited 130
    assert "Traceback" not in err, err
    assert err.count("d2merge: interrupted") == len(POINTS), err
    assert [line for line in err.splitlines() if line.strip()] == ["d2merge: interrupted"] * len(POINTS)
    for i, point in enumerate(POINTS):
        fired, ended = [r for r in report if r["point"] == point]
        assert ended["exit"] == 130, (point, ended)
        parent = drivers["INT"].workdir / str(i)
        assert list(parent.iterdir()) == [], f"{point}: left {sorted(p.name for p in parent.iterdir())}"
        if point != "commit":
            assert not set(fired["listing"]) & METADATA, (point, fired["listing"])

    out = drivers["INT"].workdir / "0" / "out"
    code, err = run_cli([*merge_args(inputs), "-o", str(out)], capsys, monkeypatch)
    assert (code, err) == (0, "")
    assert read_folder(out) == reference


# -- stale temp folders: only those of dead runs are removed --------------------------------------


def test_rerun_keeps_temp_folders_of_live_runs_and_other_outputs(inputs: Path, tmp_path: Path,
                                                                 reference: dict[str, bytes],
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_pid = 2**22 + 1  # above Linux's largest pid_max: no such process
        dead = tmp_path / f".out{TEMP_MARKER}{dead_pid}"
        live = tmp_path / f".out{TEMP_MARKER}{sleeper.pid}"
        other = tmp_path / f".out2{TEMP_MARKER}{dead_pid}"  # another output's: not ours to clean
        odd = tmp_path / f".out{TEMP_MARKER}notapid"
        for folder in (dead, live, other, odd):
            folder.mkdir()
            (folder / "model-00001-of-00004.safetensors").write_bytes(b"partial")

        code, err = run_cli([*merge_args(inputs), "-o", str(tmp_path / "out")], capsys, monkeypatch)
        assert (code, err) == (0, "")
        assert not dead.exists()
        assert live.exists() and other.exists() and odd.exists()
        assert read_folder(tmp_path / "out") == reference
    finally:
        sleeper.kill()
        sleeper.wait()


def test_output_names_with_glob_characters_clean_only_their_own_temp_folders(
        inputs: Path, tmp_path: Path, reference: dict[str, bytes], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    dead_pid = 2**22 + 1
    own = tmp_path / f".run[1]{TEMP_MARKER}{dead_pid}"
    lookalike = tmp_path / f".run1{TEMP_MARKER}{dead_pid}"  # what the unescaped pattern "run[1]" matches
    star_victim = tmp_path / f".ab{TEMP_MARKER}1{dead_pid}"
    for folder in (own, lookalike, star_victim):
        folder.mkdir()

    code, err = run_cli([*merge_args(inputs), "-o", str(tmp_path / "run[1]")], capsys, monkeypatch)
    assert (code, err) == (0, "")
    assert not own.exists()
    assert lookalike.exists()
    code, err = run_cli([*merge_args(inputs), "-o", str(tmp_path / "a*")], capsys, monkeypatch)
    assert (code, err) == (0, "")
    assert star_victim.exists(), "output 'a*' removed the temp folder of output 'ab'"
    assert read_folder(tmp_path / "run[1]") == reference
