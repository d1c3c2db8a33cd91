"""Where the merge arithmetic runs: the host CPU, or a CUDA GPU with copies overlapped with file I/O.

Files are always read and written on the host; a device only receives the
tensors a formula needs and gives back the merged tensor already cast to its
output dtype. The engine talks to every device through the same four verbs, so
the CPU runs the very code path the GPU runs (that is how CI, which has no GPU,
tests it):

- ``host_buffer(nbytes)``: host memory for reads and results (pinned on CUDA, so
  copies can be asynchronous);
- ``upload(tensor)``: host -> device (on CUDA: on a side stream, the compute
  stream waits for it);
- ``download(merged, out)``: the one cast to the output dtype, on the device,
  then device -> host into ``out``; returns a ``wait()`` that the writer calls
  before it touches the bytes, so the copy overlaps the next tensor's read;
- ``blockwise``: whether the engine may merge in cache-sized row blocks on the
  host (CPU only; a GPU takes the whole tensor).

Equality with the CPU: fp32 matrix products on a GPU accumulate in another
order than on the CPU (TF32 is switched off here, so both are true fp32), so an
fp32 merged value can differ by the usual GEMM rounding bound,
``|dW| <= (r + 1) * 2^-24 * |s| * sum_k |B_ik| |A_kj|`` plus one rounding of the
final add; cast to bf16/fp16 the results are equal except where the two fp32
values fall on either side of a rounding boundary, and there they differ by
one unit in the last place of the output dtype. Copies and replacements are
bit-identical (they never reach the device).
"""

from __future__ import annotations

from typing import Callable

import torch

from d2merge.options.base import option_error


def _no_wait() -> None:
    return None


class ComputeDevice:
    """The host CPU (``ComputeDevice("cpu")``) or a CUDA GPU (``ComputeDevice("cuda")``)."""

    cpu_blockwise = True

    def __init__(self, name: str = "cpu", *, blockwise: bool | None = None):
        try:
            self.torch_device = torch.device(name)
        except RuntimeError:
            raise option_error("unknown {device=}", hint="use {device=cpu} or {device=cuda}", device=name) from None
        self.type = self.torch_device.type
        if self.type not in ("cpu", "cuda"):
            raise option_error("unsupported {device=}", hint="use {device=cpu} or {device=cuda}", device=name)
        if self.type == "cuda":
            if not torch.cuda.is_available():
                raise option_error("{device=cuda} was asked for but no CUDA device is available",
                                   hint="use {device=cpu}")
            # True fp32 products, as on the CPU (TF32 would keep only 10 mantissa bits).
            torch.backends.cuda.matmul.allow_tf32 = False
            self._copy_stream = torch.cuda.Stream(self.torch_device)
        # Row blocks only pay off in CPU caches; ``blockwise=False`` (or the class's
        # ``cpu_blockwise = False``) runs the CPU through the whole-tensor path a GPU takes.
        self.blockwise = self.type == "cpu" and (self.cpu_blockwise if blockwise is None else blockwise)

    def __repr__(self) -> str:
        return f"ComputeDevice({str(self.torch_device)!r})"

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """uint8 host memory for ``nbytes``; pinned (page-locked) for a GPU."""
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.type == "cuda")

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device. The host tensor must stay untouched until the next compute starts."""
        if self.type == "cpu":
            return tensor
        with torch.cuda.stream(self._copy_stream):
            on_device = tensor.to(self.torch_device, non_blocking=tensor.is_pinned())
        torch.cuda.current_stream(self.torch_device).wait_stream(self._copy_stream)
        on_device.record_stream(torch.cuda.current_stream(self.torch_device))
        return on_device

    def download(self, merged: torch.Tensor, out: torch.Tensor,
                 check: Callable[[torch.Tensor], None] | None = None) -> Callable[[], None]:
        """Cast ``merged`` to ``out``'s dtype on the device and copy it into host ``out``; returns ``wait()``.

        ``check`` sees the cast tensor (on the device) before it is copied: the
        NaN/Inf screen runs where the data is, and a refusal leaves ``out`` unused.
        """
        if self.type == "cpu":
            out.copy_(merged)  # the one cast: round-to-nearest-even
            if check is not None:
                check(out)
            return _no_wait
        cast = merged.to(out.dtype)  # the same round-to-nearest-even cast, on the GPU
        if check is not None:
            check(cast)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.torch_device))
        with torch.cuda.stream(self._copy_stream):
            out.copy_(cast, non_blocking=out.is_pinned())
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        cast.record_stream(self._copy_stream)
        return done.synchronize
