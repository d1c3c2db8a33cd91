"""``d2merge merge BASE A1 A2 ... --weights``: several adapters merged into the base in one pass.

The oracles: the weighted sum of each adapter's own single merge (fp64 sums of d2merge's fp32
merges, each already checked against PEFT elsewhere), and ``d2merge combine`` followed by a
merge for the ``--combination`` types; ``verify`` against every adapter attached at runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from d2merge import merge
from d2merge.adapter_ops.combine import combine
from d2merge.adapter_ops.mix import AdapterMix
from d2merge.options.adapter_ops import CombineOptions
from d2merge.errors import D2MergeError
from helpers import assert_one_line_error

TARGETS = ("q_proj", "v_proj")  # every method below adapts these; d2lora also k_proj (a module only it has)


@pytest.fixture(scope="module")
def four(tiny_bases: Any, make_adapter: Any) -> dict[str, Path]:
    """One adapter per method on the tiny Llama (different seeds, different module sets)."""
    base = tiny_bases("llama")
    return {"base": base,
            "lora": make_adapter(base, "lora", target_modules=TARGETS, seed=11),
            "dora": make_adapter(base, "dora", target_modules=TARGETS, seed=12),
            "d2lora": make_adapter(base, "d2lora", target_modules=TARGETS + ("k_proj",), seed=13, tau=0.5),
            "dual_lora": make_adapter(base, "dual_lora", target_modules=("v_proj",), seed=14)}


@pytest.fixture(scope="module")
def single_merges(four: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                  read_tensors: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter's own fp32 merge, and the base, as fp64 tensors."""
    root = tmp_path_factory.mktemp("single-merges")
    out = {"base": {k: v.double() for k, v in read_tensors(four["base"]).items()}}
    for name in ("lora", "dora", "d2lora", "dual_lora"):
        merge(four["base"], four[name], root / name, dtype="fp32", hash_sources=False)
        out[name] = {k: v.double() for k, v in read_tensors(root / name).items()}
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_weighted_sum_of_four_methods_equals_the_sum_of_their_merges(four: dict[str, Path], single_merges: Any,
                                                                     read_tensors: Any, tmp_path: Path) -> None:
    names, weights = ["lora", "dora", "d2lora", "dual_lora"], [0.5, -0.3, 1.2, 0.8]
    result = merge(four["base"], AdapterMix(tuple(four[n] for n in names), tuple(weights)), tmp_path / "m",
                   dtype="fp32", hash_sources=False)
    base = single_merges["base"]
    expected = {k: v + sum(w * (single_merges[n][k] - v) for n, w in zip(names, weights)) for k, v in base.items()}
    ours = read_tensors(tmp_path / "m")
    assert _max_diff(ours, expected) < 1e-6  # fp32 rounding of weights ~0.1-1
    changed = {t.name for t in result.plan.merged}
    assert any("k_proj" in n for n in changed)  # a module only d2lora adapts
    assert all(torch.equal(ours[k], read_tensors(four["base"])[k]) for k in ours if k not in changed)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "lora + dora + d2lora + dual_lora" in card and "weight -0.3" in card


def test_one_adapter_with_weights(four: dict[str, Path], single_merges: Any, read_tensors: Any,
                                  tmp_path: Path) -> None:
    """Allowed: weight 1 is the adapter's merge; another weight scales its update."""
    merge(four["base"], AdapterMix((four["dora"],), (1.0,)), tmp_path / "one", dtype="fp32", hash_sources=False)
    assert _max_diff(read_tensors(tmp_path / "one"), single_merges["dora"]) == 0.0
    merge(four["base"], AdapterMix((four["dora"],), (0.25,)), tmp_path / "quarter", dtype="fp32", hash_sources=False)
    base, dora = single_merges["base"], single_merges["dora"]
    assert _max_diff(read_tensors(tmp_path / "quarter"), {k: v + 0.25 * (dora[k] - v) for k, v in base.items()}) < 1e-6


