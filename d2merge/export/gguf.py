"""GGUF export: a merged model that llama.cpp, Ollama and LM Studio load, written with gguf-py.

Why gguf-py and not our own writer: it is maintained with llama.cpp, so the key names, tensor
names (``get_tensor_name_map``) and quantization formats (``gguf.quants``) are the ones
llama.cpp reads. What d2merge adds is the conversion decisions llama.cpp's converter makes for
the architectures we support, each checked in tests/unit/export/test_gguf.py against three independent
readers (transformers' GGUF loader, llama.cpp itself, and a GGUF llama.cpp wrote):

- Llama and Mistral attention: llama.cpp applies rotary embeddings to interleaved pairs, HF to
  the two halves of each head, so q/k rows are permuted per head (Qwen2/Qwen3 use NEOX rope
  in llama.cpp and are written unpermuted).
- Llama 3 rope scaling: llama.cpp reads per-frequency factors from a ``rope_freqs`` tensor.
- Byte-level BPE tokenizers (tokenizer.json): tokens, token types, merges, special ids,
  add_bos/add_eos and the chat template, plus the pre-tokenizer name llama.cpp selects by the
  sha256 of the tokenization of a fixed probe text (as its converter does). A tokenizer whose
  pre-tokenizer is not one we have checked is refused, never approximated.
- Sentencepiece BPE tokenizers (Llama 2, Mistral v0.1, Gemma, Phi-3) from tokenizer.json, with
  the piece scores rebuilt from the merge order (checked to be llama.cpp's order, else refused).
- Gemma 2/3: RMSNorm weights written as 1 + w; softcaps and sliding windows as keys. Phi-3: the
  fused qkv and gate/up tensors as stored. MoE (Mixtral, Qwen2-MoE, Qwen3-MoE): the per-expert
  tensors stacked into one ``*_exps`` tensor per layer, written expert after expert (ARCH_SPECS).

Streaming: every tensor's header entry is computed from shapes alone, the header is written,
then tensors are read, converted and quantized one at a time, so memory holds one tensor.
The file is written beside its destination and renamed into place at the end; the bytes
depend only on the inputs (no timestamps, sorted tensor order).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace as _replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from d2merge.version import __version__
from d2merge.errors import D2MergeError
from d2merge.output_names import modelfile_for
from d2merge.sizes import format_size

# --gguf-type written by gguf-py in numpy -> (GGML type of 2-D weights, llama.cpp's general.file_type);
# 1-D tensors (norms, biases) always stay F32, as in llama.cpp. Each is llama.cpp's file byte for
# byte (tests/unit/export/test_gguf_quant.py): q8_0 is llama.cpp's Q8_0 (whose mix is Q8_0 everywhere); the
# ``_pure`` types are ``llama-quantize --pure`` (every 2-D weight in that type), not llama.cpp's
# Q4_0..Q5_1 mix, which keeps the output/embedding at Q6_K: those are the llama.cpp types below.
GGUF_TYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
    "q4_0_pure": ("Q4_0", 2), "q4_1_pure": ("Q4_1", 3), "q5_0_pure": ("Q5_0", 8), "q5_1_pure": ("Q5_1", 9),
}


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
# HF architectures -> (gguf arch name, q/k permuted for llama.cpp's interleaved rope)
ARCHITECTURES: dict[str, tuple[str, bool]] = {name: (s.gguf, s.permute) for name, s in ARCH_SPECS.items()}
# The GGUF architectures verify reads back (its weight check maps HF names one to one; stacked
# experts have no such name, and Gemma/Phi-3 are checked by logits through the tests only).
VERIFY_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# The probe text llama.cpp's converter tokenizes; the sha256 of the resulting id list names the
# pre-tokenizer (llama.cpp's convert_hf_to_gguf_update.py keeps the table). Only pre-tokenizers
# whose tokenizer families we support are listed; anything else is refused.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
}
# gguf token types (gguf.TokenType): written as ints so the table reads without the enum.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
PROVENANCE_PREFIX = "d2merge."


@dataclass(frozen=True)
class GGUFExportResult:
    output: Path
    gguf_type: str
    architecture: str
    tensors: int
    bytes: int
    seconds: float
    modelfile: Path | None = None
    f32_temp_bytes: int = 0  # the f32 GGUF llama.cpp's quantizer read (removed); 0: written directly

    def describe(self) -> str:
        extra = f" + {self.modelfile.name}" if self.modelfile else ""
        via = (f", by llama.cpp's quantizer from a {format_size(self.f32_temp_bytes)} f32 temp"
               if self.f32_temp_bytes else "")
        return (f"wrote {self.output}{extra} ({self.architecture}, {self.gguf_type}, {self.tensors} tensors, "
                f"{format_size(self.bytes)}{via}) in {self.seconds:.1f}s")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise D2MergeError("GGUF export needs the 'gguf' package", hint="pip install 'd2merge[gguf]'") from None
    return gguf


def all_gguf_types() -> tuple[str, ...]:
    """Every --gguf-type: gguf-py's, then those llama.cpp's quantizer writes (the gguf-llama extra)."""
    from d2merge.export.gguf_quant import LLAMA_CPP_TYPES

    return (*GGUF_TYPES, *LLAMA_CPP_TYPES)


def check_gguf_type(gguf_type: str) -> str:
    """``gguf_type`` if it is a type d2merge writes; one line otherwise. (Whether llama.cpp's quantizer
    is installed for a llama.cpp type is checked with the other inputs, before any work.)"""
    from d2merge.export.gguf_quant import LLAMA_CPP_TYPES

    if gguf_type not in GGUF_TYPES and gguf_type not in LLAMA_CPP_TYPES:
        raise D2MergeError(f"unknown --gguf-type {gguf_type!r}; choose one of {', '.join(all_gguf_types())}",
                           hint="docs/gguf.md says what each type is")
    return gguf_type


def _file_type_code(gguf_type: str) -> int:
    from d2merge.export.gguf_quant import LLAMA_CPP_TYPES

    return GGUF_TYPES[gguf_type][1] if gguf_type in GGUF_TYPES else LLAMA_CPP_TYPES[gguf_type]


def _by_llama_cpp(gguf_type: str, imatrix: str | os.PathLike | None) -> bool:
    """Whether llama.cpp's quantizer writes ``gguf_type`` (from an f32 temp); --imatrix only applies there."""
    from d2merge.export.gguf_quant import LLAMA_CPP_TYPES

    if imatrix is not None and gguf_type not in LLAMA_CPP_TYPES:
        raise D2MergeError(f"--imatrix applies to the types llama.cpp's quantizer writes, not {gguf_type}",
                           hint=f"use one of {', '.join(LLAMA_CPP_TYPES)}, or drop --imatrix")
    return gguf_type in LLAMA_CPP_TYPES


