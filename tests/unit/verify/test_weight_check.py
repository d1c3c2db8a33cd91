"""verify's weight check in row blocks: the whole tensor's figures, every block checked, the merged files read once.

The oracle is the whole-tensor path (``reference_merge`` + ``weight_error``, which verify still
takes for merges that are not row-separable) and the former frexp definition of an ulp.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from d2merge.api import merge
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import open_base
from d2merge.io.safetensors_file import SafetensorsFile
from d2merge.planning import build_plan
from d2merge.verify import LayerCheck, probe_logits, random_probes, reference_merge, ulp, verify, weight_error
from d2merge.verify import weights
from d2merge.verify.limits import MANTISSA_BITS, MIN_NORMAL_EXPONENT
from d2merge.verify.streamed import open_forward
from faults import rewrite_tensors

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"  # the tiny Llama's: 64 x 64, adapted by every method
EMBEDDING = "model.embed_tokens.weight"  # copied


def frexp_ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The former definition: the binade from frexp, the subnormal spacing below the smallest normal."""
    _, exponent = torch.frexp(reference.double())
    binade = torch.where(reference == 0, torch.full_like(exponent, MIN_NORMAL_EXPONENT[dtype]),
                         (exponent - 1).clamp_min(MIN_NORMAL_EXPONENT[dtype]))
    return torch.ldexp(torch.ones_like(reference, dtype=torch.float64), binade - MANTISSA_BITS[dtype])


def test_ulp_from_the_bits_is_the_frexp_ulp() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1 << 16, dtype=torch.float64, generator=generator) * 10.0 ** torch.randint(
        -320, 300, (1 << 16,), generator=generator).double()
    edges = torch.tensor([0.0, -0.0, 5e-324, 1e-310, 2.0 ** -149, 2.0 ** -126, 2.0 ** -14, 2.0 ** -24, 1.0, -1.5,
                          65504.0, 3.4e38, 1e300], dtype=torch.float64)
    for reference in (torch.cat([values, edges]), torch.cat([values, edges]).float()):
        finite = reference.isfinite()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(ulp(reference, dtype)[finite], frexp_ulp(reference, dtype)[finite]), dtype


