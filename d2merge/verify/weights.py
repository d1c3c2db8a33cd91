"""The weight check: each merged tensor against an fp64 recomputation from base + adapter, copies bit for bit.

Independent of any forward pass: a tensor merged wrong (a sign, a scale, a swapped layer) shows
here in ulps of the output dtype, named, even where the logits barely move.
"""

from __future__ import annotations

import torch

from d2merge.errors import D2MergeError
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.plan import MergePlan, TensorPlan
from d2merge.verify.limits import DTYPE_LABELS, ulp
from d2merge.verify.results import LayerCheck


def weight_error(stored: torch.Tensor, reference: torch.Tensor, terms: torch.Tensor | None = None
                 ) -> tuple[float, float, float]:
    """Errors of ``stored`` against an fp64 reference: (max abs, max ulp at the terms' scale, max ulp at the value).

    ``terms`` is the magnitude of what the merge adds per entry (``max(|W0|, |dW|, rms(dW))``).
    Where W0 and dW cancel, the result is tiny but carries the absolute rounding
    error of its terms; measured in ulps of the tiny result, every correct fp32
    merge would show thousands of ulps (5e3 on a random tiny adapter), so the
    thresholded figure measures in ulps of ``max(|reference|, terms)``.
    """
    if stored.numel() == 0:
        return 0.0, 0.0, 0.0
    # In row blocks of about 4M entries: the fp64 temporaries of a whole 7B MLP matrix (360 MB
    # each, eight of them) were the largest allocation of a block-streamed verify. Maxima of
    # elementwise values: the same figures as on the whole tensor.
    rows = stored.reshape(stored.shape[0], -1) if stored.ndim > 1 else stored.reshape(1, -1)
    reference_rows = reference.reshape(rows.shape)
    terms_rows = None if terms is None else terms.expand(reference.shape).reshape(rows.shape)
    step = max(1, (1 << 22) // max(rows.shape[1], 1))
    maxima: list[torch.Tensor] = []  # per block: (max abs, max ulp at the terms' scale, max ulp at the value)
    for start in range(0, rows.shape[0], step):
        block = slice(start, start + step)
        ref = reference_rows[block].double()
        diff = (rows[block].double() - ref).abs_()
        scale = ref.abs() if terms_rows is None else torch.maximum(ref.abs(), terms_rows[block].double())
        maxima.append(torch.stack([diff.max(), (diff / ulp(scale, stored.dtype)).max(),
                                   (diff / ulp(ref, stored.dtype)).max()]))
    worst = torch.stack(maxima).max(0).values  # torch's max keeps a NaN, Python's max() would drop it
    return float(worst[0]), float(worst[1]), float(worst[2])


def reference_merge(merge_plan: MergePlan, item: TensorPlan
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The merged tensor recomputed in fp64 from base + adapter, the terms' magnitude, the method's report."""
    if merge_plan.mix is not None:
        return _reference_mix(merge_plan, item)
    adapter = merge_plan.adapter
    method, settings = adapter.method, item.settings
    assert settings is not None and item.module is not None
    w0 = merge_plan.base_weight(item).double()
    factors = {k: v.double() for k, v in adapter.factors(item.module).items()}
    reference = method.merged_weight(w0, factors, settings, compute_dtype=torch.float64)
    transposed = settings.transposed
    update = method.update(factors, settings)
    update = (update.T if transposed else update).abs_()  # in place: fp64 temporaries of 7B matrices are 360 MB
    if update.shape != w0.shape:  # trainable token rows: the update is whole rows, at most this large
        update = update.amax().expand(w0.shape)
    # Entries of a low-rank product are sums of r products about rms(dW) in size; where they
    # cancel, the fp32 result keeps an absolute error of eps * rms(dW), so that is the floor.
    floor = torch.sqrt(torch.mean(update.square())) if update.numel() else torch.zeros((), dtype=update.dtype)
    if update.shape == w0.shape and update.is_contiguous():  # into |dW| itself: one fp64 matrix fewer
        terms = torch.maximum(update, w0.abs(), out=update)
    else:
        terms = torch.maximum(w0.abs(), update)
    del update
    terms = torch.maximum(terms, floor, out=terms) if terms.numel() else terms
    figures = method.report(w0.T if transposed else w0, factors, settings)
    return reference, terms, {k: float(v) for k, v in figures.items()}


def _reference_mix(merge_plan: MergePlan, item: TensorPlan) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """A tensor several adapters change: the plan's own rule, in fp64, and the scale of its terms.

    The fp32 merge rounds each adapter's merged tensor (at the scale of max(|W0|, |dW_i|)) and
    adds w_i times its difference from W0, so its error is up to sum_i |w_i| roundings at that
    scale: the terms are max(|W0|, |dW|, rms(dW)) times max(1, sum_i |w_i|).
    """
    assert merge_plan.mix is not None
    w0 = merge_plan.base_weight(item).double()
    reference = merge_plan.mix.merged_weight(item, w0, compute_dtype=torch.float64)
    update = (reference - w0).abs_()
    floor = torch.sqrt(torch.mean(update.square())) if update.numel() else torch.zeros((), dtype=update.dtype)
    terms = torch.maximum(torch.maximum(update, w0.abs(), out=update), floor)
    weight_sum = sum(abs(merge_plan.mix.weights[i]) for i in merge_plan.mix.contributors(item))
    return reference, terms.mul_(max(1.0, weight_sum)), {}


def check_weights(merge_plan: MergePlan, merged: BaseCheckpoint
                  ) -> tuple[list[LayerCheck], int, list[str], list[str]]:
    """Every planned tensor of the merged folder: merged ones against fp64, copied ones bit for bit.

    Returns (per-layer checks, copied tensors checked, copied tensors that differ, missing tensors).
    """
    from tqdm.auto import tqdm

    from d2merge.engine import compute_tensor

    stored_names = set(merged.tensors.keys())
    layers: list[LayerCheck] = []
    copied, mismatched, missing = 0, [], []
    for item in tqdm(merge_plan.tensors, desc="weights vs fp64", unit="tensor", disable=None, leave=False):
        if item.name not in stored_names:
            missing.append(item.name)
            continue
        dtype, shape = merged.tensors.info(item.name)
        if tuple(shape) != tuple(item.shape):
            raise D2MergeError(f"merged tensor has shape {list(shape)}, the merge plan says {list(item.shape)}",
                               path=merged.tensors.file_of(item.name), tensor=item.name,
                               hint="is MERGED a merge of this base and adapter?")
        stored = merged.tensors.read(item.name)
        if item.action == "merge":
            reference, terms, figures = reference_merge(merge_plan, item)
            abs_error, ulp_error, ulp_at_value = weight_error(stored, reference, terms)
            layers.append(LayerCheck(item.name, str(item.module), abs_error, ulp_error, ulp_at_value, figures))
        else:
            expected = compute_tensor(merge_plan, item).to(dtype)
            copied += 1
            if not torch.equal(stored, expected):
                mismatched.append(item.name)
    return layers, copied, mismatched, missing


def stored_dtype(merge_plan: MergePlan, merged: BaseCheckpoint) -> str:
    """The output dtype of a merged folder, read from its first adapted tensor."""
    names = set(merged.tensors.keys())
    for item in merge_plan.merged:
        if item.name in names:
            dtype = merged.tensors.info(item.name)[0]
            if dtype not in DTYPE_LABELS:
                raise D2MergeError(f"merged tensor has dtype {dtype}; verify checks fp32, bf16 and fp16",
                                   path=merged.tensors.file_of(item.name), tensor=item.name)
            return DTYPE_LABELS[dtype]
    raise D2MergeError("the merged folder holds none of the tensors this adapter changes", path=merged.location,
                       hint="is MERGED a merge of this base and adapter?")
