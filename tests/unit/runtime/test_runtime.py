"""The unmerged runtime: equal to the merged model, to PEFT's own forward, and faithful when saved.

The merged model is the merge engine's output loaded by transformers; the runtime is
base + adapter through d2merge.runtime. Their agreement at 1e-5 is what lets verify
attribute any larger difference to the merge. PEFT is the independent oracle for
LoRA and DoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from d2merge.api import merge
from d2merge.io.adapter import load_adapter
from d2merge.methods import parse_adapter_config
from d2merge.runtime import adapter_layers, attach, load_base_model, load_unmerged, save_adapter
from d2merge.synthetic import DEFAULT_TARGETS, adapter_config, build_tiny_model

ARCHS = ("llama", "qwen2", "gpt2")
METHODS = ("d2lora", "dual_lora", "lora", "dora")
TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def probe_ids() -> torch.Tensor:
    return torch.randint(4, 128, (3, 16), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_runtime_equals_merged_model(tiny_bases: Callable[..., Path], make_adapter: Callable[..., Path],
                                     probe_ids: torch.Tensor, tmp_path: Path, arch: str, method: str) -> None:
    base = tiny_bases(arch)
    adapter = make_adapter(base, method, seed=3)
    merged = merge(base, adapter, tmp_path / "merged", dtype="fp32", hash_sources=False).output
    unmerged_logits = logits(load_unmerged(base, adapter), probe_ids)
    merged_logits = logits(load_base_model(merged), probe_ids)
    base_logits = logits(load_base_model(base), probe_ids)
    # The adapter must move the output, or agreement would prove nothing.
    assert (unmerged_logits - base_logits).abs().max() > 1e-2
    assert (unmerged_logits - merged_logits).abs().max() <= TOLERANCE


def _peft_adapter(arch: str, use_dora: bool, base_folder: Path, adapter_folder: Path) -> torch.nn.Module:
    """A PEFT LoRA/DoRA model with random B (and magnitude), saved with PEFT's own save_pretrained."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(arch, seed=1)
    model.save_pretrained(base_folder)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS[arch]), use_dora=use_dora,
                        fan_in_fan_out=arch == "gpt2", lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(adapter_folder)
    return peft_model.eval()


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
@pytest.mark.parametrize("use_dora", (False, True), ids=("lora", "dora"))
def test_runtime_equals_peft_unmerged_forward(probe_ids: torch.Tensor, tmp_path: Path, arch: str,
                                              use_dora: bool) -> None:
    peft_model = _peft_adapter(arch, use_dora, tmp_path / "base", tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.method.name == ("dora" if use_dora else "lora")
    ours = logits(load_unmerged(tmp_path / "base", adapter), probe_ids)
    theirs = logits(peft_model, probe_ids)
    base = logits(load_base_model(tmp_path / "base"), probe_ids)
    assert (theirs - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= TOLERANCE


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name, param in layer.factors.items():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("method", METHODS)
def test_attach_save_load_round_trip(probe_ids: torch.Tensor, tmp_path: Path, method: str) -> None:
    raw = adapter_config(method, target_modules=("q_proj", "v_proj", "down_proj"), tau=1.0) if method == "d2lora" \
        else adapter_config(method, target_modules=("q_proj", "v_proj", "down_proj"))
    model = attach(build_tiny_model("llama"), raw, seed=11)
    _randomize(model, 12)
    folder = save_adapter(model, tmp_path / "adapter")

    loaded = load_adapter(folder)
    assert dict(loaded.config.raw) == raw
    assert loaded.config == parse_adapter_config(raw)
    layers = dict(adapter_layers(model))
    assert set(loaded.modules) == set(layers)
    for module, layer in layers.items():
        stored = loaded.factors(module)
        assert set(stored) == set(layer.factors)
        for name, param in layer.factors.items():
            assert torch.equal(stored[name], param.detach()), (module, name)
    base = tmp_path / "base"
    build_tiny_model("llama").save_pretrained(base)
    model.eval()
    assert torch.equal(logits(load_unmerged(base, folder), probe_ids), logits(model, probe_ids))


def test_gpt2_attach_saves_fan_in_fan_out(tmp_path: Path) -> None:
    model = attach(build_tiny_model("gpt2"), adapter_config("lora", target_modules=("c_attn",)))
    _randomize(model, 2)
    loaded = load_adapter(save_adapter(model, tmp_path / "adapter"))
    assert loaded.config.fan_in_fan_out is True
    module = next(iter(loaded.modules))
    assert loaded.factors(module)["lora_A"].shape == (4, 32)  # (r, in): PEFT orientation, not Conv1D's


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_starts_at_the_base(probe_ids: torch.Tensor, method: str) -> None:
    base = build_tiny_model("llama")
    expected = logits(base, probe_ids)
    model = attach(build_tiny_model("llama"), adapter_config(method, target_modules=DEFAULT_TARGETS["llama"]))
    assert (logits(model, probe_ids) - expected).abs().max() <= 1e-6
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all(any(p is q for _, layer in adapter_layers(model) for q in layer.factors.values()) for p in trainable)


def test_d2lora_branches_start_different() -> None:
    """A_pos and A_neg are separate draws: identical ones would make the branches one."""
    model = attach(build_tiny_model("llama"), adapter_config("d2lora", target_modules=("q_proj",)))
    for _, layer in adapter_layers(model):
        assert not torch.equal(layer.factors["lora_A_pos"], layer.factors["lora_A_neg"])
        assert not layer.factors["lora_B_pos"].any() and not layer.factors["lora_B_neg"].any()


def test_dora_runtime_computes_as_peft_does(probe_ids: torch.Tensor, tmp_path: Path) -> None:
    # DoRA's forward in PEFT's own operation order (base + (m/n - 1) * base + m/n * s * B(A(x))), not
    # the algebraically equal m/n * (base + low), which rounds differently: on SmolLM2 that put the
    # fp32 unmerged forward 2.6e-3 from the merged model where PEFT's is 8.8e-4.
    peft_model = _peft_adapter("llama", True, tmp_path / "base", tmp_path / "adapter")
    ours = logits(load_unmerged(tmp_path / "base", tmp_path / "adapter"), probe_ids)
    theirs = logits(peft_model, probe_ids)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_attach_refuses_target_parameters() -> None:
    """Training adapts target_modules only: a target_parameters config would silently train without them."""
    from d2merge.errors import D2MergeError

    with pytest.raises(D2MergeError, match="d2merge trains adapters on target_modules only"):
        attach(build_tiny_model("llama"), adapter_config("lora", target_modules=("q_proj",),
                                                         target_parameters=["self_attn.v_proj.weight"]))


def test_collecting_new_objects_only_frees_young_cycles_and_thaws_at_the_outermost_exit() -> None:
    import gc
    import weakref

    from d2merge.runtime import collecting_new_objects_only

    class Node:
        pass

    def cycle() -> weakref.ref:
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        return weakref.ref(node)

    enabled = gc.isenabled()
    gc.disable()  # no automatic collection may take the old cycle before the freeze
    try:
        old = cycle()  # garbage made before: frozen inside, so left for the outermost exit
        assert gc.get_freeze_count() == 0
        with collecting_new_objects_only():
            assert gc.get_freeze_count() > 0
            with collecting_new_objects_only():  # nested (verify inside merge --verify): no second freeze
                young = cycle()
                gc.collect()
                assert young() is None and old() is not None
            assert gc.get_freeze_count() > 0  # the inner exit did not thaw (objects freed since leave the count)
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert old() is None
        with pytest.raises(RuntimeError):  # an error inside still thaws
            with collecting_new_objects_only():
                raise RuntimeError("boom")
        assert gc.get_freeze_count() == 0
    finally:
        if enabled:
            gc.enable()
