"""What every adapter method shares: config fields, per-module scaling, the strategy interface.

A method is a small stateless strategy (as PEFT's ``LoraVariant``): it parses its
own config, names its tensors, computes the merged weight from tensors, and
builds the runtime module for the unmerged forward. Nothing outside
``d2merge/methods/`` knows a formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from d2merge.errors import D2MergeError
from d2merge.methods import matching, residual_base, target_parameters, trainable_tokens

LINEAR = "linear"
EMBEDDING = "embedding"
# PEFT's trainable_token_indices: whole rows of an embedding replaced (methods/trainable_tokens.py).
TOKENS = "tokens"
# PEFT's target_parameters: LoRA on a parameter (fused MoE experts, a router's weight); see methods/target_parameters.py.
PARAMETER = "parameter"
# Which tensor of a module a plan entry writes: its weight, or its bias (lora_bias: lora_B.bias).
WEIGHT = "weight"
BIAS = "bias"


@dataclass(frozen=True)
class AdapterConfig:
    """The parsed, validated ``adapter_config.json`` of any method."""

    method: str
    peft_type: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str | None
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    rank_pattern: Mapping[str, Any] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    format_version: str | None = None
    # Method-specific settings (tau, norm_axis, r_mag, ...), validated by the method.
    options: Mapping[str, Any] = field(default_factory=dict)
    # The fields of adapter_config.json that act on the weights, as honoured (see methods/fields.py).
    honoured_fields: tuple[str, ...] = field(default=(), compare=False)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The config as written back to ``adapter_config.json`` (round-trips through parse)."""
        return dict(self.raw)


@dataclass(frozen=True)
class ModuleSettings:
    """Everything the formula needs for one adapted module, resolved from the config."""

    module: str
    layer_kind: str  # LINEAR, EMBEDDING or TOKENS (trainable token rows of an embedding)
    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    options: Mapping[str, Any] = field(default_factory=dict)
    # WEIGHT, or BIAS for the layer's bias when the adapter has lora_bias (a second plan entry).
    part: str = WEIGHT
    # "pissa" / "olora": the base PEFT rebuilt from W0 at load time (methods/residual_base.py).
    base_init: str | None = None
    # PARAMETER only: which part of the targeted parameter's dW the stored tensor holds.
    piece: target_parameters.Piece | None = None

    @property
    def transposed(self) -> bool:
        """Whether the base weight is stored (in, out), the transpose of the formula's (out, in).

        GPT-2's Conv1D (``fan_in_fan_out``) and embeddings (num_embeddings, dim)
        both store it so; every formula works on (out, in).
        """
        return self.fan_in_fan_out or self.layer_kind == EMBEDDING


@dataclass(frozen=True)
class ModuleAnswer:
    """A method's one answer about an adapted module on its base weight (:meth:`Method.answer`).

    How the module merges (``settings``), the shape of every tensor it may store (required and
    optional, PEFT orientation), the rank its stored tensors imply and the rank the config gives it:
    what the plan checks the adapter's headers against, no tensor read.
    """

    settings: ModuleSettings
    shapes: Mapping[str, tuple[int, ...]]
    stored_rank: Any
    configured_rank: Any


