"""``d2merge convert --to lora`` and ``d2merge extract``: plain LoRAs that PEFT loads, exact or reported.

Convert: PEFT loads the converted folder on the base and its ``merge_and_unload`` must equal
d2merge's merge of the original adapter (DoRA, D2-LoRA, Dual LoRA, a PiSSA LoRA) to fp32
rounding at the default (exact) rank; below it, the update's error is what the report says.
Extract: the truncated SVD of TUNED - BASE, checked against numpy's SVD.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from d2merge import merge
from d2merge.adapter_ops.convert import convert_to_lora
from d2merge.adapter_ops.extract import extract
from d2merge.options.adapter_ops import ConvertOptions, ExtractOptions
from d2merge.errors import D2MergeError

peft = pytest.importorskip("peft")

EXACT_ATOL = 2e-5  # fp32 SVD of a 32x32..88 update, reassembled: a few ulps of weights ~0.1-1
TARGETS = ("q_proj", "v_proj", "down_proj")


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


ADAPTERS = {
    "dora": dict(method="dora"),
    "d2lora": dict(method="d2lora", tau=0.5),
    "d2lora-in": dict(method="d2lora", tau=1.0, norm_axis="in", residual=False),
    "dual_lora": dict(method="dual_lora"),
    "pissa-lora": dict(method="lora", init_lora_weights="pissa"),
    "olora-lora": dict(method="lora", init_lora_weights="olora"),
}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_convert_is_exact_at_full_rank(case: str, tiny_bases: Any, make_adapter: Any, read_tensors: Any,
                                       tmp_path: Path) -> None:
    base = tiny_bases("llama")
    fields = dict(ADAPTERS[case])
    adapter = make_adapter(base, fields.pop("method"), target_modules=TARGETS, **fields)
    out = tmp_path / "as-lora"
    result = convert_to_lora(adapter, base, out, report=tmp_path / "report.json")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False and config["modules_to_save"] is None
    assert not {"tau", "norm_axis", "residual", "eps", "r_mag"} & set(config)
    assert all(m.energy > 1 - 1e-9 for m in result.modules)
    merge(base, adapter, tmp_path / "ours", dtype="fp32", hash_sources=False)
    ours = read_tensors(tmp_path / "ours")
    theirs = _peft_merged(base, out)
    changed = 0
    for name, tensor in ours.items():
        error = float((tensor - theirs[name]).abs().max())
        assert error <= EXACT_ATOL, f"{name}: |merge(original) - peft(merge(converted))| = {error:.3g}"
        changed += name.endswith("proj.weight")
    assert changed
    assert json.loads((tmp_path / "report.json").read_text())["modules"]


def test_convert_below_rank_reports_its_error(tiny_bases: Any, make_adapter: Any, read_tensors: Any,
                                              tmp_path: Path) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "dora", target_modules=TARGETS)
    result = convert_to_lora(adapter, base, tmp_path / "r4", ConvertOptions(rank=4))
    assert all(m.rank == 4 for m in result.modules)
    merge(base, adapter, tmp_path / "ours", dtype="fp32", hash_sources=False)
    ours, base_t = read_tensors(tmp_path / "ours"), read_tensors(base)
    theirs = _peft_merged(base, tmp_path / "r4")
    for row in result.modules:
        name = f"{row.module}.weight"
        update = ours[name].double() - base_t[name].double()
        error = float((theirs[name].double() - ours[name].double()).norm() / update.norm())
        assert error == pytest.approx(row.relative_error, rel=1e-3, abs=1e-6)
        assert row.relative_error > 1e-3  # DoRA's update has full rank: rank 4 loses something


def test_convert_energy_picks_the_least_rank(tiny_bases: Any, make_adapter: Any, tmp_path: Path) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "d2lora", target_modules=TARGETS, tau=0.5)
    result = convert_to_lora(adapter, base, tmp_path / "e", ConvertOptions(energy=0.9))
    for row in result.modules:
        assert row.energy >= 0.9 and row.rank <= row.full_rank


@pytest.mark.parametrize("options,message", [
    (dict(rank=33), "above the size of module"),
])
def test_convert_refusals_write_nothing(options: dict[str, Any], message: str, tiny_bases: Any, make_adapter: Any,
                                        tmp_path: Path) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "dora", target_modules=TARGETS)
    with pytest.raises(D2MergeError, match=message):
        convert_to_lora(adapter, base, tmp_path / "out", ConvertOptions(**options))
    assert not (tmp_path / "out").exists()


def _tuned_copy(base: Path, folder: Path, seed: int, *, norm: bool = False) -> Path:
    """TUNED: the base with low-rank-plus-noise changes on some projections (and optionally a norm)."""
    import shutil

    from d2merge.io.safetensors_file import SafetensorsFile, save_tensors

    shutil.copytree(base, folder)
    stored = SafetensorsFile(base / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in stored.keys():
        t = stored.read(name).clone()
        if name.endswith(("q_proj.weight", "down_proj.weight", "embed_tokens.weight")):
            rows, cols = t.shape
            t += 0.05 * torch.randn(rows, 3, generator=g) @ torch.randn(3, cols, generator=g)
            t += 1e-3 * torch.randn(rows, cols, generator=g)
        if norm and name.endswith("input_layernorm.weight"):
            t += 0.01
        tensors[name] = t
    save_tensors(folder / "model.safetensors", tensors, {"format": "pt"})
    return folder


def test_extract_matches_numpy_svd_and_peft_loads_it(tiny_bases: Any, read_tensors: Any, tmp_path: Path) -> None:
    base = tiny_bases("llama")
    tuned = _tuned_copy(base, tmp_path / "tuned", 3)
    result = extract(base, tuned, tmp_path / "lora", ExtractOptions(rank=3), report=tmp_path / "r.json")
    modules = {m.module for m in result.modules}
    assert any(m.endswith("q_proj") for m in modules) and "model.embed_tokens" in modules
    assert not any(m.endswith("v_proj") for m in modules)  # equal weights are left out
    assert result.unchanged > 0
    base_t, tuned_t = read_tensors(base), read_tensors(tuned)
    theirs = _peft_merged(base, tmp_path / "lora")
    for row in result.modules:
        name = f"{row.module}.weight"
        update = (tuned_t[name].double() - base_t[name].double()).numpy()
        u, s, vh = np.linalg.svd(update, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        ours = (theirs[name].double() - base_t[name].double()).numpy()
        assert np.abs(ours - best).max() <= 1e-5 * max(1.0, np.abs(best).max()), name
        assert row.energy == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-6)


def test_extract_energy_and_refusals(tiny_bases: Any, tmp_path: Path) -> None:
    base = tiny_bases("llama")
    tuned = _tuned_copy(base, tmp_path / "tuned", 4, norm=True)
    with pytest.raises(D2MergeError, match="input_layernorm.weight.*a LoRA cannot carry"):
        extract(base, tuned, tmp_path / "no", ExtractOptions(rank=2))
    assert not (tmp_path / "no").exists()
    result = extract(base, tuned, tmp_path / "e", ExtractOptions(energy=0.95, skip_other_changes=True))
    assert result.left_out and all(m.energy >= 0.95 for m in result.modules)
    with pytest.raises(D2MergeError, match="above the size"):
        extract(base, tuned, tmp_path / "big", ExtractOptions(rank=1000, skip_other_changes=True))
    with pytest.raises(D2MergeError, match="qwen2"):
        extract(base, tiny_bases("qwen2"), tmp_path / "arch", ExtractOptions(rank=2))
    assert not (tmp_path / "big").exists() and not (tmp_path / "arch").exists()


def test_convert_and_extract_cli(tiny_bases: Any, make_adapter: Any, cli_runner: Any, tmp_path: Path) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "dual_lora", target_modules=TARGETS)
    result = cli_runner(["convert", adapter, "--base", base, "--rank", "8", "-o", tmp_path / "c",
                         "--report", tmp_path / "c.json"])
    assert result.code == 0, result.err
    assert "least energy kept" in result.out
    report = json.loads((tmp_path / "c.json").read_text())
    assert all(m["rank"] == 8 and m["retained_energy"] < 1 for m in report["modules"])
    tuned = _tuned_copy(base, tmp_path / "tuned", 5)
    result = cli_runner(["extract", base, tuned, "--energy", "0.99", "-o", tmp_path / "e"])
    assert result.code == 0, result.err
    assert (tmp_path / "e" / "adapter_config.json").is_file()
    result = cli_runner(["extract", base, tuned, "-o", tmp_path / "none"])
    assert result.code == 2 and "give exactly one of --rank and --energy" in result.err


def test_randomized_svd_reports_its_exact_error(tiny_bases: Any, read_tensors: Any, tmp_path: Path) -> None:
    base = tiny_bases("llama")
    tuned = _tuned_copy(base, tmp_path / "tuned", 6)
    full = extract(base, tuned, tmp_path / "full", ExtractOptions(rank=3))
    fast = extract(base, tuned, tmp_path / "fast", ExtractOptions(rank=3, svd="randomized"))
    base_t, tuned_t, ours = read_tensors(base), read_tensors(tuned), read_tensors(tmp_path / "fast")
    for row_full, row in zip(full.modules, fast.modules):
        name = row.module
        key = "lora_embedding" if name.endswith("embed_tokens") else "lora"
        a = ours[f"base_model.model.{name}.{key}_A" + ("" if key != "lora" else ".weight")].double()
        b = ours[f"base_model.model.{name}.{key}_B" + ("" if key != "lora" else ".weight")].double()
        update = tuned_t[f"{name}.weight"].double() - base_t[f"{name}.weight"].double()
        update = update.T if key != "lora" else update
        measured = float((update - b @ a).norm() / update.norm())
        assert measured == pytest.approx(row.relative_error, rel=1e-3, abs=1e-6)
        assert row.relative_error <= row_full.relative_error * 1.01 + 1e-6  # near-optimal on rank-3 + noise
    with pytest.raises(D2MergeError, match="needs rank"):
        ExtractOptions(energy=0.9, svd="randomized")


def test_verify_compares_the_converted_adapter_with_the_original(tiny_bases: Any, make_adapter: Any,
                                                                 tmp_path: Path) -> None:
    """The converted LoRA, merged, goes through verify against the original adapter: same report, same gates."""
    from d2merge.verify import verify

    base = tiny_bases("llama")
    adapter = make_adapter(base, "dora", target_modules=TARGETS)
    verdicts = {}
    for rank in (None, 4):
        out = tmp_path / f"r{rank}"
        convert_to_lora(adapter, base, out, ConvertOptions(rank=rank))
        merge(base, out, tmp_path / f"m{rank}", dtype="fp32", hash_sources=False)
        verdicts[rank] = verify(base, adapter, tmp_path / f"m{rank}")
    assert verdicts[None].passed, verdicts[None].failures()
    assert not verdicts[4].passed and any("weight check" in f for f in verdicts[4].failures())