def _prepare_llama_cpp(planned: list[_Planned], out_path: Path, gguf_type: str, imatrix: str | os.PathLike | None
                       ) -> tuple[dict[str, np.ndarray] | None, int]:
    """Before any work: the checked importance matrix, the f32 temp's size against the free space, llama.cpp."""
    from d2merge.export.gguf_quant import check_free_space, check_imatrix, llama_cpp_module, needed_bytes

    shapes = {p.name: tuple(reversed(p.shape)) for p in planned}  # ggml order: row length first
    entries = None
    if imatrix is not None:
        from d2merge.io.imatrix_file import read_imatrix

        entries = read_imatrix(imatrix)
        check_imatrix(entries, shapes, Path(imatrix))
    temp, output = needed_bytes(shapes.values())
    check_free_space(out_path.absolute().parent, temp, output, out_path)
    llama_cpp_module(gguf_type)
    return entries, temp


# ----- hyperparameters ------------------------------------------------------------------------


def _rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
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


def _head_dim(config: Mapping[str, Any]) -> int:
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
    _, rope = _rope(config)
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
    head_dim = _head_dim(config)
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


def _expert_counts(config: Mapping[str, Any]) -> tuple[int, int]:
    """(experts, experts used per token): Mixtral and transformers 5 name it num_local_experts, Qwen num_experts."""
    return (int(config.get("num_experts") or config.get("num_local_experts") or 0),
            int(config.get("num_experts_per_tok") or 0))


def _check_experts(config: Mapping[str, Any], spec: ArchSpec, path: Path) -> None:
    """MoE: every layer sparse, and the router's top-k weights normalized as llama.cpp's graph does."""
    experts, used = _expert_counts(config)
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
    gguf = _gguf()
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    theta, rope = _rope(config)
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
        writer.add_rope_dimension_count(_head_dim(config))
    family = ARCH_SPECS.get((config.get("architectures") or ["?"])[0], ArchSpec(arch)).family
    if family in ("gemma2", "gemma3"):
        if config.get("head_dim") is None:  # llama.cpp's converter always writes them for Gemma
            writer.add_key_length(_head_dim(config))
            writer.add_value_length(_head_dim(config))
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
        experts, used = _expert_counts(config)
        writer.add_expert_count(experts)
        writer.add_expert_used_count(used)
    if family in ("qwen2moe", "qwen3moe"):
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    if family == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))


# ----- tokenizer ------------------------------------------------------------------------------


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """Byte-level BPE from tokenizer.json, or a one-line refusal (never an approximation)."""
    gguf = _gguf()
    path = folder / "tokenizer.json"
    if not path.is_file():
        only_model = (folder / "tokenizer.model").is_file()
        raise D2MergeError("GGUF export needs a tokenizer.json" + (
            " (d2merge reads sentencepiece vocabularies from it, not from tokenizer.model)" if only_model else ""),
            path=folder, hint="AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes one"
            if only_model else "copy the base's tokenizer files into the merged folder")
    from d2merge.io.json_file import read_json

    spec = read_json(path, "tokenizer.json")
    if not isinstance(spec, dict):
        raise D2MergeError("tokenizer.json is not a JSON object", path=path)
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and "ByteLevel" not in json.dumps(spec):
        _add_sentencepiece_tokenizer(writer, folder, spec, vocab_size)
        return
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise D2MergeError(f"tokenizer model {model.get('type')!r} without a byte-level pre-tokenizer cannot be "
                           "converted to GGUF faithfully", path=path,
                           hint="supported: byte-level BPE (Llama 3, Qwen2/Qwen3, SmolLM2) and sentencepiece "
                                "BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3)")
    from transformers import PreTrainedTokenizerFast

    from d2merge.io.transformers_folder import quiet_transformers

    with quiet_transformers():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    pre = KNOWN_PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise D2MergeError(f"unknown BPE pre-tokenizer (probe hash {digest[:16]}...): llama.cpp would split text "
                           "differently than this tokenizer", path=path,
                           hint="supported: Llama 3, Qwen2/Qwen3 and SmolLM2 tokenizers")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise D2MergeError(f"tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}",
                           path=path)
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        if i in added:
            # llama.cpp matches added tokens before pre-tokenization: special (or <|...|>) ones are
            # control tokens, the others user-defined.
            types.append(CONTROL if added[i].special or _looks_special(token) else USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise D2MergeError("tokenizer.json has no BPE merges", path=path)
    _add_special_tokens(special, folder)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(bool(_byte_level_option(spec.get("pre_tokenizer"), "add_prefix_space")))


# gguf token types (gguf.TokenType) only sentencepiece vocabularies use
UNKNOWN, BYTE = 2, 6
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
SPIECE_SPACE = "\u2581"  # sentencepiece's visible space


def _sentencepiece_prefix(spec: Mapping[str, Any], path: Path) -> bool:
    """Whether the tokenizer puts a space before the text (llama.cpp's ``add_space_prefix``), from the
    normalizer / pre-tokenizer forms llama.cpp's sentencepiece tokenizer reproduces; others refused.

    llama.cpp always writes spaces as U+2581 and, with the prefix, puts one before the text and after
    every special token: what the legacy normalizer (Prepend + Replace, Llama 2 / Mistral v0.1) and
    a Metaspace that prepends always do; Gemma replaces spaces and prepends nothing.
    """
    def step(node: Any) -> list[dict[str, Any]]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [n for child in node.get("normalizers") or node.get("pretokenizers") or [] for n in step(child)]
        return [node]

    normalizer, pre = step(spec.get("normalizer")), step(spec.get("pre_tokenizer"))
    kinds = [n.get("type") for n in normalizer], [n.get("type") for n in pre]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE}
    if not pre and normalizer and normalizer[-1] == replace:
        if kinds[0] == ["Replace"]:
            return False  # Gemma
        if kinds[0] == ["Prepend", "Replace"] and normalizer[0].get("prepend") == SPIECE_SPACE:
            return True  # Llama 2, Mistral v0.1
    if not normalizer and kinds[1] == ["Metaspace"] and pre[0].get("replacement") == SPIECE_SPACE \
            and not pre[0].get("split", True) and pre[0].get("prepend_scheme") in ("always", "never"):
        return pre[0]["prepend_scheme"] == "always"
    raise D2MergeError(f"sentencepiece tokenizer with normalizer {kinds[0]} and pre-tokenizer {kinds[1]}: llama.cpp "
                       "would split or prefix text differently", path=path,
                       hint="supported: the Llama 2 / Mistral v0.1 normalizer (Prepend + Replace), Gemma's (Replace)")


def _merge_pairs(model: Mapping[str, Any], path: Path) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2:
            raise D2MergeError(f"tokenizer.json has a malformed merge {merge!r}", path=path)
        pairs.append((pair[0], pair[1]))
    return pairs


