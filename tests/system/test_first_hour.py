"""A new user's first hour (issue 33): outputs named as typed, every output checked before the work,
life on the screen, the card's base_model, natural order, each failure once, refusals naming the option.

Every CLI behaviour here runs ``python -m d2merge`` in a subprocess, as a user's shell would.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT as ROOT
from helpers import assert_one_line_error as one_line_error
from helpers import checkout_env


def d2merge_env(**extra: str) -> dict[str, str]:
    """This checkout on one thread, none of the shell's D2MERGE_* settings unless given; a PYTHONPATH
    given goes before the checkout (a stand-in torch)."""
    front = extra.pop("PYTHONPATH", None)
    env = checkout_env(drop=[n for n in ("D2MERGE_QUIET", "D2MERGE_PROGRESS_EVERY") if n not in extra],
                       OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [front, env["PYTHONPATH"]]))
    return env


def d2merge(*args: object, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``d2merge ARGS`` in a subprocess, stdout and stderr captured (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "d2merge", *map(str, args)], capture_output=True, text=True,
                          env=d2merge_env(**env), cwd=cwd, timeout=600)


def on_terminal(*args: object, **env: str) -> str:
    """``d2merge ARGS`` with stderr on a pseudo-terminal, as in an interactive shell: what it showed there."""
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "d2merge", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=secondary, env=d2merge_env(**env))
    os.close(secondary)
    shown = bytearray()
    try:
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        proc.wait(timeout=600)
        os.close(primary)
    return shown.decode(errors="replace").replace("\r\n", "\n")


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    return one_line_error(done.returncode, done.stdout, done.stderr, *needles)


# ---- outputs named as typed -----------------------------------------------------------------------


def test_format_follows_the_suffix_and_a_contradiction_is_refused_before_any_work(tmp_path):
    from d2merge.errors import D2MergeError
    from d2merge.output_names import format_for_output

    assert [format_for_output(name, None) for name in ("m.gguf", "m.SAFETENSORS", "m.onnx", "./merged", None)] == [
        "gguf", "safetensors", "onnx", "hf", "hf"]
    assert format_for_output("./merged-genai", "onnx-genai") == "onnx-genai"
    assert format_for_output("m.gguf", "gguf") == "gguf"
    for name, given in (("m2.gguf", "hf"), ("m.safetensors", "onnx"), ("m.onnx", "onnx-genai")):
        with pytest.raises(D2MergeError, match="which means format='.*but format='"):
            format_for_output(name, given)
    # the CLI refuses it in one line before reading anything: BASE and ADAPTER do not even exist
    done = d2merge("merge", tmp_path / "no-base", tmp_path / "no-adapter", "-o", tmp_path / "m2.gguf", "--format", "hf")
    line = assert_one_line_error(done, "ends in .gguf", "--format hf", "drop --format")
    assert "no-base" not in line and list(tmp_path.iterdir()) == []


def test_merge_without_format_writes_the_file_its_suffix_names(tiny_bases, make_adapter, tmp_path):
    base = tiny_bases("llama")
    done = d2merge("merge", base, make_adapter(base, "lora"), "-o", tmp_path / "m2.safetensors")
    assert done.returncode == 0, done.stderr
    assert "[safetensors]" in done.stdout
    out = tmp_path / "m2.safetensors"
    assert out.is_file() and out.read_bytes()[8:9] == b"{"  # a safetensors file (header length, then JSON)


# ---- every output path checked before the work ------------------------------------------------------


def test_an_existing_modelfile_is_refused_before_any_work(tiny_bases, make_adapter, tmp_path):
    from d2merge.output_names import modelfile_for

    assert modelfile_for(tmp_path / "m.gguf") == tmp_path / "m.Modelfile"
    base = tiny_bases("llama")
    (tmp_path / "m.Modelfile").write_text("FROM ./other.gguf\n")
    done = d2merge("export-gguf", base, "-o", tmp_path / "m.gguf", "--modelfile")
    assert_one_line_error(done, "m.Modelfile", "already exists", "--overwrite")
    done = d2merge("merge", base, make_adapter(base, "lora"), "-o", tmp_path / "m.gguf", "--modelfile")
    assert_one_line_error(done, "m.Modelfile", "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile"]
    assert (tmp_path / "m.Modelfile").read_text() == "FROM ./other.gguf\n"
    # without --modelfile the file beside is none of the export's business
    done = d2merge("merge", base, make_adapter(base, "lora"), "-o", tmp_path / "m.gguf", "--dry-run")
    assert done.returncode == 0, done.stderr


def test_report_paths_are_checked_before_the_work(tiny_bases, make_adapter, tmp_path):
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    done = d2merge("bench", base, adapter, "--variants", "base", "--json", tmp_path / "missing" / "bench.json")
    assert_one_line_error(done, "missing", "--json")
    assert "measuring" not in done.stderr


# ---- life on the screen -----------------------------------------------------------------------------


def test_first_line_comes_before_torch_is_imported_and_quiet_silences_it(tiny_bases, make_adapter, tmp_path):
    # A stand-in torch that says when it is imported, then fails: what came before it came before torch.
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import sys\nsys.stderr.write('TORCH IMPORT STARTS\\n')\nsys.stderr.flush()\n"
                                      "raise ImportError('stand-in torch')\n")
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    shown = on_terminal("merge", base, adapter, "--dry-run", PYTHONPATH=str(fake.parent))
    assert "TORCH IMPORT STARTS" in shown, shown
    first = shown.index("d2merge merge: starting")
    assert first < shown.index("TORCH IMPORT STARTS")
    assert shown[:first].strip() == ""  # the very first thing on the screen
    quiet = on_terminal("merge", base, adapter, "--dry-run", "--quiet", PYTHONPATH=str(fake.parent))
    assert "TORCH IMPORT STARTS" in quiet and "starting" not in quiet
    inspect_quiet = on_terminal("inspect", adapter, "-q", PYTHONPATH=str(fake.parent))  # -q added to every command
    assert "TORCH IMPORT STARTS" in inspect_quiet and "starting" not in inspect_quiet


def test_progress_reports_elapsed_and_time_left():
    from d2merge.console import Progress, still_working

    now = [0.0]
    stream = io.StringIO()
    with Progress("bench merged", 4, "cell", stream=stream, clock=lambda: now[0], terminal=False) as bar:
        for _ in range(4):
            now[0] += 10.0
            bar.advance()
    lines = stream.getvalue().splitlines()
    # a line every 15 s in a log (none in the first interval); the ETA is the pace so far
    assert lines == ["bench merged: 2/4 cells, 20 s, about 20 s left", "bench merged: 4/4 cells, 40 s"]
    terminal = io.StringIO()
    now[0] = 0.0
    with Progress("verify bf16", 3, "pass", stream=terminal, clock=lambda: now[0], terminal=True) as bar:
        now[0] = 1.0
        bar.advance()  # within the first 2 s: nothing drawn
        assert terminal.getvalue() == ""
        now[0] = 3.0
        bar.advance()
    assert terminal.getvalue() == "\rverify bf16: 2/3 passes, 3 s, about 2 s left\x1b[K\r\x1b[K"


def test_bench_in_a_log_shows_progress_lines_and_quiet_drops_them(tiny_bases, make_adapter):
    base = tiny_bases("llama")
    args = ["bench", base, make_adapter(base, "lora"), "--variants", "base", "--batch-sizes", "1,2",
            "--seq-lens", "4", "--decode-tokens", "2", "--warmup", "0", "--repeats", "1"]
    done = d2merge(*args, D2MERGE_PROGRESS_EVERY="0")
    assert done.returncode == 0, done.stderr
    cells = [line for line in done.stderr.splitlines() if line.startswith("bench base: ")]
    assert cells and re.fullmatch(r"bench base: 1/3 cells, \d+ s, about \d+ s left", cells[0]), done.stderr
    assert any(line.startswith("bench base: 3/3 cells") for line in done.stderr.splitlines()), done.stderr
    one_cell = [*args[:5], "--batch-sizes", "1", "--seq-lens", "4", "--decode-tokens", "0", "--repeats", "1"]
    quiet = d2merge(*one_cell, "--quiet", D2MERGE_PROGRESS_EVERY="0")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert "tok/s" in quiet.stdout


# ---- the model card's base_model ----------------------------------------------------------------------


def test_base_model_id_fills_the_card_and_a_bad_one_is_refused(tiny_bases, make_adapter, tmp_path):
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    done = d2merge("merge", base, adapter, "-o", tmp_path / "m", "--base-model-id", "HuggingFaceTB/SmolLM2-135M")
    assert done.returncode == 0, done.stderr
    front = (tmp_path / "m" / "README.md").read_text().split("---")[1]
    assert 'base_model:\n- "HuggingFaceTB/SmolLM2-135M"\nbase_model_relation: finetune' in front
    done = d2merge("merge", base, adapter, "-o", tmp_path / "m2", "--base-model-id", "/tmp/not-an-id")
    assert_one_line_error(done, "--base-model-id", "ORG/NAME")
    assert not (tmp_path / "m2").exists()


# ---- natural order, each failure once, refusals naming the option ----------------------------------------


def test_inspect_and_dry_run_list_layers_in_natural_order(tmp_path):
    from d2merge.natural_sort import natural_key
    from d2merge.synthetic import save_random_adapter, save_tiny_base

    assert sorted(["l.10.q", "l.2.q", "l.1.q", "l.11.q"], key=natural_key) == ["l.1.q", "l.2.q", "l.10.q", "l.11.q"]
    base = save_tiny_base(tmp_path / "deep", "llama", num_layers=12, hidden_size=16, intermediate_size=16,
                          num_heads=2, num_kv_heads=1, vocab_size=64)
    adapter = save_random_adapter(base, tmp_path / "ad", "lora", target_modules=("q_proj",))
    for args in (["inspect", adapter], ["merge", base, adapter, "--dry-run"]):
        done = d2merge(*args)
        assert done.returncode == 0, done.stderr
        layers = [int(n) for n in re.findall(r"^model\.layers\.(\d+)\.", done.stdout, re.M)]
        assert layers == list(range(12)), (args[0], layers)


def test_each_verify_failure_is_printed_once(tiny_bases, make_adapter, tmp_path):
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    done = d2merge("verify", base, adapter, "--dtypes", "bf16", "--max-abs-diff", "1e-12")
    assert done.returncode == 1, done.stderr
    assert "failures:" not in done.stdout and "PASS" not in done.stdout
    failure = done.stderr.splitlines()[-1]
    assert failure.startswith("d2merge: verification failed: bf16: ") and "max |logit diff|" in failure
    text = failure.removeprefix("d2merge: verification failed: ")
    for one in text.split("; "):
        assert (done.stdout + done.stderr).count(one) == 1, one


def test_int4_genai_refusal_names_the_options_that_help_not_atol(tiny_bases, tmp_path):
    done = d2merge("export-onnx", tiny_bases("llama"), "-o", tmp_path / "g", "--runtime", "genai", "--precision",
                   "int4", "--atol", "0.5")
    line = assert_one_line_error(done, "--atol", "top-1 agreement", "--precision fp16", "--no-validate")
    assert "--atol sets" not in line and list(tmp_path.iterdir()) == []
    from d2merge.export.onnx_genai import validation_hint

    assert "{atol}" not in validation_hint("int4") and "{atol}" in validation_hint("fp16")


# ---- the demo: sized to the machine, a summary read right, the three commands ----------------------------


def test_training_under_a_time_budget_runs_the_steps_that_fit(tmp_path):
    from d2merge.train import PACE_STEPS, steps_within, train_adapter

    assert steps_within(12.0, 0.05, most=400, fewest=60) == 240
    assert steps_within(12.0, 1.0, most=400, fewest=60) == 60  # a crawling machine still learns something
    assert steps_within(12.0, 0.001, most=400, fewest=60) == 400
    from d2merge.train import save_task_base

    base = save_task_base(tmp_path / "base")
    result = train_adapter(base, tmp_path / "ad", "d2lora", steps=400, seconds=0.0, min_steps=PACE_STEPS + 2,
                           eval_size=8, batch_size=4)
    assert result.steps == len(result.losses) == PACE_STEPS + 2


def test_bench_ratios_are_shown_only_where_the_runs_allow():
    from d2merge.bench import BenchReport, BenchRow, BenchSettings

    def row(variant, median, low, high):
        return BenchRow(variant, "prefill", 8, 32, 5, median, high, low, high, 256 / (median / 1e3),
                        100 * (high - low) / median)

    steady = BenchReport(BenchSettings(), [row("merged", 10.0, 9.8, 10.3), row("unmerged", 17.0, 16.5, 17.6),
                                           row("base", 10.1, 9.7, 10.4)])
    assert steady.compare("merged_over_unmerged", "prefill", 8, 32).sentence() == "1.70x the throughput"
    assert steady.compare("merged_over_base", "prefill", 8, 32).sentence().startswith("no measurable difference")
    assert steady.compare("onnx_over_pytorch", "prefill", 8, 32) is None
    busy = BenchReport(BenchSettings(), [row("merged", 10.0, 6.0, 70.0), row("unmerged", 17.0, 16.5, 17.6),
                                         row("base", 30.0, 10.0, 31.0)])
    assert busy.compare("merged_over_unmerged", "prefill", 8, 32).sentence().startswith(
        "too noisy to compare on this machine")
    assert "merged/unmerged too noisy" in busy.table() and "1.70" not in busy.table().split("throughput ratios")[1]
    # however noisy, a difference larger than the noise is a ratio: every run of one beat every run of the other
    clear = BenchReport(BenchSettings(), [row("merged", 20.0, 15.0, 34.0), row("unmerged", 55.0, 50.0, 80.0)])
    assert clear.compare("merged_over_unmerged", "prefill", 8, 32).sentence() == "2.75x the throughput"


@pytest.mark.slow
def test_readme_first_screen_commands_run_as_written(smollm2, tmp_path):
    """README's three commands, copied from its first screen, on a tiny base with a real BPE tokenizer
    (GGUF needs one) and a LoRA adapter laid out as ./base and ./my-adapter."""
    import shlex
    import shutil

    from d2merge.synthetic import save_random_adapter, save_tiny_base

    readme = (ROOT / "README.md").read_text()
    own = readme.split("## Your own model in three commands", 1)[1]
    start = own.index("```bash\n") + len("```bash\n")
    commands = own[start: own.index("\n```", start)].splitlines()
    base = save_tiny_base(tmp_path / "base", "llama", vocab_size=49152, tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, base / name)
    save_random_adapter(base, tmp_path / "my-adapter", "lora")
    for command in commands:
        words = shlex.split(command, comments=True)
        assert words[0] == "d2merge", command
        done = d2merge(*words[1:], cwd=tmp_path)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "model.gguf").read_bytes()[:4] == b"GGUF"
    assert (tmp_path / "model.Modelfile").read_text().startswith("FROM ./model.gguf")
