"""End to end: tiny random bases, every method, merged to disk and loaded back with transformers.

The oracle is the unmerged model (base + d2merge's runtime modules): the merged folder must load
with ``AutoModelForCausalLM.from_pretrained`` and give the same logits within 1e-5 (fp32 output).
The rest checks what a user relies on: the folder is complete, low-precision outputs are one cast
of the fp32 merge, runs are reproducible byte for byte, --dry-run writes nothing, and adapters
that replace whole tensors (modules_to_save, tied embeddings) are handled explicitly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import d2merge
from d2merge.errors import D2MergeError
from d2merge.io.checkpoint import SAFETENSORS_INDEX
from d2merge.runtime import load_base_model, load_unmerged

METHOD_NAMES = ("lora", "dora", "d2lora", "dual_lora")
SHARD_SIZE = "20KB"  # as the sharded tiny bases: several output shards
LOGITS_ATOL = 1e-5
VOCAB_SIZE, HIDDEN = 128, 32  # the tiny bases' embedding shape
LM_HEAD_KEY = "base_model.model.lm_head.weight"
WTE_KEY = "base_model.model.transformer.wte.weight"


@pytest.fixture(scope="module")
def merged_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``merged_folder(base, adapter, **options) -> Path``: d2merge.merge's output, once per arguments."""
    root = tmp_path_factory.mktemp("merged")
    made: dict[str, Path] = {}

    def get(base: Path, adapter: Path, **options: Any) -> Path:
        key = repr((str(base), str(adapter), sorted(options.items())))
        if key not in made:
            out = root / f"out-{len(made):03d}"
            d2merge.merge(base, adapter, out, **options)
            made[key] = out
        return made[key]

    return get


def new_embedding(seed: int) -> torch.Tensor:
    return 0.05 * torch.randn(VOCAB_SIZE, HIDDEN, generator=torch.Generator().manual_seed(seed))


def leftovers(folder: Path) -> list[str]:
    """Temp folders a merge could leave beside its output."""
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.d2merge-")]


# ---- every architecture x layout x method -----------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merged_model_loads_and_matches_unmerged(arch: str, sharded: bool, method: str, tiny_bases: Any,
                                                 make_adapter: Any, merged_folder: Any, read_tensors: Any,
                                                 logits_of: Any) -> None:
    base = tiny_bases(arch, sharded=sharded)
    adapter = make_adapter(base, method)
    out = merged_folder(base, adapter, dtype="fp32", max_shard_size=SHARD_SIZE if sharded else "5GB")

    names = set(os.listdir(out))
    assert {"config.json", "README.md", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not leftovers(out)
    tensors = read_tensors(out)
    base_tensors = read_tensors(base)
    assert set(tensors) == set(base_tensors)
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if sharded:
        assert SAFETENSORS_INDEX in names and len(shards) > 1
        index = json.loads((out / SAFETENSORS_INDEX).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        assert SAFETENSORS_INDEX not in names and shards == ["model.safetensors"]
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
    adapter_modules = d2merge.load_adapter(adapter).modules
    changed = {n for n in tensors if not torch.equal(tensors[n], base_tensors[n])}
    assert changed == {f"{m}.weight" for m in adapter_modules}  # biases, norms, embeddings copied bit for bit
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in tensors)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    assert "d2merge" in (out / "README.md").read_text()

    merged_logits = logits_of(out)
    unmerged_logits = logits_of(load_unmerged(base, adapter))
    base_logits = logits_of(base)
    assert float((merged_logits - unmerged_logits).abs().max()) <= LOGITS_ATOL
    assert float((merged_logits - base_logits).abs().max()) > 1e-2, "the adapter must change the logits"


# ---- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_and_fp16_outputs_are_one_cast_of_the_fp32_merge(arch: str, method: str, tiny_bases: Any,
                                                              make_adapter: Any, merged_folder: Any,
                                                              read_tensors: Any) -> None:
    base = tiny_bases(arch, sharded=True)
    adapter = make_adapter(base, method)
    fp32 = read_tensors(merged_folder(base, adapter, dtype="fp32"))
    for dtype_name, dtype, config_name in (("bf16", torch.bfloat16, "bfloat16"), ("fp16", torch.float16, "float16")):
        out = merged_folder(base, adapter, dtype=dtype_name)
        low = read_tensors(out)
        assert set(low) == set(fp32)
        for name, tensor in low.items():
            assert tensor.dtype == dtype, name
            assert torch.equal(tensor, fp32[name].to(dtype)), f"{name}: not the fp32 merge cast once to {dtype_name}"
        assert json.loads((out / "config.json").read_text())["dtype"] == config_name


