"""PEFT is the oracle for LoRA and DoRA: its own adapters, merged by d2merge and by ``merge_and_unload``.

Each case builds the adapter with PEFT itself on a tiny model (``get_peft_model`` + ``LoraConfig``),
randomizes the factors (PEFT initializes ``lora_B`` to zero, which would make every merge a no-op)
and the DoRA magnitudes, saves it with ``save_pretrained``, merges it with d2merge (fp32 output) and
compares every tensor with the state dict PEFT's ``merge_and_unload()`` produces. The unmerged
forward of d2merge's runtime modules is also compared with PEFT's own forward.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from d2merge import load_adapter, merge
from d2merge.io.safetensors_file import SafetensorsFile
from d2merge.runtime import load_unmerged

peft = pytest.importorskip("peft")

MERGE_ATOL = 1e-6
FORWARD_ATOL = 1e-5
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-lora": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)),
    "qwen2-lora-biases": ("qwen2", dict(r=4, lora_alpha=16,
                                        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])),
    "llama-rslora": ("llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR)),
    "llama-rank-alpha-pattern": ("llama", dict(
        r=4, lora_alpha=8, target_modules=ALL_LINEAR,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={"layers.0.mlp.down_proj": 3.0, "o_proj": 32})),
    "gpt2-conv1d-lora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                      fan_in_fan_out=True)),
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=ALL_LINEAR)),
    "llama-dora-rslora-pattern": ("llama", dict(
        r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"layers.0.mlp.up_proj": 8}, alpha_pattern={"v_proj": 2.0})),
    "gpt2-conv1d-dora": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"],
                                      fan_in_fan_out=True)),
    "llama-embedding-lora": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial factors (PEFT's B starts at zero) and DoRA magnitudes away from the base norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_((1 + 0.3 * torch.randn(param.shape, generator=g)).abs())
            elif "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=g))


def build_with_peft(base: Path, lora_kwargs: dict[str, Any], folder: Path, *, seed: int = 0,
                    save_embedding_layers: bool | str = "auto"
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Save a PEFT adapter to ``folder``; return PEFT's merged state dict, its unmerged logits, the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
        randomize(peft_model, seed)
        peft_model.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
    peft_model.eval()
    ids = torch.randint(4, 128, (2, 9), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        logits = peft_model(ids).logits
        merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, logits, base_state


def compare_with_peft(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                      base_state: dict[str, torch.Tensor], tied: bool) -> list[str]:
    """Every tensor within MERGE_ATOL of PEFT's merge; returns the names the merge changed."""
    missing = set(theirs) - set(ours)
    if tied:  # the base stores no lm_head.weight; transformers ties it to the embedding
        assert missing <= {"lm_head.weight"}
    else:
        assert not missing
    assert set(ours) <= set(theirs)
    changed = []
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        expected = theirs[name]
        assert tensor.shape == expected.shape, name
        error = float((tensor - expected).abs().max())
        assert error <= MERGE_ATOL, f"{name}: |d2merge - peft| = {error:.3g}"
        if not torch.equal(expected, base_state[name]):
            changed.append(name)
            assert float((expected - base_state[name]).abs().max()) > 1e-3, f"{name}: the change is trivial"
    return changed


