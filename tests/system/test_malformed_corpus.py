"""Every malformed input in tests/malformed.py gives one clean line, exit 2, and leaves nothing behind.

Most cases run in-process through `d2merge.cli.main` (fast); a handful run the real CLI in a
subprocess, and two need one: a read-only output parent and a full disk. chmod does not stop
root, so as root the read-only run first drops the capabilities that bypass file modes
(CAP_DAC_OVERRIDE and friends, via PR_CAPBSET_DROP and a re-exec); a full disk is
RLIMIT_FSIZE with SIGXFSZ ignored, so a write past the limit fails with EFBIG as a full disk
fails with ENOSPC, and both take the same path in d2merge.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import d2merge.cli
from d2merge.errors import D2MergeError
from d2merge.io.output import WORK_MARKERS
from helpers import REPO_ROOT, assert_one_line_error, checkout_env
from malformed import CASES, MARKER, WORKING, Case, Snapshot, Workspace, build_case, write_templates

# A write limit below the size of the first output shard (the tiny base is ~23 KB).
FSIZE_LIMIT = 8 * 1024
ERROR_PREFIX = "d2merge: error: "
# Subprocess runs cannot show the exception object; there the hint must close the line.
HINT_AT_END = re.compile(r" \([^()]*[a-z][^()]{8,}\)$")
SKIP_EXIT = 77

FULL_DISK = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, {FSIZE_LIMIT}))
"""
# Root ignores file modes through three capabilities; drop them from the bounding set and re-exec,
# so the new image runs without them (still uid 0, so it can read root's Python install).
DROP_FILE_MODE_OVERRIDES = f"""
import ctypes, os
if os.geteuid() == 0 and not os.environ.get("D2MERGE_TEST_CAPS_DROPPED"):
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            print("cannot drop capabilities", ctypes.get_errno(), file=sys.stderr)
            sys.exit({SKIP_EXIT})
    os.environ["D2MERGE_TEST_CAPS_DROPPED"] = "1"
    os.execv(sys.executable, sys.orig_argv)
"""


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_templates(tmp_path_factory.mktemp("templates"))


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("D2MERGE_DEBUG", raising=False)
    # main() turns --debug on for the rest of the process; no test may inherit it.
    monkeypatch.setitem(d2merge.cli._DEBUG, "on", False)


