"""Layer orientation from transformers itself (issue 11, item 7), not from module names."""

from __future__ import annotations

import json

import torch

from d2merge.io.model_structure import conv1d_modules, is_listed


def test_transformers_names_the_conv1d_layers(tiny_bases):
    gpt2 = conv1d_modules(json.loads((tiny_bases("gpt2") / "config.json").read_text()))
    llama = conv1d_modules(json.loads((tiny_bases("llama") / "config.json").read_text()))
    assert gpt2 is not None and is_listed("transformer.h.0.attn.c_attn", gpt2)
    assert is_listed("transformer.h.1.mlp.c_fc", gpt2) and not is_listed("lm_head", gpt2)
    assert llama == frozenset()


def test_unknown_architecture_or_custom_code_leaves_the_name_rules():
    assert conv1d_modules({"model_type": "no-such-architecture", "hidden_size": 8}) is None
    assert conv1d_modules({"model_type": "gpt2", "auto_map": {"AutoModel": "modeling_x.X"}}) is None
    assert conv1d_modules(None) is None


def test_fan_in_fan_out_on_a_linear_layer_is_refused(tiny_bases, make_adapter, cli_runner, tmp_path):
    # A square q_proj would take the transposed factors without a shape error: a silently wrong merge.
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora", fan_in_fan_out=True, target_modules=("q_proj",))
    result = cli_runner(["merge", base, adapter, "-o", tmp_path / "m"])
    assert result.code == 2 and "is an nn.Linear" in result.err and "fan_in_fan_out: true" in result.err
    assert not (tmp_path / "m").exists()


def test_conv1d_without_fan_in_fan_out_is_refused(tiny_bases, make_adapter, cli_runner, tmp_path):
    base = tiny_bases("gpt2")
    adapter = make_adapter(base, "lora", fan_in_fan_out=False, target_modules=("c_proj",))
    result = cli_runner(["merge", base, adapter, "-o", tmp_path / "m"])
    assert result.code == 2 and "Conv1D" in result.err and "fan_in_fan_out: false" in result.err


def test_source_scan_answers_only_where_the_source_has_no_conv1d():
    # The fast path (no model built) must never clear an architecture whose modeling code names Conv1D.
    import importlib.util
    import re
    from pathlib import Path

    from d2merge.io.model_structure import _source_builds_no_conv1d

    models = Path(importlib.util.find_spec("transformers").origin).parent / "models"
    with_conv1d = [d.name for d in models.iterdir()
                   if any(re.search(r"\bConv1D\b", f.read_text(encoding="utf-8")) for f in d.glob("modeling_*.py"))]
    assert "gpt2" in with_conv1d
    assert not [name for name in with_conv1d if _source_builds_no_conv1d(name)]
    assert _source_builds_no_conv1d("llama") and _source_builds_no_conv1d("xlm-roberta")
    assert not _source_builds_no_conv1d("no-such-architecture")
    # a composite model reaches other models' code (AutoModel.from_config): built, not scanned
    assert not _source_builds_no_conv1d("llava")


def test_source_scan_agrees_with_the_built_model():
    from d2merge.io import model_structure

    for model_type in ("llama", "bert"):
        assert model_structure._source_builds_no_conv1d(model_type)
        config = json.dumps({"model_type": model_type})
        assert model_structure._built_conv1d_modules(config) == frozenset()
    assert model_structure._built_conv1d_modules(json.dumps({"model_type": "gpt2"}))  # the build does see them


def test_transformers_names_the_tied_parameters():
    from d2merge.io.model_structure import model_structure
    from d2merge.planning import tied_pair

    small = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 32}
    tied = model_structure({"model_type": "llama", **small, "tie_word_embeddings": True})
    assert tied is not None and tied.output_embedding == "lm_head.weight"
    assert frozenset({"model.embed_tokens.weight", "lm_head.weight"}) in tied.tied
    untied = model_structure({"model_type": "llama", **small, "tie_word_embeddings": False})
    assert untied is not None and untied.tied == ()
    # GPT-2 ties by its class default (no key in config.json); its checkpoints drop the "transformer." prefix.
    gpt2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 32, "n_positions": 16}
    shapes = {"wte.weight": (torch.float32, (32, 8)), "wpe.weight": (torch.float32, (16, 8))}
    assert tied_pair(shapes, gpt2) == ("wte.weight", "lm_head.weight")
    llama_shapes = {"model.embed_tokens.weight": (torch.float32, (32, 8)),
                    "lm_head.weight": (torch.float32, (32, 8))}
    assert tied_pair(llama_shapes, {"model_type": "llama", **small, "tie_word_embeddings": False}) is None
    assert tied_pair(llama_shapes, {"model_type": "llama", **small, "tie_word_embeddings": True}) == (
        "model.embed_tokens.weight", "lm_head.weight")


def test_one_meta_build_per_base_per_process(tiny_bases, make_adapter, tmp_path):
    from d2merge.io.model_structure import _model_structure
    from d2merge.api import merge, plan

    base = tiny_bases("gpt2")
    adapter = make_adapter(base, "lora", fan_in_fan_out=True, target_modules=("c_attn",))
    _model_structure.cache_clear()
    plan(base, adapter)
    merge(base, adapter, tmp_path / "m", hash_sources=False)
    info = _model_structure.cache_info()
    assert info.misses == 1 and info.hits >= 1
