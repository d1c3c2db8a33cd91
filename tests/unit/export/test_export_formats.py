"""HF folder completeness, the single-file export, merge --format, and bench end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from d2merge.api import merge
from d2merge.bench import SCHEMA_VERSION, BenchSettings, bench
from d2merge.cli import main
from d2merge.export.protocol import OutputFormat
from d2merge.export.single_file import merge_to_safetensors
from d2merge.io.safetensors_file import SafetensorsFile
from d2merge.runtime import load_unmerged
from d2merge.synthetic import save_random_adapter, save_tiny_base


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    base = save_tiny_base(root / "base", "llama", max_shard_size="20KB")
    # A chat template and special tokens map, so "every tokenizer file" is more than tokenizer.json.
    (base / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (base / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    adapter = save_random_adapter(base, root / "adapter", "d2lora", r=4, tau=0.5, norm_axis="in")
    return base, adapter


def test_hf_folder_loads_with_transformers_and_tokenizer(llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = llama_pair
    out = merge(base, adapter, tmp_path / "merged", max_shard_size="20KB").output
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json", "README.md", "model.safetensors.index.json"):
        assert (out / name).is_file(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["the cat is red", "one two three four five"], return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    unmerged = load_unmerged(base, adapter)
    with torch.no_grad():
        got = merged(**ids).logits
        want = unmerged(**ids).logits
    real = ids["attention_mask"].bool()
    assert (got[real] - want[real]).abs().max() < 1e-5


def test_model_card_front_matter_and_body(llama_pair, tmp_path):
    base, adapter = llama_pair
    out = merge(base, adapter, tmp_path / "merged").output
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front
    assert "- d2merge" in front and "- d2lora" in front
    for fact in ("tau: 0.5", "norm_axis: in", "r: 4", "lora_alpha: 8.0", "0.1.0"):
        assert fact in card, fact
    # every source file is listed with a 64-hex sha256
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert any("adapter/adapter_model.safetensors" in r for r in rows)
    assert sum("base/model-" in r for r in rows) == len(list(base.glob("model-*.safetensors")))
    assert all(len(r.split("`")[3]) == 64 for r in rows)


def test_model_card_names_hub_base_only(tmp_path):
    """base_model is what is true of the base used: its Hub id when it came from the Hub cache,
    never the adapter's claim (issue 10: meta-llama/Llama-3.1-8B for a tiny local base)."""
    base = save_tiny_base(tmp_path / "base", "llama")
    adapter = save_random_adapter(base, tmp_path / "ad", "lora", base_model_name_or_path="org/tiny-llama")
    card = (merge(base, adapter, tmp_path / "m").output / "README.md").read_text()
    assert "base_model" not in card.split("---")[1] and "org/tiny-llama" not in card
    cached = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "abc123"
    cached.parent.mkdir(parents=True)
    shutil.copytree(base, cached)
    card = (merge(cached, adapter, tmp_path / "m2").output / "README.md").read_text()
    assert 'base_model:\n- "org/tiny-llama"\nbase_model_relation: finetune' in card


def test_single_safetensors_carries_provenance(llama_pair, tmp_path):
    base, adapter = llama_pair
    result = merge_to_safetensors(base, adapter, tmp_path / "merged.safetensors")
    sf = SafetensorsFile(result.output)
    meta = sf.metadata
    assert meta["method"] == "d2lora" and meta["d2merge_version"] == "0.1.0"
    settings = json.loads(meta["settings"])
    assert settings["tau"] == 0.5 and settings["norm_axis"] == "in"
    sources = json.loads(meta["sources"])
    assert len(sources) == 2 + len(list(base.glob("model-*.safetensors")))
    from d2merge.io.output import sha256_file

    assert sources["adapter/adapter_model.safetensors"] == sha256_file(adapter / "adapter_model.safetensors")
    # same tensors as the folder output
    folder = merge(base, adapter, tmp_path / "folder").output
    from d2merge.io.checkpoint import open_base

    reference = open_base(folder).tensors
    assert sorted(sf.keys()) == sorted(reference.keys())
    for name in sf.keys():
        assert torch.equal(sf.read(name), reference.read(name)), name
    assert not list(tmp_path.glob(".*d2merge-tmp*"))


def test_cli_format_safetensors_and_bf16_onnx_refused(llama_pair, tmp_path, capsys):
    base, adapter = llama_pair
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(base), str(adapter), "-o", str(tmp_path / "m.safetensors"), "--format", "safetensors",
              "-q"])
    assert exit_info.value.code == 0
    assert (tmp_path / "m.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--format", "onnx", "--dtype", "bf16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bf16" in err[0]
    assert not (tmp_path / "o").exists()


def test_single_file_refuses_folder_output(llama_pair, tmp_path, capsys):
    base, adapter = llama_pair
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(base), str(adapter), "-o", str(tmp_path / "x.safetensors"), "--format", "safetensors",
              "--overwrite"])
    assert exit_info.value.code == 2
    assert "folder" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_end_to_end_json(llama_pair, tmp_path):
    base, adapter = llama_pair
    settings = BenchSettings(batch_sizes=(1, 2), seq_lens=(8,), decode_tokens=2, warmup=1, repeats=2)
    report = bench(base, adapter, settings=settings)
    data = report.to_json()
    assert data["schema_version"] == SCHEMA_VERSION
    assert set(data) == {"schema_version", "settings", "meta", "results", "ratios"}
    variants = {r["variant"] for r in data["results"]}
    assert variants == {"base", "unmerged", "merged", "onnx"}
    for row in data["results"]:
        assert set(row) == {"variant", "mode", "batch", "seq", "runs", "latency_ms_p50", "latency_ms_p95",
                            "latency_ms_min", "latency_ms_max", "tokens_per_s", "spread_pct"}
        assert row["tokens_per_s"] > 0 and row["latency_ms_min"] <= row["latency_ms_p50"] <= row["latency_ms_max"]
    modes = {(r["variant"], r["mode"]) for r in data["results"]}
    assert ("merged", "decode") in modes and ("onnx", "prefill") in modes
    cell = next(c for c in data["ratios"] if c["mode"] == "prefill" and c["batch"] == 2)
    assert {"merged_over_unmerged", "merged_over_base", "onnx_over_pytorch"} <= set(cell)
    assert "spread" in report.table()


