"""GGUF export of the architectures beyond Llama/Mistral/Qwen2/Qwen3, and sentencepiece tokenizers.

Each architecture is checked like the first four (tests/unit/export/test_gguf.py), in one test: a tiny
random-init transformers model with a random D2-LoRA adapter, merged straight into an f32 GGUF,
must give the logits of the fp32 HF merge (1) read back by transformers' GGUF reader and (2) run
by llama.cpp itself, with the same token ids for the same text. The sentencepiece tokenizers are
built here, offline, the way HF's converter writes a tokenizer.model as tokenizer.json (every
split of every token a merge, best token first), in Llama 2's form (Prepend + Replace normalizer,
``<s>`` added) and Gemma's (Replace only, ``<bos>``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from d2merge.errors import D2MergeError
from d2merge.export.gguf import export_gguf, merge_to_gguf, read_gguf
from d2merge.synthetic import save_quietly, save_random_adapter
from gguf_parse import gguf_parsed_once

SPACE = "\u2581"
CORPUS = ("The quick brown fox jumps over the lazy dog. The capital of France is Paris.",
          "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
          "Once upon a time there was a little model that learned to merge adapters exactly.",
          "the theory of the thing: there, then, those, these, them, they, other, another")
TEXTS = ("The capital of France is", "def add(a, b):\n    return a+b", "  two leading spaces and émoji 🚀",
         "quick brown foxes", "Once upon a time,\tthere")
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
# f32 file, llama.cpp with an f32 KV cache, against transformers in fp32: bounds relative to the
# largest logit (test_gguf.py's f32 bound); transformers' reader runs the same fp32 values. Gemma:
# ggml's GELU reads an f16 table (its activations rounded to f16): measured 4.6e-4 (Gemma 2).
LLAMA_CPP_REL = 1e-5
LLAMA_CPP_REL_GELU = 2e-3
READER_ABS = 1e-4
has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module", autouse=True)
def parse_each_gguf_once():
    with gguf_parsed_once():
        yield


def _sentencepiece_pieces(pieces: int) -> list[str]:
    """Multi-character pieces a BPE learns on CORPUS (words prefixed with U+2581), best first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", SPACE)
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trained.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=pieces, show_progress=False))
    by_id = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    return [t for t, _ in by_id if len(t) > 1], [t for t, _ in by_id if len(t) == 1]


