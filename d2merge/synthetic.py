"""Tiny random-init models and tokenizers built locally, for the demo, tests and benchmarks.

Nothing here downloads anything: every model is created from a config with a
fixed seed, so the demo and the test-suite run on a machine with no network.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "gpt2")

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


def save_tiny_base(folder: str | Path, arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   max_shard_size: str | int | None = None, tokenizer: bool = True, **config_kwargs) -> Path:
    """Write a tiny random base model as a Hugging Face folder (sharded when max_shard_size is small)."""
    folder = Path(folder)
    model = build_tiny_model(arch, seed=seed, dtype=dtype, **config_kwargs)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        build_tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder
