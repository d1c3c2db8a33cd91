"""Bad inputs: one line on stderr, exit code 2, and nothing left on disk.

Each case prepares its inputs (copies of the session's tiny bases and adapters, corrupted as the
case needs), runs ``d2merge merge`` in-process through ``d2merge.cli.main`` and checks that:
the exit code is 2; stderr is exactly one line, ``d2merge: error: ...``, naming the problem;
no output folder appears (or an existing one is untouched); no temp folder
``.<name>.d2merge-tmp-*`` is left beside it. One case also runs as a real subprocess, to show
that no traceback reaches the user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from d2merge.io.adapter import WEIGHTS_NAME, write_adapter
from d2merge.io.checkpoint import SAFETENSORS_INDEX
from d2merge.io.safetensors_file import SafetensorsFile
from helpers import assert_one_line_error, run_python

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


@dataclass
class Case:
    """The inputs of one run: argv for ``d2merge merge`` and the output folder it must not create."""

    argv: list[str]
    out: Path
    out_existed: bool = False


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    sf = SafetensorsFile(folder / WEIGHTS_NAME)
    return {name: sf.read(name).clone() for name in sf.keys()}


def adapter_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


def rewrite_adapter(folder: Path, config: dict[str, Any] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> None:
    write_adapter(folder, config if config is not None else adapter_config(folder),
                  tensors if tensors is not None else adapter_tensors(folder))


# ---- the cases: each returns the Case to run, having prepared its inputs under tmp_path ---------


def module_not_in_base(env: Any) -> Case:
    """An adapter trained for GPT-2 given with a Llama base."""
    return env.case(adapter=env.make_adapter(env.tiny_bases("gpt2"), "lora"))


def shape_mismatch(env: Any) -> Case:
    adapter = env.copy_adapter("lora")
    tensors = adapter_tensors(adapter)
    a = tensors[f"{Q_PROJ}.lora_A.weight"]
    tensors[f"{Q_PROJ}.lora_A.weight"] = torch.randn(a.shape[0], a.shape[1] + 3)  # same rank, wrong in-features
    rewrite_adapter(adapter, tensors=tensors)
    return env.case(adapter=adapter)


def rank_mismatch(env: Any) -> Case:
    adapter = env.copy_adapter("d2lora", r=8)
    config = adapter_config(adapter)
    config["r"] = 4
    rewrite_adapter(adapter, config=config)
    return env.case(adapter=adapter)


def pickle_adapter(env: Any) -> Case:
    adapter = env.copy_adapter("lora")
    torch.save(adapter_tensors(adapter), adapter / "adapter_model.bin")
    (adapter / WEIGHTS_NAME).unlink()
    return env.case(adapter=adapter)


def existing_output(env: Any) -> Case:
    out = env.tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    return env.case(out=out, out_existed=True)


def nan_in_adapter(env: Any) -> Case:
    adapter = env.copy_adapter("dora")
    tensors = adapter_tensors(adapter)
    # The last module in the file order, so some shards are already written when the NaN is met.
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]
    tensors[key][1, 2] = float("nan")
    rewrite_adapter(adapter, tensors=tensors)
    return env.case(adapter=adapter, extra=["--max-shard-size", "20KB"])


def unknown_peft_type(env: Any) -> Case:
    adapter = env.copy_adapter("lora")
    config = adapter_config(adapter)
    config["peft_type"] = "IA3"
    rewrite_adapter(adapter, config=config)
    return env.case(adapter=adapter)


def missing_adapter_config(env: Any) -> Case:
    adapter = env.copy_adapter("lora")
    (adapter / "adapter_config.json").unlink()
    return env.case(adapter=adapter)


def index_names_missing_shard(env: Any) -> Case:
    base = env.writable_copy(env.tiny_bases("llama", sharded=True), "base-copy")
    index = json.loads((base / SAFETENSORS_INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (base / shard).unlink()
    return env.case(base=base)


def output_inside_input(env: Any) -> Case:
    base = env.writable_copy(env.tiny_bases("llama", sharded=True), "base-copy")
    return env.case(base=base, out=base / "merged")


def output_inside_adapter(env: Any) -> Case:
    adapter = env.copy_adapter("lora")
    return env.case(adapter=adapter, out=adapter / "merged")


CASES: dict[str, tuple[Callable[[Any], Case], tuple[str, ...]]] = {
    # name: (prepare, words the error line must contain)
    "module-not-in-base": (module_not_in_base, ("transformer.h.0", "not in the base model")),
    "shape-mismatch": (shape_mismatch, ("shape", "lora_A")),
    "rank-mismatch": (rank_mismatch, ("rank", "8", "4")),
    "pickle-without-allow-pickle": (pickle_adapter, ("pickle", "--allow-pickle")),
    "existing-output": (existing_output, ("already exists", "--overwrite")),
    "nan-in-adapter": (nan_in_adapter, ("NaN",)),
    "unknown-peft-type": (unknown_peft_type, ("IA3",)),
    "missing-adapter-config": (missing_adapter_config, ("adapter_config.json", "not found")),
    "index-missing-shard": (index_names_missing_shard, ("missing shard",)),
    "output-inside-base": (output_inside_input, ("overlaps an input",)),
    "output-inside-adapter": (output_inside_adapter, ("overlaps an input",)),
}


@dataclass
class Env:
    tmp_path: Path
    tiny_bases: Any
    make_adapter: Any
    writable_copy: Any

    @property
    def base(self) -> Path:
        return self.tiny_bases("llama", sharded=True)

    def copy_adapter(self, method: str, **fields: Any) -> Path:
        return self.writable_copy(self.make_adapter(self.base, method, **fields), f"adapter-{method}")

    def case(self, *, base: Path | None = None, adapter: Path | None = None, out: Path | None = None,
             out_existed: bool = False, extra: list[str] | None = None) -> Case:
        base = base or self.base
        adapter = adapter or self.make_adapter(self.base, "lora")
        out = out or self.tmp_path / "merged"
        return Case(["merge", str(base), str(adapter), "-o", str(out), *(extra or [])], out, out_existed)


@pytest.fixture
def env(tmp_path: Path, tiny_bases: Any, make_adapter: Any, writable_copy: Any) -> Env:
    return Env(tmp_path, tiny_bases, make_adapter, writable_copy)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_clean_failure(case: Case, code: int, out: str, err: str, needles: tuple[str, ...],
                         existing: dict[str, bytes] | None) -> None:
    line = assert_one_line_error(code, out, err, *needles)
    assert "internal error" not in line
    assert out == ""
    if case.out_existed:
        assert snapshot(case.out) == existing, "an existing output must be left untouched"
    else:
        assert not case.out.exists(), "no output folder may be left"
    temp = [p.name for p in case.out.parent.iterdir() if p.name.startswith(f".{case.out.name}.d2merge-")]
    assert not temp, f"leftover temp folders: {temp}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name: str, env: Env, cli_runner: Any) -> None:
    prepare, needles = CASES[name]
    case = prepare(env)
    existing = snapshot(case.out) if case.out_existed else None
    result = cli_runner(case.argv)
    assert_clean_failure(case, result.code, result.out, result.err, needles, existing)


def test_pickle_adapter_is_accepted_with_allow_pickle(env: Env, cli_runner: Any) -> None:
    case = pickle_adapter(env)
    result = cli_runner([*case.argv, "--allow-pickle", "-q"])
    assert result.code == 0, result.err
    assert (case.out / "config.json").is_file()


def test_existing_output_is_replaced_with_overwrite(env: Env, cli_runner: Any) -> None:
    """--overwrite replaces an earlier d2merge output; a folder holding anything else is refused (issue 10)."""
    case = existing_output(env)
    result = cli_runner([*case.argv, "--overwrite", "-q"])
    assert result.code == 2 and "keep.txt" in result.err and (case.out / "keep.txt").is_file(), result.err
    (case.out / "keep.txt").unlink()  # an empty folder holds nothing to lose
    assert cli_runner([*case.argv, "--overwrite", "-q"]).code == 0
    (case.out / "config.json").write_text("{}")  # a file d2merge wrote, changed since: still d2merge's
    result = cli_runner([*case.argv, "--overwrite", "-q"])
    assert result.code == 0, result.err
    assert (case.out / "config.json").read_text() != "{}"


@pytest.mark.parametrize("name", ["unknown-peft-type", "nan-in-adapter"])
def test_subprocess_error_has_no_traceback(name: str, env: Env) -> None:
    prepare, needles = CASES[name]
    case = prepare(env)
    proc = run_python(["-m", "d2merge.cli", *case.argv], cwd=env.tmp_path)
    assert_clean_failure(case, proc.returncode, proc.stdout, proc.stderr, needles, None)


def test_a_bug_in_d2merge_has_its_own_exit_code(env: Env, cli_runner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 means bad input; an internal error exits 3 with one line asking for a --debug report (issue 10)."""
    import d2merge.cli.merge

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(d2merge.cli.merge, "plan_merge", broken)
    case = existing_output(env)
    for debug in ([], ["--debug"]):
        result = cli_runner([*debug, *case.argv, "--dry-run"])
        assert result.code == 3, result.err
        last = result.err.splitlines()[-1]
        assert last.startswith("d2merge: internal error: ZeroDivisionError: division by zero")
        assert "please report it" in last and "--debug" in last
        assert ("Traceback" in result.err) == bool(debug)
        if not debug:
            assert len(result.err.splitlines()) == 1
