"""The architectures a GGUF is written for: how llama.cpp's converter writes each HF architecture.

``convert_hf_to_gguf.py``'s decisions, re-implemented per architecture (:data:`ARCH_SPECS`) and
checked in tests/unit/export/test_gguf.py and test_gguf_architectures.py against llama.cpp itself:

- Llama and Mistral attention: llama.cpp applies rotary embeddings to interleaved pairs, HF to
  the two halves of each head, so q/k rows are permuted per head (Qwen2/Qwen3 use NEOX rope
  in llama.cpp and are written unpermuted).
- Llama 3 rope scaling: llama.cpp reads per-frequency factors from a ``rope_freqs`` tensor.
- Gemma 2/3: RMSNorm weights written as 1 + w; softcaps and sliding windows as keys. Phi-3: the
  fused qkv and gate/up tensors as stored. MoE (Mixtral, Qwen2-MoE, Qwen3-MoE): the per-expert
  tensors stacked into one ``*_exps`` tensor per layer, written expert after expert.

A config whose llama.cpp graph would compute something else (an activation, a bias, a window, a
rope type llama.cpp's graph does not have) is refused in one line (:func:`arch_spec`); the keys
llama.cpp's loader reads are written by :func:`add_hyperparameters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from d2merge.errors import D2MergeError
from d2merge.export.gguf.library import gguf_py

@dataclass(frozen=True)
class ArchSpec:
    """How llama.cpp's converter writes one HF architecture (convert_hf_to_gguf.py, re-implemented)."""

    gguf: str  # llama.cpp's architecture name
    permute: bool = False  # q/k rows permuted for llama.cpp's interleaved rope (NEOX-rope archs: no)
    norm_offset: bool = False  # Gemma: HF computes x * (1 + w), llama.cpp x * w: RMSNorm weights written as 1 + w
    experts: bool = False  # MoE: per-expert HF tensors stacked into one ``*_exps`` tensor per layer
    sliding_pattern: int = 0  # Gemma: every n-th layer attends globally, the others in a window (0: none)
    family: str = ""  # the config checks that apply (dense, mixtral, gemma2, gemma3, phi3, qwen2moe, qwen3moe)


ARCH_SPECS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", permute=True, family="dense"),
    "MistralForCausalLM": ArchSpec("llama", permute=True, family="dense"),  # llama.cpp writes Mistral as llama
    "MixtralForCausalLM": ArchSpec("llama", permute=True, experts=True, family="mixtral"),  # llama + experts
    "Qwen2ForCausalLM": ArchSpec("qwen2", family="dense"),
    "Qwen3ForCausalLM": ArchSpec("qwen3", family="dense"),
    "Qwen2MoeForCausalLM": ArchSpec("qwen2moe", experts=True, family="qwen2moe"),
    "Qwen3MoeForCausalLM": ArchSpec("qwen3moe", experts=True, family="qwen3moe"),
    "Gemma2ForCausalLM": ArchSpec("gemma2", norm_offset=True, sliding_pattern=2, family="gemma2"),
    "Gemma3ForCausalLM": ArchSpec("gemma3", norm_offset=True, sliding_pattern=6, family="gemma3"),
    "Phi3ForCausalLM": ArchSpec("phi3", family="phi3"),
}