@pytest.fixture
def raised(monkeypatch: pytest.MonkeyPatch) -> list[D2MergeError]:
    """Every D2MergeError created during the test, to read the hint of the one the CLI printed."""
    errors: list[D2MergeError] = []
    original = D2MergeError.__init__

    def record(self: D2MergeError, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        errors.append(self)

    monkeypatch.setattr(D2MergeError, "__init__", record)
    return errors


def run_inprocess(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        d2merge.cli.main(argv)
    out, err = capsys.readouterr()
    d2merge.cli._DEBUG["on"] = False
    return int(exited.value.code or 0), out, err


def subprocess_env() -> dict[str, str]:
    return checkout_env(drop=("D2MERGE_TEST_CAPS_DROPPED",), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")


def start_subprocess(argv: list[str], *, prelude: str = "", cwd: Path = REPO_ROOT) -> subprocess.Popen[str]:
    """`d2merge ARGV` in a fresh interpreter; `prelude` runs first (limits, dropped capabilities)."""
    code = f"import sys\n{prelude}\nfrom d2merge.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=cwd, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def subprocess_prelude(case: Case) -> str | None:
    """The prelude a case runs its subprocess with, or None for an in-process case."""
    if case.runner == "subprocess":
        return ""
    if case.runner == "fsize":
        return FULL_DISK
    if case.runner == "readonly" and os.geteuid() == 0:
        return DROP_FILE_MODE_OVERRIDES
    return None


@dataclass
class Launched:
    ws: Workspace
    before: Snapshot
    proc: subprocess.Popen[str]


class SubprocessCases:
    """Starts subprocess cases on demand. In a plain pytest run the first request starts all of them
    (interpreter start-up dominates, and they overlap); under pytest-xdist the workers already run in
    parallel and may each get a share of the cases, so each case starts only its own process."""

    def __init__(self, templates: Path, tmp_path_factory: pytest.TempPathFactory):
        self.templates, self.tmp_path_factory = templates, tmp_path_factory
        self.runs: dict[str, Launched] = {}

    def __getitem__(self, case: Case) -> Launched:
        if case.id not in self.runs:
            batch = [case] if os.environ.get("PYTEST_XDIST_WORKER") else IN_SUBPROCESS
            for c in batch:
                if c.id not in self.runs:
                    ws, argv = build_case(c, self.tmp_path_factory.mktemp("subprocess-case") / "case", self.templates)
                    proc = start_subprocess(argv, prelude=subprocess_prelude(c) or "")
                    self.runs[c.id] = Launched(ws, Snapshot.of(ws.root), proc)
        return self.runs[case.id]

    def close(self) -> None:
        for run in self.runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
            run.proc.communicate()
            for path in [run.ws.root, *run.ws.root.rglob("*")]:  # let pytest clean up read-only folders
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)


@pytest.fixture(scope="module")
def launched(templates: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubprocessCases]:
    cases = SubprocessCases(templates, tmp_path_factory)
    try:
        yield cases
    finally:
        cases.close()


def assert_clean_error(case: Case, code: int, out: str, err: str, errors: list[D2MergeError] | None = None) -> str:
    """Exit 2, exactly one line on stderr that names the file (and tensor) and says what to do."""
    line = assert_one_line_error(code, out, err)  # "d2merge: error:", not "internal error" (a bug in d2merge)
    assert out == "", out
    assert re.search(case.expect, line), f"expected /{case.expect}/ in: {line}"
    assert case.file in line, f"expected the file {case.file!r} in: {line}"
    if case.tensor:
        assert f"tensor '{case.tensor}'" in line, line
    if errors is not None:
        shown = [e for e in errors if ERROR_PREFIX + str(e) == line]
        assert shown and shown[-1].hint, f"no hint (what to do) in: {line}"
    else:
        assert HINT_AT_END.search(line), f"no hint (what to do) at the end of: {line}"
    return line


def assert_nothing_left(ws: Workspace, before: Snapshot) -> None:
    after = Snapshot.of(ws.root)
    assert before.diff(after) == [], "the failed run changed the case folder"
    leftovers = [p for p in ws.root.rglob("*") if any(marker in p.name for marker in WORK_MARKERS)]
    assert leftovers == []
    assert not ws.marker.exists(), "a pickle payload ran"


IN_PROCESS = [c for c in CASES if subprocess_prelude(c) is None]
IN_SUBPROCESS = [c for c in CASES if subprocess_prelude(c) is not None]


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c.id for c in IN_PROCESS])
def test_malformed_input_gives_one_clean_line(case: Case, templates: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], raised: list[D2MergeError]) -> None:
    ws, argv = build_case(case, tmp_path / "case", templates)
    before = Snapshot.of(ws.root)
    code, out, err = run_inprocess(argv, capsys)  # (pytest's cleanup copes with a read-only folder)
    assert_clean_error(case, code, out, err, raised)
    assert_nothing_left(ws, before)


@pytest.mark.slow
@pytest.mark.parametrize("case", IN_SUBPROCESS, ids=[c.id for c in IN_SUBPROCESS])
def test_malformed_input_in_a_real_process(case: Case, launched: SubprocessCases) -> None:
    run = launched[case]
    code, out, err = finish(run.proc)
    if case.runner == "readonly" and code == SKIP_EXIT:
        pytest.skip(f"root cannot drop CAP_DAC_OVERRIDE here: {err.strip()}")
    assert_clean_error(case, code, out, err)
    assert_nothing_left(run.ws, run.before)


# -- the corpus itself ----------------------------------------------------------------------------


def test_corpus_covers_the_issue() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 40
    for needed in ("base-st-empty", "adapter-st-empty", "base-st-truncated-in-header", "adapter-st-truncated-in-data",
                   "base-st-header-length-past-eof", "adapter-st-invalid-json", "base-st-overlapping-offsets",
                   "adapter-st-offsets-out-of-range", "base-st-shape-does-not-match-bytes",
                   "adapter-st-dtype-does-not-match-bytes", "config-missing", "config-not-json",
                   "config-unknown-peft-type", "config-missing-r", "config-rank-zero", "config-rank-negative",
                   "config-tau-nan", "config-alpha-infinity", "adapter-tensor-missing", "adapter-tensor-extra",
                   "adapter-tensor-wrong-shape", "adapter-rank-differs-from-config", "adapter-tensor-nan",
                   "adapter-tensor-inf", "adapter-for-another-base-module", "adapter-for-another-hidden-size",
                   "base-index-missing-shard", "base-pickle-without-opt-in", "adapter-pickle-payload-allowed-raw",
                   "base-pickle-payload-allowed-zip",
                   "out-equals-base", "out-inside-adapter", "out-parent-read-only", "out-disk-full"):
        assert needed in ids
    runners = {c.runner for c in CASES}
    assert {"inprocess", "subprocess", "readonly", "fsize"} <= runners