def test_bench_cli_writes_json(llama_pair, tmp_path):
    base, adapter = llama_pair
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(base), str(adapter), "--variants", "base,merged", "--batch-sizes", "1", "--seq-lens", "4",
              "--decode-tokens", "0", "--warmup", "0", "--repeats", "1", "--json", str(out)])
    assert exit_info.value.code == 0
    data = json.loads(out.read_text())
    assert {r["variant"] for r in data["results"]} == {"base", "merged"}
    assert all(r["mode"] == "prefill" for r in data["results"])


def test_bench_rejects_unknown_variant(llama_pair):
    from d2merge.errors import D2MergeError

    with pytest.raises(D2MergeError, match="unknown bench variant"):
        bench(*llama_pair, variants=("gpu",))


def test_bench_plot_draws_a_png(llama_pair, tmp_path):
    from d2merge.bench import plot_report

    settings = BenchSettings(batch_sizes=(1,), seq_lens=(4,), decode_tokens=1, warmup=0, repeats=1)
    report = bench(*llama_pair, variants=("base", "merged"), settings=settings)
    out = tmp_path / "bench.png"
    plot_report(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


def test_bench_refuses_a_model_that_will_not_fit_before_loading_it(llama_pair, monkeypatch):
    import d2merge.bench as bench_module
    from d2merge.errors import D2MergeError

    monkeypatch.setattr(bench_module, "available_memory", lambda: 1024)
    monkeypatch.setattr(bench_module, "bench_torch", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(D2MergeError, match=r"needs about 0\.0 GiB and 0\.0 GiB is available"):
        bench(*llama_pair, variants=("base",))


class _NpzFormat(OutputFormat):
    """A toy output format written as a plug-in would be: the fp32 merge converted into one .npz file."""

    name = "toy-npz"
    is_file = True

    def merge(self, base, adapter, out, options, *, progress, choices):
        import numpy as np

        from d2merge.export.protocol import ExportOutcome, merge_then_convert
        from d2merge.io.safetensors_file import SafetensorsFile

        out = Path(out)

        def convert(folder: Path) -> Path:
            stored = SafetensorsFile(folder / "model.safetensors")
            np.savez(out, **{name.replace(".", "/"): stored.read(name).numpy() for name in stored.keys()})
            return out

        result, written = merge_then_convert(base, adapter, out, options, progress=progress, convert=convert)
        return ExportOutcome(self.name, written, result)

    def claims(self, path):
        return path.suffix == ".npz"

    def open_for_verify(self, path):
        return ("toy", path)


def test_a_new_format_is_one_module_and_one_registry_line(llama_pair, tmp_path):
    """What docs/architecture.md's "Adding an output format" promises: the plug-in and its registry entry are
    all a format needs to be written by merge_as and opened by verify's exported-column lookup."""
    import numpy as np

    from d2merge.export.formats import merge_as
    from d2merge.export.registry import register, unregister
    from d2merge.verify.columns import open_exported

    base, adapter = llama_pair
    register(_NpzFormat())
    try:
        outcome = merge_as(base, adapter, tmp_path / "m.npz", format="toy-npz")
        assert outcome.format == "toy-npz" and outcome.output == tmp_path / "m.npz"
        with np.load(outcome.output) as stored:
            reference = merge(base, adapter, tmp_path / "fp32", dtype="fp32")
            from d2merge.io.checkpoint import open_base

            merged = open_base(reference.output).tensors
            name = next(t.name for t in reference.plan.merged)
            assert np.array_equal(stored[name.replace(".", "/")], merged.read(name).numpy())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32", "m.npz"]  # the work folder is gone
        assert open_exported(outcome.output) == ("toy", outcome.output)
    finally:
        unregister("toy-npz")
    with pytest.raises(Exception, match="unknown format 'toy-npz'; choose one of hf, safetensors, onnx, onnx-genai, gguf"):
        merge_as(base, adapter, tmp_path / "again.npz", format="toy-npz")


def test_merge_many_writes_the_registrys_many_formats():
    from d2merge.export.formats import FORMATS
    from d2merge.export.registry import REGISTRY
    from d2merge.options.many import MANY_FORMATS

    assert FORMATS == ("hf", "safetensors", "onnx", "onnx-genai", "gguf")
    from d2merge.options.merge import OUTPUT_FORMATS

    assert OUTPUT_FORMATS == FORMATS  # the CLI's --format choices (torch-free) are the registry's formats
    assert MANY_FORMATS == tuple(name for name, plugin in REGISTRY.items() if plugin.many)
