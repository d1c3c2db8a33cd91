"""``d2merge combine`` against PEFT 0.21's own ``add_weighted_adapter`` (the oracle), on a tiny Llama.

PEFT builds and saves the input adapters, loads them into one PeftModel, combines them with
``add_weighted_adapter``, and then loads our combined folder beside its result: every module's
``get_delta_weight`` must agree to fp32 rounding (which also shows PEFT loads what we write).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from d2merge.adapter_ops.combine import combine
from d2merge.options.adapter_ops import CombineOptions
from d2merge.errors import D2MergeError

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]
DELTA_ATOL = 2e-6  # fp32 rounding of updates of magnitude ~0.1-1


def _save_peft_adapter(base: Path, folder: Path, seed: int, **lora_kwargs: Any) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))
    # No copy of the base embedding (PEFT's 'auto' saves one): a plain LoRA holds factors only.
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    return folder


@pytest.fixture(scope="module")
def peft_inputs(tiny_bases: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tiny_bases("llama")
    root = tmp_path_factory.mktemp("combine-inputs")
    return {
        "base": base,
        # equal ranks, different alphas; the second also adapts down_proj (a module only one adapter has)
        "a": _save_peft_adapter(base, root / "a", 1, r=4, lora_alpha=8, target_modules=TARGETS),
        "b": _save_peft_adapter(base, root / "b", 2, r=4, lora_alpha=16, target_modules=TARGETS + ["down_proj"]),
        # another rank (cat and the svd types take it)
        "c": _save_peft_adapter(base, root / "c", 3, r=6, lora_alpha=6, target_modules=["q_proj", "v_proj"]),
        "emb": _save_peft_adapter(base, root / "emb", 4, r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
        "emb2": _save_peft_adapter(base, root / "emb2", 5, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    }


def _peft_deltas(base: Path, inputs: list[Path], weights: list[float], ours: Path, **kwargs: Any
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PEFT's combined update per module, and our folder's update as PEFT loads it."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, inputs[0], adapter_name="in0")
        for i, path in enumerate(inputs[1:], 1):
            peft_model.load_adapter(path, adapter_name=f"in{i}")
        peft_model.add_weighted_adapter([f"in{i}" for i in range(len(inputs))], weights, "peft", **kwargs)
        peft_model.load_adapter(ours, adapter_name="ours")
    theirs, mine = {}, {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer):
                if "peft" in module.lora_A or "peft" in module.lora_embedding_A:
                    theirs[name] = module.get_delta_weight("peft")
                if "ours" in module.lora_A or "ours" in module.lora_embedding_A:
                    mine[name] = module.get_delta_weight("ours")
    return theirs, mine


def _assert_equal_updates(theirs: dict[str, torch.Tensor], mine: dict[str, torch.Tensor]) -> None:
    # PEFT injects the new adapter into every targeted module; the ones no input adapts stay zero.
    for name, delta in theirs.items():
        if name not in mine:
            assert float(delta.abs().max()) == 0.0, name
    assert mine, "the combined adapter adapts nothing"
    for name, delta in mine.items():
        assert name in theirs, name
        assert float(delta.abs().max()) > 1e-3, f"{name}: trivial update"
        error = float((delta - theirs[name]).abs().max())
        assert error <= DELTA_ATOL * max(1.0, float(delta.abs().max())), f"{name}: |ours - peft| = {error:.3g}"


DETERMINISTIC = [
    ("linear", ["a", "b"], [0.7, -0.4], {}),
    ("cat", ["a", "c"], [0.5, 1.5], {}),
    ("svd", ["a", "c"], [0.5, 1.5], {}),
    ("svd", ["a", "b"], [1.0, 0.6], {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", ["a", "b"], [0.6, 0.9], {"density": 0.5}),
    ("ties", ["a", "b"], [0.6, 0.9], {"density": 0.7, "majority_sign_method": "frequency"}),
    ("ties_svd", ["a", "c"], [1.0, 1.0], {"density": 0.4}),
    ("magnitude_prune", ["a", "b"], [1.0, 0.5], {"density": 0.6}),
    ("magnitude_prune_svd", ["a", "c"], [0.8, 0.3], {"density": 0.5, "svd_rank": 5}),
    ("linear", ["emb", "emb2"], [0.5, 0.5], {}),
    ("svd", ["emb", "emb2"], [1.0, -0.5], {}),
]


@pytest.mark.parametrize("combination,names,weights,kwargs", DETERMINISTIC,
                         ids=[f"{c[0]}-{'-'.join(c[1])}-{i}" for i, c in enumerate(DETERMINISTIC)])
def test_combine_equals_peft(combination: str, names: list[str], weights: list[float], kwargs: dict[str, Any],
                             peft_inputs: dict[str, Path], tmp_path: Path) -> None:
    inputs = [peft_inputs[n] for n in names]
    out = tmp_path / "combined"
    combine(inputs, out, weights, CombineOptions(combination=combination, **kwargs))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["use_dora"] and not config["modules_to_save"]
    peft_kwargs = {"combination_type": combination, **kwargs}
    theirs, mine = _peft_deltas(peft_inputs["base"], inputs, weights, out, **peft_kwargs)
    _assert_equal_updates(theirs, mine)


def test_dare_is_reproducible_and_keeps_the_density(peft_inputs: dict[str, Path], tmp_path: Path,
                                                    read_tensors: Any) -> None:
    inputs = [peft_inputs["a"], peft_inputs["b"]]
    runs = {}
    for name, seed in (("one", 7), ("two", 7), ("other", 8)):
        combine(inputs, tmp_path / name, [1.0, 1.0],
                CombineOptions(combination="dare_linear", density=0.5, seed=seed))
        runs[name] = read_tensors(tmp_path / name)
    assert runs["one"].keys() == runs["two"].keys()
    assert all(torch.equal(runs["one"][k], runs["two"][k]) for k in runs["one"])
    assert any(not torch.equal(runs["one"][k], runs["other"][k]) for k in runs["one"])
    # A module only adapter b has: its A is b's, masked at density 0.5 and rescaled by 1/0.5.
    key = next(k for k in runs["one"] if "down_proj.lora_A" in k)
    nonzero = float((runs["one"][key] != 0).float().mean())
    assert 0.3 < nonzero < 0.7


def test_dare_svd_types_run(peft_inputs: dict[str, Path], tmp_path: Path) -> None:
    for combination in ("dare_ties", "dare_ties_svd", "dare_linear_svd"):
        result = combine([peft_inputs["a"], peft_inputs["b"]], tmp_path / combination, [0.5, 0.5],
                         CombineOptions(combination=combination, density=0.8, seed=1))
        assert result.modules and all(m.rank >= 1 for m in result.modules)


@pytest.mark.parametrize("names,weights,options,message", [
    (["a", "c"], [1.0, 1.0], dict(combination="linear"), "needs equal ranks"),
    (["a", "b"], [1.0], dict(combination="svd"), "1 weight(s) for 2 adapter(s)"),
    (["a", "b"], [1.0, 1.0], dict(combination="svd", svd_rank=40), "above module"),
], ids=["linear-ranks", "weight-count", "svd-rank"])
def test_peft_rules_are_one_line_refusals(names: list[str], weights: list[float], options: dict[str, Any],
                                          message: str, peft_inputs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(D2MergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        combine([peft_inputs[n] for n in names], tmp_path / "out", weights, CombineOptions(**options))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,message", [
    (dict(combination="ties"), "needs density"),  # the library names options, not flags
    (dict(combination="ties", density=1.5), "outside"),
    (dict(combination="linear", density=0.5), "does nothing"),
    (dict(combination="linear", svd_rank=4), "svd_rank does nothing here"),
])
def test_option_refusals(options: dict[str, Any], message: str) -> None:
    with pytest.raises(D2MergeError, match=message):
        CombineOptions(**options)


def test_dora_and_d2lora_combine_through_their_full_updates(tiny_bases: Any, make_adapter: Any, read_tensors: Any,
                                                            tmp_path: Path) -> None:
    from d2merge import merge

    base = tiny_bases("llama")
    targets = ("k_proj", "v_proj")  # both 16x32 (GQA): rank 16 is their full rank
    dora = make_adapter(base, "dora", target_modules=targets, seed=1)
    d2lora = make_adapter(base, "d2lora", target_modules=targets, seed=2, tau=0.5)
    weights = [0.7, 0.3]
    result = combine([dora, d2lora], tmp_path / "both", weights, CombineOptions(combination="svd", svd_rank=16),
                     base=base)
    assert all(m.energy is not None and m.energy > 1 - 1e-9 for m in result.modules)  # full rank: exact
    base_t = read_tensors(base)
    updates = []
    for i, adapter in enumerate((dora, d2lora)):
        merge(base, adapter, tmp_path / f"m{i}", dtype="fp32", hash_sources=False)
        merged = read_tensors(tmp_path / f"m{i}")
        updates.append({k: merged[k].double() - base_t[k].double() for k in merged})
    ours = read_tensors(tmp_path / "both")
    for m in result.modules:
        a = ours[f"base_model.model.{m.module}.lora_A.weight"].double()
        b = ours[f"base_model.model.{m.module}.lora_B.weight"].double()
        name = f"{m.module}.weight"
        expected = weights[0] * updates[0][name] + weights[1] * updates[1][name]
        assert float((b @ a - expected).abs().max()) <= 2e-5, name


def test_combine_cli(peft_inputs: dict[str, Path], cli_runner: Any, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = cli_runner(["combine", peft_inputs["a"], peft_inputs["c"], "--weights", "0.5,1.5", "--combination", "cat",
                         "-o", out, "--report", tmp_path / "report.json"])
    assert result.code == 0, result.err
    assert "q_proj" in result.out and (out / "adapter_model.safetensors").is_file()
    assert max(m["rank"] for m in json.loads((tmp_path / "report.json").read_text())["modules"]) == 4 + 6
    again = cli_runner(["combine", peft_inputs["a"], peft_inputs["c"], "--weights", "0.5", "-o", out])
    assert again.code == 2 and len(again.err.splitlines()) == 1
