"""The CLI's parsing, through its public behaviour: flags become the same option models the Python
API takes, defaults included, and a flag given where it does nothing is refused before any work.

Everything runs ``d2merge.cli.main`` in-process (conftest's ``cli_runner``) and compares what the
user sees (the ``--dry-run --json`` plan, verify's ``--report``) with the Python API given the same
settings; no test here looks inside the CLI's modules. Tiny bases, milliseconds to a second each.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

import d2merge
from d2merge.options import MergeOptions
from d2merge.options.verify import VerifyOptions

LM_HEAD_KEY = "base_model.model.lm_head.weight"


def dry_run_plan(cli_runner: Any, base: Path, adapter: Path, *flags: Any) -> dict[str, Any]:
    result = cli_runner(["merge", base, adapter, "--dry-run", "--json", *flags])
    assert result.code == 0, result.err
    return json.loads(result.out)


def api_plan(base: Path, adapter: Path, **options: Any) -> dict[str, Any]:
    """What the Python API plans with these settings, as the CLI prints it (JSON, str for paths)."""
    return json.loads(json.dumps(d2merge.plan(base, adapter, **options).summary(), default=str))


# ---- flags -> option models --------------------------------------------------------------------------


def test_merge_without_flags_plans_with_the_option_model_s_defaults(tiny_bases: Any, make_adapter: Any,
                                                                    cli_runner: Any) -> None:
    base = tiny_bases("llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, "d2lora")
    assert dry_run_plan(cli_runner, base, adapter) == api_plan(base, adapter, options=MergeOptions())


@pytest.mark.parametrize("flags, options", [
    (["--dtype", "fp16"], {"dtype": "fp16"}),
    (["--max-shard-size", "20KB"], {"max_shard_size": "20KB"}),
    (["--dtype", "bf16", "--max-shard-size", "12KB"], {"dtype": "bf16", "max_shard_size": "12KB"}),
])
def test_merge_flags_plan_what_the_same_options_plan(flags: list[str], options: dict[str, Any], tiny_bases: Any,
                                                     make_adapter: Any, cli_runner: Any) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "dora")
    planned = dry_run_plan(cli_runner, base, adapter, *flags)
    assert planned == api_plan(base, adapter, options=MergeOptions(**options))
    assert planned != api_plan(base, adapter)  # each case changes the plan: the flag was not dropped


@pytest.mark.parametrize("policy", ["untie", "tie"])
def test_tied_embeddings_flag_reaches_the_plan(policy: str, tiny_bases: Any, make_adapter: Any,
                                               cli_runner: Any) -> None:
    base = tiny_bases("gpt2")
    head = 0.05 * torch.randn(128, 32, generator=torch.Generator().manual_seed(11))
    adapter = make_adapter(base, "lora", modules_to_save=["lm_head"], extra_tensors={LM_HEAD_KEY: head})
    planned = dry_run_plan(cli_runner, base, adapter, "--tied-embeddings", policy)
    assert planned == api_plan(base, adapter, tied_embeddings=policy)
    assert any(("untied" if policy == "untie" else "kept tied") in note for note in planned["notes"])


def test_verify_flags_become_the_report_s_options(tiny_bases: Any, make_adapter: Any, cli_runner: Any,
                                                  tmp_path: Path) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    merged = d2merge.merge(base, adapter, tmp_path / "merged", hash_sources=False).output
    report = tmp_path / "report.json"
    result = cli_runner(["verify", base, adapter, merged, "--report", report, "-q", "--probe-source", "random",
                         "--num-probes", "3", "--probe-length", "9", "--seed", "7", "--batch-size", "2",
                         "--mc-score", "mean", "--max-activation-memory", "64"])
    assert result.code == 0, result.err
    expected = VerifyOptions(probe_source="random", num_probes=3, probe_length=9, seed=7, batch_size=2,
                             mc_score="mean", max_activation_memory=64)
    assert json.loads(report.read_text())["options"] == json.loads(json.dumps(asdict(expected), default=str))


# ---- flags out of context: refused before any work ---------------------------------------------------


def assert_usage_refusal(result: Any, needle: str) -> None:
    """Exit 2 with one line naming the flag, no traceback, nothing on stdout."""
    assert result.code == 2, (result.out, result.err)
    assert result.err.startswith(f"d2merge: error: {needle}"), result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err, result.err
    assert result.out == ""


@pytest.mark.parametrize("flags, needle", [
    (["--json"], "--json does nothing here: it applies only with --dry-run"),
    (["--precision", "int4"], "--precision does nothing here: it applies only with --format onnx-genai"),
    (["--modelfile"], "--modelfile does nothing here: it applies only with --format gguf"),
    (["--imatrix", "m.imatrix"], "--imatrix does nothing here: it applies only with --format gguf"),
    (["--create-pr"], "--create-pr does nothing here: it applies only with --push-to"),
    (["--commit-message", "x"], "--commit-message does nothing here: it applies only with --push-to"),
    (["--token", "hf_x"], "--token does nothing here: it applies only with --push-to"),
    (["--require-verify"], "--require-verify does nothing here: it applies only with --push-to (or use --verify)"),
])
def test_merge_flags_out_of_context_are_refused_and_nothing_is_written(flags: list[str], needle: str,
                                                                       tiny_bases: Any, make_adapter: Any,
                                                                       cli_runner: Any, tmp_path: Path) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    (tmp_path / "m.imatrix").write_bytes(b"not read: refused first")
    result = cli_runner(["merge", base, adapter, "-o", tmp_path / "out", *flags])
    assert_usage_refusal(result, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.imatrix"]


def test_merge_without_an_output_is_refused_unless_dry_run(tiny_bases: Any, make_adapter: Any,
                                                           cli_runner: Any) -> None:
    base = tiny_bases("llama")
    assert_usage_refusal(cli_runner(["merge", base, make_adapter(base, "lora")]), "missing -o/--out OUT")


@pytest.mark.parametrize("flags, needle", [
    (["--precision", "int4"], "--precision does nothing here: it applies only with --runtime genai"),
    (["--int4-block-size", "32"], "--int4-block-size does nothing here: it applies only with --runtime genai and --precision int4"),
    (["--runtime", "genai", "--opset", "17"], "--opset does nothing here: it applies only with --runtime generic (with "
                                              "--runtime genai choose --precision fp32|fp16|int4)"),
])
def test_export_onnx_flags_out_of_context_are_refused(flags: list[str], needle: str, tiny_bases: Any,
                                                      cli_runner: Any, tmp_path: Path) -> None:
    result = cli_runner(["export-onnx", tiny_bases("llama"), "-o", tmp_path / "m.onnx", *flags])
    assert_usage_refusal(result, needle)
    assert list(tmp_path.iterdir()) == []


def test_a_value_outside_the_choices_names_them(tiny_bases: Any, make_adapter: Any, cli_runner: Any) -> None:
    base = tiny_bases("llama")
    result = cli_runner(["merge", base, make_adapter(base, "lora"), "--dry-run", "--dtype", "int8"])
    assert_usage_refusal(result, "Invalid value for '--dtype': 'int8' is not one of 'auto', 'fp32', 'bf16', 'fp16'")
