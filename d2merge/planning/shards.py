"""Which output shard each tensor goes to, decided from the plan's sizes before any byte is computed."""

from __future__ import annotations

from dataclasses import replace

from d2merge.planning.model import TensorPlan


def assign_shards(plans: list[TensorPlan], limit: int) -> tuple[list[TensorPlan], list[str]]:
    """The shards transformers' ``save_pretrained`` would write: huggingface_hub's own split.

    Greedy in tensor order, a tensor larger than the limit alone in its shard, the
    ``model-0000i-of-0000n.safetensors`` names; the plan only supplies each tensor's
    output size, so the split is decided before any byte is computed.
    """
    if not plans:
        return plans, ["model.safetensors"]
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory({t.name: t for t in plans}, get_storage_size=lambda t: t.out_bytes,
                                                 filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
    names = list(split.filename_to_tensors)
    shard_of = {name: i for i, name in enumerate(names)}
    return [replace(t, shard=shard_of[split.tensor_to_filename[t.name]]) for t in plans], names
