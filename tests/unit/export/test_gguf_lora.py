"""``d2merge convert --to gguf-lora``: llama.cpp's LoRA adapter GGUF.

Always: the file's metadata and tensor names are llama.cpp's, A/B have the orientation
llama.cpp's loader checks, and ``alpha / r * B @ A`` is the merge's update in the layout of the
base GGUF (q/k rows permuted as the base export permutes them). With llama-cpp-python
installed: llama.cpp runs base GGUF + adapter GGUF and its logits match the merged GGUF's.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from d2merge import merge
from d2merge.options.adapter_ops import ConvertOptions
from d2merge.errors import D2MergeError
from d2merge.export.gguf import convert_to_gguf_lora, permute_for_llama_cpp

gguf = pytest.importorskip("gguf")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


def _tensors(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("method", ["dora", "d2lora"])
def test_gguf_lora_layout_is_the_merge_update(method: str, tiny_bases: Any, make_adapter: Any, read_tensors: Any,
                                              tmp_path: Path) -> None:
    base = tiny_bases("llama")
    extra = {"tau": 0.5} if method == "d2lora" else {}
    adapter = make_adapter(base, method, target_modules=TARGETS, **extra)
    result = convert_to_gguf_lora(adapter, base, tmp_path / "adapter.gguf", ConvertOptions(to="gguf-lora"))
    reader, tensors = _tensors(result.out)
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    alpha = float(fields["adapter.lora.alpha"].parts[-1][0])
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"

    merge(base, adapter, tmp_path / "merged", dtype="fp32", hash_sources=False)
    merged, base_t = read_tensors(tmp_path / "merged"), read_tensors(base)
    config = json.loads((base / "config.json").read_text())
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    checked = 0
    for name in merged:
        if not name.endswith(tuple(f"{t}.weight" for t in TARGETS)):
            continue
        gguf_name = mapping.get_name(name, try_suffixes=(".weight",))
        a, b = tensors[f"{gguf_name}.lora_a"], tensors[f"{gguf_name}.lora_b"]
        rows, cols = merged[name].shape
        # PEFT's orientation: A (r, in), B (out, r); llama.cpp checks a.ne[0] == in, b.ne[1] == out
        assert a.shape[1] == cols and b.shape[0] == rows and a.shape[0] == b.shape[1]
        update = merged[name].double() - base_t[name].double()
        if name.endswith("q_proj.weight"):
            update = permute_for_llama_cpp(update, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            update = permute_for_llama_cpp(update, config["num_key_value_heads"])
        got = alpha / a.shape[0] * (b.astype(np.float64) @ a.astype(np.float64))
        assert np.abs(got - update.numpy()).max() <= 2e-5, name
        checked += 1
    assert checked == len(TARGETS) * config["num_hidden_layers"]


def test_gguf_lora_refusals(tiny_bases: Any, make_adapter: Any, tmp_path: Path) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora", target_modules=("q_proj",))
    with pytest.raises(D2MergeError, match="must end in .gguf"):
        convert_to_gguf_lora(adapter, base, tmp_path / "adapter.bin", ConvertOptions(to="gguf-lora"))
    gpt2 = tiny_bases("gpt2")
    with pytest.raises(D2MergeError, match="does not support architecture"):
        convert_to_gguf_lora(make_adapter(gpt2, "lora"), gpt2, tmp_path / "gpt2.gguf", ConvertOptions(to="gguf-lora"))
    assert not list(tmp_path.iterdir())


def test_convert_writes_what_to_asks_for_and_writers_refuse_another_target(tiny_bases: Any, make_adapter: Any,
                                                                           tmp_path: Path) -> None:
    """d2merge.convert dispatches on ConvertOptions.to; a writer handed another target refuses in one line."""
    import d2merge
    from d2merge.adapter_ops.convert import convert_to_lora
    from d2merge.errors import OptionError
    from d2merge.export.adapter_outputs import REGISTRY
    from d2merge.options.adapter_ops import CONVERT_TARGETS

    assert tuple(REGISTRY) == CONVERT_TARGETS
    base = tiny_bases("llama")
    adapter = make_adapter(base, "dora", target_modules=("q_proj",))
    as_gguf = d2merge.convert(adapter, base, tmp_path / "a.gguf", to="gguf-lora").out
    assert as_gguf.is_file() and as_gguf.read_bytes()[:4] == b"GGUF"
    as_lora = d2merge.convert(adapter, base, tmp_path / "as-lora").out
    assert json.loads((as_lora / "adapter_config.json").read_text())["peft_type"] == "LORA"
    made = set(tmp_path.iterdir())
    with pytest.raises(OptionError) as refused:
        convert_to_lora(adapter, base, tmp_path / "wrong", ConvertOptions(to="gguf-lora"))
    assert str(refused.value).startswith("to='gguf-lora' asks for another output than this function writes (lora)")
    assert "d2merge.extract with to='gguf-lora'" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(OptionError, match=r"to='lora' asks for another output .* \(gguf-lora\)"):
        convert_to_gguf_lora(adapter, base, tmp_path / "wrong.gguf", ConvertOptions())
    assert set(tmp_path.iterdir()) == made  # nothing written by either refusal


def test_combine_and_extract_write_the_registrys_targets(tiny_bases: Any, make_adapter: Any, cli_runner: Any,
                                                         read_tensors: Any, tmp_path: Path) -> None:
    """combine and extract with to='gguf-lora': the bytes convert writes from their LoRA folder; refusals first."""
    import d2merge
    from d2merge.adapter_ops.combine import combine as combine_lora
    from d2merge.errors import OptionError
    from d2merge.options.adapter_ops import CombineOptions, ExtractOptions

    base = tiny_bases("llama")
    first = make_adapter(base, "lora", seed=1, target_modules=("q_proj", "v_proj"))
    second = make_adapter(base, "lora", seed=2, target_modules=("q_proj", "down_proj"))
    inputs = [first, second]
    folder = d2merge.combine(inputs, tmp_path / "ab", [0.6, 0.4], combination="cat").out
    expected = d2merge.convert(folder, base, tmp_path / "via-convert.gguf", to="gguf-lora").out.read_bytes()
    combined = d2merge.combine(inputs, tmp_path / "ab.gguf", [0.6, 0.4], base=base, combination="cat", to="gguf-lora")
    assert combined.out == (tmp_path / "ab.gguf").resolve() and combined.out.read_bytes() == expected
    assert str(combined.out) in combined.describe()

    tuned = merge(base, first, tmp_path / "tuned").output
    options = ExtractOptions(rank=4)
    folder = d2merge.extract(base, tuned, tmp_path / "extracted", options).out
    expected = d2merge.convert(folder, base, tmp_path / "extracted-via-convert.gguf", to="gguf-lora").out.read_bytes()
    report = tmp_path / "extract.json"
    extracted = d2merge.extract(base, tuned, tmp_path / "extracted.gguf", options.with_overrides(to="gguf-lora"),
                                report=report)
    assert extracted.out.read_bytes() == expected
    assert json.loads(report.read_text())["out"] == str(extracted.out)
    pickled = tmp_path / "pickled-base"  # allow_pickle reaches the conversion's read of the base too
    shutil.copytree(base, pickled)
    torch.save(read_tensors(pickled), pickled / "pytorch_model.bin")
    for path in pickled.glob("*.safetensors*"):
        path.unlink()
    from_pickle = d2merge.extract(pickled, tuned, tmp_path / "from-pickle.gguf", options.with_overrides(to="gguf-lora"),
                                  allow_pickle=True)
    assert from_pickle.out.read_bytes() == expected

    result = cli_runner(["combine", str(first), str(second), "--weights", "1,1", "--combination", "cat", "--base",
                         str(base), "--to", "gguf-lora", "-o", str(tmp_path / "cli.gguf")])
    assert result.code == 0, result.err
    assert (tmp_path / "cli.gguf").read_bytes()[:4] == b"GGUF" and "cli.gguf" in result.out

    made = set(tmp_path.iterdir())
    with pytest.raises(OptionError, match=r"^to='gguf-lora' writes a file for one base model, and combine was given "
                                          r"none \(name the base"):
        d2merge.combine(inputs, tmp_path / "x.gguf", [1, 1], combination="cat", to="gguf-lora")
    with pytest.raises(D2MergeError, match="a GGUF output must end in .gguf"):
        d2merge.combine(inputs, tmp_path / "x", [1, 1], base=base, combination="cat", to="gguf-lora")
    with pytest.raises(D2MergeError, match="already exists"):
        d2merge.extract(base, tuned, tmp_path / "extracted.gguf", options.with_overrides(to="gguf-lora"))
    with pytest.raises(OptionError, match=r"to='gguf-lora' asks for another output .* \(lora\)"):
        combine_lora(inputs, tmp_path / "y", [1, 1], CombineOptions(combination="cat", to="gguf-lora"))
    refused = cli_runner(["extract", str(base), str(tuned), "--rank", "4", "--to", "gguf-lora", "-o",
                          str(tmp_path / "z.safetensors")])
    assert refused.code == 2 and len(refused.err.strip().splitlines()) == 1 and ".gguf" in refused.err
    assert set(tmp_path.iterdir()) == made  # nothing written by a refusal


llama_cpp_only = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python is not installed (extra gguf-llama)")


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
def test_llama_cpp_base_plus_adapter_matches_the_merged_gguf(smollm2: Path, tmp_path: Path) -> None:
    import llama_cpp

    from d2merge.export.gguf import export_gguf, merge_to_gguf
    from d2merge.synthetic import save_random_adapter, save_tiny_base

    base = save_tiny_base(tmp_path / "base", "llama", vocab_size=49152, tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, base / name)
    adapter = save_random_adapter(base, tmp_path / "adapter", "dora", r=4, target_modules=TARGETS)
    base_gguf = export_gguf(base, tmp_path / "base.gguf", gguf_type="f32").output
    _, merged = merge_to_gguf(base, adapter, tmp_path / "merged.gguf", gguf_type="f32")
    lora = convert_to_gguf_lora(adapter, base, tmp_path / "adapter.gguf", ConvertOptions(to="gguf-lora")).out
    ids = [int(i) for i in torch.randint(0, 49152, (12,), generator=torch.Generator().manual_seed(3))]
    f32 = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    logits = {}
    for key, kwargs in (("merged", {"model_path": str(merged.output)}),
                        ("lora", {"model_path": str(base_gguf), "lora_path": str(lora)}),
                        ("base", {"model_path": str(base_gguf)})):
        llm = llama_cpp.Llama(n_ctx=64, n_threads=1, verbose=False, logits_all=True, **f32, **kwargs)
        llm.eval(ids)
        logits[key] = np.array(llm.scores[: len(ids)])
        llm.close()
    scale = float(np.abs(logits["merged"]).max())
    gap = float(np.abs(logits["lora"] - logits["merged"]).max())
    change = float(np.abs(logits["base"] - logits["merged"]).max())
    print(f"llama.cpp base+adapter vs merged: max |logit diff| {gap:.3g}; the adapter moves logits by {change:.3g}")
    assert gap <= 1e-4 * max(1.0, scale)
    assert change > 100 * gap  # the adapter is applied, not ignored


def _peft_embedding_adapter(base: Path, folder: Path, seed: int) -> Path:
    """A PEFT LoRA on the input embedding and q_proj (PEFT's own lora_embedding_A/B), random factors."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    return folder


def test_embedding_lora_is_token_embd_in_llama_cpp_layout(tiny_bases: Any, read_tensors: Any,
                                                          tmp_path: Path) -> None:
    pytest.importorskip("peft")
    base = tiny_bases("llama")  # its lm_head is its own tensor (tie_word_embeddings false)
    adapter = _peft_embedding_adapter(base, tmp_path / "emb", 5)
    result = convert_to_gguf_lora(adapter, base, tmp_path / "emb.gguf", ConvertOptions(to="gguf-lora"))
    reader, tensors = _tensors(result.out)
    alpha = float({f.name: f for f in reader.fields.values()}["adapter.lora.alpha"].parts[-1][0])
    merge(base, adapter, tmp_path / "merged", dtype="fp32", hash_sources=False)
    name = "model.embed_tokens.weight"
    update = read_tensors(tmp_path / "merged")[name].double() - read_tensors(base)[name].double()  # (vocab, dim)
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    # llama.cpp's token_embd layout: lora_a (vocab, r) = A^T, lora_b (dim, r); row t gains scale * B @ A[:, t]
    assert a.shape == (update.shape[0], b.shape[1]) and b.shape[0] == update.shape[1]
    got = alpha / a.shape[1] * (a.astype(np.float64) @ b.astype(np.float64).T)
    assert np.abs(got - update.numpy()).max() <= 2e-5


def test_embedding_lora_of_a_tied_base_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from d2merge.synthetic import save_tiny_base

    base = save_tiny_base(tmp_path / "tied", "llama", tie_word_embeddings=True, tokenizer=False)
    adapter = _peft_embedding_adapter(base, tmp_path / "emb", 6)
    with pytest.raises(D2MergeError, match="tied to it: llama.cpp would apply its LoRA to the tied output layer"):
        convert_to_gguf_lora(adapter, base, tmp_path / "emb.gguf", ConvertOptions(to="gguf-lora"))
    assert not (tmp_path / "emb.gguf").exists()


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
def test_llama_cpp_applies_an_embedding_lora_as_the_merge(smollm2: Path, tmp_path: Path) -> None:
    import llama_cpp

    from d2merge.export.gguf import export_gguf, merge_to_gguf
    from d2merge.synthetic import save_tiny_base

    pytest.importorskip("peft")
    base = save_tiny_base(tmp_path / "base", "llama", vocab_size=49152, tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, base / name)
    adapter = _peft_embedding_adapter(base, tmp_path / "emb", 7)
    base_gguf = export_gguf(base, tmp_path / "base.gguf", gguf_type="f32").output
    _, merged = merge_to_gguf(base, adapter, tmp_path / "merged.gguf", gguf_type="f32")
    lora = convert_to_gguf_lora(adapter, base, tmp_path / "adapter.gguf", ConvertOptions(to="gguf-lora")).out
    ids = [int(i) for i in torch.randint(0, 49152, (12,), generator=torch.Generator().manual_seed(4))]
    f32 = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    logits = {}
    for key, kwargs in (("merged", {"model_path": str(merged.output)}),
                        ("lora", {"model_path": str(base_gguf), "lora_path": str(lora)}),
                        ("base", {"model_path": str(base_gguf)})):
        llm = llama_cpp.Llama(n_ctx=64, n_threads=1, verbose=False, logits_all=True, **f32, **kwargs)
        llm.eval(ids)
        logits[key] = np.array(llm.scores[: len(ids)])
        llm.close()
    scale = float(np.abs(logits["merged"]).max())
    gap = float(np.abs(logits["lora"] - logits["merged"]).max())
    change = float(np.abs(logits["base"] - logits["merged"]).max())
    print(f"llama.cpp embedding LoRA vs merged: max |logit diff| {gap:.3g}; the adapter moves logits by {change:.3g}")
    assert gap <= 1e-4 * max(1.0, scale)
    assert change > 100 * gap
