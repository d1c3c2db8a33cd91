"""The merge plan: every output tensor, where it comes from and how it changes, before any byte is written.

Building the plan reads only headers and configs. It is where every mismatch
between base and adapter is found and reported, naming the tensor, and where
each adapter tensor is accounted for: a tensor the plan does not consume is an
error, never silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from d2merge.dtypes import ALIASES, FLOAT_DTYPES, by_torch
from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.io.quantized import names_quantized_repo
from d2merge.io.checkpoint_layout import CheckpointLayout
from d2merge.io.model_structure import conv1d_modules, is_listed, meta_model, model_structure
from d2merge.io.safetensors_file import DTYPE_NAMES, dtype_size
from d2merge.methods import LINEAR, ModuleSettings, trainable_tokens
from d2merge.methods import target_parameters
from d2merge.methods.base import BIAS, PARAMETER, TOKENS
from d2merge.methods.lora import LORA_BIAS
from d2merge.natural_sort import natural_key
from d2merge.options.base import option_error
from d2merge.options.merge import TIED_POLICIES, MergeOptions
from d2merge.sizes import format_size, parse_size

# "auto" keeps each base tensor's dtype; the others are d2merge.dtypes' table.
OUT_DTYPES: dict[str, torch.dtype | None] = {"auto": None, **{n: d.torch_dtype for n, d in FLOAT_DTYPES.items()}}
DTYPE_ALIASES = ALIASES
CONV1D_MODEL_TYPES = {"gpt2"}
CONV1D_LAYERS = {"c_attn", "c_proj", "c_fc"}
# Names transformers gives the input embedding that an ``lm_head`` is tied to.
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
OUTPUT_EMBEDDING = "lm_head.weight"


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
    plans each adapter with this module): the plan holds the rule, the engine hands it W0.
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
        return (self.adapter.tensors if item.base_from_adapter else self.base.tensors).read(item.source, buffer)

    def base_weight_file(self, item: TensorPlan) -> Path:
        return (self.adapter.tensors if item.base_from_adapter else self.base.tensors).file_of(item.source)

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


def parse_dtype(name: str) -> str:
    key = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in OUT_DTYPES:
        raise D2MergeError(f"unknown dtype {name!r}; choose one of {', '.join(OUT_DTYPES)}")
    return key


def build_plan(base: BaseCheckpoint | str | Path, adapter: Adapter | str | Path, *, dtype: str = "auto",
               max_shard_size: str | int = "5GB", tied_embeddings: str = "untie",
               allow_pickle: bool = False) -> MergePlan:
    """Match every adapter tensor to a base tensor, check shapes and ranks, and lay out the output."""
    if not isinstance(base, BaseCheckpoint):
        base = open_base(base, allow_pickle=allow_pickle)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    out_dtype_name = parse_dtype(dtype)
    if tied_embeddings not in TIED_POLICIES:
        raise D2MergeError(f"unknown tied-embeddings policy {tied_embeddings!r}; choose one of {', '.join(TIED_POLICIES)}")
    shard_limit = parse_size(max_shard_size)
    if adapter.unknown_keys:
        key = adapter.unknown_keys[0]
        more = f" (and {len(adapter.unknown_keys) - 1} more)" if len(adapter.unknown_keys) > 1 else ""
        raise D2MergeError(f"adapter tensor is not a {adapter.method.name} factor, modules_to_save or base_layer "
                           f"tensor{more}", path=adapter.weights_file, tensor=key,
                           hint="is adapter_config.json's peft_type right for these weights?")

    names = base.tensors.keys()
    infos = {n: base.tensors.info(n) for n in names}
    config = base.config or {}
    tied_pair = _tied_pair(infos, config)
    linear_modules = [m for m, e in adapter.modules.items() if e.layer_kind == LINEAR]
    conv1d = conv1d_modules(config) if linear_modules else None
    notes: list[str] = []
    config_updates: dict[str, Any] = {}

    layout_cache: list[CheckpointLayout] = []

    def layout() -> CheckpointLayout:
        """The checkpoint's names for what transformers holds in memory (built once, only when needed)."""
        if not layout_cache:
            layout_cache.append(CheckpointLayout(meta_model(config), infos))
        return layout_cache[0]

    def stored_as(weight_name: str) -> str | None:
        """The name the checkpoint stores an in-memory tensor under, when transformers renames it on load."""
        if weight_name in infos or _renamed_on_load(config.get("model_type")) is None:
            return None
        return layout().stored_name(weight_name)

    # Where each module's weight is in the base (lm_head of a tied model reads the embedding).
    def base_name_for(weight_name: str, what: str, tensor: str) -> str:
        if tied_pair and weight_name == tied_pair[1]:
            return tied_pair[0]  # transformers loads a tied lm_head from the embedding, whatever is stored
        if weight_name in infos:
            return weight_name
        stored = stored_as(weight_name)
        if stored is not None:
            return stored
        renamed = _renamed_on_load(config.get("model_type"))
        if renamed:
            raise D2MergeError(f"{what} '{weight_name.rsplit('.', 1)[0]}' is named as transformers holds this "
                               f"'{config.get('model_type')}' model in memory, but its checkpoint stores no tensor "
                               f"that transformers loads into '{weight_name}' by a plain rename ({renamed})",
                               path=adapter.weights_file, tensor=tensor,
                               hint="was the adapter trained on another base model? Otherwise merge with PEFT's "
                                    "merge_and_unload")
        raise D2MergeError(f"{what} '{weight_name.rsplit('.', 1)[0]}' is not in the base model",
                           path=adapter.weights_file, tensor=tensor,
                           hint="was the adapter trained on another base model?")

    targets = _parameter_targets(adapter, config)

    merges: dict[str, tuple[str, ModuleSettings]] = {}
    token_rows: set[str] = set()  # tensors whose change is trainable token rows (PEFT keeps a tied head tied)
    for module, entry in adapter.modules.items():
        method = adapter.method
        first_key = next(iter(entry.keys.values()))
        if module in targets:
            for stored, settings in _parameter_merges(adapter, module, targets[module], layout, infos):
                if stored in merges:
                    raise D2MergeError(f"two adapted parameters both change the stored tensor '{stored}'",
                                       path=adapter.weights_file, tensor=first_key,
                                       hint="check target_parameters and target_modules")
                merges[stored] = (stored, settings)
            continue
        weight_name = f"{module}.weight"
        source = base_name_for(weight_name, "adapted module", first_key)
        if source != weight_name and not (tied_pair and weight_name == tied_pair[1]):
            weight_name = source  # renamed on load: the output keeps the checkpoint's name
        if entry.layer_kind == TOKENS:
            merges[weight_name] = (source, _token_settings(adapter, module, entry.keys, infos[source][1]))
            token_rows.add(weight_name)
            continue
        missing = [n for n in method.tensor_names(entry.layer_kind) if n not in entry.keys]
        if missing:
            raise D2MergeError(f"module '{module}' lacks the {method.name} tensor '{missing[0]}'",
                               path=adapter.weights_file, tensor=first_key,
                               hint="the adapter file is incomplete, or peft_type does not match these weights")
        fan_in_fan_out = adapter.config.fan_in_fan_out if entry.layer_kind == LINEAR else False
        if entry.layer_kind == LINEAR:
            _check_orientation(module, fan_in_fan_out, conv1d, config, adapter, first_key)
        settings = method.module_settings(adapter.config, module, entry.layer_kind, fan_in_fan_out)
        _, base_shape = infos[source]
        if len(base_shape) != 2:
            raise D2MergeError(f"base tensor has shape {list(base_shape)}; only 2-D weights can be adapted",
                               path=base.tensors.file_of(source), tensor=source)
        rows, cols = base_shape
        out_features, in_features = (cols, rows) if settings.transposed else (rows, cols)
        expected = {**method.optional_shapes(settings, out_features, in_features),
                    **method.expected_shapes(settings, out_features, in_features)}
        stored_rank = method.rank_of({n: _Shape(adapter.tensors.info(k)[1]) for n, k in entry.keys.items()},
                                     entry.layer_kind)
        config_rank = method.configured_rank(settings)
        if stored_rank != config_rank:
            raise D2MergeError(f"factor rank {stored_rank} does not match the config's rank {config_rank}",
                               path=adapter.weights_file, tensor=entry.keys[method.tensor_names(entry.layer_kind)[0]],
                               hint="check r / rank_pattern in adapter_config.json")
        for name, key in entry.keys.items():
            dtype, shape = adapter.tensors.info(key)
            if tuple(shape) != tuple(expected[name]):
                raise D2MergeError(f"shape {list(shape)} does not fit base '{source}' {list(base_shape)}: "
                                   f"expected {list(expected[name])}", path=adapter.weights_file, tensor=key,
                                   hint="was the adapter trained on another base model?")
            if not dtype.is_floating_point:
                raise D2MergeError(f"adapter tensor has non-float dtype {dtype}", path=adapter.weights_file, tensor=key,
                                   hint="adapter factors are floating point; save the adapter again")
        merges[weight_name] = (source, settings)
        if adapter.config.raw.get("lora_bias") is True and entry.layer_kind == LINEAR and LORA_BIAS not in entry.keys:
            raise D2MergeError(f"module '{module}' lacks lora_B.bias, which lora_bias: true gives every LoRA layer",
                               path=adapter.weights_file, tensor=first_key,
                               hint="the adapter file is incomplete, or lora_bias does not match these weights")
        if LORA_BIAS in entry.keys:
            bias_name = stored_as(f"{module}.bias") or f"{module}.bias"
            if bias_name not in infos:
                raise D2MergeError(f"lora_bias: module '{module}' has no bias in the base, so lora_B.bias has nowhere "
                                   "to merge (PEFT refuses to merge it too)", path=adapter.weights_file,
                                   tensor=entry.keys[LORA_BIAS], hint="serve this adapter unmerged with PEFT")
            merges[bias_name] = (bias_name, replace(settings, part=BIAS, fan_in_fan_out=False))

    if adapter.config.use_rslora and not targets and _renamed_on_load(config.get("model_type")):
        fused = {key for found in layout().sources.values() for key, expert, _, _ in found if expert is not None}
        if any(f"{m}.weight" in fused for m in adapter.modules):
            notes.append("rsLoRA on per-expert tensors that transformers 5 fuses on load: merged with the scale the "
                         "adapter was trained with (lora_alpha / sqrt(r)); PEFT 0.21 fuses w1 and w3 at rank 2r with "
                         "alpha 2*lora_alpha when it loads such an adapter, which scales their update by sqrt(2)")
    if adapter.config.raw.get("trainable_token_indices") not in (None, [], {}) and not token_rows:
        raise D2MergeError("trainable_token_indices is set but the adapter holds no trained rows "
                           f"(*.{trainable_tokens.STORED_SUFFIX})", path=adapter.weights_file,
                           hint="the adapter file is incomplete, or the config does not match these weights")
    replacements: dict[str, str] = {}
    for target, key in adapter.replacements.items():
        source = base_name_for(target, "replaced module", key)
        if tuple(adapter.tensors.info(key)[1]) != tuple(infos[source][1]):
            raise D2MergeError(f"replacement shape {list(adapter.tensors.info(key)[1])} does not match the base's "
                               f"{list(infos[source][1])}", path=adapter.weights_file, tensor=key,
                               hint="was the adapter trained on another base model?")
        if source != target and not (tied_pair and target == tied_pair[1]):
            target = source  # renamed on load: the checkpoint's name
        replacements[target] = key

    # Output tensor list: the base's own tensors, plus an explicit lm_head when a tied pair is untied.
    outputs = list(names)
    if tied_pair:
        emb, head = tied_pair
        changed = [n for n in (emb, head) if n in merges or n in replacements]
        if changed == [emb] and emb in token_rows and emb not in replacements:
            # PEFT ties the lm_head's token adapter to the embedding's: both change, and the tie is exact.
            notes.append(f"trainable tokens on '{emb}', which is tied to '{head}': the tie is kept, as PEFT "
                         "applies the trained rows to both (exact)")
            changed = []
        elif emb in token_rows:
            raise D2MergeError(f"trainable tokens on the tied '{emb}' together with a change to '{head}' or a full "
                               "embedding tensor", path=adapter.weights_file,
                               hint="d2merge cannot tell how PEFT combined them; merge with PEFT's merge_and_unload")
        if changed:
            if tied_embeddings == "error":
                raise option_error(f"the adapter changes '{changed[0]}', which is tied to "
                                   f"'{head if changed[0] == emb else emb}' (tie_word_embeddings)",
                                   path=adapter.weights_file,
                                   hint="choose {tied_embeddings=untie} (exact: writes both) or tie (shares the change)")
            if tied_embeddings == "untie":
                if head not in infos:
                    outputs.insert(outputs.index(emb) + 1, head)
                config_updates["tie_word_embeddings"] = False
                notes.append(f"tied embeddings untied: '{emb}' and '{head}' are written separately "
                             "and tie_word_embeddings is set to false (exact)")
            else:
                if len(changed) == 2:
                    raise option_error(f"the adapter changes both '{emb}' and '{head}', which are tied",
                                       path=adapter.weights_file, hint="use {tied_embeddings=untie}")
                if changed[0] == head:
                    # keep one shared tensor: move lm_head's change onto the stored embedding
                    if head in merges:
                        merges[emb] = merges.pop(head)
                    else:
                        replacements[emb] = replacements.pop(head)
                notes.append(f"tied embeddings kept tied: the change to '{changed[0]}' now applies to both "
                             f"'{emb}' and '{head}' (not exact for the untouched one)")

    target_dtype = OUT_DTYPES[out_dtype_name]
    if target_dtype is None and base.quantization is not None:
        # "auto" keeps each stored dtype, but a quantized weight has none: the dtype the base was
        # stored in before quantization (config.json's dtype), else bf16, for every tensor.
        target_dtype = base.quantization.out_dtype
        out_dtype_name = by_torch(target_dtype).name
    trained_on = adapter.config.raw.get("base_model_name_or_path")
    if base.quantization is None and names_quantized_repo(trained_on if isinstance(trained_on, str) else None):
        notes.append(f"warning: the adapter was trained on {trained_on}, a quantized base, but this base is not "
                     "quantized: the merge is exact for a model nobody trained; pass the quantized base, or "
                     "measure the difference with `d2merge verify QBASE ADAPTER MERGED --original-base BASE` "
                     "(docs/qlora.md)")
    if base.quantization is not None:
        notes.append(f"base quantized with {base.quantization.method}: its weights are dequantized as the "
                     f"training runtime computed them; output dtype {out_dtype_name} (--dtype overrides)")
    plans: list[TensorPlan] = []
    for name in outputs:
        source = tied_pair[0] if tied_pair and name == tied_pair[1] else name
        in_dtype, shape = infos[source]
        out_dtype = target_dtype if (target_dtype is not None and in_dtype.is_floating_point) else in_dtype
        if name in replacements and name in merges:
            # An embedding's ``base_layer`` weight (save_embedding_layers) replaces the base's
            # tensor before the merge; the adapter's factors still apply on top of it.
            key, (_, settings) = replacements[name], merges[name]
            plans.append(TensorPlan(name, key, "merge", tuple(shape), adapter.tensors.info(key)[0], out_dtype,
                                    module=settings.module, settings=settings, base_from_adapter=True))
        elif name in replacements:
            key = replacements[name]
            rep_dtype = adapter.tensors.info(key)[0]
            plans.append(TensorPlan(name, key, "replace", tuple(shape), rep_dtype,
                                    out_dtype if target_dtype is not None else in_dtype))
        elif name in merges:
            src, settings = merges[name]
            plans.append(TensorPlan(name, src, "merge", tuple(shape), in_dtype, out_dtype, module=settings.module,
                                    settings=settings))
        else:
            plans.append(TensorPlan(name, source, "copy", tuple(shape), in_dtype, out_dtype))
    plans, shard_names = _assign_shards(plans, shard_limit)
    from d2merge.io.output import support_files

    _, skipped = support_files(base.folder, base.weight_files)
    if skipped:
        notes.append(f"not copied from the base folder: {', '.join(skipped)}")
    dtype_label = out_dtype_name if target_dtype is not None else _auto_label(plans)
    if target_dtype is not None:
        config_updates["dtype"] = by_torch(target_dtype).config_name
    return MergePlan(base, adapter, tuple(plans), tuple(shard_names), dtype_label, config_updates, tuple(notes))


