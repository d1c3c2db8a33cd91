"""Quantized bases (issue 31): the dequantizer bit for bit against bitsandbytes, merges of PEFT adapters
trained over bitsandbytes 4-/8-bit and FP8 bases against an fp64 reference, verify over them.

bitsandbytes is the oracle here only (a dev dependency); d2merge never imports it.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from d2merge.io.quantized import dequantize_4bit, dequantize_fp8, dequantize_int8, nested_absmax

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

LAYOUTS = {  # name -> BitsAndBytesConfig arguments, as QLoRA users write them
    "nf4-dq-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]
SMOL_VOCAB = 49152


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def bnb_dequantize_4bit(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """bitsandbytes' generic 4-bit dequantization (its ``backends/default`` op, eager), the formula its CUDA
    kernel computes and QLoRA trained on.

    Not ``BF.dequantize_4bit`` alone: on a CPU with AVX512, bitsandbytes 0.50's native CPU kernel returns
    other values whenever a quantization block does not line up with a row (measured on this machine: nf4
    and fp4 weights of shape (64, 48) off by up to 0.08 in 2694 of 3072 values; every block-size-32 tensor),
    so that oracle would depend on the machine running the tests.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # no torch.compile
    absmax = state.absmax
    if state.nested:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.view(torch.uint8).reshape(-1)
    return compute(flat, absmax.float(), _get_4bit_code(state.quant_type, flat.device), state.blocksize,
                   state.shape, state.dtype)

# bitsandbytes' native CPU kernel is the oracle as well where it is not the AVX512 one (see above).
NATIVE_KERNEL_AGREES = torch.backends.cpu.get_cpu_capability() != "AVX512"


def _same_bits(ours: torch.Tensor, expected: torch.Tensor, quant_type: str) -> bool:
    """Bit for bit; for fp4 the sign of a zero aside (its code 8 is -0.0 in bitsandbytes' kernels, +0.0 in
    its generic table; a zero's sign changes no sum). ``quant_type``: nf4, fp4, or another layout's name."""
    return torch.equal(ours, expected) if quant_type == "fp4" else torch.equal(_bits(ours), _bits(expected))