@pytest.mark.parametrize("names,weights,options", [
    (["lora", "lora2"], [0.6, 0.4], dict(combination="linear")),
    (["lora", "lora3"], [0.5, 1.5], dict(combination="cat")),
    (["lora", "lora2"], [1.0, 1.0], dict(combination="ties", density=0.5)),
    (["lora", "lora2"], [1.0, 0.5], dict(combination="dare_linear", density=0.7)),
    (["dora", "d2lora", "lora"], [0.7, 0.3, 0.5], dict(combination="svd", svd_rank=8)),
], ids=["linear", "cat", "ties", "dare_linear", "svd-dora-d2lora-lora"])
def test_combination_equals_combine_then_merge(names: list[str], weights: list[float], options: dict[str, Any],
                                               four: dict[str, Path], make_adapter: Any, read_tensors: Any,
                                               tmp_path: Path) -> None:
    base = four["base"]
    inputs = {**four, "lora2": make_adapter(base, "lora", target_modules=("q_proj", "o_proj"), seed=21),
              "lora3": make_adapter(base, "lora", target_modules=TARGETS, seed=22, r=6, lora_alpha=3.0)}
    paths = [inputs[n] for n in names]
    combine(paths, tmp_path / "combined", weights, CombineOptions(**options), base=base)
    merge(base, tmp_path / "combined", tmp_path / "two-steps", dtype="fp32", hash_sources=False)
    merge(base, AdapterMix(tuple(paths), tuple(weights), CombineOptions(**options)), tmp_path / "one-pass",
          dtype="fp32", hash_sources=False)
    gap = _max_diff(read_tensors(tmp_path / "one-pass"), read_tensors(tmp_path / "two-steps"))
    # Plain LoRA inputs: the same factors through the same row blocks, the same bytes; the *svd types on
    # DoRA/D2-LoRA updates go whole (they need all of W0), within fp32 rounding of the two-step merge.
    assert gap == 0.0 if "dora" not in names else gap < 1e-6


def test_verify_several_passes_and_a_tampered_merge_fails(four: dict[str, Path], cli_runner: Any, make_adapter: Any,
                                                          tmp_path: Path) -> None:
    from d2merge.io.safetensors_file import SafetensorsFile
    from safetensors.torch import save_file

    # A PiSSA LoRA too: its runtime rewrites its base layer as the residual, which must not reach the others'.
    pissa = make_adapter(four["base"], "lora", target_modules=("v_proj",), seed=15, init_lora_weights="pissa")
    args = [four["base"], four["lora"], four["dora"], four["d2lora"], pissa]
    merged = tmp_path / "merged"
    done = cli_runner(["merge", *args, "-o", merged, "--weights", "0.5,0.7,-0.4,0.6", "--dtype", "fp32", "-q"])
    assert done.code == 0, done.err
    assert "lora + dora + d2lora + lora" in done.out
    report = tmp_path / "verify.json"
    passed = cli_runner(["verify", *args, merged, "--weights", "0.5,0.7,-0.4,0.6", "--report", report])
    assert passed.code == 0, passed.out + passed.err
    assert json.loads(report.read_text())["method"] == "lora + dora + d2lora + lora"
    # The same merge verified as if the weights were others: the reference moves, the check fails.
    wrong = cli_runner(["verify", *args, merged, "--weights", "0.5,0.7,0.4,0.6"])
    assert wrong.code == 1, wrong.out + wrong.err
    # merge --verify runs the same check on the fresh merge.
    again = cli_runner(["merge", *args, "-o", tmp_path / "again", "--weights", "0.5,0.7,-0.4,0.6", "--dtype", "fp32",
                        "-q", "--verify"])
    assert again.code == 0, again.out + again.err
    # One merged tensor tampered with: fails.
    shard = merged / "model.safetensors"
    tensors = {k: SafetensorsFile(shard).read(k).clone() for k in SafetensorsFile(shard).keys()}
    name = next(k for k in tensors if "layers.1.self_attn.v_proj" in k)
    tensors[name][0, 0] += 0.05
    save_file(tensors, str(shard), metadata={"format": "pt"})
    tampered = cli_runner(["verify", *args, merged, "--weights", "0.5,0.7,-0.4,0.6"])
    assert tampered.code == 1, tampered.out + tampered.err


def test_verify_a_combination_merge_against_combine(four: dict[str, Path], make_adapter: Any, cli_runner: Any,
                                                    tmp_path: Path) -> None:
    lora2 = make_adapter(four["base"], "lora", target_modules=("q_proj", "o_proj"), seed=21)
    args = [four["base"], four["lora"], lora2]
    flags = ["--weights", "1,1", "--combination", "ties", "--density", "0.5"]
    assert cli_runner(["merge", *args, "-o", tmp_path / "m", "--dtype", "fp32", "-q", *flags]).code == 0
    result = cli_runner(["verify", *args, tmp_path / "m", *flags, "--report", tmp_path / "r.json"])
    assert result.code == 0, result.out + result.err
    assert json.loads((tmp_path / "r.json").read_text())["adapter"] == f"{four['lora']} + {lora2}"  # not the temp