def _parameter_targets(adapter: Adapter, config: dict[str, Any]) -> dict[str, target_parameters.Target]:
    """The adapter's ``target_parameters`` resolved on the base as transformers builds it (module path -> target)."""
    names = adapter.config.raw.get("target_parameters") or []
    if not names:
        return {}
    model = meta_model(config)
    source = adapter.path / "adapter_config.json"
    if model is None:
        raise D2MergeError(f"target_parameters {names!r}: transformers cannot build this base from its config.json, "
                           "so the parameters these names match are unknown", path=source,
                           hint="merge with PEFT's merge_and_unload")
    try:
        targets = target_parameters.resolve(model, names)
    except D2MergeError as exc:
        raise D2MergeError(exc.reason, path=source, hint=exc.hint) from None
    if not targets:
        raise D2MergeError(f"target_parameters {names!r} match no parameter of the base model", path=source,
                           hint="was the adapter trained on another base model?")
    return targets


def _parameter_merges(adapter: Adapter, module: str, target: target_parameters.Target,
                      layout: Any, infos: dict[str, tuple[torch.dtype, tuple[int, ...]]]
                      ) -> list[tuple[str, ModuleSettings]]:
    """(stored tensor, settings) for each tensor of the checkpoint that holds part of a targeted parameter."""
    entry = adapter.modules[module]
    method = adapter.method
    first_key = next(iter(entry.keys.values()))
    target_parameters.check_supported(adapter.config.raw, target, str(adapter.path / "adapter_config.json"))
    names = method.tensor_names(PARAMETER)
    extra = sorted(set(entry.keys) - set(names))
    missing = [n for n in names if n not in entry.keys]
    if extra or missing:
        raise D2MergeError(f"target parameter '{target.key}' has the tensors {sorted(entry.keys)}, PEFT's "
                           f"ParamWrapper saves exactly {list(names)}", path=adapter.weights_file, tensor=first_key,
                           hint="the adapter file is incomplete, or not a PEFT target_parameters adapter")
    settings = method.module_settings(adapter.config, target.key, PARAMETER, False)
    expected = target_parameters.expected_shapes(target, settings.r)
    for name, key in entry.keys.items():
        dtype, shape = adapter.tensors.info(key)
        if tuple(shape) != expected[name]:
            raise D2MergeError(f"shape {list(shape)} does not fit the parameter '{target.key}' {list(target.shape)}"
                               f" ({target.num_experts} expert(s), r={settings.r}): expected {list(expected[name])}",
                               path=adapter.weights_file, tensor=key,
                               hint="was the adapter trained on another base model, or with another r / rank_pattern?")
        if not dtype.is_floating_point:
            raise D2MergeError(f"adapter tensor has non-float dtype {dtype}", path=adapter.weights_file, tensor=key,
                               hint="adapter factors are floating point; save the adapter again")
    pieces = layout().pieces(target)
    if isinstance(pieces, str):
        raise D2MergeError(f"target parameter '{target.key}' {list(target.shape)}: {pieces}, so d2merge cannot tell "
                           "which stored values its update changes", path=adapter.weights_file, tensor=first_key,
                           hint="merge with PEFT's merge_and_unload")
    merges = []
    for stored, piece in pieces:
        dtype, shape = infos[stored]
        if tuple(shape) != piece.shape() or not dtype.is_floating_point:
            raise D2MergeError(f"stored tensor has shape {list(shape)} ({dtype}); its part of '{target.key}' is "
                               f"{list(piece.shape())} floats", tensor=stored, hint="is the base checkpoint complete?")
        merges.append((stored, replace(settings, module=module, piece=piece)))
    return merges


