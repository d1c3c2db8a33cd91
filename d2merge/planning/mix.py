"""One plan for several adapters merged at once, from each adapter's own plan on the same base.

``d2merge.adapter_ops.mix`` plans each adapter with :func:`d2merge.planning.build_plan`, then joins the
plans here; the arithmetic of every changed tensor is its :class:`~d2merge.planning.model.MixRule`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from d2merge.errors import D2MergeError
from d2merge.io.safetensors_file import DTYPE_NAMES
from d2merge.planning.model import MergePlan, MixRule, TensorPlan
from d2merge.planning.shards import assign_shards
from d2merge.sizes import parse_size


def mix_plans(plans: Sequence[MergePlan], rule: MixRule, max_shard_size: str | int) -> MergePlan:
    """One plan for several adapters from each adapter's own plan on the same base (same options).

    Every output tensor of any plan, in the base's order; a tensor any adapter changes is a
    "merge" entry whose arithmetic is ``rule``'s. Each plan has already checked its adapter
    against the base (names, shapes, ranks), so what is left to check is that they agree.
    """
    first = plans[0]
    order: list[str] = []
    entries: dict[str, TensorPlan] = {}
    for merge_plan in plans:
        previous = None
        for item in merge_plan.tensors:
            known = entries.get(item.name)
            if known is None:
                order.insert(order.index(previous) + 1 if previous is not None else 0, item.name)
                entries[item.name] = item
            elif (known.shape, known.out_dtype) != (item.shape, item.out_dtype):
                raise D2MergeError(f"the adapters' plans disagree on this tensor: {list(known.shape)} "
                                   f"{DTYPE_NAMES[known.out_dtype]} and {list(item.shape)} {DTYPE_NAMES[item.out_dtype]}",
                                   path=merge_plan.adapter.weights_file, tensor=item.name,
                                   hint="were the adapters trained on different base models?")
            elif known.action == "copy" and item.action == "merge":
                entries[item.name] = item
            previous = item.name
    for name, item in entries.items():
        if item.action == "replace" or item.base_from_adapter:
            raise D2MergeError("an adapter replaces this whole tensor (modules_to_save or an embedding's "
                               "base_layer), which a weighted merge of several adapters cannot scale",
                               path=first.adapter.weights_file, tensor=name,
                               hint="merge that adapter alone with `d2merge merge BASE ADAPTER`")
    tensors, shard_names = assign_shards([replace(entries[n], shard=0) for n in order], parse_size(max_shard_size))
    config_updates: dict[str, Any] = {}
    notes: list[str] = []
    for merge_plan in plans:
        config_updates.update(merge_plan.config_updates)
        notes += [n for n in merge_plan.notes if n not in notes]
    return MergePlan(first.base, first.adapter, tuple(tensors), tuple(shard_names), first.out_dtype, config_updates,
                     tuple(notes), first.base_model_id, mix=rule)
