"""A new user's rough edges (issue 11, items 9-12): no local paths published, fail early, progress, fast help."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from helpers import run_python


# ---- 9: the model card that --push-to publishes names no local path ----------------------------


def test_model_card_after_merge_verify_names_no_local_path(tiny_bases, make_adapter, cli_runner, tmp_path):
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    out = tmp_path / "merged"
    result = cli_runner(["merge", base, adapter, "-o", out, "--verify"])
    assert result.code == 0, result.err
    card = (out / "README.md").read_text()
    assert "## Verification" in card
    for local in (str(tmp_path), str(base), str(adapter), str(Path(base).parent)):
        assert local not in card
    assert "base     " + Path(base).name in card  # the verify table keeps the folder's name


def test_local_paths_keep_their_last_component_or_hub_id():
    from d2merge.export.model_card import without_local_paths

    text = ("base     /tmp/run-7/base\nadapter  /home/me/ad  (lora)\nprobes from C:\\data\\p.txt\n"
            "cached /root/.cache/huggingface/hub/models--org--name/snapshots/abc1 ratio 1/2")
    assert without_local_paths(text) == ("base     base\nadapter  ad  (lora)\nprobes from p.txt\n"
                                         "cached org/name ratio 1/2")


# ---- 10: fail early ------------------------------------------------------------------------------


def test_export_onnx_refuses_dynamo_opset_17_before_loading_the_model(tiny_bases, cli_runner, tmp_path,
                                                                      monkeypatch):
    import d2merge.export.onnx as onnx_export

    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded for a request known to fail")

    monkeypatch.setattr(onnx_export, "_load_model", must_not_load)
    result = cli_runner(["export-onnx", tiny_bases("llama"), "-o", tmp_path / "m.onnx", "--opset", "17"])
    assert result.code == 2
    assert result.err.startswith("d2merge: error:") and result.err.count("\n") == 1
    assert "dynamo exporter cannot write ONNX opset 17" in result.err and "--exporter legacy" in result.err
    assert list(tmp_path.iterdir()) == []


def test_offline_push_fails_before_merging(tiny_bases, make_adapter, cli_runner, tmp_path, monkeypatch):
    # Both imported before patching: d2merge.publish binds formats.merge_as when it is first imported,
    # and would keep the stand-in after this test if that import happened while it was patched.
    import d2merge.export.formats
    import d2merge.publish

    def must_not_merge(*_args, **_kwargs):
        raise AssertionError("merged although the push could never happen")

    monkeypatch.setattr(d2merge.export.formats, "merge_as", must_not_merge)
    monkeypatch.setattr(d2merge.publish, "merge_as", must_not_merge)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tiny_bases("llama")
    result = cli_runner(["merge", base, make_adapter(base, "lora"), "-o", tmp_path / "m", "--push-to", "me/m"])
    assert result.code == 2 and "HF_HUB_OFFLINE" in result.err and result.err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flags", "needle"), [
    (["--json"], "--json does nothing here"),
    (["--private"], "--private does nothing here"),
    (["--revision", "exp"], "--revision does nothing here"),
    (["--gguf-type", "q8_0"], "--gguf-type does nothing here"),
])
def test_flags_that_do_nothing_in_context_are_errors(tiny_bases, make_adapter, cli_runner, tmp_path, flags, needle):
    base = tiny_bases("llama")
    result = cli_runner(["merge", base, make_adapter(base, "lora"), "-o", tmp_path / "m", *flags])
    assert result.code == 2 and needle in result.err
    assert list(tmp_path.iterdir()) == []


def test_dry_run_json_carries_the_per_tensor_list(tiny_bases, make_adapter, cli_runner):
    import d2merge

    base = tiny_bases("llama")
    adapter = make_adapter(base, "dual_lora")
    result = cli_runner(["merge", base, adapter, "--dry-run", "--json", "--dtype", "bf16"])
    assert result.code == 0, result.err
    changed = json.loads(result.out)["changed"]
    modules = d2merge.load_adapter(adapter).modules
    assert sorted(c["tensor"] for c in changed) == sorted(f"{m}.weight" for m in modules)
    text = cli_runner(["merge", base, adapter, "--dry-run", "--dtype", "bf16"]).out
    for entry in changed:  # the same rows as the text table
        assert entry["action"] == "merge" and entry["dtype"] == "BF16" and "/" in entry["rank"]
        assert any(line.split()[:3] == [entry["tensor"], "merge", entry["rank"]] for line in text.splitlines())


def test_inspect_of_a_base_folder_does_not_hint_at_a_second_argument(tiny_bases, cli_runner):
    result = cli_runner(["inspect", tiny_bases("llama")])
    assert result.code == 2 and "adapter_config.json" in result.err
    assert "second" not in result.err


# ---- 11: progress and the demo's step lines ------------------------------------------------------


def test_demo_prints_each_step_line_when_it_starts(tmp_path, monkeypatch):
    import d2merge.train
    from d2merge.demo import run_demo

    lines: list[str] = []

    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt  # stands for a long training run the user is watching

    monkeypatch.setattr(d2merge.train, "train_adapter", stop)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, echo=lines.append, quick=True)
    assert lines[0] == "[1] build base model ..."
    assert lines[-1] == "[2] train D2-LoRA adapter ..."  # printed before the step ran


def test_bench_decode_prompt_length_option_and_no_bar_off_a_terminal(tiny_bases, make_adapter, cli_runner,
                                                                    tmp_path):
    base = tiny_bases("llama")
    report = tmp_path / "bench.json"
    result = cli_runner(["bench", base, make_adapter(base, "lora"), "--variants", "base", "--batch-sizes", "1",
                         "--seq-lens", "4", "--decode-tokens", "2", "--decode-prompt-len", "5", "--warmup", "0",
                         "--repeats", "1", "--json", report])
    assert result.code == 0, result.err
    saved = json.loads(report.read_text())
    rows = saved["results"]
    assert saved["settings"]["decode_prompt_len"] == 5
    assert [(r["mode"], r["seq"]) for r in rows] == [("prefill", 4), ("decode", 5)]
    assert "\r" not in result.err  # tqdm stays quiet when stderr is not a terminal


# ---- 12: fast help, and no deprecated cache argument ---------------------------------------------


def test_help_does_not_import_torch():
    code = ("import sys\nfrom d2merge.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules))")
    done = run_python(["-c", code], timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_bench_decode_uses_the_cache_argument_without_deprecation_warnings(tiny_bases):
    from d2merge.bench import BenchSettings, bench_torch
    from d2merge.runtime import load_base_model

    model = load_base_model(tiny_bases("llama")).eval()
    settings = BenchSettings(batch_sizes=(1,), seq_lens=(4,), decode_tokens=2, decode_prompt_len=3, warmup=0,
                             repeats=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = bench_torch(model, "base", settings)
    assert [r.mode for r in rows] == ["prefill", "decode"]
    assert not [w for w in caught if "past_key_values" in str(w.message)]


# ---- 6: a library call leaves the caller's torch as it found it --------------------------------


def test_merge_gives_back_the_callers_thread_count(tiny_bases, make_adapter, tmp_path, monkeypatch):
    import torch

    import d2merge
    import d2merge.engine
    from d2merge.errors import D2MergeError

    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        d2merge.merge(base, adapter, tmp_path / "merged", hash_sources=False)
        assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2

        def corrupt(*_args, **_kwargs):
            raise D2MergeError("merged weight has 1 NaN/Inf value(s)")

        monkeypatch.setattr(d2merge.engine, "check_finite", corrupt)  # fails inside the engine's stream
        with pytest.raises(D2MergeError):
            d2merge.merge(base, adapter, tmp_path / "failed", hash_sources=False)
        assert torch.get_num_threads() == 2 and not (tmp_path / "failed").exists()
    finally:
        torch.set_num_threads(before)
