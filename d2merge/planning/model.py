"""What a merge plan is: one :class:`TensorPlan` per output tensor, gathered in a :class:`MergePlan`.

The records every layer after the plan reads (the engine, the writers, verify, merge-many), and the
two protocols through which a merge of several adapters (``d2merge.adapter_ops.mix``) plugs into
the plan without this package importing ``adapter_ops``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from d2merge.dtypes import ALIASES, FLOAT_DTYPES
from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter
from d2merge.io.checkpoint import BaseCheckpoint, TensorSource
from d2merge.io.safetensors_file import DTYPE_NAMES, dtype_size
from d2merge.methods import ModuleSettings
from d2merge.natural_sort import natural_key
from d2merge.options.merge import MergeOptions
from d2merge.sizes import format_size

# "auto" keeps each base tensor's dtype; the others are d2merge.dtypes' table.
OUT_DTYPES: dict[str, torch.dtype | None] = {"auto": None, **{n: d.torch_dtype for n, d in FLOAT_DTYPES.items()}}
DTYPE_ALIASES = ALIASES


def parse_dtype(name: str) -> str:
    key = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in OUT_DTYPES:
        raise D2MergeError(f"unknown dtype {name!r}; choose one of {', '.join(OUT_DTYPES)}")
    return key


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its source in the base, what the adapter does to it, where it goes."""

    name: str
    source: str  # base tensor read (for "replace": the adapter key)
    action: str  # "copy", "merge" or "replace"
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    shard: int = 0
    module: str | None = None
    settings: ModuleSettings | None = None
    # "merge" only: W0 is the adapter's ``base_layer`` replacement (key in ``source``), not the base's tensor.
    base_from_adapter: bool = False

    @property
    def out_bytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.out_dtype)


