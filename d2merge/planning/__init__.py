"""The merge plan: what every output tensor is (copied, merged, replaced), its dtype and its shard.

Built from headers and configs alone, between the loaders (``d2merge.io``) and the engine; every
mismatch between base and adapter is refused here, naming the tensor. The modules, by job:

- ``model``: the records (:class:`TensorPlan`, :class:`MergePlan`) and the protocols a merge of
  several adapters plugs in through (:class:`MixRule`, :class:`SeveralAdapters`);
- ``build``: :func:`build_plan` (one base, one adapter) and :func:`plan_for` (paths or a mix, options);
- ``base_names``: where an adapter's module lives in the checkpoint (renamed on load, tied lm_head);
- ``targets``: target_parameters, trainable tokens and a layer's orientation (fan_in_fan_out);
- ``ties``: tied embeddings, and what the ``tied_embeddings`` policy makes of a change to them;
- ``shards``: the output shards, huggingface_hub's split;
- ``mix``: :func:`mix_plans`, one plan from several adapters' plans.
"""

from __future__ import annotations

from d2merge.planning.build import build_plan, plan_for
from d2merge.planning.mix import mix_plans
from d2merge.planning.model import (DTYPE_ALIASES, OUT_DTYPES, MergePlan, MixRule, SeveralAdapters, TensorPlan,
                                    parse_dtype)
from d2merge.planning.ties import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING, tied_pair

__all__ = ["DTYPE_ALIASES", "INPUT_EMBEDDING_SUFFIXES", "OUTPUT_EMBEDDING", "OUT_DTYPES", "MergePlan", "MixRule",
           "SeveralAdapters", "TensorPlan", "build_plan", "mix_plans", "parse_dtype", "plan_for", "tied_pair"]