class _Shaped:
    """Stands in for a tensor where only ``.shape`` is needed (the rank of stored tensors, from headers)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)


def pattern_key(patterns: Mapping[str, Any], module: str, field: str = "pattern") -> str | None:
    """The pattern that applies to ``module``, matched as PEFT does: a regex on a dotted suffix."""
    return matching.pattern_key(patterns, module, field=field)


# Scales and alphas multiply float32 tensors: beyond this torch raises instead of giving inf.
FLOAT32_MAX = 3.4028234663852886e38


def _number(raw: Mapping[str, Any], name: str, source: str, *, default: Any = None, positive: bool = False,
            integer: bool = False) -> Any:
    value = raw.get(name, default)
    if value is None:
        raise D2MergeError(f"missing required field '{name}'", path=source,
                           hint="add it to adapter_config.json")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise D2MergeError(f"field '{name}' must be a number, got {value!r}", path=source)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        raise D2MergeError(f"field '{name}' is too large", path=source) from None
    if not finite:
        raise D2MergeError(f"field '{name}' must be finite, got {value!r}", path=source)
    if integer and int(value) != value:
        raise D2MergeError(f"field '{name}' must be an integer, got {value!r}", path=source)
    if positive and value <= 0:
        raise D2MergeError(f"field '{name}' must be positive, got {value!r}", path=source)
    return int(value) if integer else float(value)


def _flag(raw: Mapping[str, Any], name: str, source: str, default: bool) -> bool:
    value = raw.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise D2MergeError(f"field '{name}' must be true or false, got {value!r}", path=source)
    return value


class Method:
    """A method's strategy. Subclasses set the class attributes and implement the math."""

    name: ClassVar[str]
    peft_type: ClassVar[str]
    # Adapter tensor names per module, without the ``.weight`` suffix for linear layers.
    linear_tensors: ClassVar[tuple[str, ...]]
    embedding_tensors: ClassVar[tuple[str, ...]] = ()
    # Tensors stored without a ``.weight`` suffix (PEFT's own quirk).
    bare_tensors: ClassVar[frozenset[str]] = frozenset()
    # Tensors a linear module may have, with the key suffix PEFT stores them under (lora_B.bias).
    optional_linear_tensors: ClassVar[dict[str, str]] = {}

    # ----- config -------------------------------------------------------------------------
    def parse_config(self, raw: Mapping[str, Any], source: str) -> AdapterConfig:
        """Validate the fields every method shares, then the method's own ``options``."""
        rank = self.parse_rank(raw, source)
        alpha = _number(raw, "lora_alpha", source, default=rank if isinstance(rank, int) else None)
        if alpha == 0:
            raise D2MergeError("field 'lora_alpha' must be non-zero", path=source)
        if abs(alpha) > FLOAT32_MAX:
            raise D2MergeError(f"field 'lora_alpha' is {alpha:g}, beyond float32 range (3.4e38), in which the "
                               "merge computes", path=source)
        target = raw.get("target_modules")
        if isinstance(target, list):
            target = tuple(str(t) for t in target)
        elif target is not None and not isinstance(target, str):
            raise D2MergeError(f"field 'target_modules' must be a list or a string, got {target!r}", path=source)
        rank_pattern = raw.get("rank_pattern") or {}
        alpha_pattern = raw.get("alpha_pattern") or {}
        for name, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            if not isinstance(patterns, dict):
                raise D2MergeError(f"field '{name}' must be an object, got {patterns!r}", path=source)
            matching.check_pattern_keys(patterns, name, source)
        for key in rank_pattern:
            self.parse_rank({**raw, **self.rank_override(rank_pattern[key])}, source)
        for key, value in alpha_pattern.items():
            _number({"alpha_pattern": value}, "alpha_pattern", source)
            if value == 0:
                raise D2MergeError(f"alpha_pattern['{key}'] must be non-zero", path=source)
            if abs(value) > FLOAT32_MAX:
                raise D2MergeError(f"alpha_pattern['{key}'] is {value:g}, beyond float32 range (3.4e38)", path=source)
        modules_to_save = raw.get("modules_to_save") or ()
        if not isinstance(modules_to_save, (list, tuple)) or not all(isinstance(m, str) for m in modules_to_save):
            raise D2MergeError("field 'modules_to_save' must be a list of module names", path=source)
        base_model = raw.get("base_model_name_or_path")
        if base_model is not None and not isinstance(base_model, str):
            raise D2MergeError(f"field 'base_model_name_or_path' must be a string, got {base_model!r}", path=source)
        return AdapterConfig(
            method=self.name,
            peft_type=self.peft_type,
            r=rank if isinstance(rank, int) else 0,
            lora_alpha=alpha,
            target_modules=target,
            base_model_name_or_path=base_model,
            fan_in_fan_out=_flag(raw, "fan_in_fan_out", source, False),
            use_rslora=_flag(raw, "use_rslora", source, False),
            rank_pattern=dict(rank_pattern),
            alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
            modules_to_save=tuple(modules_to_save),
            format_version=None if raw.get("format_version") is None else str(raw.get("format_version")),
            options=self.parse_options(raw, source),
            raw=dict(raw),
        )

    def parse_rank(self, raw: Mapping[str, Any], source: str) -> Any:
        return _number(raw, "r", source, positive=True, integer=True)

    def rank_override(self, pattern_value: Any) -> dict[str, Any]:
        """How a ``rank_pattern`` value overrides the config's rank fields."""
        return {"r": pattern_value}

    def parse_options(self, raw: Mapping[str, Any], source: str) -> dict[str, Any]:
        return {}

    def module_settings(self, config: AdapterConfig, module: str, layer_kind: str,
                        fan_in_fan_out: bool | None = None) -> ModuleSettings:
        """Resolve rank, alpha and scale for one module (rank/alpha patterns applied)."""
        raw = dict(config.raw)
        key = pattern_key(config.rank_pattern, module, "rank_pattern")
        if key is not None:
            raw.update(self.rank_override(config.rank_pattern[key]))
        rank = self.parse_rank(raw, "adapter_config.json")
        alpha_key = pattern_key(config.alpha_pattern, module, "alpha_pattern")
        alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
        options = dict(config.options)
        if not isinstance(rank, int):
            options.update(rank)
        if layer_kind == TOKENS:
            options["token_indices"] = trainable_tokens.indices_for(config.raw.get("trainable_token_indices"), module)
        init = config.raw.get("init_lora_weights")
        return ModuleSettings(
            module=module,
            layer_kind=layer_kind,
            r=rank if isinstance(rank, int) else 0,
            alpha=alpha,
            scale=self.scale(rank, alpha, config.use_rslora),
            fan_in_fan_out=config.fan_in_fan_out if fan_in_fan_out is None else fan_in_fan_out,
            options=options,
            # PEFT rebuilds the base only for linear layers (its Embedding has no PiSSA/OLoRA init).
            base_init=init if layer_kind == LINEAR and init in residual_base.INITS else None,
        )

    def scale(self, rank: Any, alpha: float, use_rslora: bool) -> float:
        return alpha / math.sqrt(rank) if use_rslora else alpha / rank

    def answer(self, config: AdapterConfig, module: str, layer_kind: str, fan_in_fan_out: bool,
               base_shape: tuple[int, int], stored_shapes: Mapping[str, tuple[int, ...]]) -> ModuleAnswer:
        """How ``module`` merges on a 2-D base weight stored as ``base_shape``, its tensors stored as
        ``stored_shapes`` (every tensor of :meth:`tensor_names` among them): the plan's one question."""
        settings = self.module_settings(config, module, layer_kind, fan_in_fan_out)
        rows, cols = base_shape
        out_features, in_features = (cols, rows) if settings.transposed else (rows, cols)
        shapes = {**self.optional_shapes(settings, out_features, in_features),
                  **self.expected_shapes(settings, out_features, in_features)}
        stored_rank = self.rank_of({n: _Shaped(shape) for n, shape in stored_shapes.items()}, layer_kind)
        return ModuleAnswer(settings, shapes, stored_rank, self.configured_rank(settings))

    # ----- tensors ------------------------------------------------------------------------
    def tensor_names(self, layer_kind: str) -> tuple[str, ...]:
        """The tensors every module of this kind must have (optional ones are not listed)."""
        if layer_kind == TOKENS:
            return (trainable_tokens.DELTA,) if self.peft_type == "LORA" else ()
        if layer_kind == PARAMETER:
            if self.name != "lora":
                raise D2MergeError(f"{self.name} does not support target_parameters (PEFT's ParamWrapper is plain LoRA)")
            return ("lora_A", "lora_B")
        names = self.linear_tensors if layer_kind == LINEAR else self.embedding_tensors
        if not names:
            raise D2MergeError(f"{self.name} does not support {layer_kind} layers")
        return names

    def stored_key(self, module: str, tensor: str, layer_kind: str) -> str:
        """The key of an adapter tensor in ``adapter_model.safetensors`` (PEFT layout)."""
        if tensor in self.optional_linear_tensors:
            return f"base_model.model.{module}.{self.optional_linear_tensors[tensor]}"
        bare = layer_kind != LINEAR or tensor in self.bare_tensors
        return f"base_model.model.{module}.{tensor}" + ("" if bare else ".weight")

    def expected_shapes(self, settings: ModuleSettings, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes each adapter tensor must have, in PEFT orientation: ``A`` is (r, in), ``B`` is (out, r)."""
        raise NotImplementedError

    def optional_shapes(self, settings: ModuleSettings, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the optional tensors (``optional_linear_tensors``) a module may have."""
        return {}

    def rank_of(self, tensors: Mapping[str, torch.Tensor], layer_kind: str) -> Any:
        """The rank the stored tensors imply (compared against the config by the planner)."""
        raise NotImplementedError

    # How the rank is named in tables ("r=8"); Dual LoRA has two.
    rank_name: ClassVar[str] = "r"

    def configured_rank(self, settings: ModuleSettings) -> Any:
        """The rank the config gives a module, in the form :meth:`rank_of` returns."""
        return settings.r

    def rank_text(self, rank: Any) -> str:
        """A rank (from :meth:`rank_of` or :meth:`configured_rank`) as tables print it."""
        return str(rank)

    # ----- math ---------------------------------------------------------------------------
    # Factors indexed by output row (B factors, magnitudes): sliced when merging a block of rows.
    row_factors: ClassVar[frozenset[str]] = frozenset()

    def merged_weight(self, w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], settings: ModuleSettings,
                      *, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The merged weight in the base tensor's on-disk layout, in ``compute_dtype``.

        The formula works on ``W`` of shape (out, in); layers stored transposed
        (fan_in_fan_out, embeddings) are transposed in and out here.
        """
        factors = {name: t.to(compute_dtype) for name, t in tensors.items()}
        if settings.layer_kind == TOKENS:
            return trainable_tokens.merged_embedding(w0.to(compute_dtype, copy=True), factors[trainable_tokens.DELTA],
                                                     settings.options["token_indices"])
        if settings.part == BIAS:
            return self.merged_bias(w0.to(compute_dtype, copy=True), factors, settings)
        if settings.layer_kind == PARAMETER:
            assert settings.piece is not None
            return w0.to(compute_dtype, copy=True).add_(target_parameters.piece_delta(factors, settings.piece,
                                                                                       settings.scale))
        transposed = settings.transposed
        w = w0.to(compute_dtype, copy=True)
        w = w.T if transposed else w
        w = self.effective_base(w, settings)
        merged = self.merge_rows_(w, factors, settings, slice(None))
        return (merged.T if transposed else merged).contiguous()

    def effective_base(self, w0: torch.Tensor, settings: ModuleSettings) -> torch.Tensor:
        """The base weight (out, in) the adapter was trained on: W0, or PEFT's PiSSA/OLoRA residual of it."""
        if settings.base_init is None:
            return w0
        return residual_base.residual_base(w0, settings.base_init, settings.r, settings.scale)

    def merged_bias(self, b0: torch.Tensor, factors: Mapping[str, torch.Tensor],
                    settings: ModuleSettings) -> torch.Tensor:
        """The layer's merged bias (only methods with a bias factor have one)."""
        raise D2MergeError(f"{self.name} has no bias factor", hint="merge with PEFT")

    def merge_rows_(self, w: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings,
                    rows: slice) -> torch.Tensor:
        """The method's formula, in place: ``w`` holds rows ``rows`` of W0 (out, in) and becomes the merged rows.

        In place and row by row so the engine can merge a large matrix in
        cache-sized blocks into reused buffers; ``rows=slice(None)`` is the
        whole matrix. Only called with a partial slice when
        :meth:`row_separable` says the formula allows it.
        """
        raise NotImplementedError

    def row_separable(self, settings: ModuleSettings) -> bool:
        """Whether each merged row depends only on the same row of W0 (true unless norms span rows)."""
        return settings.base_init is None and settings.part == WEIGHT and settings.layer_kind not in (TOKENS, PARAMETER)

    def rows_of(self, factors: Mapping[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
        """The factors restricted to a block of output rows."""
        return {name: (t[rows] if name in self.row_factors else t) for name, t in factors.items()}

    def update(self, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor:
        """The adapter's own update dW (out, in), before any base-dependent projection (for ``inspect``)."""
        raise NotImplementedError

    def report(self, w0: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> dict[str, float]:
        """Method-specific figures for verify (norm ratios, sign margins): none by default."""
        return {}

    def update_square_sum(self, factors: Mapping[str, torch.Tensor], settings: ModuleSettings) -> torch.Tensor | None:
        """sum(dW ** 2) without forming dW, where the method's algebra allows it (None: verify forms dW).

        verify's weight check needs rms(dW) of a whole tensor before its row blocks; a low-rank
        update gives it from r x r matrices instead of a pass over out x in entries.
        """
        return None

    # How each :meth:`report` figure of row blocks combines into the whole tensor's: "min", "max" or
    # "sum". verify's weight check works in row blocks (bounded memory at any tensor size).
    report_combine: ClassVar[Mapping[str, str]] = {}

    def report_rows(self, w0: torch.Tensor, factors: Mapping[str, torch.Tensor], settings: ModuleSettings,
                    rows: slice, state: dict[str, Any]) -> dict[str, float]:
        """:meth:`report`'s figures for output rows ``rows`` (``w0``: those rows of W0, (out, in); ``factors``: whole).

        Only called where :meth:`row_separable` holds. ``state`` is one dict per tensor, kept
        across its blocks, for what a method computes once from the whole factors.
        """
        return self.report(w0, self.rows_of(factors, rows), settings)

    # ----- initialisation -----------------------------------------------------------------
    # The "down" factors (PEFT's A): drawn at random for training while every other factor starts
    # at zero, so a fresh adapter is exactly the base model.
    random_init_tensors: ClassVar[frozenset[str]] = frozenset()

    def init_factors(self, shapes: Mapping[str, tuple[int, ...]], *,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Fresh factors for training, as PEFT's ``LoraVariant.init``: each A Kaiming-uniform, each B zero.

        Each random factor gets its own draw, so D2-LoRA's two branches differ.
        A method whose other factors need a start value (DoRA's magnitude from
        the base weight) sets it in its runtime module.
        """
        factors: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            if name in self.random_init_tensors:
                bound = (3.0 / shape[1]) ** 0.5
                factors[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            else:
                factors[name] = torch.zeros(shape)
        return factors

    def example_config(self, r: int) -> dict[str, Any]:
        """The method's own ``adapter_config.json`` fields for a fresh adapter of rank ``r``."""
        return {"peft_type": self.peft_type, "r": r}

    # ----- runtime ------------------------------------------------------------------------
    def runtime_module(self, base_layer: nn.Module, tensors: Mapping[str, torch.Tensor] | None,
                       settings: ModuleSettings, *, dropout: float = 0.0) -> nn.Module:
        """An ``nn.Module`` computing the unmerged forward around ``base_layer``."""
        raise NotImplementedError