def test_templates_merge_cleanly(templates: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each case breaks exactly one thing: unbroken, the same inputs merge (single file and sharded)."""
    for base in ("base", "sharded"):
        code, out, err = run_inprocess(["merge", str(templates / base), str(templates / "adapter"),
                                        "-o", str(tmp_path / base), "-q"], capsys)
        assert code == 0, err
        assert err == ""
        assert "merged 4 tensors (d2lora)" in out


# -- --debug and repeated in-process calls --------------------------------------------------------


def test_debug_shows_the_traceback_then_the_line(templates: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 raised: list[D2MergeError]) -> None:
    case = next(c for c in CASES if c.id == "adapter-tensor-nan")
    ws, argv = build_case(case, tmp_path / "case", templates)
    before = Snapshot.of(ws.root)
    code, _, err = run_inprocess(["--debug", *argv], capsys)
    assert code == 2
    assert "Traceback" in err and "D2MergeError" in err
    assert err.splitlines()[-1].startswith(ERROR_PREFIX)
    assert_nothing_left(ws, before)
    code, out, err = run_inprocess(argv, capsys)
    assert_clean_error(case, code, out, err, raised)


# -- paths that must work -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference_output(templates: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from d2merge.api import merge

    root = tmp_path_factory.mktemp("reference")
    ws = Workspace(root, templates)
    ws.copy("base")
    ws.copy("adapter")
    merge(ws.base, ws.adapter, ws.out)
    return {p.name: p.read_bytes() for p in ws.out.iterdir()}


@pytest.mark.parametrize("paths", WORKING, ids=[w.id for w in WORKING])
def test_symlinked_and_relative_paths_work(paths, templates: Path, reference_output: dict[str, bytes],
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace(tmp_path / "case", templates)
    ws.root.mkdir()
    argv, out, cwd = paths.build(ws)
    if cwd is not None:
        monkeypatch.chdir(cwd)
    code, stdout, err = run_inprocess(argv, capsys)
    assert (code, err) == (0, ""), err
    assert "merged 4 tensors" in stdout
    assert out.is_dir() and not out.is_symlink()
    produced = {p.name: p.read_bytes() for p in out.iterdir()}
    if paths.id == "base-as-a-single-file":  # a bare .safetensors base has no config or tokenizer to copy
        assert sorted(produced) == [".d2merge-output.json", "README.md", "model.safetensors"]
    else:
        assert sorted(produced) == sorted(reference_output)
    # Weights and config are byte-identical to the plain-path merge (the card may name sources differently).
    for name in produced:
        if name not in ("README.md", ".d2merge-output.json"):
            assert produced[name] == reference_output[name], name
    assert [p for p in ws.root.rglob("*") if ".d2merge-" in p.name and p.name != ".d2merge-output.json"] == []
    assert not (ws.root / MARKER).exists()


# -- unusual but valid inputs (issue 10) ----------------------------------------------------------


def test_float8_adapter_factors_merge_as_their_exact_fp32_values(templates: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Once NotImplementedError "sum_cpu" from the NaN screen: fp8 factors are upcast exactly, then merged."""
    from malformed import adapter_tensors, write_adapter

    from d2merge.io.safetensors_file import SafetensorsFile

    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in adapter_tensors().items()}
    write_adapter(tmp_path / "fp8", tensors=fp8)
    write_adapter(tmp_path / "fp32", tensors={k: v.float() for k, v in fp8.items()})
    for name in ("fp8", "fp32"):
        code, out, err = run_inprocess(["merge", str(templates / "base"), str(tmp_path / name),
                                        "-o", str(tmp_path / f"out-{name}"), "-q"], capsys)
        assert (code, err) == (0, ""), err
    got, want = SafetensorsFile(tmp_path / "out-fp8" / "model.safetensors"), SafetensorsFile(
        tmp_path / "out-fp32" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in got.keys():
        assert torch.equal(got.read(key), want.read(key)), key