def rope_of(config: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, rope scaling dict) from transformers 4.x (rope_scaling) or 5.x (rope_parameters).

    Gemma 3 (transformers 5) keeps one dict per layer type: the global layers' one is returned
    (llama.cpp's ``rope.*`` keys are theirs; its sliding layers use a fixed 10000, checked apart).
    """
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if isinstance(params.get("full_attention"), Mapping):
        params = dict(params["full_attention"])
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = kind
    return float(theta), params


def llama3_rope_factors(params: Mapping[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, the ``rope_freqs`` tensor llama.cpp reads.

    The same wavelength bands transformers uses: high frequencies unchanged, low frequencies
    divided by ``factor``, a smooth blend in between.
    """
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def head_dim_of(config: Mapping[str, Any]) -> int:
    """The attention head size: ``head_dim`` when the config gives it (Gemma, Qwen3), else hidden / heads."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def arch_spec(config: Mapping[str, Any], path: Path) -> ArchSpec:
    """How this config's architecture is written; one-line refusal for an architecture or variant
    whose llama.cpp graph would compute something else."""
    archs = config.get("architectures") or []
    name = archs[0] if archs else config.get("model_type", "?")
    if name not in ARCH_SPECS:
        raise D2MergeError(f"GGUF export does not support architecture {name}", path=path,
                           hint=f"supported: {', '.join(ARCH_SPECS)}")
    spec = ARCH_SPECS[name]
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise D2MergeError(f"config.json has no integer {key}", path=path)
    gemma = spec.family in ("gemma2", "gemma3")
    act_key = "hidden_activation" if gemma and config.get("hidden_activation") else "hidden_act"
    want_act = "gelu_pytorch_tanh" if gemma else "silu"  # llama.cpp: tanh-approximated GELU / SiLU
    if config.get(act_key, want_act) != want_act:
        raise D2MergeError(f"{act_key} {config.get(act_key)!r} is not exported (llama.cpp's {spec.gguf} uses "
                           f"{want_act})", path=path)
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise D2MergeError(f"attention_bias/mlp_bias {name} variants are not exported", path=path)
    if gemma:
        _check_gemma(config, spec, path)
    elif config.get("sliding_window") and config.get("use_sliding_window", True):
        raise D2MergeError(f"{name} with sliding_window={config['sliding_window']} is not exported: llama.cpp's "
                           f"{spec.gguf} graph attends to the whole context", path=path)
    _, rope = rope_of(config)
    kinds = ("default", "llama3", "linear") if spec.family in ("dense", "mixtral") else (
        ("default", "linear") if spec.family == "gemma3" else ("default",))
    if rope["rope_type"] not in kinds:
        raise D2MergeError(f"rope type {rope['rope_type']!r} is not exported for {name}", path=path,
                           hint=f"supported: {', '.join(kinds)}")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and spec.family != "phi3":  # phi3 writes rope.dimension_count
        raise D2MergeError("partial rotary embeddings are not exported", path=path)
    if spec.experts:
        _check_experts(config, spec, path)
    return spec


def _check_gemma(config: Mapping[str, Any], spec: ArchSpec, path: Path) -> None:
    """Gemma 2/3: the sliding-window layout, softcaps and attention scale llama.cpp's graphs hard-code."""
    layers = config["num_hidden_layers"]
    expected = ["full_attention" if (i + 1) % spec.sliding_pattern == 0 else "sliding_attention"
                for i in range(layers)]
    pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", spec.sliding_pattern))
    if (config.get("layer_types") is not None and list(config["layer_types"]) != expected) or (
            config.get("layer_types") is None and pattern != spec.sliding_pattern):
        raise D2MergeError(f"layer_types is not llama.cpp's {spec.gguf} layout (every {spec.sliding_pattern}th "
                           "layer global, the others sliding)", path=path)
    if not isinstance(config.get("sliding_window"), int) or config["sliding_window"] <= 0:
        raise D2MergeError(f"{spec.gguf} needs an integer sliding_window", path=path)
    head_dim = head_dim_of(config)
    if config.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise D2MergeError(f"query_pre_attn_scalar={config['query_pre_attn_scalar']} differs from head_dim="
                           f"{head_dim}: llama.cpp's {spec.gguf} scales attention by head_dim (except its 27B)",
                           path=path)
    if config.get("use_bidirectional_attention"):
        raise D2MergeError("bidirectional Gemma attention is not exported", path=path)
    caps = (config.get("attn_logit_softcapping"), config.get("final_logit_softcapping"))
    if spec.family == "gemma2" and not all(isinstance(c, (int, float)) for c in caps):
        raise D2MergeError("Gemma 2 without attn/final logit softcapping is not exported", path=path)
    if spec.family == "gemma3":
        if any(c is not None for c in caps):
            raise D2MergeError("Gemma 3 with logit softcapping is not exported (llama.cpp's gemma3 has none)",
                               path=path)
        local = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
        local_theta = local.get("rope_theta", config.get("rope_local_base_freq", 10000.0))
        if float(local_theta) != 10000.0 or local.get("rope_type", "default") != "default":
            raise D2MergeError(f"Gemma 3 sliding layers with rope theta {local_theta} are not exported "
                               "(llama.cpp's gemma3 uses 10000 there)", path=path)


def expert_counts(config: Mapping[str, Any]) -> tuple[int, int]:
    """(experts, experts used per token): Mixtral and transformers 5 name it num_local_experts, Qwen num_experts."""
    return (int(config.get("num_experts") or config.get("num_local_experts") or 0),
            int(config.get("num_experts_per_tok") or 0))


def _check_experts(config: Mapping[str, Any], spec: ArchSpec, path: Path) -> None:
    """MoE: every layer sparse, and the router's top-k weights normalized as llama.cpp's graph does."""
    experts, used = expert_counts(config)
    if experts < 1 or not 0 < used <= experts:
        raise D2MergeError("config.json has no usable expert count (num_experts/num_local_experts, "
                           "num_experts_per_tok)", path=path)
    if spec.family in ("qwen2moe", "qwen3moe"):
        if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise D2MergeError("MoE models with dense layers (decoder_sparse_step/mlp_only_layers) are not "
                               "exported: llama.cpp's graph makes every layer sparse", path=path)
        if not isinstance(config.get("moe_intermediate_size"), int):
            raise D2MergeError("config.json has no integer moe_intermediate_size", path=path)
        normalized = spec.family == "qwen3moe"  # llama.cpp: qwen3moe renormalizes the top-k, qwen2moe not
        if bool(config.get("norm_topk_prob", False)) != normalized:
            raise D2MergeError(f"norm_topk_prob={config.get('norm_topk_prob')} is not exported: llama.cpp's "
                               f"{spec.gguf} graph uses {normalized}", path=path)
    if spec.family == "qwen2moe" and not isinstance(config.get("shared_expert_intermediate_size"), int):
        raise D2MergeError("config.json has no integer shared_expert_intermediate_size", path=path)


def check_config(config: Mapping[str, Any], path: Path) -> tuple[str, bool]:
    """(gguf arch, permute q/k) for a supported config; one-line refusal otherwise."""
    spec = arch_spec(config, path)
    return spec.gguf, spec.permute


def add_hyperparameters(writer: Any, config: Mapping[str, Any], arch: str) -> None:
    """The keys llama.cpp's loader reads for these architectures (``{arch}.*``)."""
    gguf = gguf_py()
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    theta, rope = rope_of(config)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim") is not None:
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim_of(config))
    family = ARCH_SPECS.get((config.get("architectures") or ["?"])[0], ArchSpec(arch)).family
    if family in ("gemma2", "gemma3"):
        if config.get("head_dim") is None:  # llama.cpp's converter always writes them for Gemma
            writer.add_key_length(head_dim_of(config))
            writer.add_value_length(head_dim_of(config))
        writer.add_sliding_window(int(config["sliding_window"]))
        if family == "gemma2":
            writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if family == "phi3":
        # rope over the first partial_rotary_factor of each head (Phi-4-mini), NEOX-style as HF
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(int(partial * config["hidden_size"]) // config["num_attention_heads"])
        writer.add_rope_scaling_orig_ctx_len(int(config.get("original_max_position_embeddings")
                                                 or config.get("max_position_embeddings") or 2048))
        writer.add_sliding_window(0)  # llama.cpp reads 0 as "no window" (a window is refused above)
    if family in ("mixtral", "qwen2moe", "qwen3moe"):
        experts, used = expert_counts(config)
        writer.add_expert_count(experts)
        writer.add_expert_used_count(used)
    if family in ("qwen2moe", "qwen3moe"):
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    if family == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))



def tied_output(config: Mapping[str, Any], spec: ArchSpec) -> bool:
    """Whether the output reuses the embedding; Gemma's configs leave out their default (tied)."""
    return bool(config.get("tie_word_embeddings", spec.family in ("gemma2", "gemma3")))