def check_case(case: str, tiny_bases: Any, read_tensors: Any, tmp_path: Path, **save_kwargs: Any) -> dict[str, Any]:
    arch, lora_kwargs = CASES[case]
    base = tiny_bases(arch)
    adapter_dir = tmp_path / "peft-adapter"
    theirs, peft_logits, base_state = build_with_peft(base, lora_kwargs, adapter_dir, **save_kwargs)
    out = tmp_path / "merged"
    merge(base, adapter_dir, out, dtype="fp32", hash_sources=False)
    ours = read_tensors(out)
    changed = compare_with_peft(ours, theirs, base_state, tied=arch == "gpt2")
    assert changed, "the adapter must change the model"

    # The same adapter through d2merge's runtime modules (the unmerged forward) against PEFT's forward.
    model = load_unmerged(base, adapter_dir)
    ids = torch.randint(4, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    assert float((logits - peft_logits).abs().max()) <= FORWARD_ATOL
    stored = SafetensorsFile(adapter_dir / "adapter_model.safetensors").keys()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {"changed": changed, "keys": stored, "config": config, "adapter": adapter_dir}


# The pattern and embedding cases have tests of their own, below.
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("llama-embedding-lora", "llama-rank-alpha-pattern")])
def test_merge_matches_peft_merge_and_unload(case: str, tiny_bases: Any, read_tensors: Any, tmp_path: Path) -> None:
    result = check_case(case, tiny_bases, read_tensors, tmp_path)
    keys, config = result["keys"], result["config"]
    lora_kwargs = CASES[case][1]
    targets = lora_kwargs["target_modules"]
    # Every targeted module of every layer is merged (GPT-2's c_proj names two layers per block).
    assert all(any(name.rsplit(".", 2)[-2] == t for name in result["changed"]) for t in targets)
    # PEFT's on-disk layout, as METHODS.md describes it (a change in PEFT shows up here first).
    assert all(k.startswith("base_model.model.") for k in keys)
    assert any(k.endswith(".lora_A.weight") for k in keys) and any(k.endswith(".lora_B.weight") for k in keys)
    if lora_kwargs.get("use_dora"):
        assert config["use_dora"] is True
        magnitudes = [k for k in keys if "lora_magnitude_vector" in k]
        assert magnitudes and all(k.endswith(".lora_magnitude_vector") for k in magnitudes)
        assert load_adapter(result["adapter"]).method.name == "dora"
    else:
        assert not any("magnitude" in k for k in keys)
        assert load_adapter(result["adapter"]).method.name == "lora"
    if lora_kwargs.get("fan_in_fan_out"):
        assert config["fan_in_fan_out"] is True


def test_rank_and_alpha_patterns_are_resolved_per_module(tiny_bases: Any, read_tensors: Any, tmp_path: Path) -> None:
    result = check_case("llama-rank-alpha-pattern", tiny_bases, read_tensors, tmp_path)
    adapter = load_adapter(result["adapter"])
    ranks = {m: adapter.tensors.info(e.keys["lora_A"])[1][0] for m, e in adapter.modules.items()}
    assert ranks["model.layers.1.self_attn.q_proj"] == 2
    assert ranks["model.layers.0.self_attn.q_proj"] == 4
    assert ranks["model.layers.0.self_attn.v_proj"] == ranks["model.layers.1.self_attn.v_proj"] == 6
    method, config = adapter.method, adapter.config
    down0 = method.module_settings(config, "model.layers.0.mlp.down_proj", "linear")
    down1 = method.module_settings(config, "model.layers.1.mlp.down_proj", "linear")
    o_proj = method.module_settings(config, "model.layers.1.self_attn.o_proj", "linear")
    assert (down0.scale, down1.scale, o_proj.scale) == (3.0 / 4, 8.0 / 4, 32.0 / 4)


@pytest.mark.parametrize("save_embedding_layers", [True, False], ids=["with-base-layer", "factors-only"])
def test_embedding_lora_matches_peft(save_embedding_layers: bool, tiny_bases: Any, read_tensors: Any,
                                     tmp_path: Path) -> None:
    result = check_case("llama-embedding-lora", tiny_bases, read_tensors, tmp_path,
                        save_embedding_layers=save_embedding_layers)
    keys = set(result["keys"])
    assert {"base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.lora_embedding_B"} <= keys
    assert ("base_model.model.model.embed_tokens.base_layer.weight" in keys) == save_embedding_layers
    assert "model.embed_tokens.weight" in result["changed"]
    adapter = load_adapter(result["adapter"])
    assert adapter.modules["model.embed_tokens"].layer_kind == "embedding"
    if save_embedding_layers:
        assert "model.embed_tokens.weight" in adapter.replacements