# ---- the dequantizer, tensors in and out ---------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double", [False, True])
def test_4bit_dequantize_is_bitsandbytes_bit_for_bit(quant_type: str, dtype: torch.dtype, double: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import d2merge.io.quantized

    monkeypatch.setattr(d2merge.io.quantized, "_CHUNK", 256)  # many chunks, as a real weight has
    g = torch.Generator().manual_seed(0)
    for blocksize, shape in ((64, (48, 64)), (128, (33, 40)), (256, (7, 300)), (32, (24, 16)), (4096, (70, 100))):
        w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double)
            expected = bnb_dequantize_4bit(packed, state)
            native = BF.dequantize_4bit(packed, state)
        if double:
            absmax = nested_absmax(state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize,
                                   float(state.offset))
        else:
            absmax = state.absmax
        ours = dequantize_4bit(packed, absmax, quant_type, blocksize, shape, dtype)
        assert ours.dtype == expected.dtype == dtype
        assert _same_bits(ours, expected, quant_type), (blocksize, shape, (ours.float() - expected.float()).abs().max())
        if NATIVE_KERNEL_AGREES:
            # the native kernel writes fp4's code 8 as -0.0 (bit for bit with ours); odd in-features take the generic path
            same = torch.equal(_bits(ours), _bits(native)) if shape[-1] % 2 == 0 else torch.equal(ours, native)
            assert same, (blocksize, shape, (ours.float() - native.float()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dequantize_is_bitsandbytes_training_matmul(dtype: torch.dtype) -> None:
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        codes, scb, _ = BF.int8_vectorwise_quant(w)
    # bitsandbytes' MatMul8bitFp (its CPU training path) builds the weight exactly like this
    expected = codes.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    ours = dequantize_int8(codes, scb, dtype)
    assert torch.equal(_bits(ours), _bits(expected))
    if dtype == torch.float32:  # the tempting formula is not bitsandbytes' (bf16 rounding hides it here)
        assert not torch.equal((codes.float() * scb.unsqueeze(1) / 127), ours)


def test_fp8_dequantize_partial_blocks_against_fp64_and_transformers() -> None:
    g = torch.Generator().manual_seed(2)
    for shape in ((300, 200), (256, 384)):
        codes = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
        scale = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=g) * 1e-3 + 1e-5
        ours = dequantize_fp8(codes, scale, (128, 128), torch.float32)
        ref = codes.double().clone()
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= float(scale[i, j])
        assert torch.equal(ours, ref.float())  # one fp32 product of two exact values: the fp64 value rounded once
        if shape[0] % 128 == 0 and shape[1] % 128 == 0:
            from transformers.integrations.finegrained_fp8 import Fp8Dequantize

            theirs = Fp8Dequantize(None)._dequantize_one(codes, scale, torch.bfloat16)
            assert torch.equal(_bits(dequantize_fp8(codes, scale, (128, 128), torch.bfloat16)), _bits(theirs))
    per_tensor = dequantize_fp8(codes, torch.tensor([0.5]), None, torch.float32)
    assert torch.equal(per_tensor, codes.float() * 0.5)


# ---- quantized tiny models, PEFT adapters over them, merges -------------------------------------


class QuantizedModels:
    """Tiny bf16 Llama/Qwen2 bases quantized by transformers + bitsandbytes on CPU, and PEFT adapters over them."""

    def __init__(self, root: Path, tiny_bases: Any):
        self.root, self.tiny_bases = root, tiny_bases
        self.smollm2 = Path()  # set by the tests that build "llama-bpe"
        self._made: dict[tuple[str, ...], Path] = {}

    def source(self, arch: str) -> Path:
        """The 16-bit original; ``llama-bpe``: with SmolLM2's byte-level BPE tokenizer (GGUF needs one)."""
        if arch != "llama-bpe":
            return self.tiny_bases(arch, dtype=torch.bfloat16)
        folder = self.root / "llama-bpe-bf16"
        if not folder.exists():
            from d2merge.synthetic import save_tiny_base

            save_tiny_base(folder, "llama", dtype=torch.bfloat16, vocab_size=SMOL_VOCAB, tokenizer=False)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (self.smollm2 / name).is_file():
                    (folder / name).write_bytes((self.smollm2 / name).read_bytes())
        return folder

    def base(self, arch: str, layout: str) -> Path:
        key = ("base", arch, layout)
        if key not in self._made:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            source = self.source(arch)
            folder = self.root / f"{arch}-{layout}"
            if layout == "fp8":
                _write_fp8(source, folder)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = AutoModelForCausalLM.from_pretrained(
                        source, quantization_config=BitsAndBytesConfig(**LAYOUTS[layout]), dtype=torch.bfloat16,
                        device_map="cpu")
                    model.save_pretrained(folder)
                for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                    if (source / name).exists():
                        (folder / name).write_bytes((source / name).read_bytes())
            self._made[key] = folder
        return self._made[key]

    def adapter(self, arch: str, layout: str, method: str = "lora") -> Path:
        key = ("adapter", arch, layout, method)
        if key not in self._made:
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            base = self.base(arch, layout)
            source = self.source(arch) if layout == "fp8" else base
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(source, device_map="cpu")
                torch.manual_seed(0)
                peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                              init_lora_weights=False, use_dora=method == "dora"))
            with torch.no_grad():  # a trained adapter's size of update, not init_lora_weights=False's
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name:
                        param.mul_(0.1)
            folder = self.root / f"adapter-{arch}-{layout}-{method}"
            peft_model.save_pretrained(folder)
            config = json.loads((folder / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = str(base)
            (folder / "adapter_config.json").write_text(json.dumps(config))
            self._made[key] = folder
        return self._made[key]


def _write_fp8(source: Path, folder: Path) -> None:
    """An FP8 block-scaled checkpoint as DeepSeek-V3 / Qwen3-FP8 store it; 128x128 blocks, all partial here."""
    from d2merge.io.checkpoint import open_base
    from d2merge.io.safetensors_file import save_tensors

    base = open_base(source)
    tensors: dict[str, torch.Tensor] = {}
    for name in base.tensors.keys():
        t = base.tensors.read(name).clone()
        if name.endswith("_proj.weight"):
            scale = (t.float().abs().amax() / 448).reshape(1, 1).expand(-(-t.shape[0] // 128),
                                                                       -(-t.shape[1] // 128)).clone()
            tensors[name] = (t.float() / scale[0, 0]).to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = scale
        else:
            tensors[name] = t
    folder.mkdir(parents=True)
    save_tensors(folder / "model.safetensors", tensors, {"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (source / name).exists():
            (folder / name).write_bytes((source / name).read_bytes())


@pytest.fixture(scope="session")
def quantized(tmp_path_factory: pytest.TempPathFactory, tiny_bases: Any) -> QuantizedModels:
    return QuantizedModels(tmp_path_factory.mktemp("quantized"), tiny_bases)


def _reference_weights(folder: Path, layout: str) -> dict[str, torch.Tensor]:
    """Every weight of a quantized checkpoint as bitsandbytes (or the FP8 formula) dequantizes it: the oracle."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        for name in keys:
            leaf = name.rsplit(".", 1)[-1]
            if layout.startswith(("nf4", "fp4")) and name + ".absmax" in keys:
                parts = {k[len(name) + 1:]: f.get_tensor(k) for k in keys if k.startswith(name + ".")}
                state = BF.QuantState.from_dict(parts, device=torch.device("cpu"))
                out[name] = bnb_dequantize_4bit(f.get_tensor(name), state)
            elif layout == "int8" and name.endswith(".weight") and name.replace(".weight", ".SCB") in keys:
                scb = f.get_tensor(name.replace(".weight", ".SCB"))
                out[name] = f.get_tensor(name).to(torch.bfloat16).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
            elif layout == "fp8" and name + "_scale_inv" in keys:
                codes, scale = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
                out[name] = (codes.double() * float(scale[0, 0])).to(torch.bfloat16)
            elif not any(name.startswith(w + ".") for w in keys) and leaf not in ("SCB", "weight_format",
                                                                                   "weight_scale_inv"):
                out[name] = f.get_tensor(name)
    return out


def _fp64_merge(reference: dict[str, torch.Tensor], adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """W + (alpha/r) B A (LoRA) or DoRA's formula, all in fp64 over the oracle's weights, with the
    magnitude the fp32 arithmetic works at (|W| + s|B||A|: where terms cancel, an ulp of the result is no measure)."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    merged = {}
    for key in [k for k in factors if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = factors[key].double(), factors[key.replace("lora_A", "lora_B")].double()
        w = reference[module + ".weight"].double()
        delta = scale * (b @ a)
        updated, size = w + delta, w.abs() + scale * (b.abs() @ a.abs())
        magnitude_key = key.replace("lora_A.weight", "lora_magnitude_vector")
        if magnitude_key in factors:
            factor = factors[magnitude_key].double()[:, None] / updated.norm(dim=1, keepdim=True)
            updated, size = updated * factor, size * factor.abs()
        merged[module + ".weight"] = (updated, size)
    return merged


def _ulps(got: torch.Tensor, exact: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> float:
    """Error in ulps of ``dtype``: of the result in bf16 (one rounding), of the terms' size in fp32 (the arithmetic)."""
    from d2merge.verify.limits import ulp

    value, size = exact
    return float(((got.double() - value) / ulp(value if dtype != torch.float32 else size, dtype)).abs().max())


def _merge(cli_runner: Callable[..., Any], base: Path, adapter: Path, out: Path, *extra: str) -> Any:
    result = cli_runner(["merge", str(base), str(adapter), "-o", str(out), "--no-hash-sources", *extra])
    assert result.code == 0, result.err
    return result


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout, method", [
    ("llama", "nf4-dq-bf16", "lora"), ("llama", "nf4-dq-bf16", "dora"), ("llama", "fp4", "lora"),
    ("llama", "int8", "lora"), ("qwen2", "nf4-dq-bf16", "lora"), ("llama", "fp8", "lora"),
])
def test_merge_over_a_quantized_base_is_exact(quantized: QuantizedModels, cli_runner: Callable[..., Any],
                                               read_tensors: Callable[[Path], dict[str, torch.Tensor]],
                                               tmp_path: Path, arch: str, layout: str, method: str) -> None:
    base, adapter = quantized.base(arch, layout), quantized.adapter(arch, layout, method)
    reference = _reference_weights(base, layout)
    exact = _fp64_merge(reference, adapter)
    # half an ulp, plus what the fp32 arithmetic (2^-24 relative) may add where the exact value is a tie
    for dtype, flag, limit in ((torch.bfloat16, [], 0.5 + 2**-10), (torch.float32, ["--dtype", "fp32"], 4.0)):
        out = tmp_path / f"merged-{dtype}"
        result = _merge(cli_runner, base, adapter, out, *flag)
        assert "dequantized" in result.err or "dequantized" in result.out
        merged = read_tensors(out)
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config
        assert set(merged) == set(reference)  # every quantization-state tensor consumed, none copied
        for name, tensor in merged.items():
            assert tensor.dtype == dtype, name
            if name in exact:
                assert _ulps(tensor, exact[name], dtype) <= limit, name
            elif reference[name].dtype == dtype:
                assert _same_bits(tensor, reference[name], layout), name  # untouched: exact
            else:
                assert torch.equal(tensor, reference[name].to(dtype)), name


def _quiet_verify(cli_runner: Callable[..., Any], *args: str) -> Any:
    return cli_runner(["verify", *args, "--num-probes", "4", "--probe-length", "16"])


@pytest.mark.slow
def test_verify_passes_a_merge_over_nf4_and_fails_a_corrupted_one(quantized: QuantizedModels, tmp_path: Path,
                                                                    cli_runner: Callable[..., Any]) -> None:
    from faults import scale_tensor

    base, adapter = quantized.base("llama", "nf4-dq-bf16"), quantized.adapter("llama", "nf4-dq-bf16")
    out = tmp_path / "merged"
    _merge(cli_runner, base, adapter, out)
    original = quantized.source("llama")
    good = _quiet_verify(cli_runner, str(base), str(adapter), str(out), "--original-base", str(original))
    assert good.code == 0, good.out + good.err
    # the common recipe's column: shown beside the merge, never judged, further from the trained model
    header = next(line for line in good.out.splitlines() if "original bf16" in line)
    assert header.split() == ["bf16", "original", "bf16"]
    result = next(line for line in good.out.splitlines() if line.startswith("result"))
    assert result.split()[1:] == ["PASS", "(shown)"]
    diffs = next(line for line in good.out.splitlines() if line.startswith("max |logit diff|")).split()[-2:]
    assert float(diffs[1]) > 10 * float(diffs[0])
    refused = _quiet_verify(cli_runner, str(original), str(adapter), str(out), "--original-base", str(original))
    assert refused.code == 2 and "--original-base needs a quantized BASE" in refused.err
    corrupted = scale_tensor(out, tmp_path / "corrupted", "model.layers.1.self_attn.q_proj.weight", 1.01)
    bad = _quiet_verify(cli_runner, str(base), str(adapter), str(corrupted))
    assert bad.code == 1, bad.out + bad.err


def test_merge_into_the_16bit_original_warns_when_the_adapter_names_a_quantized_repo(
        quantized: QuantizedModels, tmp_path: Path, cli_runner: Callable[..., Any]) -> None:
    import shutil

    adapter = Path(shutil.copytree(quantized.adapter("llama", "nf4-dq-bf16"), tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = _merge(cli_runner, quantized.source("llama"), adapter, tmp_path / "merged")
    warnings_shown = [line for line in result.err.splitlines() if "warning" in line]
    assert len(warnings_shown) == 1 and "--original-base" in warnings_shown[0], result.err
    quiet = _merge(cli_runner, quantized.base("llama", "nf4-dq-bf16"), adapter, tmp_path / "merged-q")
    assert "warning" not in quiet.err


@pytest.mark.slow
def test_single_file_and_gguf_outputs_from_a_quantized_base(quantized: QuantizedModels, smollm2: Path, tmp_path: Path,
                                                             cli_runner: Callable[..., Any],
                                                             read_tensors: Callable[[Path], dict[str, torch.Tensor]]
                                                             ) -> None:
    from safetensors.torch import load_file

    base, adapter = quantized.base("llama", "nf4-dq-bf16"), quantized.adapter("llama", "nf4-dq-bf16")
    _merge(cli_runner, base, adapter, tmp_path / "folder")
    _merge(cli_runner, base, adapter, tmp_path / "m.safetensors", "--format", "safetensors")
    folder, single = read_tensors(tmp_path / "folder"), load_file(tmp_path / "m.safetensors")
    assert set(single) == set(folder) and all(torch.equal(single[n], folder[n]) for n in folder)

    quantized.smollm2 = smollm2
    bpe_base, bpe_adapter = quantized.base("llama-bpe", "nf4-dq-bf16"), quantized.adapter("llama-bpe", "nf4-dq-bf16")
    gguf = tmp_path / "m.gguf"
    made = cli_runner(["merge", str(bpe_base), str(bpe_adapter), "-o", str(gguf), "--format", "gguf",
                       "--gguf-type", "f32"])
    assert made.code == 0, made.err
    checked = cli_runner(["verify", str(bpe_base), str(bpe_adapter), str(gguf), "--num-probes", "2",
                          "--probe-length", "8", "--probe-source", "random"])
    assert checked.code == 0, checked.out + checked.err


def test_merge_many_over_a_quantized_base_writes_what_merge_writes(quantized: QuantizedModels, tmp_path: Path,
                                                                    cli_runner: Callable[..., Any],
                                                                    read_tensors: Callable[[Path], dict[str, torch.Tensor]]
                                                                    ) -> None:
    from d2merge.many import merge_many

    base = quantized.base("llama", "nf4-dq-bf16")
    adapters = [quantized.adapter("llama", "nf4-dq-bf16"), quantized.adapter("llama", "nf4-dq-bf16", "dora")]
    report = merge_many(base, adapters, tmp_path / "many")
    assert report.exit_code == 0, report.table()
    for adapter in adapters:
        _merge(cli_runner, base, adapter, tmp_path / adapter.name)
        alone, together = read_tensors(tmp_path / adapter.name), read_tensors(tmp_path / "many" / adapter.name)
        assert set(alone) == set(together) and all(torch.equal(alone[n], together[n]) for n in alone)


@pytest.mark.slow
def test_onnx_from_a_quantized_base_is_checked_against_the_dequantized_merge(quantized: QuantizedModels,
                                                                            tmp_path: Path,
                                                                            cli_runner: Callable[..., Any]) -> None:
    """`merge -o model.onnx` from an nf4 base: the graph is validated against the merged (dequantized) model."""
    base, adapter = quantized.base("llama", "nf4-dq-bf16"), quantized.adapter("llama", "nf4-dq-bf16")
    out = tmp_path / "onnx" / "model.onnx"
    made = cli_runner(["merge", str(base), str(adapter), "-o", str(out), "--dtype", "fp32"])
    assert made.code == 0, made.err
    assert out.is_file() and "dequantized" in made.out + made.err
    assert "validation (ONNX Runtime CPU vs PyTorch fp32" in made.out and ": passed" in made.out
