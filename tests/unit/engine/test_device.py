"""The compute-device abstraction, run on the CPU through the path a GPU takes (CI has no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2merge.api import MergeOptions, compute_tensor, merge, plan
from d2merge.device import ComputeDevice
from d2merge.errors import D2MergeError


def test_cpu_device_verbs() -> None:
    device = ComputeDevice("cpu", blockwise=False)
    assert not device.blockwise and ComputeDevice("cpu").blockwise
    host = device.host_buffer(10)
    assert host.dtype == torch.uint8 and host.numel() == 10 and not host.is_pinned()
    x = torch.randn(4, 3)
    assert device.upload(x) is x
    out = torch.empty(4, 3, dtype=torch.bfloat16)
    seen: list[torch.Tensor] = []
    wait = device.download(x, out, seen.append)
    wait()
    assert torch.equal(out, x.to(torch.bfloat16)) and seen[0] is out


def test_cuda_refused_in_one_line_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(D2MergeError, match="no CUDA device is available"):
        ComputeDevice("cuda")
    with pytest.raises(D2MergeError, match="unsupported device"):
        ComputeDevice("meta")


def test_cli_refuses_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch, tiny_bases, make_adapter, cli_runner,
                                        tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = tiny_bases("llama")
    result = cli_runner(["merge", str(base), str(make_adapter(base, "lora")), "-o", str(tmp_path / "out"),
                         "--device", "cuda"])
    assert result.code == 2
    assert "no CUDA device is available" in result.err and len(result.err.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_whole_tensor_device_path_equals_blockwise(tiny_bases, make_adapter, read_tensors, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, method: str, dtype: str) -> None:
    """The upload/compute/download path a GPU runs, on the CPU, gives the blockwise CPU result.

    fp32 values may differ by GEMM rounding (row blocks vs one product; bound in d2merge/device.py);
    cast to bf16 they are equal except at rounding boundaries, where they differ by one unit.
    """
    base = tiny_bases("llama")
    adapter = make_adapter(base, method)
    blockwise = read_tensors(merge(base, adapter, tmp_path / "blockwise", dtype=dtype).output)
    monkeypatch.setattr(ComputeDevice, "cpu_blockwise", False)
    uploads: list[tuple[int, ...]] = []
    real_upload = ComputeDevice.upload
    monkeypatch.setattr(ComputeDevice, "upload", lambda self, t: uploads.append(tuple(t.shape)) or real_upload(self, t))
    staged = read_tensors(merge(base, adapter, tmp_path / "staged", dtype=dtype).output)
    assert uploads  # the GPU's path was taken
    assert blockwise.keys() == staged.keys()
    merged_names = {t.name for t in plan(base, adapter).merged}
    for name, tensor in blockwise.items():
        other = staged[name]
        assert other.dtype == tensor.dtype
        if name not in merged_names:
            assert torch.equal(other, tensor), name
            continue
        a, b = tensor.double(), other.double()
        ulp = (torch.finfo(tensor.dtype).eps * a.abs().clamp_min(torch.finfo(tensor.dtype).tiny))
        assert ((a - b).abs() <= ulp * (8 if dtype == "fp32" else 1)).all(), name


def test_compute_tensor_accepts_devices(tiny_bases, make_adapter) -> None:
    base = tiny_bases("llama")
    merge_plan = plan(base, make_adapter(base, "lora"))
    item = merge_plan.merged[0]
    by_name = compute_tensor(merge_plan, item, device="cpu")
    staged = compute_tensor(merge_plan, item, device=ComputeDevice("cpu", blockwise=False))
    assert by_name.dtype == staged.dtype and torch.allclose(by_name.float(), staged.float(), rtol=1e-6, atol=1e-7)


def test_merge_options_device_choices() -> None:
    with pytest.raises(D2MergeError):
        MergeOptions(device="tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu(tiny_bases, make_adapter, read_tensors, tmp_path: Path) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "lora")
    cpu = read_tensors(merge(base, adapter, tmp_path / "cpu", dtype="fp32").output)
    gpu = read_tensors(merge(base, adapter, tmp_path / "gpu", dtype="fp32", device="cuda").output)
    for name, tensor in cpu.items():
        assert torch.allclose(gpu[name], tensor, rtol=2**-20, atol=0), name
