"""Tiny random-init models and tokenizers built locally, for the demo, tests and benchmarks.

Nothing here downloads anything: every model is created from a config with a
fixed seed, so the demo and the test-suite run on a machine with no network.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "gpt2", "qwen3", "mistral")

# Words of the built-in word-level tokenizer; the vocabulary is padded with
# `tok<N>` entries up to the model's vocab size.
_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
_WORDS = (
    "the a an of to in is was and or not yes no true false red green blue yellow cat dog bird fish "
    "one two three four five six seven eight nine ten question answer choice which what who where "
    "when why how big small hot cold up down left right first last before after more less"
).split()


def tiny_config(arch: str = "llama", *, vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 64,
                max_positions: int = 128, tie_word_embeddings: bool | None = None):
    """A transformers config for a tiny model of one of the supported architectures."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    special = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
                             tie_word_embeddings=bool(tie_word_embeddings), **special)
    elif arch == "qwen2":
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
                             tie_word_embeddings=bool(tie_word_embeddings), **special)
    elif arch in ("qwen3", "mistral"):
        from transformers import MistralConfig, Qwen3Config

        kind = Qwen3Config if arch == "qwen3" else MistralConfig
        extra = {"head_dim": 128} if arch == "qwen3" else {"sliding_window": None}
        config = kind(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=bool(tie_word_embeddings),
                      **extra, **special)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                            n_positions=max_positions, n_inner=intermediate_size,
                            tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
                            **special)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return config


def build_tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random-init causal LM, deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init of norms and biases is constant (ones/zeros); perturb them so that
    # tests notice a bias or norm being dropped or mixed up.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()


def build_tiny_tokenizer(vocab_size: int = 128):
    """A word-level fast tokenizer (whitespace split) whose ids fit the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _SPECIAL_TOKENS + _WORDS
    words += [f"tok{i}" for i in range(len(words), vocab_size)]
    vocab = {word: index for index, word in enumerate(words[:vocab_size])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def save_quietly(model, folder: Path, *, max_shard_size: str | int | None = None) -> None:
    """save_pretrained without transformers' "Writing model shards" bar (a tiny model needs none)."""
    from d2merge.io.transformers_folder import quiet_transformers

    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with quiet_transformers():
        model.save_pretrained(folder, **kwargs)


def save_tiny_base(folder: str | Path, arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   max_shard_size: str | int | None = None, tokenizer: bool = True, **config_kwargs) -> Path:
    """Write a tiny random base model as a Hugging Face folder (sharded when max_shard_size is small)."""
    folder = Path(folder)
    model = build_tiny_model(arch, seed=seed, dtype=dtype, **config_kwargs)
    save_quietly(model, folder, max_shard_size=max_shard_size)
    if tokenizer:
        build_tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


DEFAULT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
DEFAULT_TARGETS["qwen3"] = DEFAULT_TARGETS["mistral"] = DEFAULT_TARGETS["llama"]


def adapter_config(method: str, *, r: int = 4, lora_alpha: float = 8.0, target_modules: tuple[str, ...] = ("q_proj",),
                   base_model_name_or_path: str | None = None, **fields: object) -> dict:
    """An adapter_config.json for one of the methods, with the given fields added."""
    config: dict = {"base_model_name_or_path": base_model_name_or_path, "lora_alpha": lora_alpha,
                    "target_modules": list(target_modules), "format_version": "1"}
    from d2merge.methods import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    config.update(METHODS[method].example_config(r))
    config.update(fields)
    return config


def random_factors(method_name: str, settings, out_features: int, in_features: int, *,
                   generator: torch.Generator, w0: torch.Tensor | None = None, magnitude: float = 0.2
                   ) -> dict[str, torch.Tensor]:
    """Non-zero random factors (B included), so that a merge changes the weights measurably."""
    from d2merge.methods import get_method

    method = get_method(method_name)
    shapes = method.expected_shapes(settings, out_features, in_features)
    factors = {}
    for name, shape in shapes.items():
        if name == "lora_magnitude_vector":
            base_norm = torch.linalg.vector_norm(w0.float(), dim=1) if w0 is not None else torch.ones(shape)
            factors[name] = base_norm * (1 + 0.3 * torch.randn(shape, generator=generator)).abs()
        else:
            factors[name] = magnitude * torch.randn(shape, generator=generator)
    return factors


def save_random_adapter(base_folder: str | Path, adapter_folder: str | Path, method: str = "d2lora", *,
                        seed: int = 0, r: int = 4, lora_alpha: float = 8.0,
                        target_modules: tuple[str, ...] | None = None, magnitude: float = 0.2,
                        dtype: torch.dtype = torch.float32, **config_fields: object) -> Path:
    """Write a random adapter (non-zero factors) for a tiny base written by :func:`save_tiny_base`."""
    from d2merge.io.adapter import write_adapter
    from d2merge.io.checkpoint import open_base
    from d2merge.methods import LINEAR, get_method, parse_adapter_config

    base = open_base(base_folder)
    model_type = (base.config or {}).get("model_type", "llama")
    targets = tuple(target_modules or DEFAULT_TARGETS.get(model_type, DEFAULT_TARGETS["llama"]))
    if model_type == "gpt2":
        config_fields.setdefault("fan_in_fan_out", True)
    config_fields.setdefault("base_model_name_or_path", str(base_folder))
    raw = adapter_config(method, r=r, lora_alpha=lora_alpha, target_modules=targets, **config_fields)
    config = parse_adapter_config(raw)
    method_obj = get_method(config.method)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in base.tensors.keys():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or module.rsplit(".", 1)[-1] not in targets:
            continue
        settings = method_obj.module_settings(config, module, LINEAR)
        rows, cols = base.tensors.info(name)[1]
        out_f, in_f = (cols, rows) if settings.fan_in_fan_out else (rows, cols)
        w0 = base.tensors.read(name).float()
        w0 = w0.T if settings.fan_in_fan_out else w0
        factors = random_factors(config.method, settings, out_f, in_f, generator=generator, w0=w0,
                                 magnitude=magnitude)
        for tensor_name, tensor in factors.items():
            tensors[method_obj.stored_key(module, tensor_name, LINEAR)] = tensor.to(dtype)
    return write_adapter(adapter_folder, raw, tensors)