class MixRule(Protocol):
    """How a merge of several adapters makes each tensor they change (``d2merge.adapter_ops.mix``).

    Declared here so the plan and the engine call it without importing ``adapter_ops`` (which
    plans each adapter with this package): the plan holds the rule, the engine hands it W0.
    """

    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    combination: str | None  # None: the weighted sum of the updates; else a combine type

    def merged_weight(self, item: TensorPlan, w0: torch.Tensor, *,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The merged tensor ``item`` (stored layout, ``compute_dtype``) from W0 as stored."""
        ...

    def contributors(self, item: TensorPlan) -> tuple[int, ...]:
        """Indices of the adapters that change ``item``."""
        ...

    def row_merger(self, item: TensorPlan) -> Callable[[torch.Tensor, slice], torch.Tensor] | None:
        """For a tensor whose merged rows depend only on the same rows of W0: a function that turns fp32
        rows ``rows`` of W0 (out, in) into the merged rows, in place, its factors read once; else None."""
        ...


@runtime_checkable
class SeveralAdapters(Protocol):
    """What to merge when it is several adapters at once: it plans itself on a base (adapter_ops/mix.py).

    ``plan_for`` (so every format: folder, single file, GGUF) takes one in place of an adapter.
    """

    def plan_on(self, base: BaseCheckpoint, options: MergeOptions) -> MergePlan: ...


@dataclass(frozen=True)
class MergePlan:
    """Every output tensor of one merge, in the base's order, with its shards and what the plan noted."""

    base: BaseCheckpoint
    adapter: Adapter  # with several adapters (``mix``): the first
    tensors: tuple[TensorPlan, ...]
    shard_names: tuple[str, ...]
    out_dtype: str
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    base_model_id: str | None = None  # the Hub id the model card names as base_model (--base-model-id)
    mix: MixRule | None = None  # several adapters merged at once: the rule every "merge" entry follows

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.action == "merge"]

    def base_weight(self, item: TensorPlan, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """W0 of a merged tensor: the base's tensor, or the adapter's replacement of it.

        ``buffer`` (uint8) receives the data when given, instead of fresh memory.
        """
        return self.base_weight_source(item).read(item.source, buffer)

    def base_weight_source(self, item: TensorPlan) -> TensorSource:
        """Where :meth:`base_weight` reads ``item.source`` from: the base, or the adapter's replacement."""
        return self.adapter.tensors if item.base_from_adapter else self.base.tensors

    def base_weight_file(self, item: TensorPlan) -> Path:
        return self.base_weight_source(item).file_of(item.source)

    @property
    def adapters(self) -> tuple[Adapter, ...]:
        """Every adapter this merge applies (one, or a mix's)."""
        return self.mix.adapters if self.mix is not None else (self.adapter,)

    def source_files(self) -> dict[str, Path]:
        """The files this merge reads, by the label the model card shows (``adapter/...``, ``base/...``).

        Several adapters are labelled ``adapter1/...``, ``adapter2/...`` in the order given.
        """
        labelled: dict[str, Path] = {}
        for i, adapter in enumerate(self.adapters, 1):
            label = "adapter" if self.mix is None else f"adapter{i}"
            for p in (adapter.weights_file, adapter.path / "adapter_config.json"):
                labelled[f"{label}/{p.name}"] = p
        labelled.update({f"base/{p.name}": p for p in self.base.weight_files})
        return labelled

    @property
    def total_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description of the plan (what --dry-run prints)."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.action] = counts.get(t.action, 0) + 1
        cfg = self.adapter.config
        several = {} if self.mix is None else {
            "adapters": [str(a.path) for a in self.mix.adapters], "methods": [a.method.name for a in self.mix.adapters],
            "weights": list(self.mix.weights), "combination": self.mix.combination or "weighted sum of updates"}
        return {
            "base": str(self.base.location),
            "adapter": str(self.adapter.path),
            **several,
            "method": self.adapter.method.name,
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "options": dict(cfg.options),
            "out_dtype": self.out_dtype,
            "tensors": counts,
            "shards": list(self.shard_names),
            "total_bytes": self.total_bytes,
            "config_updates": self.config_updates,
            "notes": list(self.notes),
            # The rows of describe()'s table: every tensor that is not a plain copy.
            "changed": [self._change(t) for t in self.changed_in_reading_order()],
        }

    def changed_in_reading_order(self) -> list[TensorPlan]:
        """Every tensor that is not a plain copy, layers.2 before layers.10 (the order of listings)."""
        return sorted((t for t in self.tensors if t.action != "copy"), key=lambda t: natural_key(t.name))

    def _change(self, t: TensorPlan) -> dict[str, Any]:
        method = self.adapter.method
        if self.mix is not None:
            return {"tensor": t.name, "action": t.action, "dtype": DTYPE_NAMES[t.out_dtype],
                    "shard": self.shard_names[t.shard],
                    "adapters": [i + 1 for i in self.mix.contributors(t)] if t.action == "merge" else []}
        return {"tensor": t.name, "action": t.action,
                "rank": method.rank_text(method.configured_rank(t.settings)) if t.settings else None,
                "scale": t.settings.scale if t.settings else None, "dtype": DTYPE_NAMES[t.out_dtype],
                "shard": self.shard_names[t.shard]}

    def describe(self) -> str:
        """A readable table of the plan: one line per changed tensor, then the totals."""
        if self.mix is not None:
            return self._describe_mix()
        s = self.summary()
        cfg = self.adapter.config
        method = self.adapter.method
        ranks = f"{method.rank_name}={method.rank_text(method.parse_rank(cfg.raw, 'adapter_config.json'))}"
        lines = [f"base     {s['base']}", f"adapter  {s['adapter']}  ({s['method']}, {ranks}, alpha={s['lora_alpha']:g}"
                 + "".join(f", {k}={v}" for k, v in s["options"].items()) + ")",
                 f"output   dtype {s['out_dtype']}, {len(self.shard_names)} shard(s), {format_size(self.total_bytes)}", ""]
        width = max((len(t.name) for t in self.tensors if t.action != "copy"), default=10)
        lines.append(f"{'tensor':<{width}}  action   rank  scale      dtype  shard")
        for t in self.changed_in_reading_order():
            rank = method.rank_text(method.configured_rank(t.settings)) if t.settings else "-"
            scale = f"{t.settings.scale:<9.4g}" if t.settings else "-        "
            lines.append(f"{t.name:<{width}}  {t.action:<7}  {str(rank):<4}  {scale}  {DTYPE_NAMES[t.out_dtype]:<5}  "
                         f"{self.shard_names[t.shard]}")
        lines.append("")
        lines.append(", ".join(f"{n} {a}" for a, n in s["tensors"].items()) + f" of {len(self.tensors)} tensors")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def _describe_mix(self) -> str:
        """The table of a merge of several adapters: which adapters change each tensor."""
        assert self.mix is not None
        s = self.summary()
        lines = [f"base     {s['base']}"]
        for i, adapter in enumerate(self.mix.adapters):
            cfg = adapter.config
            lines.append(f"adapter{i + 1} {adapter.path}  ({adapter.method.name}, r={cfg.r}, alpha={cfg.lora_alpha:g}, "
                         f"weight {self.mix.weights[i]:g})")
        lines += [f"combined {s['combination']}",
                  f"output   dtype {s['out_dtype']}, {len(self.shard_names)} shard(s), {format_size(self.total_bytes)}", ""]
        width = max((len(t.name) for t in self.tensors if t.action != "copy"), default=10)
        lines.append(f"{'tensor':<{width}}  action   adapters  dtype  shard")
        for row in s["changed"]:
            adapters = ",".join(map(str, row["adapters"])) or "-"
            lines.append(f"{row['tensor']:<{width}}  {row['action']:<7}  {adapters:<8}  {row['dtype']:<5}  {row['shard']}")
        lines.append("")
        lines.append(", ".join(f"{n} {a}" for a, n in s["tensors"].items()) + f" of {len(self.tensors)} tensors")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
