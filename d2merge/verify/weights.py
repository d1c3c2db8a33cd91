"""The weight check: each merged tensor against an fp64 recomputation from base + adapter, copies bit for bit.

Independent of any forward pass: a tensor merged wrong (a sign, a scale, a swapped layer) shows
here in ulps of the output dtype, named, even where the logits barely move.

Lean at any size: a row-separable merge (LoRA, DoRA, D2-LoRA by rows, Dual LoRA on a linear
layer: every merged row depends on the same row of W0 only) is recomputed in fp64 a row block
of :data:`BLOCK_ENTRIES` at a time, so its temporaries are a few MB whatever the tensor's size
(a 7B's 11008 x 4096 MLP matrix took eight 360 MB fp64 copies whole), and stay in cache. The
figures are the whole tensor's: maxima and minima of per-entry values, sums of counts, fp64
throughout. Other merges (column norms, transposed layouts, token rows, PiSSA/OLoRA bases)
are recomputed whole, as before. Copied tensors are compared a row block at a time.

Reads: :class:`WeightChecker` checks each tensor as a forward reads it (it is the block-streamed
run's ``checker``), so verify's merged run and its weight check share one read of the merged
files; told a pass's reads ahead (:meth:`WeightChecker.expect`), a thread reads the W0s they
need meanwhile; :meth:`WeightChecker.finish` reads what the forward did not.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from d2merge.errors import D2MergeError
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.io.tensor_reader import TensorReader
from d2merge.planning import MergePlan, TensorPlan
from d2merge.verify.limits import DTYPE_LABELS, MANTISSA_BITS, binade_, binade_bounds, binade_into, ulp
from d2merge.verify.results import LayerCheck

# Entries per row block of the fp64 recomputation: 2 MB per fp64 temporary, about five alive,
# so a block's arithmetic stays in the CPU's cache (4M-entry blocks ran 1.6x slower).
BLOCK_ENTRIES = 1 << 18


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
    # In row blocks: the fp64 temporaries of a whole 7B MLP matrix (360 MB each, eight of them)
    # were the largest allocation of a block-streamed verify. Maxima of elementwise values: the
    # same figures as on the whole tensor.
    rows = stored.reshape(stored.shape[0], -1) if stored.ndim > 1 else stored.reshape(1, -1)
    reference_rows = reference.reshape(rows.shape)
    terms_rows = None if terms is None else terms.expand(reference.shape).reshape(rows.shape)
    step = max(1, BLOCK_ENTRIES // max(rows.shape[1], 1))
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


def _row_blocks(item: TensorPlan, merge_plan: MergePlan) -> bool:
    """Whether the entry's merge can be recomputed a row block at a time (each row from its own row).

    The stored tensor's shape is the plan's (:class:`WeightChecker` refuses a folder where it is not).
    """
    if merge_plan.mix is not None:  # several adapters: the mix's own rule, whole (_reference_mix)
        return False
    settings = item.settings
    assert settings is not None
    return len(item.shape) == 2 and not settings.transposed and merge_plan.adapter.method.row_separable(settings)


def _merged_by_rows(merge_plan: MergePlan, item: TensorPlan, stored: torch.Tensor, reader: TensorReader
                    ) -> LayerCheck:
    """The merged tensor's errors and the method's figures, a row block at a time in fp64.

    Per entry the figures :func:`reference_merge` and :func:`weight_error` compute on the whole
    tensor, bit for bit: the reference is the method's own formula (``merge_rows_``) on fp64
    rows; the ulp at the terms' scale is that of ``max(|W_merged|, |W0|, |dW|, rms(dW))``, taken
    as the largest of their binades (ulp is monotone in |x|), each read from the bits with no
    abs pass; dividing by the binade and scaling the maximum by ``2**mantissa_bits`` is exact.
    rms(dW) over the whole tensor comes from the method's algebra where it can
    (``update_square_sum``), else from a first pass over the update. The block buffers are
    reused: a fresh 2 MB allocation is page-faulted in, which cost as much as the pass using it.
    ``reader`` reads W0 into its reused buffer instead of fresh memory, for the same reason at 90 MB.
    """
    adapter = merge_plan.adapter
    method, settings = adapter.method, item.settings
    assert settings is not None and item.module is not None
    w0 = reader.read(merge_plan.base_weight_source(item), item.source)
    factors = {k: v.double() for k, v in adapter.factors(item.module).items()}
    rows, cols = stored.shape
    step = max(1, BLOCK_ENTRIES // max(cols, 1))
    blocks = [slice(start, min(rows, start + step)) for start in range(0, rows, step)]
    squares = method.update_square_sum(factors, settings)
    if squares is None:
        squares = torch.zeros((), dtype=torch.float64)
        for block in blocks:
            squares += method.update(method.rows_of(factors, block), settings).square().sum()
    dtype = stored.dtype
    low, high = binade_bounds(dtype)
    floor = binade_(torch.sqrt(squares / max(stored.numel(), 1)).reshape(1))
    low_at_scale = max(low, float(floor))  # rms(dW) only raises the scale, like the subnormal spacing
    buffers = torch.empty((3, min(step, rows) * cols), dtype=torch.float64)
    state: dict[str, Any] = {}
    figures: dict[str, float] = {}
    worst = torch.zeros(3, dtype=torch.float64)  # max abs, max ulp at the terms' scale, max ulp at the value
    for block in blocks:
        shape = (block.stop - block.start, cols)
        size = shape[0] * cols
        w, scale, diff = (buffer[:size].view(shape) for buffer in buffers)
        w.copy_(w0[block])
        for name, value in method.report_rows(w, factors, settings, block, state).items():
            figures[name] = value if name not in figures else _combine(method.report_combine.get(name), name,
                                                                       figures[name], value)
        terms = binade_(method.update(method.rows_of(factors, block), settings))
        torch.maximum(terms, binade_into(w, scale), out=terms)
        reference = method.merge_rows_(w, factors, settings, block)  # in place: w is not needed after
        at_value = binade_into(reference, scale)
        torch.maximum(terms, at_value, out=terms).clamp_(low_at_scale, high)
        at_value.clamp_(low, high)
        diff.copy_(stored[block]).sub_(reference).abs_()  # upcast first: a mixed-dtype sub ran 2x slower
        # torch's max keeps a NaN (Python's max() would drop it)
        worst = torch.maximum(worst, torch.stack([diff.max(), torch.div(diff, terms, out=terms).max(),
                                                  torch.div(diff, at_value, out=at_value).max()]))
    if not blocks:
        figures = {k: float(v) for k, v in method.report(w0.double(), factors, settings).items()}
    worst[1:] *= 2.0 ** MANTISSA_BITS[dtype]  # x / binade * 2**bits = x / ulp, exactly (powers of two)
    return LayerCheck(item.name, str(item.module), float(worst[0]), float(worst[1]), float(worst[2]), figures)


def _combine(how: str | None, name: str, a: float, b: float) -> float:
    if how == "min":
        return min(a, b) if not (math.isnan(a) or math.isnan(b)) else math.nan
    if how == "max":
        return max(a, b) if not (math.isnan(a) or math.isnan(b)) else math.nan
    if how == "sum":
        return a + b
    raise D2MergeError(f"the method's figure {name} has no rule to combine row blocks (report_combine)")


def _same_copy(merge_plan: MergePlan, item: TensorPlan, stored: torch.Tensor) -> bool:
    """Whether a copied tensor equals the base's, cast to the stored dtype as the merge casts it (through
    the plan's dtype), bit for bit; a row block at a time, so no fp32 copy of a whole embedding."""
    # modules_to_save ("replace"): the adapter's tensor; otherwise W0's own source
    source = merge_plan.adapter.tensors if item.action == "replace" else merge_plan.base_weight_source(item)
    base = source.read(item.source)
    if tuple(base.shape) != tuple(stored.shape):
        return False
    if base.dtype == stored.dtype == item.out_dtype or base.ndim == 0:
        return bool(torch.equal(base.to(item.out_dtype).to(stored.dtype), stored))
    base_rows = base.reshape(base.shape[0], -1) if base.ndim > 1 else base.reshape(1, -1)
    stored_rows = stored.reshape(base_rows.shape)
    step = max(1, BLOCK_ENTRIES // max(base_rows.shape[1], 1))
    for start in range(0, base_rows.shape[0], step):
        expected = base_rows[start:start + step].to(item.out_dtype).to(stored.dtype)
        if not torch.equal(expected, stored_rows[start:start + step]):
            return False
    return True


class WeightChecker:
    """Every planned tensor of a merged folder checked once: merged ones against fp64, copied ones bit for bit.

    The header is checked when it is made (a missing tensor, a wrong shape: before any model
    runs); :meth:`check` takes tensors as a forward reads them; :meth:`finish` reads and
    checks the rest and returns (per-layer checks, copied tensors checked, copied tensors that
    differ, missing tensors), in plan order.
    """

    def __init__(self, merge_plan: MergePlan, merged: BaseCheckpoint):
        self.merge_plan, self.merged = merge_plan, merged
        stored_names = set(merged.tensors.keys())
        self.planned = {item.name: item for item in merge_plan.tensors if item.name in stored_names}
        self.missing = [item.name for item in merge_plan.tensors if item.name not in stored_names]
        for name, item in self.planned.items():
            shape = merged.tensors.info(name)[1]
            if tuple(shape) != tuple(item.shape):
                raise D2MergeError(f"merged tensor has shape {list(shape)}, the merge plan says {list(item.shape)}",
                                   path=merged.tensors.file_of(name), tensor=name,
                                   hint="is MERGED a merge of this base and adapter?")
        self.results: dict[str, LayerCheck | bool] = {}  # a merged tensor's check, or whether a copy matched
        self._reader = TensorReader(slots=1)  # W0's bytes, one buffer reused from tensor to tensor
        self._ahead: TensorReader | None = None  # W0s of the reads a run announced, read ahead by a thread
        self._ahead_names: set[str] = set()

    def expect(self, blocks: Sequence[Sequence[str]]) -> None:
        """A run will read these merged tensors, block by block: a thread reads their W0s ahead, in the same order.

        Only the W0s a row-block check reads from a file (the rest read as before); one buffer
        per W0 of a decoder block, so W0 of block i+1 is read while block i is checked. O_DIRECT
        when most of the base is not in the page cache, as the forward's own reads.
        """
        self._close_ahead()
        ahead = [[name for name in block if self._reads_w0_ahead(name)] for block in blocks]
        schedule = [(self.merge_plan.base_weight_source(self.planned[name]), self.planned[name].source)
                    for block in ahead for name in block]
        if not schedule:
            return
        self._ahead = TensorReader(slots=max(len(block) for block in ahead), schedule=schedule, direct=None)
        self._ahead_names = {name for block in ahead for name in block}

    def _reads_w0_ahead(self, name: str) -> bool:
        """Whether checking ``name`` will read its W0 from a file through the row blocks' reader."""
        item = self.planned.get(name)
        return (item is not None and name not in self.results and item.action == "merge"
                and _row_blocks(item, self.merge_plan)
                and getattr(self.merge_plan.base_weight_source(item), "byte_range", None) is not None)

    def _close_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
        self._ahead, self._ahead_names = None, set()

    def check(self, name: str, stored: torch.Tensor) -> None:
        """Check ``stored``, the merged folder's tensor ``name``, if planned and not checked yet (as a run reads it)."""
        item = self.planned.get(name)
        if item is None or name in self.results:
            return
        if item.action == "merge":
            if _row_blocks(item, self.merge_plan):
                reader = self._ahead if name in self._ahead_names and self._ahead is not None else self._reader
                self.results[name] = _merged_by_rows(self.merge_plan, item, stored, reader)
                reader.done()  # W0's buffer free for the thread reading ahead
                self._ahead_names.discard(name)
            else:
                reference, terms, figures = reference_merge(self.merge_plan, item)
                abs_error, ulp_error, ulp_at_value = weight_error(stored, reference, terms)
                self.results[name] = LayerCheck(item.name, str(item.module), abs_error, ulp_error, ulp_at_value,
                                                figures)
        else:
            self.results[name] = _same_copy(self.merge_plan, item, stored)

    def unchecked(self) -> int:
        """How many planned tensors of the folder are not checked yet."""
        return sum(1 for name in self.planned if name not in self.results)

    def finish(self) -> tuple[list[LayerCheck], int, list[str], list[str]]:
        from tqdm.auto import tqdm

        self._close_ahead()
        left = [name for name in self.planned if name not in self.results]
        for name in tqdm(left, desc="weights vs fp64", unit="tensor", disable=None, leave=False):
            self.check(name, self.merged.tensors.read(name))
        layers = [r for r in (self.results[n] for n in self.planned) if isinstance(r, LayerCheck)]
        copies = [n for n in self.planned if not isinstance(self.results[n], LayerCheck)]
        return layers, len(copies), [n for n in copies if self.results[n] is False], list(self.missing)


def check_weights(merge_plan: MergePlan, merged: BaseCheckpoint
                  ) -> tuple[list[LayerCheck], int, list[str], list[str]]:
    """Every planned tensor of the merged folder: merged ones against fp64, copied ones bit for bit.

    Returns (per-layer checks, copied tensors checked, copied tensors that differ, missing tensors).
    """
    return WeightChecker(merge_plan, merged).finish()


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
