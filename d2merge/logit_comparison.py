"""The one logit comparator: a model's logits against a reference's, on real positions, one sequence at a time.

verify compares the merged model with the unmerged one through it (``verify.compare``), and the
exporters' own checks use the same arithmetic: ONNX Runtime against PyTorch (``export.onnx``), an
onnxruntime-genai build against transformers (``export.onnx_genai``). It imports nothing of
d2merge, so every layer may use it.

The figures are computed in the dtype of the tensors given (verify passes fp32, the exporters'
checks float64) and a NaN anywhere makes the largest difference NaN: a check that compares it
with a bound then fails instead of skipping it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


class LogitComparison:
    """Running statistics of ``actual`` against ``reference`` logits, fed one sequence (positions x vocab) at a time.

    ``edges``: the bins of a histogram of |difference| (right-closed counts, as ``torch.bucketize``
    with ``right=True``), when wanted.
    """

    def __init__(self, edges: Sequence[float] | None = None):
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.agree = 0
        self.positions = 0
        self.reference_max_abs = 0.0
        self.nll_reference = 0.0
        self.nll_actual = 0.0
        self.predicted = 0
        self._edges = torch.tensor(list(edges), dtype=torch.float32) if edges is not None else None
        self.histogram = (torch.zeros(len(self._edges) + 1, dtype=torch.int64) if self._edges is not None
                          else None)

    def add(self, reference: torch.Tensor, actual: torch.Tensor, targets: torch.Tensor | None = None
            ) -> tuple[float, float, float]:
        """One sequence's real positions; returns its (largest |difference|, mean KL, top-1 agreement).

        ``targets``, when given, are the next real tokens (one fewer than positions): the negative
        log-likelihood of each side on them accumulates for the perplexities.
        """
        diff = (reference - actual).abs_()
        row_max = float(diff.max())
        self.max_abs = _max_keeping_nan(self.max_abs, row_max)
        self.reference_max_abs = _max_keeping_nan(self.reference_max_abs, float(reference.abs().max()))
        self.sum_abs += float(diff.sum(dtype=torch.float64))
        self.count += diff.numel()
        if self.histogram is not None and self._edges is not None:
            self.histogram += torch.bincount(torch.bucketize(diff.view(-1), self._edges.to(diff.dtype), right=True),
                                             minlength=self.histogram.numel())
        del diff
        log_r, log_a = torch.log_softmax(reference, -1), torch.log_softmax(actual, -1)
        kl = (log_r.exp() * (log_r - log_a)).sum(-1).clamp_min(0)
        self.kl_sum += float(kl.sum(dtype=torch.float64))
        self.kl_max = max(self.kl_max, float(kl.max()))
        row_agree = int((reference.argmax(-1) == actual.argmax(-1)).sum())
        self.agree += row_agree
        self.positions += kl.numel()
        if targets is not None:
            self.nll_reference -= float(log_r[:-1].gather(-1, targets[:, None]).sum(dtype=torch.float64))
            self.nll_actual -= float(log_a[:-1].gather(-1, targets[:, None]).sum(dtype=torch.float64))
            self.predicted += targets.numel()
        return row_max, float(kl.mean(dtype=torch.float64)), row_agree / max(kl.numel(), 1)

    @property
    def top1_agreement(self) -> float:
        return self.agree / max(self.positions, 1)


def _max_keeping_nan(current: float, new: float) -> float:
    if math.isnan(current) or math.isnan(new):
        return math.nan
    return max(current, new)
