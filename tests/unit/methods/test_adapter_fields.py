"""The adapter_config.json field table: every field d2merge knows, refusals for everything else.

An adapter whose config holds a field (or a value) d2merge does not implement must give one line,
exit 2, and write nothing; the PEFT-made cases at the end check the fields PEFT saves in its
ordinary way that d2merge now honours (modules_to_save as a plain suffix, bias "all").
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from d2merge import merge
from d2merge.errors import D2MergeError
from d2merge.methods import parse_adapter_config
from d2merge.methods.fields import FIELDS, render_markdown
from d2merge.synthetic import adapter_config
from helpers import REPO_ROOT, assert_one_line_error

DOCS = REPO_ROOT / "docs" / "adapter-fields.md"


@pytest.fixture
def lora_adapter(tiny_bases: Any, make_adapter: Any, writable_copy: Any) -> tuple[Path, Path]:
    base = tiny_bases("llama")
    return base, writable_copy(make_adapter(base, "lora", target_modules=("q_proj", "v_proj")), "adapter")


def set_fields(adapter: Path, **fields: Any) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def refused(cli_runner: Any, base: Path, adapter: Path, tmp_path: Path) -> str:
    """Merge through the CLI; assert one line, exit 2, nothing written; return the line."""
    out = tmp_path / "merged"
    result = cli_runner(["merge", base, adapter, "-o", out])
    line = assert_one_line_error(result.code, result.out, result.err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    return line


def test_a_made_up_field_is_refused(lora_adapter: Any, cli_runner: Any, tmp_path: Path) -> None:
    base, adapter = lora_adapter
    set_fields(adapter, use_quantum_rank=True)
    line = refused(cli_runner, base, adapter, tmp_path)
    assert "unknown field 'use_quantum_rank'" in line and "adapter_config.json" in line


def test_a_field_of_another_method_is_refused(lora_adapter: Any, cli_runner: Any, tmp_path: Path) -> None:
    base, adapter = lora_adapter
    set_fields(adapter, tau=0.5)  # D2-LoRA's field in a LORA config would be silently unused
    assert "unknown field 'tau' for peft_type LORA" in refused(cli_runner, base, adapter, tmp_path)


@pytest.mark.parametrize("fields, expect", [
    ({"init_lora_weights": "banana"}, "init_lora_weights 'banana' is not one d2merge implements"),
    ({"bias": "sometimes"}, "bias: value 'sometimes'"),
    ({"init_lora_weights": "olora", "fan_in_fan_out": True}, "init_lora_weights 'olora' with fan_in_fan_out"),
    ({"init_lora_weights": "pissa_niter_4"}, "randomised SVD"),
    ({"init_lora_weights": "corda"}, "init_lora_weights 'corda'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights 'loftq'"),
    ({"alora_invocation_tokens": [5, 6]}, "aLoRA adapter is active only after its invocation tokens"),
    ({"lora_bias": True, "use_dora": True}, "lora_bias with use_dora"),
    ({"lora_bias": True}, "lacks lora_B.bias"),
    ({"lora_bias": "yes"}, "lora_bias: value 'yes' is not true or false"),
    ({"trainable_token_indices": [3, 5]}, "trainable_token_indices is set but the adapter holds no trained rows"),
    ({"trainable_token_indices": ["cat"]}, "trainable_token_indices: ['cat'] is neither"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "match no parameter of the base model"),
    ({"target_parameters": "mlp.experts.gate_up_proj"}, "is not a list of parameter names"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"use_qalora": True}, "use_qalora"),
    ({"lora_alpha": 1e300}, "field 'lora_alpha' is 1e+300, beyond float32 range"),
    ({"alpha_pattern": {"v_proj": -1e39}}, "alpha_pattern['v_proj'] is -1e+39, beyond float32 range"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_values_that_change_the_weights_and_are_not_implemented_are_refused(
        fields: dict[str, Any], expect: str, lora_adapter: Any, cli_runner: Any, tmp_path: Path) -> None:
    base, adapter = lora_adapter
    set_fields(adapter, **fields)
    assert expect in refused(cli_runner, base, adapter, tmp_path)


# Nested repetition over the letters of a module name: exponential backtracking for Python's re.
CATASTROPHIC = r"(\w|\.|[a-z])*(\w|\.|[a-z])*(\w|\.|[a-z])*(\w|\.|[a-z])*\d"


def test_the_issues_redos_key_is_matched_quickly(lora_adapter: Any, cli_runner: Any, tmp_path: Path) -> None:
    """``([a-z_.0-9]+)+!`` hangs Python's re on every module name; the regex module answers at once."""
    base, adapter = lora_adapter
    set_fields(adapter, rank_pattern={"([a-z_.0-9]+)+!": 2})
    result = cli_runner(["merge", base, adapter, "-o", tmp_path / "merged"])
    assert result.code == 0, result.err  # the key matches no module: the config's r applies


@pytest.mark.parametrize("field, value", [("rank_pattern", {CATASTROPHIC: 2}), ("alpha_pattern", {CATASTROPHIC: 2.0})])
def test_catastrophic_pattern_keys_fail_fast_naming_the_key(field: str, value: dict[str, Any], lora_adapter: Any,
                                                             cli_runner: Any, tmp_path: Path) -> None:
    base, adapter = lora_adapter
    set_fields(adapter, **{field: value})
    line = refused(cli_runner, base, adapter, tmp_path)
    assert f"{field} key {CATASTROPHIC!r} takes too long" in line