def write_sentencepiece_tokenizer(folder: Path, style: str, added: tuple[str, ...] = ()) -> int:
    """A sentencepiece-style BPE tokenizer.json (byte fallback) in ``style`` llama or gemma, with ``added``
    special tokens after the vocabulary (as Phi-3's ``<|end|>``...); its size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    specials = LLAMA_SPECIALS if style == "llama" else GEMMA_SPECIALS
    merged, chars = _sentencepiece_pieces(300)
    if SPACE not in chars:
        chars.append(SPACE)
    tokens = [*specials, *(f"<0x{b:02X}>" for b in range(256)), *merged, *chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []  # HF's sentencepiece converter: every split of every token, best (first) token first
    for token in merged:
        splits = [(token[:c], token[c:]) for c in range(1, len(token)) if token[:c] in vocab and token[c:] in vocab]
        merges.extend(sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    unk = "<unk>"
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", SPACE)
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if style == "llama"
                            else replace)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if style == "llama" else []))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*specials, *added)])
    bos, eos = ("<s>", "</s>") if style == "llama" else ("<bos>", "<eos>")
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                             special_tokens=[(bos, vocab[bos])])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "add_bos_token": True, "add_eos_token": False,
              "tokenizer_class": "LlamaTokenizer" if style == "llama" else "GemmaTokenizer",
              "model_max_length": 512}
    if style == "gemma":
        config["pad_token"] = "<pad>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(tokens) + len(added)


def _config(arch: str, vocab_size: int, style: str):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if style == "llama":
        common.update(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    else:
        common.update(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if arch == "llama-spm":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "mistral-spm":
        return transformers.MistralConfig(**common, sliding_window=None, rope_theta=1e6)
    if arch == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=256, query_pre_attn_scalar=256, sliding_window=4)
    if arch == "gemma3":
        # six layers: five sliding, one global (llama.cpp's gemma3 layout); linear rope scaling on the global one
        return transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 6, "num_attention_heads": 2,
                                                "num_key_value_heads": 1}, head_dim=256,
                                             query_pre_attn_scalar=256, sliding_window=4,
                                             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                                 "rope_theta": 1e6},
                                                              "sliding_attention": {"rope_type": "default",
                                                                                    "rope_theta": 10000.0}})
    if arch == "phi3":
        return transformers.Phi3Config(**{**common, "vocab_size": vocab_size + 8, "pad_token_id": 2},
                                       sliding_window=None, original_max_position_embeddings=128)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    # Qwen MoE: the expert sizes are the config defaults, the only ones transformers' reader builds
    # (it reads no expert_feed_forward_length for these architectures)
    if arch == "qwen2moe":
        return transformers.Qwen2MoeConfig(**common, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                           num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)
    if arch == "qwen3moe":
        return transformers.Qwen3MoeConfig(**common, moe_intermediate_size=768, num_experts=4, head_dim=16,
                                           num_experts_per_tok=2, norm_topk_prob=True)
    raise ValueError(arch)


TARGETS = {"phi3": ("qkv_proj", "o_proj", "gate_up_proj"), "gemma2": ("q_proj", "v_proj", "down_proj"),
           "gemma3": ("q_proj", "k_proj", "up_proj")}


def _base(root: Path, arch: str, smollm2: Path | None = None) -> Path:
    """A tiny random-init base of ``arch`` with its tokenizer files."""
    from transformers import AutoModelForCausalLM

    folder = root / f"base-{arch}"
    folder.mkdir()
    if smollm2 is not None:  # Qwen MoE: byte-level BPE, as the real ones
        from test_gguf import SMOL_VOCAB, _with_smol_tokenizer

        _with_smol_tokenizer(folder, smollm2)
        vocab_size, style = SMOL_VOCAB, "llama"
    else:
        style = "gemma" if arch.startswith("gemma") else "llama"
        # llama.cpp's vocabulary loader looks up Phi-3's added tokens in a model named phi3
        added = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>") if arch == "phi3" else ()
        vocab_size = write_sentencepiece_tokenizer(folder, style, added)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, vocab_size, style), dtype=torch.float32)
    with torch.no_grad():  # random norms (HF initializes them to 1, or 0 for Gemma): the offset shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    save_quietly(model, folder)
    return folder


def _export(root: Path, arch: str, smollm2: Path | None = None) -> tuple[Path, Path, Path]:
    """(base, fp32 HF merge, f32 GGUF merge) of ``arch`` with a random D2-LoRA adapter."""
    from d2merge.api import merge

    base = _base(root, arch, smollm2)
    adapter = save_random_adapter(base, root / f"adapter-{arch}", "d2lora", r=4,
                                  target_modules=TARGETS.get(arch, ("q_proj", "k_proj", "v_proj", "o_proj")))
    merged = merge(base, adapter, root / f"merged-{arch}", dtype="fp32", hash_sources=False).output
    _, exported = merge_to_gguf(base, adapter, root / f"{arch}.gguf", gguf_type="f32")
    return base, merged, exported.output


def _ids(tokenizer, texts=TEXTS) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in texts]


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def _reader_matches(path: Path, model, ids: list[list[int]]) -> float:
    """Max |logit diff| of transformers' GGUF reader against the HF merge; weights compared too."""
    from d2merge.export.gguf import load_gguf_model

    read = load_gguf_model(path)
    want_state, got_state = model.state_dict(), read.state_dict()
    assert set(got_state) == set(want_state)
    for name, want in want_state.items():
        # Gemma's norms are stored as 1 + w and read back as (1 + w) - 1: one fp32 rounding each way
        torch.testing.assert_close(got_state[name], want, rtol=0, atol=1e-6, msg=name)
    diff = 0.0
    with torch.no_grad():
        for row in ids:
            batch = torch.tensor([row])
            diff = max(diff, (read(batch).logits - model(batch).logits).abs().max().item())
    return diff