def test_dry_run_names_the_adapters_of_each_tensor(four: dict[str, Path], cli_runner: Any) -> None:
    result = cli_runner(["merge", four["base"], four["lora"], four["d2lora"], "--weights", "1,1", "--dry-run"])
    assert result.code == 0, result.err
    assert "adapter2" in result.out and "weighted sum of updates" in result.out
    row = next(line for line in result.out.splitlines() if "layers.0.self_attn.k_proj" in line)
    assert row.split()[2] == "2"  # only the second adapter changes k_proj
    plan = json.loads(cli_runner(["merge", four["base"], four["lora"], four["d2lora"], "--weights", "1,1",
                                  "--dry-run", "--json"]).out)
    assert plan["weights"] == [1.0, 1.0] and plan["methods"] == ["lora", "d2lora"]


def test_verify_counts_its_paths_by_the_weights(four: dict[str, Path], cli_runner: Any) -> None:
    result = cli_runner(["verify", four["base"], four["lora"], four["dora"], four["d2lora"]])
    assert result.code == 2 and "several adapters need --weights" in result.err
    result = cli_runner(["verify", four["base"], four["lora"], four["dora"], "--weights", "1,1,1"])
    assert result.code == 2 and "expected 3 ADAPTER(s)" in result.err


def test_adapters_of_another_base_and_whole_tensors_are_refused(four: dict[str, Path], make_adapter: Any,
                                                                cli_runner: Any, tmp_path: Path) -> None:
    from d2merge.synthetic import save_random_adapter, save_tiny_base

    wide = save_tiny_base(tmp_path / "wide", "llama", hidden_size=48, tokenizer=False)
    other = save_random_adapter(wide, tmp_path / "other", "lora", target_modules=TARGETS, seed=31)
    result = cli_runner(["merge", four["base"], four["lora"], other, "-o", tmp_path / "out", "--weights", "1,1"])
    assert_one_line_error(result.code, result.out, result.err, "trained on different bases")
    # The same base named, shapes not: that adapter's own plan names the tensor.
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(four["base"])}))
    result = cli_runner(["merge", four["base"], four["lora"], other, "-o", tmp_path / "out", "--weights", "1,1"])
    assert_one_line_error(result.code, result.out, result.err, "does not fit base", "q_proj")
    saved = make_adapter(four["base"], "lora", target_modules=TARGETS, seed=41, modules_to_save=["lm_head"],
                         extra_tensors={"base_model.model.lm_head.modules_to_save.default.weight":
                                        torch.zeros(128, 32)})
    result = cli_runner(["merge", four["base"], four["lora"], saved, "-o", tmp_path / "out", "--weights", "1,1"])
    assert_one_line_error(result.code, result.out, result.err, "replaces the whole tensor")
    with pytest.raises(D2MergeError, match="replaces the whole tensor"):
        merge(four["base"], AdapterMix((saved,), (0.5,)), tmp_path / "out", hash_sources=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gguf_of_several_adapters_holds_the_folder_merge(smollm2: Path, read_tensors: Any, tmp_path: Path) -> None:
    """Every format takes the mix through plan_for: the GGUF stream holds the merged folder's tensors."""
    import shutil

    import numpy as np

    gguf = pytest.importorskip("gguf")
    from d2merge.export.gguf import merge_to_gguf, permute_for_llama_cpp
    from d2merge.synthetic import save_random_adapter, save_tiny_base

    base = save_tiny_base(tmp_path / "base", "llama", vocab_size=49152, tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, base / name)
    mix = AdapterMix((save_random_adapter(base, tmp_path / "a", "lora", target_modules=TARGETS, seed=1),
                      save_random_adapter(base, tmp_path / "b", "dora", target_modules=("q_proj", "k_proj"), seed=2)),
                     (0.6, 0.9))
    merge_to_gguf(base, mix, tmp_path / "mix.gguf", gguf_type="f32")
    merge(base, mix, tmp_path / "folder", dtype="fp32", hash_sources=False)
    folder = read_tensors(tmp_path / "folder")
    streamed = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "mix.gguf").tensors}
    config = json.loads((base / "config.json").read_text())
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn"
        assert np.array_equal(streamed[f"blk.{layer}.attn_v.weight"], folder[f"{prefix}.v_proj.weight"].numpy())
        for gguf_name, module, heads in (("attn_q", "q_proj", config["num_attention_heads"]),
                                         ("attn_k", "k_proj", config["num_key_value_heads"])):
            expected = permute_for_llama_cpp(folder[f"{prefix}.{module}.weight"], heads).numpy()
            assert np.array_equal(streamed[f"blk.{layer}.{gguf_name}.weight"], expected)