def sentencepiece_scores(vocab: Mapping[str, int], merges: list[tuple[str, str]], path: Path,
                         whole: frozenset[str] = frozenset()) -> dict[str, float]:
    """The score of each merged token for llama.cpp's sentencepiece tokenizer, from the BPE merges.

    llama.cpp merges, again and again, the adjacent pair whose concatenation is the vocabulary token
    of highest score; HF's BPE merges the pair of lowest rank. They agree when the merges are the
    ones HF writes for a sentencepiece model (its converter lists every split of every token, best
    token first): every pair whose concatenation is a token is a merge, and the merges that make one
    token are consecutive. Scores are then minus the order of first appearance. A tokenizer.json
    whose merges are otherwise (trained by ``tokenizers``, edited) is refused: llama.cpp would
    tokenize it differently.
    """
    order: dict[str, int] = {}
    pairs = set()
    previous = None
    for left, right in merges:
        token = left + right
        if token not in vocab or left not in vocab or right not in vocab:
            raise D2MergeError(f"merge {left!r} + {right!r} names a token missing from the vocabulary", path=path)
        if token != previous and token in order:
            raise D2MergeError(f"the merges that make {token!r} are not consecutive: not a sentencepiece BPE's "
                               "merge list, llama.cpp would tokenize differently", path=path)
        order.setdefault(token, len(order))
        pairs.add((left, right))
        previous = token
    for token in order:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab and (left, right) not in pairs:
                raise D2MergeError(f"no merge {left!r} + {right!r} although both and {token!r} are tokens: not a "
                                   "sentencepiece BPE's merge list, llama.cpp would tokenize differently", path=path)
    for token in vocab:  # a token no merge makes must not be reachable by llama.cpp's pairing either
        if token in order or token in whole or BYTE_TOKEN.match(token):
            continue
        for cut in range(1, len(token)):
            if token[:cut] in vocab and token[cut:] in vocab:
                raise D2MergeError(f"no merge {token[:cut]!r} + {token[cut:]!r} although both and {token!r} are "
                                   "tokens: not a sentencepiece BPE's merge list, llama.cpp would tokenize "
                                   "differently", path=path)
    return {token: -float(rank) for token, rank in order.items()}


def _add_sentencepiece_tokenizer(writer: Any, folder: Path, spec: Mapping[str, Any], vocab_size: int) -> None:
    """A sentencepiece BPE with byte fallback (Llama 2, Mistral v0.1, Gemma, Phi-3), from tokenizer.json.

    llama.cpp's converter reads tokenizer.model with the sentencepiece library; the same vocabulary's
    tokenizer.json holds everything it takes from there except the scores, which are rebuilt from the
    merge order (:func:`sentencepiece_scores`). Token types as sentencepiece's: control for special
    tokens, byte for ``<0xXX>``, unknown for the unk token, user-defined for other added tokens.
    """
    gguf = _gguf()
    path = folder / "tokenizer.json"
    add_prefix = _sentencepiece_prefix(spec, path)
    model = spec["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise D2MergeError("tokenizer.json's BPE has no vocabulary", path=path)
    added = {int(t["id"]): t for t in spec.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
    by_id = {int(i): t for t, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise D2MergeError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}", path=path)
    scores_of = sentencepiece_scores(vocab, _merge_pairs(model, path), path,
                                     whole=frozenset(t["content"] for t in added.values()))
    if not any(BYTE_TOKEN.match(t) for t in vocab):
        raise D2MergeError("byte_fallback without <0xXX> byte tokens", path=path)
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)  # llama.cpp's converter's padding score
            types.append(UNUSED)
            continue
        tokens.append(token)
        scores.append(scores_of.get(token, 0.0))
        if i in added and (added[i].get("special") or token == unk):
            types.append(UNKNOWN if token == unk else CONTROL)
        elif i in added:
            types.append(USER_DEFINED)
        elif BYTE_TOKEN.match(token):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    _add_special_tokens(special, folder)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(add_prefix)


def _add_special_tokens(special: Any, folder: Path) -> None:
    """add_bos/add_eos as the tokenizer really adds them (not what a config claims): llama.cpp's
    defaults for these differ by tokenizer, so both are always written."""
    from d2merge.io.transformers_folder import load_tokenizer

    configured = load_tokenizer(folder)
    ids = configured("a")["input_ids"]
    special.add_special_token = {"bos": configured.bos_token_id is not None and ids[:1] == [configured.bos_token_id],
                                 "eos": configured.eos_token_id is not None and ids[-1:] == [configured.eos_token_id]}


def _byte_level_option(node: Any, key: str) -> Any:
    """An option of the ByteLevel step of a (possibly nested Sequence) pre-tokenizer."""
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return node.get(key)
        for child in node.get("pretokenizers") or []:
            found = _byte_level_option(child, key)
            if found is not None:
                return found
    return None


# ----- tensors --------------------------------------------------------------------------------


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotates the two halves of each head; llama.cpp rotates interleaved pairs: reorder rows."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


@dataclass(frozen=True)
class _Planned:
    source: str | None  # HF tensor name (None: generated, e.g. rope_freqs); a stack's first expert
    name: str
    shape: tuple[int, ...]
    qtype: Any
    nbytes: int
    stacked: tuple[str, ...] = ()  # MoE: the per-expert HF tensors written one after the other, in expert order
    plus_one: bool = False  # Gemma's RMSNorm weights: written as 1 + w (in fp32, as HF computes it)

    @property
    def parts(self) -> tuple[str, ...]:
        """The HF tensors this GGUF tensor is written from, in stream order."""
        return self.stacked or ((self.source,) if self.source is not None else ())


def _stream_order(planned: list[_Planned]) -> list[str]:
    """The HF tensors in the order the writer consumes them (an expert stack's members together)."""
    return [name for item in planned for name in item.parts]


EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<index>\d+)\.(?P<rest>.+)$")