def test_bf16_base_with_dtype_auto_stays_bf16(tiny_bases: Any, make_adapter: Any, merged_folder: Any,
                                              read_tensors: Any) -> None:
    base = tiny_bases("llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, "d2lora")
    merge_plan = d2merge.plan(base, adapter, dtype="auto")
    assert merge_plan.out_dtype == "auto (bf16)"
    out = merged_folder(base, adapter, dtype="auto")
    tensors, base_tensors = read_tensors(out), read_tensors(base)
    assert all(t.dtype == torch.bfloat16 for t in base_tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    loaded = d2merge.load_adapter(adapter)
    for item in merge_plan.merged:
        # fp32 math on the bf16 base, cast once: never merged in bf16.
        w0 = base_tensors[item.name].float()  # exact: every bf16 value is an fp32 value
        expected = loaded.method.merged_weight(w0, loaded.factors(item.module), item.settings)
        assert torch.equal(tensors[item.name], expected.to(torch.bfloat16)), item.name
    base_config = json.loads((base / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype") == base_config.get("dtype") == "bfloat16"


# ---- reproducibility and dry runs ----------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_two_runs_give_byte_identical_files(method: str, tiny_bases: Any, make_adapter: Any, tmp_path: Path) -> None:
    base = tiny_bases("qwen2", sharded=True)
    adapter = make_adapter(base, method)
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        d2merge.merge(base, adapter, out, dtype="bf16", max_shard_size=SHARD_SIZE)  # source hashes included

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    first, second = files(outs[0]), files(outs[1])
    assert SAFETENSORS_INDEX in first and "README.md" in first
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs"


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_bases: Any, make_adapter: Any, cli_runner: Any,
                                                    tmp_path: Path) -> None:
    base = tiny_bases("llama", sharded=True)
    adapter = make_adapter(base, "dual_lora")
    out = tmp_path / "merged"
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(base)), sorted(os.listdir(adapter))
    result = cli_runner(["merge", base, adapter, "-o", out, "--dry-run"])
    assert result.code == 0, result.err
    assert not out.exists()
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(base)), sorted(os.listdir(adapter))) == before
    modules = d2merge.load_adapter(adapter).modules
    merge_lines = [line for line in result.out.splitlines() if re.match(r"\S+\.weight +merge ", line)]
    assert len(merge_lines) == len(modules)
    assert all(any(line.startswith(f"{m}.weight ") for line in merge_lines) for m in modules)
    assert "dual_lora" in result.out

    result = cli_runner(["merge", base, adapter, "--dry-run", "--json", "--dtype", "bf16"])
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["method"] == "dual_lora" and summary["out_dtype"] == "bf16"
    assert summary["tensors"]["merge"] == len(modules)
    assert not out.exists()


# ---- whole-tensor replacements ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_modules_to_save_replaces_the_base_tensor(dtype: str, tiny_bases: Any, make_adapter: Any,
                                                  merged_folder: Any, read_tensors: Any, logits_of: Any) -> None:
    base = tiny_bases("llama")
    head = new_embedding(seed=5)
    adapter = make_adapter(base, "d2lora", modules_to_save=["lm_head"], extra_tensors={LM_HEAD_KEY: head})
    out = merged_folder(base, adapter, dtype=dtype)
    tensors, base_tensors = read_tensors(out), read_tensors(base)
    out_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert torch.equal(tensors["lm_head.weight"], head.to(out_dtype))  # copied, not merged
    assert torch.equal(tensors["model.embed_tokens.weight"], base_tensors["model.embed_tokens.weight"].to(out_dtype))
    if dtype == "fp32":
        unmerged = load_unmerged(base, adapter)
        assert torch.equal(unmerged.lm_head.weight.detach(), head)
        assert float((logits_of(out) - logits_of(unmerged)).abs().max()) <= LOGITS_ATOL


@pytest.mark.parametrize("changed", ["lm_head", "wte"])
def test_tied_embeddings_untie_is_exact(changed: str, tiny_bases: Any, make_adapter: Any, merged_folder: Any,
                                        read_tensors: Any, logits_of: Any) -> None:
    base = tiny_bases("gpt2")
    base_tensors = read_tensors(base)
    assert "lm_head.weight" not in base_tensors  # tied: transformers reads lm_head from wte
    new = new_embedding(seed=6)
    key = LM_HEAD_KEY if changed == "lm_head" else WTE_KEY
    # Only the replacement: the merged and unmerged models then run the very same weights.
    adapter = make_adapter(base, "lora", modules_to_save=[changed], extra_tensors={key: new}, drop_factors=True)
    merge_plan = d2merge.plan(base, adapter, tied_embeddings="untie")
    assert any("untied" in note for note in merge_plan.notes)
    out = merged_folder(base, adapter, dtype="fp32", tied_embeddings="untie")
    tensors = read_tensors(out)
    old = base_tensors["transformer.wte.weight"]
    expected_head, expected_wte = (new, old) if changed == "lm_head" else (old, new)
    assert torch.equal(tensors["lm_head.weight"], expected_head)
    assert torch.equal(tensors["transformer.wte.weight"], expected_wte)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    merged_logits = logits_of(out)
    unmerged = load_unmerged(base, adapter)
    assert torch.equal(unmerged.lm_head.weight.detach(), expected_head)
    assert torch.equal(unmerged.transformer.wte.weight.detach(), expected_wte)
    assert torch.equal(merged_logits, logits_of(unmerged))
    assert float((merged_logits - logits_of(base)).abs().max()) > 1e-2