def test_catastrophic_target_modules_regex_fails_in_one_line(tiny_bases: Any) -> None:
    from transformers import AutoModelForCausalLM

    from d2merge.runtime import attach

    model = AutoModelForCausalLM.from_pretrained(tiny_bases("llama"), dtype=torch.float32)
    config = adapter_config("lora", target_modules=())
    config["target_modules"] = CATASTROPHIC
    with pytest.raises(D2MergeError, match=r"target_modules .* takes too long"):
        attach(model, config)


def test_benign_patterns_keep_pythons_regex_meaning() -> None:
    from d2merge.methods.matching import is_target, pattern_key

    assert pattern_key({"layers.1.self_attn.q_proj": 2}, "model.layers.1.self_attn.q_proj")
    assert pattern_key({"q_proj|v_proj": 2}, "model.layers.0.self_attn.v_proj") == "q_proj|v_proj"
    assert pattern_key({"proj": 2}, "model.layers.0.self_attn.q_proj") is None  # a dotted suffix, not a substring
    assert is_target(r".*\.(q|v)_proj", "model.layers.0.self_attn.q_proj")
    assert not is_target(r".*\.(q|v)_proj", "model.layers.0.self_attn.k_proj")
    assert is_target(["q_proj"], "model.layers.0.self_attn.q_proj", exclude_modules=["mlp.q_proj"])
    assert not is_target(["q_proj"], "model.layers.0.self_attn.q_proj", exclude_modules=r".*layers\.0.*")


def test_every_peft_lora_config_field_is_in_the_table() -> None:
    peft = pytest.importorskip("peft")
    names = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert names - set(FIELDS) == set(), "a PEFT field d2merge has not decided on"
    # And everything PEFT writes into adapter_config.json by default parses.
    saved = json.loads(json.dumps(peft.LoraConfig(target_modules=["q_proj"]).to_dict(), default=str))
    saved["target_modules"] = ["q_proj"]
    config = parse_adapter_config(saved)
    assert set(config.honoured_fields) >= {"peft_type", "r", "lora_alpha", "target_modules"}


def test_docs_table_is_generated_from_the_code() -> None:
    text = DOCS.read_text()
    marker = "<!-- generated by d2merge.methods.fields.render_markdown"
    assert text[text.index(marker):].split("\n", 1)[1] == render_markdown(), \
        "docs/adapter-fields.md is stale: regenerate its table with render_markdown()"


def test_inspect_lists_the_fields_it_honoured(lora_adapter: Any, cli_runner: Any) -> None:
    _, adapter = lora_adapter
    set_fields(adapter, use_rslora=True, lora_dropout=0.1, task_type="CAUSAL_LM")
    result = cli_runner(["inspect", adapter])
    assert result.code == 0, result.err
    fields_line = next(line for line in result.out.splitlines() if line.startswith("fields"))
    assert "use_rslora=true" in fields_line and "r=4" in fields_line and "lora_alpha=8.0" in fields_line
    assert "lora_dropout" not in fields_line and "task_type" not in fields_line  # weight-neutral
    as_json = json.loads(cli_runner(["inspect", adapter, "--json"]).out)
    assert as_json["honoured_fields"]["use_rslora"] is True


# -- PEFT's own adapters for the fields PEFT saves in its ordinary way ------------------------------

@pytest.mark.parametrize("arch, kwargs", [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"])),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], bias="lora_only")),
], ids=["modules-to-save-plain-suffix", "bias-all", "bias-lora-only"])
def test_peft_saved_fields_merge_as_peft_merges(arch: str, kwargs: dict[str, Any], tiny_bases: Any,
                                                read_tensors: Any, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = tiny_bases(arch)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:  # factors, the saved norms, the trained biases
                param.add_(0.2 * torch.randn(param.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "adapter")
    theirs = {k: v.clone() for k, v in peft_model.eval().merge_and_unload().state_dict().items()}
    merge(base, tmp_path / "adapter", tmp_path / "merged", dtype="fp32", hash_sources=False)
    ours = read_tensors(tmp_path / "merged")
    changed = [n for n in ours if not torch.equal(base_state[n], theirs[n])]
    for name, tensor in ours.items():
        assert float((tensor - theirs[name]).abs().max()) <= 1e-6, name
    if "modules_to_save" in kwargs:
        # PEFT up to 0.21 matched "norm" as a plain suffix (every *_layernorm too); 0.22 matches a dotted
        # suffix only. The merge follows the tensors the adapter saved, so it equals PEFT's either way.
        layernorms = {"model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"}
        plain_suffix = tuple(int(p) for p in peft.__version__.split(".")[:2]) < (0, 22)
        assert "model.norm.weight" in changed
        assert (layernorms <= set(changed)) == plain_suffix and (layernorms & set(changed)) in (set(), layernorms)
    elif kwargs["bias"] == "all":
        assert "model.layers.0.self_attn.k_proj.bias" in changed  # a bias outside the LoRA layers
    else:
        assert "model.layers.0.self_attn.k_proj.bias" in changed
        assert "model.layers.0.self_attn.v_proj.bias" not in changed
