"""onnxruntime-genai builds (export-onnx --runtime genai): token for token against transformers in
fp32, int4 gated by its measured floors, and one-line refusals that leave nothing behind.

The tiny bases of conftest have a head size of 8, which onnxruntime's CPU GroupQueryAttention
kernel refuses (it needs a multiple of 16), so the builds here use the same tiny Llama and Qwen2
with hidden size 64 (head size 16); the conftest bases serve as the refused case.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")

from d2merge.export.onnx_genai import (  # noqa: E402
    GENAI_CONFIG,
    INT4_MIN_TOP1,
    GenaiCausalLM,
    Int4Options,
    export_genai,
)
from d2merge.errors import D2MergeError  # noqa: E402
from d2merge.synthetic import save_tiny_base  # noqa: E402
from helpers import assert_one_line_error  # noqa: E402

TINY_PROMPTS = ["the cat is red and the dog is", "which one is big", "yes no true false one two three"]
REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("wide")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = save_tiny_base(root / arch, arch, hidden_size=64, num_heads=4, num_kv_heads=2)
        return made[arch]

    return get


def _prompt_ids(folder: Path, prompts: list[str]) -> list[list[int]]:
    # The tokenizer file itself: transformers 5 maps a qwen2 folder to Qwen2Tokenizer, which does
    # not read the tiny word-level tokenizer the way it was written.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [tokenizer.encode(text).ids for text in prompts]


def _expected_greedy(folder_or_model: Path | torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = folder_or_model
    if isinstance(folder_or_model, Path):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    settings = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos,
                                pad_token_id=model.generation_config.pad_token_id or eos)
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), generation_config=settings)[0].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_build_generates_token_for_token(wide_base, tmp_path: Path, arch: str) -> None:
    torch.set_num_threads(1)
    base = wide_base(arch)
    prompts = _prompt_ids(base, TINY_PROMPTS)
    result = export_genai(base, tmp_path / "genai", precision="fp32", greedy_prompts=prompts)
    assert result.validation is not None and result.validation.passed
    assert result.validation.max_abs_diff <= 1e-4 and result.validation.top1_agreement == 1.0
    assert result.validation.greedy_tokens_equal == result.validation.greedy_tokens_compared > 0
    assert {"model.onnx", GENAI_CONFIG} <= set(result.files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai"]  # no temp folder left beside it
    # Independently of the built-in check: the Generator's greedy tokens equal generate()'s.
    model = GenaiCausalLM(tmp_path / "genai")
    for prompt in prompts:
        assert model.greedy(prompt, 10) == _expected_greedy(base, prompt, 10)


def test_int4_build_reports_agreement_against_fp32(wide_base, tmp_path: Path) -> None:
    result = export_genai(wide_base("llama"), tmp_path / "int4", precision="int4")
    validation = result.validation
    assert validation is not None and validation.passed and validation.tolerance is None
    assert INT4_MIN_TOP1 <= validation.top1_agreement < 1.0  # int4 rounding is visible, and bounded
    assert 0 < validation.max_abs_diff < validation.reference_max_abs
    assert "top-1 agreement" in result.describe()


def test_int4_options_reach_the_graph(wide_base, tmp_path: Path, cli_runner) -> None:
    """Block size, symmetry and the algorithm's int8 lm_head are what the built MatMulNBits nodes say."""
    import onnx

    res = cli_runner(["export-onnx", wide_base("llama"), "-o", tmp_path / "g", "--runtime", "genai", "--precision",
                      "int4", "--int4-block-size", "16", "--int4-algorithm", "rtn_last", "--int4-asymmetric",
                      "--no-validate"])
    assert res.code == 0, res.err
    graph = onnx.load(str(tmp_path / "g" / "model.onnx"), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert nodes and {a["block_size"] for a in attrs} == {16}
    assert all(len(n.input) >= 4 and n.input[3] for n in nodes)  # a zero point per block: uint4
    bits = {n.name: a["bits"] for n, a in zip(nodes, attrs)}
    assert [name for name, b in bits.items() if b == 8] == [n for n in bits if "lm_head" in n]  # rtn_last
    refused = cli_runner(["export-onnx", wide_base("llama"), "-o", tmp_path / "x", "--int4-block-size", "64"])
    assert refused.code == 2 and "--int4-block-size does nothing here: it applies only with --runtime genai and --precision int4" in refused.err
    with pytest.raises(D2MergeError, match="int4 settings apply to precision int4"):
        export_genai(wide_base("llama"), tmp_path / "y", precision="fp16", int4=Int4Options())
    with pytest.raises(D2MergeError, match="block size 48"):
        Int4Options(block_size=48)


def test_genai_adapter_gives_transformers_logits_at_real_tokens(wide_base, tmp_path: Path) -> None:
    """The model-like object verify uses: left-padded rows, logits at real positions only."""
    from transformers import AutoModelForCausalLM

    base = wide_base("qwen2")
    export_genai(base, tmp_path / "g", precision="fp32", validate=False)
    ids = torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    logits = GenaiCausalLM(tmp_path / "g")(input_ids=ids, attention_mask=mask).logits
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        row0 = reference(ids[:1]).logits[0]
        row1 = reference(ids[1:, 2:]).logits[0]
    np.testing.assert_allclose(logits[0].numpy(), row0.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits[1, 2:].numpy(), row1.numpy(), atol=1e-4)
    assert not logits[1, :2].any()


def _assert_one_line_refusal(result, *needles: str) -> None:
    assert_one_line_error(result.code, result.out, result.err, *needles)


def test_cli_builds_and_refuses_generic_options(cli_runner, wide_base, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = cli_runner(["export-onnx", wide_base("llama"), "-o", out, "--runtime", "genai", "--precision", "fp32"])
    assert done.code == 0, done.err
    assert "passed" in done.out and (out / GENAI_CONFIG).is_file()
    refused = cli_runner(["export-onnx", wide_base("llama"), "-o", tmp_path / "x", "--runtime", "genai",
                          "--with-past"])
    assert refused.code == 2 and "--with-past" in refused.err and not (tmp_path / "x").exists()


def test_architecture_the_builder_refuses(cli_runner, tiny_bases, tmp_path: Path) -> None:
    result = cli_runner(["export-onnx", tiny_bases("gpt2"), "-o", tmp_path / "out", "--runtime", "genai"])
    _assert_one_line_refusal(result, "does not support architecture GPT2LMHeadModel")
    assert list(tmp_path.iterdir()) == []


def test_head_size_the_cpu_kernel_refuses(cli_runner, tiny_bases, tmp_path: Path) -> None:
    result = cli_runner(["export-onnx", tiny_bases("llama"), "-o", tmp_path / "out", "--runtime", "genai"])
    _assert_one_line_refusal(result, "head_size", "multiple of 16")
    assert list(tmp_path.iterdir()) == []


def test_missing_extra(cli_runner, wide_base, make_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # makes `import onnxruntime_genai` fail
    result = cli_runner(["export-onnx", wide_base("llama"), "-o", tmp_path / "out", "--runtime", "genai"])
    _assert_one_line_refusal(result, "onnxruntime-genai is not installed", "d2merge[genai]")
    assert list(tmp_path.iterdir()) == []
    adapter = make_adapter(wide_base("llama"), "lora")
    result = cli_runner(["merge", wide_base("llama"), adapter, "-o", tmp_path / "out", "--format", "onnx-genai"])
    _assert_one_line_refusal(result, "onnxruntime-genai is not installed")  # before any merge work
    assert list(tmp_path.iterdir()) == []
    build = tmp_path / "build"
    build.mkdir()
    (build / GENAI_CONFIG).write_text("{}")
    result = cli_runner(["verify", wide_base("llama"), adapter, build])
    _assert_one_line_refusal(result, "onnxruntime-genai is not installed")


@pytest.mark.parametrize("make", ["empty", "adapter", "no-weights"])
def test_folder_that_is_not_a_merged_model(cli_runner, wide_base, make_adapter, tiny_bases, tmp_path: Path,
                                           make: str) -> None:
    if make == "empty":
        source = tmp_path / "empty"
        source.mkdir()
    elif make == "adapter":
        source = make_adapter(tiny_bases("llama"), "lora")
    else:
        source = tmp_path / "no-weights"
        source.mkdir()
        (source / "config.json").write_text((wide_base("llama") / "config.json").read_text())
    out = tmp_path / "out"
    result = cli_runner(["export-onnx", source, "-o", out, "--runtime", "genai"])
    _assert_one_line_refusal(result, str(source))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.slow
def test_smollm2_fp32_build_generates_token_for_token(smollm2: Path, tmp_path: Path) -> None:
    """The real model (bf16 folder, tied embeddings): built in fp32, greedy on real prompts."""
    torch.set_num_threads(1)
    prompts = _prompt_ids(smollm2, REAL_PROMPTS)
    result = export_genai(smollm2, tmp_path / "smol", precision="fp32", greedy_prompts=prompts)
    validation = result.validation
    assert validation is not None and validation.passed, validation
    assert validation.greedy_tokens_compared >= 3 * 8
    # Every compared token equal, except at most one accepted near tie per prompt.
    assert validation.greedy_tokens_equal >= validation.greedy_tokens_compared - validation.greedy_ties


@pytest.mark.slow
def test_smollm2_generic_onnx_with_past_generates_token_for_token(smollm2: Path, tmp_path: Path) -> None:
    """Issue 9's check on the real model: the generic graph with past, greedy in ONNX Runtime.

    Also the case that needs the fp32 bound relative to the logits' scale (logits reach ~30 here).
    """
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    from d2merge.export.onnx import export_onnx, greedy_generate_onnx

    torch.set_num_threads(1)
    result = export_onnx(smollm2, tmp_path / "smol.onnx", with_past=True, exporter="legacy")
    assert result.passed and result.max_abs_diff <= result.tolerance
    # One model and one session for the three prompts: loading either is seconds on the real model.
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    for prompt in _prompt_ids(smollm2, REAL_PROMPTS):
        expected = _expected_greedy(model, prompt, 12)
        tokens = greedy_generate_onnx(result.onnx_path, [prompt], 12, eos_token_id=2, pad_token_id=2, session=session)
        assert tokens[0].tolist() == expected


def test_merge_format_onnx_genai(cli_runner, wide_base, make_adapter, tmp_path: Path) -> None:
    """merge --format onnx-genai takes export-onnx's --int4-* flags: they reach the built graph."""
    import onnx

    from d2merge.export.formats import merge_as

    base = wide_base("llama")
    adapter = make_adapter(base, "d2lora", target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "merged-genai"
    done = cli_runner(["merge", base, adapter, "-o", out, "--format", "onnx-genai", "--precision", "int4",
                       "--int4-block-size", "16", "--int4-algorithm", "rtn_last", "--int4-asymmetric"])
    assert done.code == 0, done.err
    assert "[onnx-genai]" in done.out and "top-1 agreement" in done.out and (out / GENAI_CONFIG).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged-genai"]  # the fp32 scratch merge is gone
    nodes = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert nodes and {a["block_size"] for a in attrs} == {16}  # the builder's default is 32
    assert all(len(n.input) >= 4 and n.input[3] for n in nodes)  # --int4-asymmetric: a zero point per block
    assert [n.name for n, a in zip(nodes, attrs) if a["bits"] == 8] == [n.name for n in nodes if "lm_head" in n.name]
    refused = cli_runner(["merge", base, adapter, "-o", tmp_path / "x", "--precision", "int4"])
    assert refused.code == 2 and "--format onnx-genai" in refused.err and not (tmp_path / "x").exists()
    refused = cli_runner(["merge", base, adapter, "-o", tmp_path / "x", "--format", "onnx-genai",
                          "--int4-block-size", "64"])  # fp32 build: the flag would do nothing
    assert refused.code == 2 and "--precision int4" in refused.err and not (tmp_path / "x").exists()
    with pytest.raises(D2MergeError, match="genai_int4 settings apply only with format='onnx-genai' and genai_precision='int4'"):
        merge_as(base, adapter, tmp_path / "x", format="hf", genai_int4=Int4Options())


# ----- verify and bench take a genai build ------------------------------------------------------


@pytest.fixture(scope="module")
def wide_merge(wide_base, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base, D2-LoRA adapter, fp32 merged folder) on the wide tiny Llama."""
    from d2merge.api import merge
    from d2merge.synthetic import save_random_adapter

    root = tmp_path_factory.mktemp("wide-merge")
    base = wide_base("llama")
    adapter = save_random_adapter(base, root / "adapter", "d2lora", r=4,
                                  target_modules=("q_proj", "v_proj", "down_proj"))
    merged = merge(base, adapter, root / "merged", dtype="fp32", hash_sources=False).output
    return base, adapter, merged


def test_verify_gates_a_genai_build_and_overwrite_follows_merge(wide_merge, cli_runner, tmp_path: Path) -> None:
    import json

    base, adapter, merged = wide_merge
    out = tmp_path / "genai"
    export_genai(base, out, precision="fp32", validate=False)  # the base, not the merge: a wrong build
    wrong = cli_runner(["verify", base, adapter, out, "--num-probes", "2", "--probe-length", "8"])
    assert wrong.code == 1 and "genai-fp32: logit check" in wrong.err, wrong.err
    refused = cli_runner(["export-onnx", merged, "-o", out, "--runtime", "genai"])
    _assert_one_line_refusal(refused, "output already exists")
    done = cli_runner(["export-onnx", merged, "-o", out, "--runtime", "genai", "--overwrite"])
    assert done.code == 0, done.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai"]
    report = tmp_path / "verify.json"
    right = cli_runner(["verify", base, adapter, out, "--num-probes", "2", "--probe-length", "8", "--report", report])
    assert right.code == 0, right.err + right.out
    column = json.loads(report.read_text())["results"][0]
    assert column["dtype"] == "genai-fp32" and column["passed"] and column["layers"] == []
    assert len(column["not_checked"]) > 0 and column["logits"]["max_abs_diff"] <= 1e-4
    assert "tensors by logits only" in right.out


def test_merge_format_onnx_genai_overwrite_replaces_only_its_own_output(cli_runner, wide_merge, tmp_path: Path) -> None:
    base, adapter, _ = wide_merge
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = cli_runner(["merge", base, adapter, "-o", foreign, "--format", "onnx-genai", "--overwrite"])
    assert refused.code == 2 and (foreign / "notes.txt").read_text() == "mine", refused.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


def test_bench_measures_genai_beside_the_other_variants(wide_merge, tmp_path: Path) -> None:
    from d2merge.bench import BenchSettings, bench
    from d2merge.export.onnx import export_onnx

    base, adapter, merged = wide_merge
    # the generic graph with the (much faster) legacy exporter; the genai build is bench's own
    onnx = export_onnx(merged, tmp_path / "generic", exporter="legacy", validate=False).onnx_path
    settings = BenchSettings(batch_sizes=(1,), seq_lens=(8,), decode_prompt_len=8, decode_tokens=4, warmup=1,
                             repeats=2)
    report = bench(base, adapter, merged=merged, onnx=onnx, variants=("base", "unmerged", "merged", "onnx", "genai"),
                   settings=settings)
    cells = {(r.variant, r.mode) for r in report.rows}
    for variant in ("base", "unmerged", "merged", "genai"):
        assert (variant, "prefill") in cells and (variant, "decode") in cells, variant
    assert ("onnx", "prefill") in cells and report.meta["genai_precision"] == "int4"
    assert all(r.tokens_per_s > 0 for r in report.rows)
    ratios = [entry for entry in report.ratios() if "genai_over_pytorch" in entry]
    assert {entry["mode"] for entry in ratios} == {"prefill", "decode"}
    assert "genai/pytorch" in report.table()