def test_tied_embeddings_untie_with_factors_matches_unmerged(tiny_bases: Any, make_adapter: Any, merged_folder: Any,
                                                             logits_of: Any) -> None:
    base = tiny_bases("gpt2", sharded=True)
    adapter = make_adapter(base, "dora", modules_to_save=["lm_head"], extra_tensors={LM_HEAD_KEY: new_embedding(7)})
    out = merged_folder(base, adapter, dtype="fp32", tied_embeddings="untie", max_shard_size=SHARD_SIZE)
    assert float((logits_of(out) - logits_of(load_unmerged(base, adapter))).abs().max()) <= LOGITS_ATOL


def test_tied_embeddings_tie_shares_the_change(tiny_bases: Any, make_adapter: Any, merged_folder: Any,
                                               read_tensors: Any, logits_of: Any) -> None:
    base = tiny_bases("gpt2")
    new = new_embedding(seed=8)
    adapter = make_adapter(base, "lora", modules_to_save=["lm_head"], extra_tensors={LM_HEAD_KEY: new},
                           drop_factors=True)
    merge_plan = d2merge.plan(base, adapter, tied_embeddings="tie")
    assert any("kept tied" in note for note in merge_plan.notes)
    out = merged_folder(base, adapter, dtype="fp32", tied_embeddings="tie")
    tensors = read_tensors(out)
    assert "lm_head.weight" not in tensors
    assert torch.equal(tensors["transformer.wte.weight"], new)
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True
    both_replaced = load_base_model(base)
    with torch.no_grad():
        both_replaced.transformer.wte.weight.copy_(new)  # tied: lm_head follows
    assert torch.equal(both_replaced.lm_head.weight, new)
    assert torch.equal(logits_of(out), logits_of(both_replaced))


@pytest.mark.parametrize("changed", ["lm_head", "wte"])
def test_tied_embeddings_error_refuses(changed: str, tiny_bases: Any, make_adapter: Any, cli_runner: Any,
                                       tmp_path: Path) -> None:
    base = tiny_bases("gpt2")
    key = LM_HEAD_KEY if changed == "lm_head" else WTE_KEY
    adapter = make_adapter(base, "lora", modules_to_save=[changed], extra_tensors={key: new_embedding(9)})
    out = tmp_path / "merged"
    result = cli_runner(["merge", base, adapter, "-o", out, "--tied-embeddings", "error"])
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1 and result.err.startswith("d2merge: error:")
    assert "tied" in result.err
    assert not out.exists() and not leftovers(out)
    with pytest.raises(D2MergeError, match="tied"):
        d2merge.merge(base, adapter, tmp_path / "api", tied_embeddings="error")
    assert not (tmp_path / "api").exists()


# ---- the Python API ----------------------------------------------------------------------------


def test_python_api(tiny_bases: Any, make_adapter: Any, read_tensors: Any, tmp_path: Path) -> None:
    base = tiny_bases("llama", sharded=True)
    adapter_path = make_adapter(base, "d2lora", tau=1.0, norm_axis="in", residual=False)
    adapter = d2merge.load_adapter(adapter_path)
    assert adapter.method.name == "d2lora"
    assert adapter.config.options == {"tau": 1.0, "norm_axis": "in", "residual": False, "eps": 0.0}
    merge_plan = d2merge.plan(base, adapter_path, dtype="bf16")
    assert len(merge_plan.merged) == len(adapter.modules)
    assert "model.layers.0.self_attn.q_proj.weight" in merge_plan.describe()
    assert merge_plan.summary()["out_dtype"] == "bf16"
    options = d2merge.MergeOptions(dtype="bf16", max_shard_size="30KB", hash_sources=False)
    result = d2merge.merge(base, adapter, tmp_path / "merged", options)
    assert isinstance(result, d2merge.MergeResult)
    assert result.output == (tmp_path / "merged").absolute()
    assert all((result.output / name).is_file() for name in result.files)
    assert SAFETENSORS_INDEX in result.files
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(result.output).values())
    with pytest.raises(D2MergeError, match="already exists"):
        d2merge.merge(base, adapter, tmp_path / "merged", options)
    d2merge.merge(base, adapter, tmp_path / "merged", options, overwrite=True)
