"""d2merge.planning's decisions, read from the plan alone (nothing merged, nothing written).

What each output tensor is (copied, merged, replaced) and where it comes from, its dtype, its
shard, what a tied embedding becomes, and what is refused before any byte is computed. The
merges themselves are checked against oracles elsewhere (test_merge_e2e, test_peft_oracle); here
only the plan, on the tiny bases of conftest.py: each test is a header read and milliseconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from d2merge.errors import D2MergeError
from d2merge.io.checkpoint import open_base
from d2merge.planning import build_plan, parse_dtype

LM_HEAD_KEY = "base_model.model.lm_head.weight"
VOCAB, HIDDEN = 128, 32  # conftest's tiny bases: the embedding's shape


def base_tensors(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} of every tensor the base stores, from the headers."""
    tensors = open_base(folder).tensors
    return {name: (tensors.info(name)[0], tuple(tensors.info(name)[1])) for name in tensors.keys()}


def actions(plan: Any) -> dict[str, str]:
    return {t.name: t.action for t in plan.tensors}


def embedding(seed: int) -> torch.Tensor:
    return 0.05 * torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ---- copied, merged, replaced ---------------------------------------------------------------------


def test_each_base_tensor_is_copied_merged_or_replaced_once(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("llama", sharded=True)
    adapter = make_adapter(base, "d2lora", target_modules=("q_proj", "v_proj"), modules_to_save=["lm_head"],
                           extra_tensors={LM_HEAD_KEY: embedding(1)})
    plan = build_plan(base, adapter)
    stored = base_tensors(base)
    assert [t.name for t in plan.tensors] == list(plan.base.tensors.keys())  # the base's order, nothing added
    assert sorted(actions(plan)) == sorted(stored)
    merged = {t.name for t in plan.tensors if t.action == "merge"}
    assert merged == {n for n in stored if n.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight"))}
    assert actions(plan)["lm_head.weight"] == "replace"
    assert {a for n, a in actions(plan).items() if n not in merged | {"lm_head.weight"}} == {"copy"}
    for t in plan.tensors:
        assert t.shape == stored[t.name][1]
        if t.action == "merge":  # read from the base under its own name, with the module's settings
            assert t.source == t.name and t.module == t.name.removesuffix(".weight") and t.settings is not None
        elif t.action == "replace":  # read from the adapter
            assert t.source == LM_HEAD_KEY and t.settings is None
        else:
            assert t.source == t.name and t.settings is None
    assert plan.summary()["tensors"] == {"copy": len(stored) - len(merged) - 1, "merge": len(merged), "replace": 1}
    assert [row["tensor"] for row in plan.summary()["changed"]] == [t.name for t in plan.changed_in_reading_order()]


def test_an_adapter_of_factors_only_changes_nothing_else(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("qwen2")
    plan = build_plan(base, make_adapter(base, "lora", target_modules=("down_proj",)))
    assert {t.name for t in plan.merged} == {n for n in base_tensors(base) if n.endswith("mlp.down_proj.weight")}
    assert "replace" not in actions(plan).values()
    assert not any("tied" in note for note in plan.notes) and "tie_word_embeddings" not in plan.config_updates


# ---- dtype -----------------------------------------------------------------------------------------


def test_auto_keeps_each_stored_dtype(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("llama", dtype=torch.bfloat16)
    plan = build_plan(base, make_adapter(base, "lora"))
    assert {t.out_dtype for t in plan.tensors} == {torch.bfloat16} and all(t.in_dtype == t.out_dtype
                                                                          for t in plan.tensors)
    assert plan.out_dtype == "auto (bf16)" and "dtype" not in plan.config_updates


@pytest.mark.parametrize("asked, torch_dtype, config_name", [("fp16", torch.float16, "float16"),
                                                             ("bfloat16", torch.bfloat16, "bfloat16"),
                                                             ("FLOAT32", torch.float32, "float32")])
def test_a_dtype_applies_to_every_tensor_and_to_config_json(asked: str, torch_dtype: torch.dtype, config_name: str,
                                                             tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("llama")
    plan = build_plan(base, make_adapter(base, "dora"), dtype=asked)
    assert {t.out_dtype for t in plan.tensors} == {torch_dtype}
    assert {t.in_dtype for t in plan.tensors} == {torch.float32}  # read as stored, cast on the way out
    assert plan.out_dtype == parse_dtype(asked) and plan.config_updates["dtype"] == config_name
    size = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}[torch_dtype]
    assert plan.total_bytes == size * sum(math.prod(t.shape) for t in plan.tensors)


def test_an_unknown_dtype_is_refused_naming_the_choices(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("llama")
    with pytest.raises(D2MergeError, match=r"unknown dtype 'int8'; choose one of auto, fp32, bf16, fp16"):
        build_plan(base, make_adapter(base, "lora"), dtype="int8")


# ---- shards ----------------------------------------------------------------------------------------


def test_one_shard_when_everything_fits(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("llama", sharded=True)  # a sharded base: the output's split is the plan's own
    plan = build_plan(base, make_adapter(base, "lora"))
    assert plan.shard_names == ("model.safetensors",) and {t.shard for t in plan.tensors} == {0}


def test_shards_follow_the_limit_in_tensor_order(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("llama")
    limit = 20_000
    plan = build_plan(base, make_adapter(base, "lora"), max_shard_size=limit)
    count = len(plan.shard_names)
    assert count > 2 and plan.shard_names == tuple(f"model-{i:05d}-of-{count:05d}.safetensors"
                                                   for i in range(1, count + 1))
    shards = [t.shard for t in plan.tensors]
    assert shards == sorted(shards) and set(shards) == set(range(count))  # greedy, in order, none empty
    for shard in range(count):
        sizes = [t.out_bytes for t in plan.tensors if t.shard == shard]
        assert sum(sizes) <= limit or len(sizes) == 1  # over the limit only alone
    # the output dtype decides the split: half the bytes, fewer shards
    assert len(build_plan(base, make_adapter(base, "lora"), max_shard_size=limit, dtype="bf16").shard_names) < count


def test_a_shard_size_that_is_not_a_size_is_refused(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("llama")
    with pytest.raises(D2MergeError, match="invalid size '5 parsecs'"):
        build_plan(base, make_adapter(base, "lora"), max_shard_size="5 parsecs")


# ---- tied embeddings -----------------------------------------------------------------------------


def test_untie_writes_lm_head_beside_the_embedding(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("gpt2")  # stores no lm_head.weight: transformers ties it to wte
    adapter = make_adapter(base, "lora", modules_to_save=["lm_head"], extra_tensors={LM_HEAD_KEY: embedding(2)},
                           drop_factors=True)
    plan = build_plan(base, adapter, tied_embeddings="untie")
    names = [t.name for t in plan.tensors]
    assert names.index("lm_head.weight") == names.index("transformer.wte.weight") + 1
    assert actions(plan)["lm_head.weight"] == "replace" and actions(plan)["transformer.wte.weight"] == "copy"
    assert plan.config_updates["tie_word_embeddings"] is False and any("untied" in n for n in plan.notes)


def test_tie_moves_the_change_onto_the_stored_embedding(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("gpt2")
    adapter = make_adapter(base, "lora", modules_to_save=["lm_head"], extra_tensors={LM_HEAD_KEY: embedding(3)},
                           drop_factors=True)
    plan = build_plan(base, adapter, tied_embeddings="tie")
    assert "lm_head.weight" not in actions(plan)
    replaced = next(t for t in plan.tensors if t.name == "transformer.wte.weight")
    assert replaced.action == "replace" and replaced.source == LM_HEAD_KEY
    assert "tie_word_embeddings" not in plan.config_updates and any("kept tied" in n for n in plan.notes)


@pytest.mark.parametrize("policy, message", [("error", r"changes 'lm_head.weight', which is tied to "
                                                        r"'transformer.wte.weight'"),
                                             ("sometimes", "unknown tied-embeddings policy 'sometimes'")])
def test_tied_embedding_refusals(policy: str, message: str, tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("gpt2")
    adapter = make_adapter(base, "lora", modules_to_save=["lm_head"], extra_tensors={LM_HEAD_KEY: embedding(4)},
                           drop_factors=True)
    with pytest.raises(D2MergeError, match=message):
        build_plan(base, adapter, tied_embeddings=policy)


# ---- refusals before any work ----------------------------------------------------------------------


def test_an_adapter_for_another_base_is_refused(tiny_bases: Any, make_adapter: Any) -> None:
    adapter = make_adapter(tiny_bases("gpt2"), "lora")  # transformer.h.*.attn.c_attn: no such module in Llama
    with pytest.raises(D2MergeError, match=r"adapted module '.*c_attn' is not in the base model") as caught:
        build_plan(tiny_bases("llama"), adapter)
    assert "adapter_model.safetensors" in str(caught.value)


def test_a_rank_the_config_does_not_state_is_refused(tiny_bases: Any, make_adapter: Any, writable_copy: Any) -> None:
    base = tiny_bases("llama")
    adapter = writable_copy(make_adapter(base, "lora", r=4))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(D2MergeError, match="factor rank 4 does not match the config's rank 2"):
        build_plan(base, adapter)


def test_a_replacement_of_the_wrong_shape_is_refused(tiny_bases: Any, make_adapter: Any) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora", modules_to_save=["lm_head"],
                           extra_tensors={LM_HEAD_KEY: torch.zeros(VOCAB + 1, HIDDEN)})
    with pytest.raises(D2MergeError, match=rf"replacement shape \[{VOCAB + 1}, {HIDDEN}\] does not match the base's "
                                           rf"\[{VOCAB}, {HIDDEN}\]"):
        build_plan(base, adapter)