def _renamed_on_load(model_type: Any) -> str | None:
    """What transformers renames or fuses when it loads a checkpoint of ``model_type`` (None: nothing)."""
    if not isinstance(model_type, str):
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    mapping = get_checkpoint_conversion_mapping(model_type) or []
    shown = []
    for transform in mapping:
        sources = getattr(transform, "source_patterns", None)
        targets = getattr(transform, "target_patterns", None)
        if sources and targets:
            first = lambda v: (v[0] if isinstance(v, (list, tuple)) else v).strip(".")  # noqa: E731
            shown.append(f"{first(sources)} -> {first(targets)}")
    return "; ".join(shown[:3]) or None


def _token_settings(adapter: Adapter, module: str, keys: dict[str, str], base_shape: tuple[int, ...]
                    ) -> ModuleSettings:
    """Settings of a trainable-tokens entry, its indices and delta checked against the base embedding."""
    settings = adapter.method.module_settings(adapter.config, module, TOKENS, False)
    key = keys[trainable_tokens.DELTA]
    indices = settings.options.get("token_indices")
    if indices is None:
        raise D2MergeError(f"trainable_token_indices names no indices for '{module}'", path=adapter.weights_file,
                           tensor=key, hint="the adapter config and weights do not match")
    rows, dim = base_shape
    if len(set(indices)) != len(indices) or any(not 0 <= i < rows for i in indices):
        raise D2MergeError(f"trainable_token_indices for '{module}' repeat an index or fall outside its {rows} rows",
                           path=adapter.path / "adapter_config.json", tensor=key,
                           hint="was the adapter trained on another base model (or a resized vocabulary)?")
    dtype, shape = adapter.tensors.info(key)
    if tuple(shape) != (len(indices), dim) or not dtype.is_floating_point:
        raise D2MergeError(f"trained token rows have shape {list(shape)} ({dtype}), expected "
                           f"[{len(indices)}, {dim}] floats", path=adapter.weights_file, tensor=key,
                           hint="was the adapter trained on another base model?")
    return settings


