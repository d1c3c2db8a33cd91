"""The merged model's outputs against the unmerged model's: logits on the probes, answers on the eval set.

Statistics are taken on real tokens only (never padding), one sequence at a time.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from d2merge.forward import Call, Forward, Job, as_forward, run_jobs
from d2merge.logit_comparison import LogitComparison
from d2merge.tasks import MCExample, accuracy, predictions
from d2merge.verify.probes import Probes
from d2merge.verify.results import ABS_DIFF_EDGES, FlippedAnswer, LogitStats, MCResult
from d2merge.verify.stats import flips_vs_rounding, mcnemar_exact, paired_gap_interval


def _batches(probes: Probes, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(probe rows, their ids, their mask) per forward pass: shortest probes first, each batch cut to its longest.

    Probes are right-padded to the longest of all; batching them by length and cutting the
    padding columns no row of the batch needs leaves less padding to run (any order gives the
    same statistics: they are taken per sequence on real tokens).
    """
    lengths = probes.attention_mask.sum(-1).tolist()
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    # no progress here: the batches only become calls; the forward that runs them shows its own
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        mask = probes.attention_mask[rows]
        real_columns = mask.any(0).nonzero()
        width = int(real_columns.max()) + 1 if real_columns.numel() else 1
        yield rows, probes.input_ids[rows, :width], mask[:, :width]


def probe_calls(probes: Probes, batch_size: int) -> tuple[list[list[int]], list[Call]]:
    """The probe rows of each forward pass and the calls that run them (see ``_batches``)."""
    rows_of, calls = [], []
    for rows, ids, mask in _batches(probes, batch_size):
        rows_of.append(rows)
        calls.append(Call(ids, mask))
    return rows_of, calls


def probe_job(probes: Probes, batch_size: int) -> tuple[Job, Callable[[], torch.Tensor]]:
    """The probe calls and, once they ran, the fp32 logits of every probe at the probes' full width."""
    rows_of, calls = probe_calls(probes, batch_size)
    found: dict[str, torch.Tensor] = {}

    def keep(index: int, logits: torch.Tensor) -> None:
        logits = logits.float().cpu()
        if "out" not in found:  # padding columns a batch did not run stay zero (never compared)
            found["out"] = logits.new_zeros((*probes.input_ids.shape, logits.shape[-1]))
        found["out"][rows_of[index], : calls[index].input_ids.shape[1]] = logits

    return Job(calls, keep), lambda: found["out"]


@torch.no_grad()
def probe_logits(model: nn.Module | Forward, probes: Probes, batch_size: int) -> torch.Tensor:
    """fp32 logits of every probe at the probes' full width; only positions the mask marks real are meaningful."""
    job, result = probe_job(probes, batch_size)
    run_jobs(as_forward(model), [job])
    return result()


def compare_job(probes: Probes, reference: torch.Tensor, batch_size: int) -> tuple[Job, Callable[[], LogitStats]]:
    """The probe calls and, once they ran, their logits' statistics against the unmerged ``reference``.

    Statistics are taken one sequence at a time (``d2merge.logit_comparison``, the comparator the
    exporters' checks share): a whole batch of fp32 log-softmaxes over a large vocabulary would cost
    more memory than the rest of verify besides the model.
    """
    rows_of, calls = probe_calls(probes, batch_size)
    comparison = LogitComparison(ABS_DIFF_EDGES)
    per_probe: dict[int, tuple[float, float, float]] = {}
    text = probes.description.get("source") in ("sentences", "prompts")  # real text: its next tokens

    def compare(index: int, logits: torch.Tensor) -> None:
        rows, mask, width = rows_of[index], calls[index].attention_mask, calls[index].input_ids.shape[1]
        ids = calls[index].input_ids
        logits = logits.cpu()
        for row in range(logits.shape[0]):
            real = mask[row].bool()
            # each real position predicts the next real token (right padding: a prefix)
            targets = ids[row][real][1:] if text else None
            per_probe[rows[row]] = comparison.add(reference[rows[row], :width][real], logits[row][real].float(),
                                                  targets)

    def result() -> LogitStats:
        positions, agree = probes.description["positions"], comparison.agree
        ppl = {}
        predicted = comparison.predicted
        if predicted:
            nll_u, nll_m = comparison.nll_reference, comparison.nll_actual
            ppl = {"ppl_unmerged": math.exp(nll_u / predicted), "ppl_merged": math.exp(nll_m / predicted),
                   "ppl_ratio": math.exp((nll_m - nll_u) / predicted)}
        assert comparison.histogram is not None
        return LogitStats(positions=positions, max_abs_diff=comparison.max_abs,
                          mean_abs_diff=comparison.sum_abs / max(comparison.count, 1),
                          kl_mean=comparison.kl_sum / max(positions, 1), kl_max=comparison.kl_max,
                          top1_agreement=agree / max(positions, 1), argmax_flips=positions - agree,
                          probe_max_abs_diff=[per_probe[i][0] for i in sorted(per_probe)],
                          probe_kl_mean=[per_probe[i][1] for i in sorted(per_probe)],
                          probe_top1_agreement=[per_probe[i][2] for i in sorted(per_probe)],
                          abs_diff_counts=[int(c) for c in comparison.histogram], **ppl)

    return Job(calls, compare), result


@torch.no_grad()
def compare_logits(model: nn.Module | Forward, probes: Probes, reference: torch.Tensor, batch_size: int
                   ) -> LogitStats:
    """Run ``model`` batch by batch and compare with the unmerged logits on real positions only."""
    job, result = compare_job(probes, reference, batch_size)
    run_jobs(as_forward(model), [job])
    return result()


def mc_result(examples: Sequence[MCExample], unmerged: Sequence[Sequence[float]],
              merged: Sequence[Sequence[float]], rounded: Sequence[Sequence[float]] | None = None) -> MCResult:
    """Accuracies, the merge gap with its interval and tests, and every example whose answer changed.

    ``rounded``: the scores of the rounding-floor model; its flips against the unmerged model
    are what rounding alone does to these answers.
    """
    pred_u, pred_m = predictions(unmerged), predictions(merged)
    acc_u, acc_m = accuracy(examples, pred_u), accuracy(examples, pred_m)
    flipped = [FlippedAnswer(i, e.answer, u, m) for i, (e, u, m) in enumerate(zip(examples, pred_u, pred_m)) if u != m]
    right_to_wrong = sum(1 for f in flipped if f.unmerged == f.answer)
    wrong_to_right = sum(1 for f in flipped if f.merged == f.answer)
    rounding_flips = flips_p = None
    if rounded is not None:
        rounding_flips = sum(1 for u, r in zip(pred_u, predictions(rounded)) if u != r)
        flips_p = flips_vs_rounding(len(flipped), rounding_flips)
    return MCResult(len(examples), acc_u, acc_m, 100.0 * (acc_m - acc_u), flipped, right_to_wrong, wrong_to_right,
                    paired_gap_interval(right_to_wrong, wrong_to_right, len(examples)),
                    mcnemar_exact(right_to_wrong, wrong_to_right), rounding_flips, flips_p)
