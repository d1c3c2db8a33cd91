"""Every ``adapter_config.json`` field d2merge knows, and which of its values d2merge implements.

The rule (FIDELITY): a field that changes the merged weights is honoured only for
the values implemented here; any other value is refused with one line naming the
field. A field missing from this table is refused too, unless it is listed as
weight-neutral, so an option added by a future PEFT gives a refusal, never a
wrong model. The LoRA rows are PEFT 0.22's ``LoraConfig`` (and ``PeftConfig``)
fields, read from its source; docs/adapter-fields.md is generated from this table
(``render_markdown``) and a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from d2merge.errors import D2MergeError

LORA = ("LORA",)
OURS = ("D2LORA", "DUAL_LORA")
ALL = LORA + OURS

HONOURED = "honoured"  # changes the weights; the listed values are implemented
NEUTRAL = "neutral"  # never changes the merged weights (metadata, training-only settings)
REFUSED = "refused"  # changes the weights and is not implemented: only its off value is accepted

# (reason, hint) when a value is refused, None when it is accepted.
Check = Callable[[Any, Mapping[str, Any]], "tuple[str, str] | None"]

CONVERT_HINT = ("convert it with PEFT first: save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                "turns it into a plain LoRA adapter that d2merge merges exactly")


@dataclass(frozen=True)
class Field:
    name: str
    peft_types: tuple[str, ...]
    effect: str
    values: str  # the values accepted, as the docs list them
    check: Check | None = None  # None: every value is accepted (the method's parser validates its type)


def _off(*offs: Any, what: str, hint: str) -> Check:
    """Accept only the values that switch a feature off (None, False, [], {} ...)."""
    def check(value: Any, raw: Mapping[str, Any]) -> tuple[str, str] | None:
        if value in offs or value is None:
            return None
        return f"{what}, which d2merge does not implement", hint
    return check


def _one_of(*allowed: Any, what: str) -> Check:
    def check(value: Any, raw: Mapping[str, Any]) -> tuple[str, str] | None:
        if any(value == a and type(value) is type(a) for a in allowed):
            return None
        return f"{what}: value {value!r} is not one d2merge implements", \
            "accepted: " + ", ".join(repr(a) for a in allowed)
    return check


# True/False/gaussian/orthogonal/eva/nora leave the base as it is (the trained factors are all saved);
# pissa/olora make PEFT rebuild a residual base on load, which d2merge rebuilds the same way.
INIT_ACCEPTED = (True, False, "gaussian", "orthogonal", "eva", "nora", "pissa", "olora")


def _init(value: Any, raw: Mapping[str, Any]) -> tuple[str, str] | None:
    if value == "olora" and raw.get("fan_in_fan_out"):
        return ("init_lora_weights 'olora' with fan_in_fan_out: PEFT's OLoRA factors the stored (in, out) weight "
                "of a Conv1D layer, whose factors then do not fit the layer, so there is no merge to reproduce",
                CONVERT_HINT)
    if any(value == a and type(value) is type(a) for a in INIT_ACCEPTED):
        return None
    text = str(value)
    if text.startswith("pissa_niter_"):
        return (f"init_lora_weights {value!r}: PEFT rebuilds a residual base from a randomised SVD when it loads "
                "this adapter, which cannot be reproduced; merging into W0 would be wrong", CONVERT_HINT)
    if text in ("corda", "astra", "lora_ga", "loftq"):
        return (f"init_lora_weights {value!r}: the adapter was trained on a base changed with data or "
                "quantization that adapter_config.json does not hold", CONVERT_HINT)
    return f"init_lora_weights {value!r} is not one d2merge implements", \
        "accepted: " + ", ".join(repr(a) for a in INIT_ACCEPTED)


def _alora(value: Any, raw: Mapping[str, Any]) -> tuple[str, str] | None:
    if value in (None, []):
        return None
    return ("alora_invocation_tokens: an aLoRA adapter is active only after its invocation tokens appear in "
            "the input, so no single merged weight reproduces it (PEFT refuses to merge it too)",
            "serve it unmerged with PEFT, or train a plain LoRA adapter")


def _lora_bias(value: Any, raw: Mapping[str, Any]) -> tuple[str, str] | None:
    if value is True and raw.get("use_dora"):
        return "lora_bias with use_dora: PEFT does not support this pair, so no PEFT merge exists to reproduce", \
            "train the adapter with one of them"
    if value in (None, False, True) and type(value) in (type(None), bool):
        return None
    return f"lora_bias: value {value!r} is not true or false", "accepted: true, false"


def _token_indices(value: Any, raw: Mapping[str, Any]) -> tuple[str, str] | None:
    def ints(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    if value is None or ints(value) or (isinstance(value, dict) and value
                                        and all(isinstance(k, str) and ints(v) for k, v in value.items())):
        return None
    return (f"trainable_token_indices: {value!r} is neither a list of token ids nor {{module: [token ids]}}",
            "write it as PEFT does")


def _target_parameters(value: Any, raw: Mapping[str, Any]) -> tuple[str, str] | None:
    # Which parameters the names match, and where the checkpoint stores them, is settled against the base
    # (methods/target_parameters.py, io/checkpoint_layout.py): a parameter d2merge cannot map is refused there.
    if value in (None, []):
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return f"target_parameters: {value!r} is not a list of parameter names", "write it as PEFT does"
    return None


def _bias(value: Any, raw: Mapping[str, Any]) -> tuple[str, str] | None:
    return None if value in ("none", "all", "lora_only") else (
        f"bias: value {value!r} is not one PEFT defines", "accepted: 'none', 'all', 'lora_only'")


NOT_IMPLEMENTED = "remove it only if the adapter was trained without it; otherwise merge with PEFT"

TABLE: tuple[Field, ...] = (
    # PeftConfig (every PEFT method)
    Field("peft_type", ALL, HONOURED, "LORA, D2LORA, DUAL_LORA"),
    Field("task_type", ALL, NEUTRAL, "any (the model class; weights unchanged)"),
    Field("auto_mapping", ALL, NEUTRAL, "any"),
    Field("peft_version", ALL, NEUTRAL, "any"),
    Field("base_model_name_or_path", ALL, NEUTRAL, "a string (written to the model card)"),
    Field("revision", ALL, NEUTRAL, "any"),
    Field("inference_mode", ALL, NEUTRAL, "true, false"),
    Field("format_version", ALL, NEUTRAL, "any (d2merge's own methods)"),
    # Shared by LoRA and d2merge's methods
    Field("r", ("LORA", "D2LORA"), HONOURED, "a positive integer"),
    Field("lora_alpha", ALL, HONOURED, "a non-zero number with |lora_alpha| <= 3.4e38 (float32)"),
    Field("target_modules", ALL, HONOURED, "a list (name or dotted suffix) or a regex string (full match); "
                                           "the merge follows the saved factors"),
    Field("exclude_modules", ALL, HONOURED, "a list or a regex string, as target_modules"),
    Field("fan_in_fan_out", ALL, HONOURED, "true, false"),
    Field("use_rslora", ALL, HONOURED, "true, false"),
    Field("rank_pattern", ALL, HONOURED, "{regex on a dotted suffix: rank}"),
    Field("alpha_pattern", ALL, HONOURED, "{regex on a dotted suffix: alpha}"),
    Field("modules_to_save", ALL, HONOURED, "a list of module names (the saved full tensors replace the base's)"),
    Field("lora_dropout", ALL, NEUTRAL, "any number (dropout is off at inference)"),
    # LoraConfig (PEFT 0.22)
    Field("bias", LORA, HONOURED, "\"none\", \"lora_only\", \"all\" (the trained biases PEFT saves replace the "
                                  "base's; with lora_bias, s * lora_B.bias is added on top)", _bias),
    Field("init_lora_weights", LORA, HONOURED, "true, false, \"gaussian\", \"orthogonal\", \"eva\", \"nora\" "
                                               "(base unchanged); "
                                               "\"pissa\" (SVD) and \"olora\" (QR, not with fan_in_fan_out): the "
                                               "residual base PEFT rebuilds on load is rebuilt; refused: "
                                               "\"pissa_niter_*\" (randomised), \"corda\", \"astra\", \"loftq\", "
                                               "\"lora_ga\", \"mica\"", _init),
    Field("layers_to_transform", LORA, HONOURED, "a list or an integer (which layers got factors; the merge "
                                                 "follows the saved factors)"),
    Field("layers_pattern", LORA, HONOURED, "a list or a string, with layers_to_transform"),
    Field("use_dora", LORA, HONOURED, "true (DoRA on linear and embedding layers), false"),
    Field("megatron_config", LORA, REFUSED, "null", _off(None, {}, what="megatron_config (Megatron parallel "
                                                          "layers)", hint=NOT_IMPLEMENTED)),
    Field("megatron_core", LORA, NEUTRAL, "any (a module name, used only with megatron_config)"),
    Field("trainable_token_indices", LORA, HONOURED, "null, [token ids] (input embedding) or {module: [token ids]}: "
                                                     "the trained rows replace the base's (a tied lm_head follows, "
                                                     "as in PEFT)", _token_indices),
    Field("loftq_config", LORA, NEUTRAL, "any (read only with init_lora_weights \"loftq\", which is refused)"),
    Field("eva_config", LORA, NEUTRAL, "any (EVA only initialises the factors, which are saved)"),
    Field("corda_config", LORA, NEUTRAL, "any (read only with init_lora_weights \"corda\", which is refused)"),
    Field("astra_config", LORA, NEUTRAL, "any (read only with init_lora_weights \"astra\", which is refused)"),
    Field("lora_ga_config", LORA, NEUTRAL, "any (read only with init_lora_weights \"lora_ga\", which is refused)"),
    Field("velora_config", LORA, REFUSED, "null", _off(None, {}, what="velora_config (VeLoRA)",
                                                      hint=NOT_IMPLEMENTED)),
    Field("alora_invocation_tokens", LORA, REFUSED, "null (aLoRA cannot be merged)", _alora),
    Field("use_qalora", LORA, REFUSED, "false", _off(False, what="use_qalora (QA-LoRA input pooling)",
                                                    hint=NOT_IMPLEMENTED)),
    Field("qalora_group_size", LORA, NEUTRAL, "any (read only with use_qalora)"),
    Field("monteclora_config", LORA, REFUSED, "null", _off(None, {}, what="monteclora_config (MonteCLoRA)",
                                                          hint=NOT_IMPLEMENTED)),
    Field("layer_replication", LORA, REFUSED, "null", _off(None, [], what="layer_replication (the adapted model "
          "has more layers than the base)", hint=NOT_IMPLEMENTED)),
    Field("runtime_config", LORA, NEUTRAL, "any (runtime-only, PEFT does not save it)"),
    Field("lora_bias", LORA, HONOURED, "true (b + s * lora_B.bias; refused on a layer without bias, as PEFT "
                                       "does), false", _lora_bias),
    Field("target_parameters", LORA, HONOURED, "null, or parameter names matched as PEFT matches them: 2-D weights "
                                               "(\"gate.weight\", a router) and fused 3-D MoE experts "
                                               "(\"mlp.experts.gate_up_proj\", \"mlp.experts.down_proj\"), merged "
                                               "into the tensors the checkpoint stores (per-expert w1/w3/w2 or "
                                               "gate/up/down_proj, or the fused tensor itself) through transformers' "
                                               "conversion table; refused: a stored layout that table does not map "
                                               "by stacking and concatenation, with DoRA, lora_bias or a "
                                               "base-rebuilding init", _target_parameters),
    Field("use_bdlora", LORA, REFUSED, "null", _off(None, {}, False, what="use_bdlora (block-diagonal LoRA)",
                                                   hint=NOT_IMPLEMENTED)),
    Field("arrow_config", LORA, REFUSED, "null", _off(None, {}, what="arrow_config (Arrow routing over several "
          "adapters)", hint=NOT_IMPLEMENTED)),
    Field("kasa_config", LORA, REFUSED, "null", _off(None, {}, what="kasa_config (KaSA)", hint=NOT_IMPLEMENTED)),
    Field("ensure_weight_tying", LORA, REFUSED, "false", _off(False, what="ensure_weight_tying (adapters shared "
          "by tied layers)", hint="save the adapter with ensure_weight_tying=False, or merge with PEFT")),
    # d2merge's own methods
    Field("tau", ("D2LORA",), HONOURED, "a finite number (required)"),
    Field("norm_axis", ("D2LORA",), HONOURED, "\"out\", \"in\""),
    Field("residual", ("D2LORA",), HONOURED, "true, false"),
    Field("eps", ("D2LORA",), HONOURED, "a number >= 0 that fits in float32"),
    Field("r_mag", ("DUAL_LORA",), HONOURED, "a positive integer"),
    Field("r_dir", ("DUAL_LORA",), HONOURED, "a positive integer"),
)
FIELDS: dict[str, Field] = {f.name: f for f in TABLE}


def check_fields(raw: Mapping[str, Any], peft_type: str, source: str) -> tuple[str, ...]:
    """Refuse any field or value d2merge does not implement; returns the fields honoured, in file order."""
    honoured = []
    for name, value in raw.items():
        entry = FIELDS.get(name)
        if entry is None or peft_type not in entry.peft_types:
            where = "" if entry is None else f" for peft_type {peft_type}"
            raise D2MergeError(f"unknown field '{name}'{where}: d2merge cannot tell whether it changes the weights",
                               path=source, hint="remove it if it is metadata; the fields d2merge knows are listed "
                                                 "in docs/adapter-fields.md")
        if entry.check is not None:
            refusal = entry.check(value, raw)
            if refusal is not None:
                reason, hint = refusal
                raise D2MergeError(reason, path=source, hint=hint)
        if entry.effect == HONOURED or (entry.effect == REFUSED and value not in (None, False, [], {})):
            honoured.append(name)
    return tuple(honoured)


def render_markdown() -> str:
    """The field table as docs/adapter-fields.md shows it."""
    lines = ["| field | methods | effect | values d2merge accepts |", "| --- | --- | --- | --- |"]
    for f in TABLE:
        methods = "all" if f.peft_types == ALL else ", ".join(f.peft_types)
        lines.append(f"| `{f.name}` | {methods} | {f.effect} | {f.values} |")
    return "\n".join(lines) + "\n"