class _Shape:
    """Stands in for a tensor where only ``.shape`` is needed (rank checks on headers)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)


def _auto_label(plans: list[TensorPlan]) -> str:
    floats = {DTYPE_NAMES[t.out_dtype] for t in plans if t.out_dtype.is_floating_point}
    return "auto (" + ", ".join(sorted(floats)).lower() + ")"


def _check_orientation(module: str, fan_in_fan_out: bool, conv1d: frozenset[str] | None, config: dict[str, Any],
                       adapter: Adapter, first_key: str) -> None:
    """``fan_in_fan_out`` must match the layer: Conv1D stores (in, out), nn.Linear (out, in).

    ``conv1d`` is transformers' own answer (d2merge.io.model_structure); without it
    (an architecture transformers cannot build) GPT-2's layer names are the rule.
    """
    if conv1d is not None:
        is_conv1d = is_listed(module, conv1d)
    else:
        is_conv1d = config.get("model_type") in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_LAYERS
    if is_conv1d and not fan_in_fan_out:
        raise D2MergeError(f"module '{module}' is a Conv1D layer stored (in, out) but the adapter config has "
                           "fan_in_fan_out: false", path=adapter.path / "adapter_config.json", tensor=first_key,
                           hint="set fan_in_fan_out: true, as PEFT does for GPT-2")
    if conv1d is not None and fan_in_fan_out and not is_conv1d:
        # PEFT resets fan_in_fan_out to false for an nn.Linear; merging it transposed would be wrong
        # without a shape error whenever the weight is square.
        raise D2MergeError(f"module '{module}' is an nn.Linear stored (out, in) but the adapter config has "
                           "fan_in_fan_out: true", path=adapter.path / "adapter_config.json", tensor=first_key,
                           hint="set fan_in_fan_out: false (PEFT uses true only for GPT-2 style Conv1D layers)")


def _tied_pair(infos: dict[str, tuple[torch.dtype, tuple[int, ...]]], config: dict[str, Any]) -> tuple[str, str] | None:
    """(input embedding, lm_head) when the base ties them, else None.

    transformers' own model class answers (the parameters it shares after tying, on the meta
    device); config.json's ``tie_word_embeddings`` decides only for a base it cannot build
    or whose output embedding is not an ``lm_head``.
    """
    sub_configs = [k for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    if config.get("tie_word_embeddings") is False and not sub_configs and OUTPUT_EMBEDDING in infos:
        # transformers ties only when the (text) config says so: an explicit false with no sub-config
        # and a stored lm_head needs no model build (importing its code is ~3 CPU-s of a 1.1B merge).
        return None
    structure = model_structure(config)
    if structure is not None and structure.output_embedding == OUTPUT_EMBEDDING:
        group = next((g for g in structure.tied if OUTPUT_EMBEDDING in g), None)
        if group is None:
            return None  # transformers keeps a separate lm_head
        inputs = group - {OUTPUT_EMBEDDING}
        candidates = [n for n in infos if n != OUTPUT_EMBEDDING
                      and any(n == g or g.endswith("." + n) or n.endswith("." + g) for g in inputs)]
        return _checked_pair(infos, candidates)
    tied = config.get("tie_word_embeddings")
    if tied is None:
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        tied = text_config.get("tie_word_embeddings", OUTPUT_EMBEDDING not in infos and bool(config))
    if not tied:
        return None
    return _checked_pair(infos, [n for n in infos if n.endswith(INPUT_EMBEDDING_SUFFIXES)])


def _checked_pair(infos: dict[str, tuple[torch.dtype, tuple[int, ...]]], candidates: list[str]
                  ) -> tuple[str, str] | None:
    """The one stored input embedding and ``lm_head``, if their shapes agree."""
    if len(candidates) != 1:
        return None
    emb, head = candidates[0], OUTPUT_EMBEDDING
    if head in infos and infos[head][1] != infos[emb][1]:
        return None
    return emb, head


def _assign_shards(plans: list[TensorPlan], limit: int) -> tuple[list[TensorPlan], list[str]]:
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


def plan_for(base: str | Path | BaseCheckpoint, adapter: str | Path | Adapter | SeveralAdapters,
             options: MergeOptions | None = None, **overrides: Any) -> MergePlan:
    """The merge plan of ``base`` and ``adapter`` (paths or opened sources), writing nothing.

    ``adapter`` may be several adapters with their weights (``d2merge.adapter_ops.mix.AdapterMix``).

    ``d2merge.api.plan`` is this function; it lives here, below every writer, so that the
    format modules in ``d2merge.export`` plan a merge without importing ``d2merge.api``.
    """
    options = MergeOptions.resolve(options, overrides)
    if not isinstance(base, BaseCheckpoint):
        base = open_base(base, allow_pickle=options.allow_pickle)
    if isinstance(adapter, SeveralAdapters):
        return adapter.plan_on(base, options)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=options.allow_pickle)
    merge_plan = build_plan(base, adapter, dtype=options.dtype, max_shard_size=options.max_shard_size,
                            tied_embeddings=options.tied_embeddings)
    if options.base_model_id is not None:
        merge_plan = replace(merge_plan, base_model_id=options.base_model_id)
    return merge_plan


def tied_pair(infos: dict[str, tuple[torch.dtype, tuple[int, ...]]], config: dict[str, Any]) -> tuple[str, str] | None:
    """(input embedding, lm_head) when the base ties them (the plan's rule, for extract), else None."""
    return _tied_pair(infos, config)


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
    tensors, shard_names = _assign_shards([replace(entries[n], shard=0) for n in order], parse_size(max_shard_size))
    config_updates: dict[str, Any] = {}
    notes: list[str] = []
    for merge_plan in plans:
        config_updates.update(merge_plan.config_updates)
        notes += [n for n in merge_plan.notes if n not in notes]
    return MergePlan(first.base, first.adapter, tuple(tensors), tuple(shard_names), first.out_dtype, config_updates,
                     tuple(notes), first.base_model_id, mix=rule)