def _llama_cpp_matches(path: Path, model, tokenizer, ids: list[list[int]]) -> tuple[float, float]:
    """(max |logit diff|, largest |logit|) of llama.cpp against transformers; token ids checked equal."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, verbose=False, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        for text, row in zip(TEXTS, ids):
            plain = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == plain, text
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == row, text
        diff = largest = 0.0
        for row in ids:
            llm.reset()
            llm.eval(row)
            got = torch.from_numpy(np.array(llm.scores[: len(row)]))
            with torch.no_grad():
                want = model(torch.tensor([row])).logits[0]
            diff = max(diff, (got - want).abs().max().item())
            largest = max(largest, want.abs().max().item())
    finally:
        llm.close()
    return diff, largest


def _round_trip(tmp_path: Path, arch: str, smollm2: Path | None = None, reader: str = "logits") -> dict:
    """``reader``: what transformers' GGUF reader is held to: ``logits`` (and weights), ``weights`` (its
    config misses a key the file has), or ``none`` (it has no such model); llama.cpp runs every file."""
    torch.set_num_threads(1)
    base, merged, path = _export(tmp_path, arch, smollm2)
    model, tokenizer = _hf(merged)
    ids = _ids(tokenizer)
    figures = {}
    if reader != "none":
        figures["reader_max_diff"] = _reader_matches(path, model, ids)
        assert figures["reader_max_diff"] < READER_ABS or reader == "weights", figures
    if has_llama_cpp:
        diff, largest = _llama_cpp_matches(path, model, tokenizer, ids)
        figures.update(llama_cpp_max_diff=diff, largest_logit=largest)
        assert diff <= (LLAMA_CPP_REL_GELU if arch.startswith("gemma") else LLAMA_CPP_REL) * largest, figures
    print(f"{arch}: {figures}")
    return read_gguf(path)[0]


def test_llama2_sentencepiece_tokenizer(tmp_path):
    meta = _round_trip(tmp_path, "llama-spm")
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # unk, <s>, </s> control, then <0x00>
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 1


def test_mistral_sentencepiece_tokenizer(tmp_path):
    meta = _round_trip(tmp_path, "mistral-spm")
    assert meta["general.architecture"] == "llama" and meta["llama.rope.freq_base"] == 1e6


def test_gemma2(tmp_path):
    meta = _round_trip(tmp_path, "gemma2")
    assert meta["gemma2.attention.sliding_window"] == 4 and meta["gemma2.final_logit_softcapping"] == 30.0
    assert meta["tokenizer.ggml.add_space_prefix"] is False


@pytest.mark.slow  # six layers (one global): about 4 s on an idle 2-core box
def test_gemma3(tmp_path):
    # transformers' reader builds Gemma 3 without the file's rope.scaling (linear, global layers)
    meta = _round_trip(tmp_path, "gemma3", reader="weights")
    assert meta["gemma3.rope.freq_base"] == 1e6 and meta["gemma3.rope.scaling.factor"] == 2.0


def test_phi3(tmp_path):
    meta = _round_trip(tmp_path, "phi3")
    assert meta["phi3.rope.dimension_count"] == 16
    assert meta["tokenizer.ggml.tokens"][-1].startswith("[PAD")  # vocab_size past the tokenizer
    # verify reads Phi-3's GGUF: the fused qkv_proj / gate_up_proj map back one to one
    from d2merge.verify import verify

    base, adapter = tmp_path / "base-phi3", tmp_path / "adapter-phi3"
    report = verify(base, adapter, tmp_path / "phi3.gguf", num_probes=2, probe_length=8)
    column = report.results[0]
    assert report.passed and column.dtype == "gguf-f32" and not column.not_checked, report.table()
    assert len(column.layers) == 2 * len(TARGETS["phi3"]) and column.copied_checked > 0
    wrong = export_gguf(base, tmp_path / "base.gguf", gguf_type="f32").output  # the base, not the merge
    failures = verify(base, adapter, wrong, num_probes=2, probe_length=8).results[0].failures
    assert any("weight check" in f for f in failures), failures


def test_verify_refuses_what_it_cannot_map(tmp_path):
    """Gemma (norms stored as 1 + w) and experts: one line naming what verify reads, nothing judged."""
    base = _base(tmp_path, "gemma2")
    adapter = save_random_adapter(base, tmp_path / "adapter", "lora", r=2, target_modules=("q_proj",))
    path = export_gguf(base, tmp_path / "gemma2.gguf", gguf_type="f32").output
    from d2merge.verify import verify

    with pytest.raises(D2MergeError, match="verify reads GGUF files of the llama, qwen2, qwen3 and phi3 "
                                           "architectures, not 'gemma2'.*verify the merged folder instead"):
        verify(base, adapter, path, num_probes=2, probe_length=8)


def test_mixtral(tmp_path):
    # llama.cpp writes Mixtral as llama with experts, which transformers' reader loads as a dense Llama
    meta = _round_trip(tmp_path, "mixtral", reader="none")
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2


def test_qwen2_moe(tmp_path):
    meta = _round_trip(tmp_path, "qwen2moe")
    assert meta["qwen2moe.expert_shared_feed_forward_length"] == 5632


def test_qwen3_moe(tmp_path):
    meta = _round_trip(tmp_path, "qwen3moe")
    assert meta["qwen3moe.expert_feed_forward_length"] == 768


# ----- refused in one line: what llama.cpp's graphs would compute otherwise ---------------------

def _arch_config(architecture: str, **fields) -> dict:
    config = {"architectures": [architecture], "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 512}
    return {**config, **fields}


GEMMA2 = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.mark.parametrize("architecture,fields,message", [
    ("Gemma2ForCausalLM", {**GEMMA2, "query_pre_attn_scalar": 24}, "query_pre_attn_scalar=24 differs from head_dim"),
    ("Gemma2ForCausalLM", {**GEMMA2, "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("Gemma2ForCausalLM", {**GEMMA2, "hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ("Gemma3ForCausalLM", {**GEMMA2, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                           "sliding_window_pattern": 4}, "layer_types"),  # transformers 4.x: no layer_types
    ("Gemma3ForCausalLM", {**GEMMA2, "attn_logit_softcapping": None}, "with logit softcapping"),
    ("Gemma3ForCausalLM", {**GEMMA2, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                           "rope_parameters": {"full_attention": {"rope_theta": 1e6},
                                               "sliding_attention": {"rope_theta": 1e5}}}, "sliding layers"),
    ("Phi3ForCausalLM", {"sliding_window": 2047}, "sliding_window=2047"),
    ("Phi3ForCausalLM", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope'"),
    ("Qwen3MoeForCausalLM", {**MOE, "norm_topk_prob": False}, "norm_topk_prob=False"),
    ("Qwen2MoeForCausalLM", {**MOE, "shared_expert_intermediate_size": 48, "mlp_only_layers": [1]}, "dense layers"),
    ("MixtralForCausalLM", {"num_experts_per_tok": 2}, "no usable expert count"),
])
def test_variants_llama_cpp_would_compute_otherwise_are_refused(architecture, fields, message):
    from d2merge.export.gguf import check_config

    with pytest.raises(D2MergeError, match=message) as caught:
        check_config(_arch_config(architecture, **fields), Path("config.json"))
    assert "\n" not in str(caught.value)


def test_sentencepiece_merges_llama_cpp_would_apply_differently_are_refused():
    """Scores from merge order are llama.cpp's only for a sentencepiece converter's merge list."""
    from d2merge.export.gguf import sentencepiece_scores

    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc"])}
    good = [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]  # every split of every token, token by token
    assert sentencepiece_scores(vocab, good, Path("tokenizer.json")) == {"ab": 0.0, "bc": -1.0, "abc": -2.0}
    with pytest.raises(D2MergeError, match="no merge 'ab' \\+ 'c'"):  # trained BPE: one split per token
        sentencepiece_scores(vocab, good[:3], Path("tokenizer.json"))
    with pytest.raises(D2MergeError, match="the merges that make 'abc' are not consecutive"):
        sentencepiece_scores(vocab, [("a", "b"), ("a", "bc"), ("b", "c"), ("ab", "c")], Path("tokenizer.json"))
    with pytest.raises(D2MergeError, match="no merge 'a' \\+ 'b'"):  # a token no merge makes, llama.cpp's pairing would
        sentencepiece_scores(vocab, good[1:], Path("tokenizer.json"))


def test_unsupported_sentencepiece_normalizer_refused(tmp_path):
    from tokenizers import normalizers

    write_sentencepiece_tokenizer(tmp_path, "llama")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["normalizer"] = json.loads(normalizers.NFKC().__getstate__())
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    import gguf

    from d2merge.export.gguf import add_tokenizer

    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    with pytest.raises(D2MergeError, match="normalizer \\['NFKC'\\]"):
        add_tokenizer(writer, tmp_path, 600)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a")  # a sentencepiece model alone: not read
    with pytest.raises(D2MergeError, match="not from tokenizer.model"):
        add_tokenizer(writer, tmp_path, 600)
