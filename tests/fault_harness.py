"""Faults on every output: kill -9, Ctrl-C, a full disk and a read-only destination, for any CLI command.

tests/system/test_fault_paths.py runs every :data:`KINDS` entry through four faults and checks the same
promise each time (docs/faults.md):

- **kill -9**: SIGKILL right after each rename of a d2merge work path (the states between the
  renames of a commit) and after seeded random delays drawn from the command's own duration;
- **Ctrl-C**: SIGINT at the same points (the process lives on, so it must clean up itself);
- **a full disk**: the run's folder is a tmpfs sized to fill up part way through the write, and
  sized to hold the output's files but not the work files beside them (the commit's journal);
- **a read-only destination**: the run's folder is remounted read-only (root ignores file modes).

Afterwards: the output path holds nothing, the previous output, or the complete new one, never
anything else; a run that fails while alive (full disk, read-only, Ctrl-C) leaves the previous
output exactly as it was; once recovered (what every run does first) the previous output is
back if the new one had not arrived; the next run succeeds, writes the same bytes as a clean
run, and no ``.d2merge-*`` work file (temp, set-aside, lock, journal) is left anywhere.

Each faulty run is a fork of the test process (torch and d2merge already imported, so a run
costs the command's own time, not an interpreter start), running ``d2merge.cli.main``.

Adding an output is one entry in :data:`KINDS`, e.g. a K-quant GGUF::

    OutputKind("gguf-q4_k_m", "out.gguf", lambda i, out, previous: [
        "merge", i.bpe_base, i.bpe_adapter2 if previous else i.bpe_adapter, "-o", out, "-q",
        "--format", "gguf", "--gguf-type", "q4_k_m"], needs=("bpe",)),

``command(inputs, out, previous)`` returns the CLI arguments that write the output at ``out``;
``previous=True`` must write a *different* output at the same path (the one ``--overwrite``
replaces; another adapter or seed). ``output`` is the output's name in its run folder (a folder
name, or a file name with its suffix). ``overwrite`` is what makes the command replace an existing
output (``()`` for a report that is always replaced). Inputs the command needs beyond
:class:`Inputs`' defaults go in ``needs`` (``"bpe"``: the tiny base with SmolLM2's byte-level
tokenizer that GGUF needs; ``"llama_cpp"``: skipped without llama-cpp-python; ``"nf4"``: an nf4-quantized base and two
adapters over it). ``cost="slow"`` marks a command of a second or more (GGUF, ONNX,
verify): CI runs only its ``--overwrite`` case, one point per fault; ``cost="full"`` runs it only
in the full sweep.

``D2MERGE_FAULTS_FULL=1`` runs the full sweep: every rename point for a fresh output and for an
``--overwrite``, ``D2MERGE_FAULTS_RANDOM`` (default 10) random kill and Ctrl-C points for each,
and every tmpfs size from the previous output's pages plus one to the new output's pages plus three.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FULL = os.environ.get("D2MERGE_FAULTS_FULL", "") not in ("", "0")
RANDOM_POINTS = int(os.environ.get("D2MERGE_FAULTS_RANDOM", "10")) if FULL else 1
PAGE = 4096
WORK = ".d2merge-"  # every work name beside or inside an output: temps, set-asides, locks, journals
OUTPUT_MARKER = ".d2merge-output.json"  # part of an HF folder output, not work
NO_SPACE = "no space left"
INTERRUPTED_AFTER = 131  # a child's exit code: SIGINT landed after the CLI had returned
READ_ONLY = ("not writable", "permission denied", "read-only")


@dataclass(frozen=True)
class Inputs:
    """The folders the commands read (built once per module by tests/system/test_fault_paths.py)."""

    base: Path
    adapter: Path
    adapter2: Path
    merged: Path
    merged2: Path
    jobs: Path  # a merge-many manifest: two jobs
    jobs2: Path  # the same job names, other adapters
    bpe_base: Path | None = None  # a tiny llama with SmolLM2's tokenizer (GGUF); None when not installed
    bpe_adapter: Path | None = None
    bpe_adapter2: Path | None = None
    nf4_base: Path | None = None  # a bitsandbytes nf4 base as transformers saves it (tests/malformed.py's template)
    nf4_adapter: Path | None = None
    nf4_adapter2: Path | None = None


Command = Callable[[Inputs, Path, bool], list]


@dataclass(frozen=True)
class OutputKind:
    id: str
    output: str
    command: Command
    overwrite: tuple[str, ...] = ("--overwrite",)
    needs: tuple[str, ...] = ()
    # "fast"; "slow" (a second or more a run: CI runs only an --overwrite, one point per fault);
    # "full" (the full sweep only)
    cost: str = "fast"
    # independent outputs inside the output, each whole on its own (merge-many's jobs); () for one
    parts: tuple[str, ...] = ()
    # what its one-line error on a full disk may say: the write's ENOSPC, or a refusal before any
    # write where the command checks free space first (the K-quant temp)
    disk_full: tuple[str, ...] = (NO_SPACE,)

    def argv(self, inputs: Inputs, out: Path, *, previous: bool = False, overwrite: bool = False) -> list[str]:
        return [str(a) for a in self.command(inputs, out, previous)] + (list(self.overwrite) if overwrite else [])


def _merge(i: Inputs, out: Path, previous: bool, *extra: str) -> list:
    return ["merge", i.base, i.adapter2 if previous else i.adapter, "-o", out, "-q", *extra]


def _gguf(gguf_type: str) -> Command:
    def command(i: Inputs, out: Path, previous: bool) -> list:
        return ["merge", i.bpe_base, i.bpe_adapter2 if previous else i.bpe_adapter, "-o", out, "-q",
                "--format", "gguf", "--gguf-type", gguf_type]
    return command


KINDS = [
    OutputKind("hf-folder", "out", lambda i, out, p: _merge(i, out, p, "--max-shard-size", "20KB")),
    OutputKind("safetensors", "out.safetensors", lambda i, out, p: _merge(i, out, p, "--format", "safetensors")),
    OutputKind("gguf-f16", "out.gguf", _gguf("f16"), needs=("bpe",), cost="slow"),
    # the f16 file's writer and commit; only each tensor's encoding differs: the full sweep's
    OutputKind("gguf-q8_0", "out.gguf", _gguf("q8_0"), needs=("bpe",), cost="full"),
    # llama.cpp's quantizer on an f32 temp beside the output (issue 32); skipped without llama-cpp-python
    OutputKind("gguf-q4_k_m", "out.gguf", _gguf("q4_k_m"), needs=("bpe", "llama_cpp"), cost="slow",
               disk_full=(NO_SPACE, "free beside the output")),
    # the graph's validation (ONNX Runtime against PyTorch) runs before the commit like any other step;
    # skipped here to keep a run at a second
    OutputKind("onnx", "model.onnx", lambda i, out, p: [
        "export-onnx", i.merged2 if p else i.merged, "-o", out, "--exporter", "legacy", "--opset", "17",
        "--no-validate"], cost="slow"),
    OutputKind("merge-format-onnx", "model.onnx", lambda i, out, p: _merge(i, out, p, "--format", "onnx"),
               cost="full"),
    OutputKind("merge-many", "out", lambda i, out, p: [
        "merge-many", i.base, i.jobs2 if p else i.jobs, "-o", out, "-q"], parts=("job1", "job2")),
    OutputKind("verify-report", "report.json", lambda i, out, p: [
        "verify", i.base, i.adapter, i.merged, "--report", out, "--probe-source", "random", "--num-probes", "2",
        "--probe-length", "8", "--seed", "1" if p else "0"], overwrite=(), cost="slow"),
    OutputKind("verify-html", "verify.html", lambda i, out, p: [
        "verify", i.base, i.adapter, i.merged, "--html", out, "--probe-source", "random", "--num-probes", "2",
        "--probe-length", "8", "--seed", "1" if p else "0"], overwrite=(), cost="slow"),
    # a merge from a quantized base (issue 31): the dequantizing reads feed the same commit
    OutputKind("merge-nf4-base", "out", lambda i, out, p: [
        "merge", i.nf4_base, i.nf4_adapter2 if p else i.nf4_adapter, "-o", out, "-q"], needs=("nf4",)),
    # this turn's adapter outputs (issue 26): plain PEFT LoRA folders and llama.cpp's LoRA GGUF
    OutputKind("convert-lora", "out", lambda i, out, p: [
        "convert", i.adapter2 if p else i.adapter, "--base", i.base, "-o", out, "-q"]),
    OutputKind("extract", "out", lambda i, out, p: [
        "extract", i.base, i.merged2 if p else i.merged, "--rank", "2", "-o", out, "-q"]),
    OutputKind("combine", "out", lambda i, out, p: [
        "combine", i.adapter, i.adapter2, "--base", i.base, "--weights", "0.3,0.7" if p else "0.5,0.5",
        "--combination", "svd", "-o", out, "-q"]),
    OutputKind("convert-gguf-lora", "adapter.gguf", lambda i, out, p: [
        "convert", i.bpe_adapter2 if p else i.bpe_adapter, "--base", i.bpe_base, "--to", "gguf-lora", "-o", out,
        "-q"], needs=("bpe",), cost="slow"),
]


# -- what a user sees -----------------------------------------------------------------------------


def visible(folder: Path) -> dict[str, bytes] | None:
    """Every file under the folder's non-hidden entries (the output and its sidecars), or None."""
    files = {}
    for top in sorted(folder.iterdir()):
        if top.name.startswith("."):
            continue
        for path in [top] if not top.is_dir() else sorted(top.rglob("*")):
            if path.is_file() and not any(p.startswith(".") and p != OUTPUT_MARKER
                                          for p in path.relative_to(folder).parts):
                files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files or None


def leftovers(folder: Path) -> list[str]:
    """Work files anywhere under the folder (an HF output's own marker excepted)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if WORK in p.name and p.name != OUTPUT_MARKER)


def pieces(kind: OutputKind, state: dict[str, bytes] | None) -> dict[str, dict[str, bytes] | None]:
    """The state cut into the kind's independent outputs (one piece: the whole state)."""
    if not kind.parts:
        return {"": state}
    found: dict[str, dict[str, bytes] | None] = {}
    for part in kind.parts:
        prefix = f"{kind.output}/{part}/"
        found[part] = {k: v for k, v in (state or {}).items() if k.startswith(prefix)} or None
    rest = {k for k in (state or {}) if not any(k.startswith(f"{kind.output}/{p}/") for p in kind.parts)}
    assert not rest, f"files outside the kind's parts: {sorted(rest)}"
    return found


def assert_whole(kind: OutputKind, seen: dict[str, bytes] | None,
                 allowed: tuple[dict[str, bytes] | None, ...], what: str) -> None:
    """Each independent output is one of the allowed states, never a mix or a partial one."""
    seen_pieces = pieces(kind, seen)
    allowed_pieces = [pieces(kind, state) for state in allowed]
    for name, piece in seen_pieces.items():
        assert piece in [a[name] for a in allowed_pieces], f"{what}: {kind.output}/{name} is not a whole output " \
            f"({'missing' if piece is None else sorted(piece)})"


def pages(state: dict[str, bytes] | None) -> int:
    return sum(math.ceil(len(b) / PAGE) for b in (state or {}).values())


# -- one run: a fork of this process, with a fault ------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """``signal`` (KILL or INT) after the ``after_rename``-th rename of a work path, or ``delay`` s in."""

    signal: str = ""
    after_rename: int = 0
    delay: float = -1.0

    def __str__(self) -> str:
        if not self.signal:
            return "no fault"
        return f"SIG{self.signal} " + (f"after rename {self.after_rename}" if self.after_rename
                                       else f"at {self.delay:.3f} s")


@dataclass
class Ran:
    code: int  # exit code, or -N when killed by signal N
    err: str
    seconds: float
    renames: list[str]  # where each work-path rename of the run went (when it was not killed)


def run(argv: list[str], cwd: Path, fault: Fault = Fault()) -> Ran:
    """``d2merge ARGV`` in a fork of this process, with ``fault`` applied."""
    err_path, count_path = cwd.parent / f".{cwd.name}-stderr", cwd.parent / f".{cwd.name}-renames"
    for path in (err_path, count_path):
        path.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    ready, go = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 70
        try:
            os.close(ready)
            code = _child(argv, cwd, fault, err_path, count_path, go)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(go)
    os.read(ready, 1)  # the child is about to call the CLI: delays count from here
    os.close(ready)
    started = time.perf_counter()
    if fault.delay >= 0:
        time.sleep(fault.delay)
        os.kill(pid, getattr(signal, "SIG" + fault.signal))  # a finished child is a zombie: no-op
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    err = err_path.read_text(errors="replace") if err_path.exists() else ""
    renames = json.loads(count_path.read_text()) if count_path.exists() else []
    return Ran(code, err, seconds, renames)


def _child(argv: list[str], cwd: Path, fault: Fault, err_path: Path, count_path: Path, go: int) -> int:
    import torch

    import d2merge.cli

    out = os.open(os.devnull, os.O_WRONLY)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115 (pytest's capture is the parent's)
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal
    os.environ.pop("D2MERGE_DEBUG", None)
    d2merge.cli._DEBUG["on"] = False
    torch.set_num_threads(1)
    os.chdir(cwd)
    renames: list[str] = []
    original = os.replace

    def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(src, dst, *args, **kwargs)
        if WORK in os.fspath(src) + os.fspath(dst):
            renames.append(os.fspath(dst))
            if len(renames) == fault.after_rename:
                os.kill(os.getpid(), getattr(signal, "SIG" + fault.signal))

    os.replace = replace  # type: ignore[assignment]
    code = 0
    os.write(go, b"1")
    os.close(go)
    try:
        try:
            d2merge.cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = INTERRUPTED_AFTER  # the signal came as the command was returning: it had ended
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    count_path.write_text(json.dumps(renames))
    return code


# -- tmpfs ----------------------------------------------------------------------------------------


class Mount:
    """A tmpfs at ``folder`` (root only; CI runs as root), resized and remounted read-only at will."""

    def __init__(self, folder: Path, size: int):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs")

    @staticmethod
    def why_not() -> str | None:
        """None where tmpfs mounts work here, else why the tests that need one skip."""
        if os.geteuid() != 0:
            return "mounting a tmpfs needs root (CI runs as root)"
        if shutil.which("mount") is None:
            return "no mount command"
        return None

    def _mount(self, *args: str) -> None:
        proc = subprocess.run(["mount", *args, str(self.folder)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise MountRefused(f"mount {' '.join(args)} refused: {proc.stderr.strip()}")

    def remount(self, options: str) -> None:
        self._mount("-o", f"remount,{options}")

    def close(self) -> None:
        if subprocess.run(["umount", str(self.folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


class MountRefused(RuntimeError):
    pass


# -- references and checks ------------------------------------------------------------------------


@dataclass
class Reference:
    """A kind's outputs from clean runs: the new one, the previous one it replaces, their costs."""

    new: dict[str, bytes]
    previous: dict[str, bytes]
    seconds: float  # the command's duration (what random fault delays are drawn from)
    renames_fresh: int
    renames_overwrite: int
    first_aside: int  # the --overwrite's rename that sets the previous output aside (1-based)
    previous_dir: Path = field(repr=False)


def make_reference(kind: OutputKind, inputs: Inputs, root: Path) -> Reference:
    fresh, previous, replaced = root / "fresh", root / "previous", root / "replaced"
    for folder in (fresh, previous):
        folder.mkdir(parents=True)
    ran = run(kind.argv(inputs, fresh / kind.output), fresh)
    assert ran.code == 0, ran.err
    ran_previous = run(kind.argv(inputs, previous / kind.output, previous=True), previous)
    assert ran_previous.code == 0, ran_previous.err
    shutil.copytree(previous, replaced, symlinks=True)
    ran_over = run(kind.argv(inputs, replaced / kind.output, overwrite=True), replaced)
    assert ran_over.code == 0, ran_over.err
    new, old = visible(fresh), visible(previous)
    assert new is not None and old is not None and new != old, "the previous output must differ from the new"
    assert visible(replaced) == new, "an --overwrite run wrote other bytes than a fresh run"
    assert leftovers(root) == [], leftovers(root)
    aside = [n for n, target in enumerate(ran_over.renames, 1) if ".d2merge-old" in Path(target).parent.name
             or ".d2merge-old" in Path(target).name]
    assert aside, f"the --overwrite set nothing aside: {ran_over.renames}"
    return Reference(new, old, max(ran.seconds, ran_over.seconds), len(ran.renames), len(ran_over.renames),
                     aside[0], previous)


def said(ran: Ran) -> list[str]:
    """What the run said as d2merge (its stage messages, verify's say, aside)."""
    assert "Traceback" not in ran.err, ran.err
    return [line for line in ran.err.splitlines() if line.startswith("d2merge:")]


def one_line_error(ran: Ran, *expected: str, kind: OutputKind | None = None) -> str:
    """One error line, last (merge-many: one per job, then the summary), naming the fault."""
    lines = said(ran)
    assert lines and ran.err.rstrip("\n").splitlines()[-1] == lines[-1], ran.err
    assert len(lines) == 1 or (kind is not None and kind.parts and len(lines) <= len(kind.parts) + 1), ran.err
    assert all(line.startswith("d2merge: error: ") for line in lines), ran.err
    assert any(e in lines[-1].lower() for e in expected), f"expected one of {expected} in: {lines[-1]}"
    return lines[-1]


def check_recovered(kind: OutputKind, inputs: Inputs, ref: Reference, run_dir: Path, overwrite: bool,
                    what: str) -> None:
    """After a fault: recovery gives the previous output back (or the new one), and the next run
    writes the new one's bytes and leaves no work file."""
    from d2merge.io.output import recover_output

    out = run_dir / kind.output
    for target in [out / part for part in kind.parts] or [out]:
        recover_output(target)  # what every d2merge run does before any work
    recovered = visible(run_dir)
    assert_whole(kind, recovered, ((ref.previous if overwrite else None), ref.new), f"{what}, recovered")
    ran = run(kind.argv(inputs, out, overwrite=overwrite), run_dir)
    if not overwrite and recovered == ref.new and ran.code == 2:
        one_line_error(ran, "already exists", kind=kind)  # the new output arrived before the fault: kept
    else:
        assert ran.code == 0, f"{what}: the rerun failed: {ran.err}"
    assert visible(run_dir) == ref.new, f"{what}: the rerun's output differs from a clean run's"
    assert leftovers(run_dir) == [], f"{what}: left {leftovers(run_dir)}"


def signal_points(kind: OutputKind, ref: Reference, sig: str, overwrite: bool) -> list[Fault]:
    """Right after each rename of a commit, and at seeded random moments of the command."""
    renames = ref.renames_overwrite if overwrite else ref.renames_fresh
    if FULL or (overwrite and kind.cost == "fast"):
        points = [Fault(sig, after_rename=n) for n in range(1, renames + 1)]
    elif overwrite:
        points = [Fault(sig, after_rename=ref.first_aside)]  # the previous output aside, the new one not in
    else:
        points = []
    if kind.cost == "fast" or FULL:
        rng = random.Random(f"{kind.id}-{sig}-{overwrite}")
        points += [Fault(sig, delay=rng.uniform(0, ref.seconds)) for _ in range(RANDOM_POINTS)]
    return points


def disk_sizes(kind: OutputKind, ref: Reference, overwrite: bool) -> list[int]:
    """tmpfs sizes in bytes: part way through the write, and the output's pages but no more."""
    held = pages(ref.previous) if overwrite else 0
    need = pages(ref.new)
    if FULL:
        extra = range(1, need + 4)  # (size=0 is an unlimited tmpfs)
    elif kind.cost == "fast":
        extra = range(need // 2, need + 1, max(1, need - need // 2))  # half, and all of the output's pages
    else:
        extra = range(need, need + 1)
    return [(held + k) * PAGE for k in extra if held + k > 0]