def _plan_tensors(names_shapes: list[tuple[str, tuple[int, ...]]], config: Mapping[str, Any], arch: str,
                  gguf_type: str, path: Path) -> list[_Planned]:
    gguf = _gguf()
    spec = arch_spec(config, path)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    mapping = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    weight_type = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][0])
    tied = _tied(config, spec)
    stacks: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {}
    planned = []
    for name, shape in names_shapes:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp ties output to token_embd when output.weight is absent
        expert = EXPERT_NAME.match(name) if spec.experts else None
        if expert is not None:
            # llama.cpp's ``*_exps`` tensor is the experts stacked on a new first axis: written as
            # one after the other (rows encode independently, so the bytes are the stack's)
            key = f"{expert['prefix']}.{expert['rest']}"
            stacks.setdefault(key, {})[int(expert["index"])] = (name, shape)
            continue
        target = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise D2MergeError(f"no GGUF name for this tensor in llama.cpp's {arch} layout", path=path, tensor=name)
        if name.endswith("shared_expert_gate.weight") and len(shape) == 2 and shape[0] == 1:
            shape = shape[1:]  # Qwen2-MoE's [1, hidden] gate: llama.cpp's converter writes it as a vector
        item = _plan_one(name, target, shape, weight_type)
        if spec.norm_offset and name.endswith("norm.weight"):
            item = _replace(item, plus_one=True)
        planned.append(item)
    experts = _expert_counts(config)[0] if spec.experts else 0
    for key, members in sorted(stacks.items()):
        target = mapping.get_name(key, try_suffixes=(".weight", ".bias"))
        first = members.get(0, next(iter(members.values())))
        if target is None:
            raise D2MergeError(f"no GGUF name for these experts in llama.cpp's {arch} layout", path=path,
                               tensor=first[0])
        if sorted(members) != list(range(experts)) or len({shape for _, shape in members.values()}) != 1:
            raise D2MergeError(f"expected experts 0..{experts - 1} of one shape (num_experts={experts})",
                               path=path, tensor=first[0])
        item = _plan_one(first[0], target, (experts, *first[1]), weight_type)
        planned.append(_replace(item, stacked=tuple(members[i][0] for i in range(experts))))
    if not tied and "lm_head.weight" not in {n for n, _ in names_shapes}:
        raise D2MergeError("config says untied embeddings but there is no lm_head.weight", path=path)
    theta, rope = _rope(config)
    if rope["rope_type"] == "llama3":
        planned.append(_planned_f32(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                    (_head_dim(config) // 2,)))
    return planned


def _tied(config: Mapping[str, Any], spec: ArchSpec) -> bool:
    """Whether the output reuses the embedding; Gemma's configs leave out their default (tied)."""
    return bool(config.get("tie_word_embeddings", spec.family in ("gemma2", "gemma3")))


def _planned_f32(source: str | None, name: str, shape: tuple[int, ...]) -> _Planned:
    gguf = _gguf()
    return _Planned(source, name, shape, gguf.GGMLQuantizationType.F32, 4 * math.prod(shape))


def _plan_one(source: str, name: str, shape: tuple[int, ...], weight_type: Any) -> _Planned:
    gguf = _gguf()
    if len(shape) < 2 or weight_type == gguf.GGMLQuantizationType.F32:
        return _planned_f32(source, name, shape)
    block, _ = gguf.GGML_QUANT_SIZES[weight_type]
    if shape[-1] % block:
        # a row that is not a whole number of blocks cannot be quantized: F16, as llama.cpp does
        weight_type = gguf.GGMLQuantizationType.F16
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, weight_type)
    return _Planned(source, name, shape, weight_type, math.prod(byte_shape))


def _encode(tensor: torch.Tensor, qtype: Any) -> np.ndarray:
    gguf = _gguf()
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


# ----- the export -----------------------------------------------------------------------------

# Values per encoded block of rows: a block's temporaries (fp32 copy, quantization scratch) are
# a few times this, whatever the model's size; rows are independent in every GGML type, so the
# bytes are those of the whole tensor encoded at once.
BLOCK_VALUES = 1 << 21
SOURCES_KEY = PROVENANCE_PREFIX + "sources"


@dataclass(frozen=True)
class _TensorData:
    """One tensor to encode: in memory, or a byte range of a file (read a block of rows at a time)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None
    raw: tuple[Path, int, int] | None = None  # (file, offset, bytes), in ``dtype``

    def row_blocks(self, rows_per_block: int) -> Iterator[torch.Tensor]:
        rows = self.shape[0] if self.shape else 1
        if self.tensor is not None:
            tensor = self.tensor.reshape(self.shape) if self.shape else self.tensor.reshape(1)
            for start in range(0, rows, rows_per_block):
                yield tensor[start:start + rows_per_block]
            return
        assert self.raw is not None
        path, offset, nbytes = self.raw
        row_bytes = nbytes // max(rows, 1)
        buffer = torch.empty(min(rows, rows_per_block) * row_bytes, dtype=torch.uint8)
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                for start in range(0, rows, rows_per_block):
                    count = min(rows_per_block, rows - start)
                    view = buffer[: count * row_bytes]
                    if fh.readinto(memoryview(view.numpy())) != count * row_bytes:
                        raise D2MergeError("file ended inside the tensor (changed while exporting?)", path=path,
                                           tensor=self.name)
                    yield view.view(self.dtype).reshape(count, *self.shape[1:])
        except OSError as exc:
            raise D2MergeError(f"cannot read file: {exc.strerror or exc}", path=path, tensor=self.name) from None


def _folder_tensors(checkpoint: Any, names: list[str]) -> Iterator[_TensorData]:
    """A merged folder's tensors: safetensors as file ranges (never whole in memory), others as read."""
    tensors = checkpoint.tensors
    byte_range = getattr(tensors, "byte_range", None)
    for name in names:
        dtype, shape = tensors.info(name)
        raw = byte_range(name) if byte_range is not None else None  # None: computed (a dequantized weight)
        if raw is not None:
            yield _TensorData(name, dtype, tuple(shape), raw=raw)
        else:
            yield _TensorData(name, dtype, tuple(shape), tensor=tensors.read(name))


def _heads_to_permute(item: _Planned, config: Mapping[str, Any], permute: bool) -> int | None:
    if not permute or item.source is None:
        return None
    if item.source.endswith(("q_proj.weight", "q_proj.bias")):
        return int(config["num_attention_heads"])
    if item.source.endswith(("k_proj.weight", "k_proj.bias")):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def _encoded_blocks(item: _Planned, data: _TensorData | None, config: Mapping[str, Any],
                    permute: bool) -> Iterator[np.ndarray]:
    """The tensor's GGUF bytes, a block of rows at a time (q/k: whole heads, permuted per head)."""
    if data is None:  # rope_freqs
        theta, rope = _rope(config)
        yield llama3_rope_factors(rope, theta, _head_dim(config))
        return
    heads = _heads_to_permute(item, config, permute)
    shape = data.shape  # one expert of a stack: its own shape
    rows = shape[0] if shape else 1
    row_values = math.prod(shape[1:]) if len(shape) > 1 else (math.prod(shape) if shape else 1)
    unit = rows // heads if heads else 1  # the permutation moves rows within a head only
    step = max(1, BLOCK_VALUES // max(row_values * unit, 1)) * unit
    if len(shape) < 2:
        step = rows  # 1-D: one block
    for block in data.row_blocks(step):
        if heads:
            block = permute_for_llama_cpp(block, block.shape[0] // unit)
        if item.plus_one:
            block = block.to(torch.float32) + 1.0
        yield _encode(block, item.qtype)


def _kv_entry(key: str, value: str) -> bytes:
    """A string key/value as gguf-py packs it (little endian): for finding it in the written header."""
    gguf = _gguf()
    raw_key, raw_value = key.encode(), value.encode()
    return (struct.pack("<Q", len(raw_key)) + raw_key + struct.pack("<I", gguf.GGUFValueType.STRING)
            + struct.pack("<Q", len(raw_value)) + raw_value)


def _write_gguf(target: Path, *, arch: str, permute: bool, config: Mapping[str, Any], tokenizer_folder: Path,
                planned: list[_Planned], tensors: Iterator[_TensorData], gguf_type: str, name: str,
                provenance: Mapping[str, str], final_sources: Callable[[], str] | None = None,
                progress: bool = False) -> None:
    """The GGUF at ``target``: header, metadata and tensor table from shapes, then the tensors as they come.

    ``tensors`` yields the planned tensors (rope_freqs excepted) in plan order, one at a time.
    ``final_sources``, called after the last tensor, gives the ``d2merge.sources`` value that
    replaces the same-length placeholder in ``provenance`` (hashes computed while streaming).
    """
    gguf = _gguf()
    writer = gguf.GGUFWriter(target, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        total = sum(math.prod(p.shape) for p in planned if p.source is not None)
        writer.add_size_label(gguf.size_label(total, total, 0, 0))
        add_hyperparameters(writer, config, arch)
        writer.add_file_type(_file_type_code(gguf_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer_folder, config["vocab_size"])
        writer.add_string(PROVENANCE_PREFIX + "version", __version__)
        writer.add_string(PROVENANCE_PREFIX + "gguf_type", gguf_type)
        for key, value in sorted(provenance.items()):
            writer.add_string(PROVENANCE_PREFIX + key, str(value))
        for item in planned:
            writer.add_tensor_info(item.name, item.shape, np.float32, item.nbytes, raw_dtype=item.qtype)
        writer.write_header_to_file()
        header_end = writer.fout[0].tell()
        writer.write_kv_data_to_file()
        kv_end = writer.fout[0].tell()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for item in _progress(planned, progress):
            parts = [next(tensors) for _ in item.parts] or [None]  # [None]: generated (rope_freqs)
            for data, source in zip(parts, item.parts):
                if data is None or data.name != source:
                    raise D2MergeError(f"tensor stream out of order: got {data and data.name}", tensor=source)
            writer.write_padding(fout, fout.tell())
            written = 0
            for data in parts:
                for block in _encoded_blocks(item, data, config, permute):
                    block.tofile(fout)
                    written += block.nbytes
            if written != item.nbytes:
                raise D2MergeError(f"encoded {written} bytes, planned {item.nbytes}", tensor=item.source)
            writer.write_padding(fout, item.nbytes)
        if final_sources is not None:
            _replace_in_header(fout, header_end, kv_end, SOURCES_KEY, str(provenance.get("sources", "")),
                               final_sources())
        writer.flush()
    finally:
        writer.close()


def _replace_in_header(fout: Any, start: int, end: int, key: str, old: str, new: str) -> None:
    """Overwrite a string value in the written metadata with one of the same length (the hashes)."""
    if new == old:
        return
    if len(new.encode()) != len(old.encode()):
        raise D2MergeError(f"{key} changed length while streaming ({len(old)} -> {len(new)} bytes)")
    fout.flush()
    with open(fout.name, "rb") as fh:  # gguf-py's handle is write-only
        fh.seek(start)
        region = fh.read(end - start)
    entry = _kv_entry(key, old)
    at = region.find(entry)
    if at < 0 or region.find(entry, at + 1) >= 0:
        raise D2MergeError(f"{key} not found once in the written metadata")
    fout.seek(start + at + len(entry) - len(old.encode()))
    fout.write(new.encode())
    fout.seek(0, os.SEEK_END)


def provenance_from_folder(folder: Path) -> dict[str, str]:
    """What an export from a merged folder can say about its source: the sha256 of its weights."""
    from d2merge.io.output import sha256_file

    hashes = {f"merged/{p.name}": sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    return {"sources": json.dumps(hashes, sort_keys=True)}


def _check_gguf_path(out_path: Path) -> None:
    if out_path.suffix != ".gguf":
        raise D2MergeError("a GGUF output must end in .gguf", path=out_path, hint="name it like model.gguf")


def export_gguf(merged: str | os.PathLike, out: str | os.PathLike, *, gguf_type: str = "f16",
                overwrite: bool = False, provenance: Mapping[str, str] | None = None, name: str | None = None,
                modelfile: bool = False, progress: bool = False, imatrix: str | os.PathLike | None = None
                ) -> GGUFExportResult:
    """Write the causal LM in the HF folder ``merged`` as one GGUF file at ``out``.

    ``provenance`` (method, settings, sources, ...) lands under ``d2merge.*`` keys beside
    ``d2merge.version``; without it the sha256 of the folder's weight files is recorded.
    ``modelfile`` also writes an Ollama ``<stem>.Modelfile`` next to the GGUF. The folder's shards are
    read a block of rows at a time: memory does not grow with the model. A type llama.cpp's
    quantizer writes (K-quants, q4_0..q5_1) goes through an f32 temp beside ``out``; ``imatrix``
    is its importance matrix (llama.cpp's format, checked against this model).
    """
    from d2merge.io.checkpoint import open_base
    from d2merge.io.output import AtomicFiles, check_output_location, disk_error

    check_gguf_type(gguf_type)
    by_llama_cpp = _by_llama_cpp(gguf_type, imatrix)
    started = time.perf_counter()
    folder = Path(merged)
    out_path = Path(out)
    _check_gguf_path(out_path)
    checkpoint = open_base(folder)
    if checkpoint.folder is None or checkpoint.config is None:
        raise D2MergeError("GGUF export needs a Hugging Face folder with config.json", path=folder)
    config = checkpoint.config
    arch, permute = check_config(config, folder / "config.json")
    out_path = check_output_location(out_path, [folder], overwrite=overwrite, is_file=True,
                                     sidecars=(modelfile_for(out_path).name,) if modelfile else ())
    names = sorted(checkpoint.tensors.keys())
    planned = _plan_tensors([(n, tuple(checkpoint.tensors.info(n)[1])) for n in names], config, arch,
                            "f32" if by_llama_cpp else gguf_type, folder)
    entries, temp_bytes = _prepare_llama_cpp(planned, out_path, gguf_type, imatrix) if by_llama_cpp else (None, 0)
    sources = _stream_order(planned)
    sidecars = (modelfile_for(out_path).name,) if modelfile else ()
    with AtomicFiles(out_path, overwrite=overwrite, sidecars=sidecars) as staging:
        try:
            with _written_by(staging.staged, out_path, gguf_type if by_llama_cpp else None, entries) as target:
                _write_gguf(target, arch=arch, permute=permute, config=config,
                            tokenizer_folder=checkpoint.folder, planned=planned,
                            tensors=_folder_tensors(checkpoint, sources), gguf_type=gguf_type,
                            name=name or out_path.stem, provenance=provenance or provenance_from_folder(folder),
                            progress=progress)
            if modelfile:
                write_modelfile(staging.staged, checkpoint.folder)
        except OSError as exc:
            raise disk_error(exc, out_path) from None
        staging.commit()
    written_modelfile = modelfile_for(out_path) if modelfile else None
    return GGUFExportResult(out_path, gguf_type, arch, len(planned), out_path.stat().st_size,
                            time.perf_counter() - started, written_modelfile, temp_bytes)


@contextmanager
def _written_by(staged: Path, out_path: Path, llama_cpp_type: str | None, imatrix: dict[str, np.ndarray] | None
                ) -> Iterator[Path]:
    """Where the GGUF writer writes: the staged output, or an f32 temp that llama.cpp then quantizes into it.

    The temp lives in a ``.d2merge-tmp-`` folder beside the output: removed when this block
    ends, however it ends, and by the next run after a kill.
    """
    if llama_cpp_type is None:
        yield staged
        return
    from d2merge.export.gguf_quant import quantize
    from d2merge.io.output import scratch_beside

    with scratch_beside(out_path, "f32") as scratch:
        f32 = Path(scratch) / out_path.name
        yield f32
        quantize(f32, staged, llama_cpp_type, imatrix=imatrix)


def _progress(items: list[_Planned], enabled: bool) -> Iterator[_Planned]:
    """The tensors, with elapsed time and time left (``d2merge.console``: on a terminal, or now and then
    in a log)."""
    from d2merge.console import Progress

    with Progress("writing GGUF", len(items), "tensor") as bar:
        bar.enabled = bar.enabled and enabled
        for item in items:
            yield item
            bar.advance()


def write_modelfile(gguf_path: Path, folder: Path) -> Path:
    """An Ollama Modelfile beside the GGUF (``<stem>.Modelfile``): FROM it; Ollama reads the chat template
    from the GGUF."""
    from d2merge.io.output import write_text

    target = modelfile_for(gguf_path)
    lines = [f"FROM ./{gguf_path.name}"]
    generation = folder / "generation_config.json"
    if generation.is_file():
        from d2merge.io.json_file import read_json

        settings = read_json(generation, "generation_config.json")
        if not isinstance(settings, dict):
            settings = {}
        for key in ("temperature", "top_p", "top_k"):
            if isinstance(settings.get(key), (int, float)) and settings.get("do_sample"):
                lines.append(f"PARAMETER {key} {settings[key]}")
    write_text(target, "\n".join(lines) + "\n")
    return target


def merge_provenance(merge_plan: Any, hashes: Mapping[str, str]) -> dict[str, str]:
    """The ``d2merge.*`` provenance of a merge, as the HF card says it (``export.provenance.gguf_provenance``)."""
    from d2merge.export.provenance import gguf_provenance

    return gguf_provenance(merge_plan, hashes)


def merge_to_gguf(base: Any, adapter: Any, out: str | os.PathLike, options: Any = None, *,
                  gguf_type: str = "f16", progress: bool = False, modelfile: bool = False,
                  imatrix: str | os.PathLike | None = None) -> tuple[Any, GGUFExportResult]:
    """Merge in fp32 straight into a GGUF: the engine hands each merged tensor to the writer.

    Nothing of the model is held or written twice: each tensor is merged (fp32, as
    ``merge --dtype fp32`` writes it), permuted and quantized a block of rows at a time, and
    unchanged tensors are read from the base in blocks. The sha256 of the sources, computed
    from the engine's reads, is written at the end into space the metadata reserved. The bytes
    are those of ``export_gguf`` on the fp32 merged folder with this provenance. A type
    llama.cpp's quantizer writes is streamed into an f32 temp beside ``out`` first (``imatrix``:
    its importance matrix).
    """
    from contextlib import closing

    from d2merge.engine import resolve_device, stream_tensors
    from d2merge.export.hf_folder import MergeResult, merged_config
    from d2merge.export.provenance import filled, gguf_provenance, reserved
    from d2merge.io.output import (AtomicFiles, check_output_location, copy_support_files, disk_error,
                                   scratch_beside, write_json)
    from d2merge.io.source_hashes import BackgroundHashes
    from d2merge.options import MergeOptions
    from d2merge.planning import plan_for as plan

    check_gguf_type(gguf_type)
    by_llama_cpp = _by_llama_cpp(gguf_type, imatrix)
    started = time.perf_counter()
    options = options or MergeOptions()
    out_path = Path(out)
    _check_gguf_path(out_path)
    check_output_location(out_path, [Path(str(base)), Path(str(adapter))], overwrite=options.overwrite,
                          is_file=True, sidecars=(modelfile_for(out_path).name,) if modelfile else ())
    merge_plan = plan(base, adapter, options.with_overrides(dtype="fp32", overwrite=False))
    config = merged_config(merge_plan)
    if merge_plan.base.folder is None or config is None:
        raise D2MergeError("GGUF export needs a Hugging Face base folder with config.json",
                           path=merge_plan.base.location)
    arch, permute = check_config(config, merge_plan.base.folder / "config.json")
    out_path = check_output_location(out_path, [merge_plan.base.location, *(a.path for a in merge_plan.adapters)],
                                     overwrite=options.overwrite, is_file=True)
    by_name = {t.name: t for t in merge_plan.tensors}
    names = sorted(by_name)
    planned = _plan_tensors([(n, tuple(by_name[n].shape)) for n in names], config, arch,
                            "f32" if by_llama_cpp else gguf_type, merge_plan.base.folder)
    entries, temp_bytes = _prepare_llama_cpp(planned, out_path, gguf_type, imatrix) if by_llama_cpp else (None, 0)
    items = [by_name[name] for name in _stream_order(planned)]
    labels = merge_plan.source_files()
    hasher = BackgroundHashes(labels) if options.hash_sources else None
    provenance = gguf_provenance(merge_plan, reserved(labels) if hasher is not None else {})
    hashes: dict[str, str] = {}

    def final_sources() -> str:
        nonlocal hashes
        if hasher is not None:
            hashes = hasher.result()
        return gguf_provenance(merge_plan, filled(labels, hashes)).get("sources", "")

    def streamed(stream: Iterator[Any]) -> Iterator[_TensorData]:
        for part in stream:
            item = part.item
            if part.tensor is not None:
                yield _TensorData(item.name, item.out_dtype, tuple(item.shape), tensor=part.tensor)
            else:
                yield _TensorData(item.name, item.in_dtype, tuple(item.shape), raw=part.raw)

    try:
        # The tokenizer and config as the merged folder would have them (the same files the
        # two-step export read): a few small files, no weights.
        with scratch_beside(out_path, "tokenizer") as support:
            write_json(Path(support) / "config.json", config)
            copy_support_files(merge_plan.base.folder, Path(support), merge_plan.base.weight_files)
            with AtomicFiles(out_path, overwrite=options.overwrite,
                             sidecars=(modelfile_for(out_path).name,) if modelfile else ()) as staging:
                stream = stream_tensors(merge_plan, items, device=resolve_device(options.device), hasher=hasher)
                with closing(stream):
                    try:
                        with _written_by(staging.staged, out_path, gguf_type if by_llama_cpp else None,
                                         entries) as target:
                            _write_gguf(target, arch=arch, permute=permute, config=config,
                                        tokenizer_folder=Path(support), planned=planned, tensors=streamed(stream),
                                        gguf_type=gguf_type, name=out_path.stem, provenance=provenance,
                                        final_sources=final_sources if hasher is not None else None,
                                        progress=progress)
                        if modelfile:
                            write_modelfile(staging.staged, Path(support))
                    except OSError as exc:
                        raise disk_error(exc, out_path) from None
                staging.commit()
    finally:
        if hasher is not None:
            hasher.abandon()  # stops the hashing thread if the export failed; a no-op after result()
    seconds = time.perf_counter() - started
    result = MergeResult(out_path, merge_plan, (out_path.name,), seconds, hashes)
    written_modelfile = modelfile_for(out_path) if modelfile else None
    exported = GGUFExportResult(out_path, gguf_type, arch, len(planned), out_path.stat().st_size, seconds,
                                written_modelfile, temp_bytes)
    return result, exported


# ----- reading back ---------------------------------------------------------------------------


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A GGUF as a transformers model (dequantized, q/k permutation undone): what verify runs."""
    from d2merge.io.transformers_folder import load_model

    path = Path(path)
    if not path.is_file():
        raise D2MergeError("GGUF file not found", path=path)
    _gguf()
    return load_model(path, gguf_file=path.name, dtype=dtype).eval()


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], str]]]:
    """(every key/value, {tensor name: (ggml shape, type name)}) from the file's header alone.

    Read by d2merge.io.gguf_file (gguf-py's reader walks every tokenizer string in Python:
    seconds per file for a 49k-token vocabulary); a malformed file is refused in one line.
    """
    from d2merge.io.gguf_file import read_gguf_header

    _gguf()  # the GGML type tables come from gguf-py: the extra's one-line hint if it is missing
    header = read_gguf_header(path)
    return header.metadata, {name: (t.shape, t.type_name) for name, t in header.tensors.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every key/value of a GGUF file (arrays as lists), for comparisons and inspection."""
    return read_gguf(path)[0]


def tensor_table(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """{GGUF tensor name: (ggml shape, type name)}."""
    return read_gguf(path)[1]


# ----- verify: a GGUF file as the merged model ------------------------------------------------

# GGML tensor types that hold the merged values exactly in a torch dtype: verify checks those
# tensors in ulps of that dtype. Quantized tensors have no such dtype and are gated by logits only.
EXACT_TENSOR_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# verify's column defaults for a file whose 2-D weights are stored exactly in that dtype.
EXACT_FILE_TYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# llama.cpp's file types (enum llama_ftype, written as general.file_type) -> the GGML type most of
# their 2-D weights get (llama_ftype_get_default_type in llama.cpp's src/llama-quant.cpp).
LLAMA_FILE_TYPES: dict[str, tuple[int, str]] = {
    "f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0"),
    "q4_0": (2, "Q4_0"), "q4_1": (3, "Q4_1"), "q5_0": (8, "Q5_0"), "q5_1": (9, "Q5_1"),
    "q2_k": (10, "Q2_K"), "q3_k_s": (11, "Q3_K"), "q3_k_m": (12, "Q3_K"), "q3_k_l": (13, "Q3_K"),
    "q4_k_s": (14, "Q4_K"), "q4_k_m": (15, "Q4_K"), "q5_k_s": (16, "Q5_K"), "q5_k_m": (17, "Q5_K"),
    "q6_k": (18, "Q6_K"), "iq4_nl": (25, "IQ4_NL"), "iq4_xs": (30, "IQ4_XS"),
}
# What llama.cpp writes instead for rows that are not whole 256-value blocks (tensor_type_fallback).
LLAMA_FALLBACKS = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                   "IQ4_XS": "IQ4_NL"}


@dataclass(frozen=True)
class QuantizedGate:
    """How verify judges a quantized file of one type, on real text (never random tokens)."""

    max_kl: float  # mean KL(unmerged fp32 || file) per position
    min_top1: float  # top-1 agreement with the unmerged fp32 model
    max_ppl_ratio: float  # perplexity file / unmerged on the text's own next tokens
    max_rel_diff: float  # max |logit diff| / largest |logit| of the unmerged model


# Quantized gates by file type, from the figures measured on SmolLM2-135M + a D2-LoRA merge on the
# built-in sentences (docs/gguf.md, benchmarks/gguf_quality.py): max mean KL 3x the measured (at
# least 0.02), min top-1 the measured less 15 points, max perplexity ratio 1 + 3x the measured
# excess (at least 1.03). They catch a broken file (wrong weights: KL of several nats, top-1 near
# 0), not a model that quantizes worse than SmolLM2; --max-kl / --min-top1 / --max-ppl-ratio /
# --max-abs-diff set your own. Measured through transformers' reader (what verify runs): q8_0 KL
# 0.0021 / top-1 96.8% / ppl 1.0068; q4_0_pure 0.620 / 50.5% / 1.387; q4_1_pure 0.081 / 80.0% /
# 1.078; q5_0_pure 0.128 / 82.3% / 1.157; q5_1_pure 0.220 / 70.9% / 1.341. Measured in llama.cpp
# (whose f16 cache and rounded activations add to the error, so these gates are looser than
# verify's own view needs; max |logit diff| at 2-3x the measured): q2_k 0.598 / 63.6% / 1.443;
# q3_k_m 0.163 / 75.0% / 1.162; q4_0 0.489 / 65.5% / 1.332; q4_k_s 0.072 / 83.6% / 1.069; q4_k_m
# 0.071 / 85.5% / 1.051; q5_0 0.106 / 87.3% / 1.181; q5_k_s 0.087 / 80.9% / 1.139; q5_k_m 0.075 /
# 83.6% / 1.080; q6_k 0.027 / 88.6% / 0.967; q3_k_s as q2_k (the same tensors on SmolLM2); q3_k_l
# 0.192 / 71.8% / 1.225 (docs/gguf.md has the table). Types without a figure
# this session get the gate of the nearest measured type with fewer bits, loosened.
QUANTIZED_GATES: dict[str, QuantizedGate] = {
    "q8_0": QuantizedGate(0.02, 0.8, 1.03, 0.5),
    "q4_0_pure": QuantizedGate(1.9, 0.35, 2.2, 1.5), "q4_1_pure": QuantizedGate(0.25, 0.65, 1.25, 1.5),
    "q5_0_pure": QuantizedGate(0.4, 0.67, 1.5, 1.5), "q5_1_pure": QuantizedGate(0.7, 0.55, 2.1, 1.5),
    "q2_k": QuantizedGate(1.8, 0.48, 2.35, 1.5), "q3_k_s": QuantizedGate(1.8, 0.48, 2.35, 1.5),
    "q3_k_m": QuantizedGate(0.49, 0.6, 1.49, 1.0), "q3_k_l": QuantizedGate(0.58, 0.56, 1.68, 1.0),
    "q4_0": QuantizedGate(1.5, 0.5, 2.0, 1.5), "q5_0": QuantizedGate(0.32, 0.72, 1.55, 0.8),
    "q4_k_s": QuantizedGate(0.22, 0.68, 1.21, 0.6), "q4_k_m": QuantizedGate(0.22, 0.7, 1.16, 0.6),
    "q5_k_s": QuantizedGate(0.26, 0.65, 1.42, 0.8), "q5_k_m": QuantizedGate(0.23, 0.68, 1.25, 0.8),
    "q6_k": QuantizedGate(0.09, 0.73, 1.06, 0.5),
    # not measured this session: from the nearest measured type with fewer bits, loosened
    "q4_1": QuantizedGate(1.5, 0.5, 2.0, 1.5), "q5_1": QuantizedGate(0.7, 0.55, 2.1, 1.5),
    "iq4_nl": QuantizedGate(1.5, 0.5, 2.0, 1.5), "iq4_xs": QuantizedGate(1.5, 0.5, 2.0, 1.5),
}
# The loosest of them: a mix no file type names (the GGML type that dominates it decides nothing).
LOOSEST_GATE = QuantizedGate(max(g.max_kl for g in QUANTIZED_GATES.values()),
                             min(g.min_top1 for g in QUANTIZED_GATES.values()),
                             max(g.max_ppl_ratio for g in QUANTIZED_GATES.values()),
                             max(g.max_rel_diff for g in QUANTIZED_GATES.values()))


def file_type_from_tensors(table: Mapping[str, tuple[tuple[int, ...], str]], file_type: Any = None,
                           path: Path | None = None) -> tuple[str, str | None]:
    """(the file's type name, its exact dtype or None) from the GGML types of its 2-D tensors.

    Never from ``d2merge.gguf_type``: llama.cpp's quantizer copies every key of its input, so
    a Q4_K_M made from our f32 file still says f32 there. A file whose 2-D weights are all
    F32/F16/BF16 is exact (judged by the least precise of them); otherwise it is quantized and
    named by ``file_type`` (llama.cpp's ``general.file_type``) only if that type's GGML type, or
    llama.cpp's fallback for it, is among its weights' types, else by the GGML type that holds
    most of its quantized weights.
    """
    elements: dict[str, int] = {}
    for shape, kind in table.values():
        if len(shape) >= 2:
            elements[kind] = elements.get(kind, 0) + math.prod(shape)
    if not elements:
        raise D2MergeError("the GGUF file has no 2-D weight tensors", path=path)
    if set(elements) <= set(EXACT_FILE_TYPES):
        kind = next(k for k in ("BF16", "F16", "F32") if k in elements)
        return kind.lower(), EXACT_FILE_TYPES[kind]
    quantized = {k: v for k, v in elements.items() if k not in EXACT_FILE_TYPES}
    dominant = max(sorted(quantized), key=lambda k: quantized[k])
    named = next((name for name, (code, kind) in LLAMA_FILE_TYPES.items() if code == file_type), None)
    if named is not None and {LLAMA_FILE_TYPES[named][1], LLAMA_FALLBACKS.get(LLAMA_FILE_TYPES[named][1])} & set(quantized):
        return named, None
    return dominant.lower(), None


def quantized_gate(gguf_type: str) -> QuantizedGate:
    """The gate of a quantized file type; the loosest one for a mix no file type names."""
    return QUANTIZED_GATES.get(gguf_type, LOOSEST_GATE)


class GGUFWeights:
    """The exactly stored tensors of a GGUF, by HF name, as transformers' reader loaded them.

    A ``TensorSource`` for verify's weight check: each tensor is handed back in the dtype the
    file stores it in (the reader's fp32 upcast of F16/BF16 is exact), so ulps are the file's.
    ``quantized`` names the tensors stored in a block format, which no dtype holds exactly.
    """

    def __init__(self, path: Path, state: Mapping[str, torch.Tensor], stored: Mapping[str, torch.dtype],
                 quantized: tuple[str, ...]):
        self.path = path
        self._state = state
        self._stored = dict(stored)
        self.quantized = quantized

    def keys(self) -> list[str]:
        return list(self._stored)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._stored[name], tuple(self._state[name].shape)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._state[name].to(self._stored[name])

    def file_of(self, name: str) -> Path:
        return self.path


@dataclass(frozen=True)
class GGUFForVerify:
    """What ``d2merge verify`` needs to judge a GGUF file given as MERGED."""

    path: Path
    gguf_type: str
    architecture: str  # the GGUF's (llama, qwen2, qwen3)
    blocks: int
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type name
    exact_dtype: str | None = None  # fp32/fp16/bf16 when every 2-D weight is stored exactly (from the tensors)

    @property
    def label(self) -> str:
        return f"gguf-{self.gguf_type}"

    def load_model(self) -> torch.nn.Module:
        return load_gguf_model(self.path)

    def weights(self, model: torch.nn.Module) -> GGUFWeights:
        """The model's tensors (HF names) mapped back to how the file stores them."""
        gguf = _gguf()
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.architecture)
        mapping = gguf.get_tensor_name_map(arch_id, self.blocks)
        embedding = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        state = model.state_dict()
        stored: dict[str, torch.dtype] = {}
        quantized: list[str] = []
        for name in state:
            target = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
            if name == "lm_head.weight" and target not in self.tensor_types:
                target = embedding  # tied: llama.cpp reuses token_embd as the output
            if target not in self.tensor_types:
                continue
            kind = self.tensor_types[target]
            if kind in EXACT_TENSOR_TYPES:
                stored[name] = EXACT_TENSOR_TYPES[kind]
            else:
                quantized.append(name)
        return GGUFWeights(self.path, state, stored, tuple(quantized))

    @property
    def floor_dtype(self) -> str | None:
        """The dtype whose rounding floor verify judges this file by; None for quantized files."""
        return self.exact_dtype

    def thresholds(self, reference_max_abs: float) -> Any:
        """verify's limits for this file (``reference_max_abs``: the largest |logit| of the unmerged model)."""
        from d2merge.options.verify import DEFAULT_THRESHOLDS, Thresholds

        if self.floor_dtype is not None:
            return DEFAULT_THRESHOLDS[self.floor_dtype]
        gate = quantized_gate(self.gguf_type)
        # No rounding floor for block formats: fixed limits on real text. F16 fallbacks in a quantized
        # file are checked like an fp16 merge; answers flipped on --mc-eval are judged by McNemar's test.
        fp16 = DEFAULT_THRESHOLDS["fp16"]
        return Thresholds(floor_multiple=fp16.floor_multiple, alpha=fp16.alpha, max_ulp=fp16.max_ulp,
                          max_abs_diff=gate.max_rel_diff * reference_max_abs, min_top1=gate.min_top1,
                          max_kl=gate.max_kl, max_ppl_ratio=gate.max_ppl_ratio)


def gguf_for_verify(path: str | os.PathLike) -> GGUFForVerify:
    """A GGUF's type (from its tensors' GGML types) and per-tensor storage, read once for verify."""
    path = Path(path)
    metadata, table = read_gguf(path)
    arch = metadata.get("general.architecture")
    if arch not in VERIFY_ARCHITECTURES or metadata.get(f"{arch}.expert_count"):
        what = f"{arch!r} with experts" if arch in VERIFY_ARCHITECTURES else repr(arch)
        raise D2MergeError(f"verify reads GGUF files of the llama, qwen2 and qwen3 architectures, not {what}",
                           path=path, hint="verify the merged folder instead (merge --format hf)")
    gguf_type, exact = file_type_from_tensors(table, metadata.get("general.file_type"), path)
    return GGUFForVerify(path, gguf_type, arch, int(metadata.get(f"{arch}.block_count") or 0),
                         {name: kind for name, (_, kind) in table.items()}, exact)


ProgressHook = Callable[[str], None]