def test_the_floors_fp32_rounding_is_the_fp64_ulp_rounding() -> None:
    """The floor's rounding reads fp32 weights' ulps from their bits: the sums of the fp64 formula, bit for bit."""
    from d2merge.verify.limits import ROUNDING_BLOCK_ENTRIES, round_parameter, rounding_levels

    generator = torch.Generator().manual_seed(1)
    count = 7 * (ROUNDING_BLOCK_ENTRIES // 5 + 1)  # the 5/7 view below then holds one block and a short one
    values = torch.randn(count, generator=generator) * 10.0 ** torch.randint(-44, 38, (count,),
                                                                            generator=generator).float()
    values[:9] = torch.tensor([0.0, -0.0, 1e-45, 1e-40, 2.0 ** -126, 6e-8, 65504.0, 3.4e38, -1.5])
    weight = values.reshape(-1, 7)[:, :5]  # a 5/7 view (rounded through a copy): two blocks, the last short
    levels = rounding_levels("5:w", weight.numel()).reshape(weight.shape)
    assert levels.min() == -128 and levels.max() == 127 and abs(float(levels.float().mean()) + 0.5) < 0.1
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        rounded = weight.clone()
        round_parameter("w", rounded, {"w"}, dtype, seed=5)
        expected = weight + (levels.float() + 0.5) / 256 * ulp(weight, dtype).float()
        assert torch.equal(rounded.view(torch.int32), expected.view(torch.int32)), dtype
        assert not torch.equal(rounded, weight)
    assert torch.equal(rounding_levels("5:w", 10), rounding_levels("5:w", 10))
    assert not torch.equal(rounding_levels("5:w", 10), rounding_levels("6:w", 10))


@pytest.fixture(scope="module")
def merged_folders(tiny_bases: Callable[..., Path], make_adapter: Callable[..., Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Path, Path, Path]]:
    root = tmp_path_factory.mktemp("weight-check")
    made: dict[tuple[str, str], tuple[Path, Path, Path]] = {}

    def make(method: str, dtype: str) -> tuple[Path, Path, Path]:
        if (method, dtype) not in made:
            base = tiny_bases("llama")
            adapter = make_adapter(base, method, seed=3, magnitude=0.05)
            folder = merge(open_base(base), load_adapter(adapter), root / f"{method}-{dtype}", dtype=dtype,
                           hash_sources=False).output
            made[method, dtype] = base, adapter, folder
        return made[method, dtype]

    return make


def whole_tensor_checks(base: Path, adapter: Path, folder: Path) -> list[LayerCheck]:
    plan = build_plan(open_base(base), load_adapter(adapter), dtype="fp32")
    merged = open_base(folder)
    checks = []
    for item in plan.merged:
        reference, terms, figures = reference_merge(plan, item)
        errors = weight_error(merged.tensors.read(item.name), reference, terms)
        checks.append(LayerCheck(item.name, str(item.module), *errors, figures))
    return checks


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["lora", "dora", "d2lora", "dual_lora"])
def test_row_blocks_give_the_whole_tensor_figures(method: str, dtype: str, merged_folders: Callable[..., Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 100 entries (one row of 64, or two): every figure equals the whole tensor's.

    To fp64 rounding, not bit for bit: DoRA's column norms are fp64 sums whose order follows the block
    (and the CPU's vector width: AVX512 machines differ in the 14th digit).
    """
    base, adapter, folder = merged_folders(method, dtype)
    monkeypatch.setattr(weights, "BLOCK_ENTRIES", 100)
    by_rows = Counter[str]()
    real = weights._merged_by_rows

    def counting(merge_plan: Any, item: Any, stored: torch.Tensor, reader: Any = None) -> LayerCheck:
        by_rows[item.name] += 1
        return real(merge_plan, item, stored, reader)

    monkeypatch.setattr(weights, "_merged_by_rows", counting)
    plan = build_plan(open_base(base), load_adapter(adapter), dtype="fp32")
    layers, copied, mismatched, missing = weights.check_weights(plan, open_base(folder))
    assert set(by_rows) == {item.name for item in plan.merged}  # every merged tensor took the row blocks
    _assert_same_figures(layers, whole_tensor_checks(base, adapter, folder))
    assert copied == len(plan.tensors) - len(plan.merged) and not mismatched and not missing
    assert all(layer.max_ulp_error <= (0.75 if dtype != "fp32" else 256) for layer in layers)  # the default limits


def _assert_same_figures(got: list[LayerCheck], expected: list[LayerCheck]) -> None:
    """The same tensors in the same order, each figure equal to 1e-6 relative: an error is the difference of two
    nearly equal fp64 values (merged and exact), so fp64 sums taken in another order move its last digits."""
    assert [(c.tensor, c.module) for c in got] == [(c.tensor, c.module) for c in expected]
    for ours, whole in zip(got, expected):
        assert ours.method.keys() == whole.method.keys(), ours.tensor
        pairs = [(ours.max_abs_error, whole.max_abs_error), (ours.max_ulp_error, whole.max_ulp_error),
                 (ours.max_ulp_error_at_value, whole.max_ulp_error_at_value),
                 *((ours.method[k], whole.method[k]) for k in ours.method)]
        for a, b in pairs:
            assert a == pytest.approx(b, rel=1e-6, abs=1e-300), (ours.tensor, a, b)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_error_in_the_last_row_block_is_found(dtype: str, merged_folders: Callable[..., Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry of the last row of a merged tensor and of a copied one: the blocks after the first are checked."""
    base, adapter, folder = merged_folders("lora", dtype)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)

    def last_entry_times(factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
        def change(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.clone()
            tensor[-1, -1] = tensor[-1, -1] * factor
            return tensor
        return change

    rewrite_tensors(broken, {Q_PROJ: last_entry_times(1.01), EMBEDDING: last_entry_times(-1.0)})
    monkeypatch.setattr(weights, "BLOCK_ENTRIES", 100)
    plan = build_plan(open_base(base), load_adapter(adapter), dtype="fp32")
    layers, _, mismatched, _ = weights.check_weights(plan, open_base(broken))
    errors = {layer.tensor: layer.max_ulp_error for layer in layers}
    assert errors[Q_PROJ] > 1.0 and all(error <= 256 for name, error in errors.items() if name != Q_PROJ)
    assert mismatched == [EMBEDDING]


def test_the_merged_files_are_read_once(merged_folders: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The weight check takes each tensor as the merged model's block-streamed run reads it: no read of its own.

    Before, it read the whole folder and the run read it again. (The run itself reads the final
    norm twice, at its head and tail stages; a decoder block's tensors once.)
    """
    base, adapter, folder = merged_folders("lora", "bf16")
    reads = Counter[str]()
    real = SafetensorsFile.read

    def counting(self: SafetensorsFile, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        if self.path.parent == folder:
            reads[name] += 1
        return real(self, name, buffer)

    monkeypatch.setattr(SafetensorsFile, "read", counting)
    lines: list[str] = []
    report = verify(base, adapter, folder, echo=lines.append)
    assert report.passed
    assert any("checking each weight against fp64 as it is read" in line for line in lines)
    assert not any("the run did not read" in line for line in lines)
    in_verify = reads.copy()
    reads.clear()
    checkpoint = open_base(folder)
    probe_logits(open_forward(checkpoint), random_probes(int(checkpoint.config["vocab_size"]), count=2, length=8, seed=0), 2)
    assert in_verify == reads and set(reads) == set(checkpoint.tensors.keys())


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_w0s_are_read_ahead_of_the_run_and_give_the_same_figures(direct: bool, merged_folders: Callable[..., Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Told the run's block reads, the check reads their W0s ahead in a thread: every figure as when it reads them itself."""
    from d2merge.io import tensor_reader
    from d2merge.io.tensor_reader import TensorReader

    base, adapter, folder = merged_folders("lora", "bf16")
    real_expect = weights.WeightChecker.expect
    monkeypatch.setattr(weights.WeightChecker, "expect", lambda self, names: None)
    plain = verify(base, adapter, folder, echo=lambda line: None)
    monkeypatch.setattr(weights.WeightChecker, "expect", real_expect)
    readers: list[TensorReader] = []

    class Recorded(TensorReader):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if kwargs.get("schedule"):
                readers.append(self)

    monkeypatch.setattr(weights, "TensorReader", Recorded)
    monkeypatch.setattr(tensor_reader, "cold_enough", lambda paths: direct)
    ahead = verify(base, adapter, folder, echo=lambda line: None)
    assert plain.passed and ahead.passed
    assert ahead.results[0].layers == plain.results[0].layers
    plan = build_plan(open_base(base), load_adapter(adapter), dtype="fp32")
    in_blocks = [item for item in plan.merged if ".layers." in item.name]
    assert in_blocks and len(readers) == 1
    assert readers[0].bytes_read == sum(torch.Size(item.shape).numel() * 4 for item in in_blocks)  # an fp32 base
    assert (readers[0].direct_bytes > 0) == direct
