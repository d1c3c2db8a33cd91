"""Forward passes as a list of calls, so that one list runs on a whole model or block by block.

verify and the multiple-choice scorer describe what they need as :class:`Call` s (token ids, a
mask, whether the call continues an earlier call's KV cache) and receive each call's logits
through a ``consume(index, logits)`` callback, in call order. :class:`WholeModel` runs them on a
loaded transformers model, one call at a time; ``d2merge.verify.streamed.StreamedModel`` runs the
same list one decoder block at a time with the same batches, so both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

Consume = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class Call:
    """One forward pass of a batch: ``model(input_ids=..., attention_mask=...)``.

    ``keep_cache``: run with ``use_cache=True`` and keep the KV cache for a later call.
    ``cache_from``: the index of the call whose cache this one continues, each of its rows
    repeated ``repeat`` times (an example's prompt, shared by its choices).
    ``logits_to_keep``: only the last positions' logits are computed (the prompt's last one).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep_cache: bool = False
    cache_from: int | None = None
    repeat: int = 1
    logits_to_keep: int | None = None

    @property
    def positions(self) -> int:
        return int(self.input_ids.numel())


class Forward(Protocol):
    """Something that runs a list of calls and hands each call's logits to ``consume`` in order."""

    shares_prompts: bool  # whether calls may continue another call's cache (a decoder with a KV cache)

    def run(self, calls: Sequence[Call], consume: Consume) -> None: ...


def shares_prompts(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers decoder that can continue from a KV cache of the prompt."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    import inspect

    if not isinstance(model, PreTrainedModel) or not model.can_generate():
        return False
    parameters = inspect.signature(model.forward).parameters
    return "cache" in parameters and not getattr(model.config, "is_encoder_decoder", False)


def keeps_last_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (only the last position's logits computed)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


class WholeModel:
    """A loaded model: each call is one ``model(...)``, a cache passed on to the call that continues it.

    The whole-model path: verify takes it for an architecture it cannot split block by block
    (and for exported models), and the tests take it as the oracle of the streamed path.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.shares_prompts = shares_prompts(model)
        self.keeps_last_logits = self.shares_prompts and keeps_last_logits(model)

    @torch.no_grad()
    def run(self, calls: Sequence[Call], consume: Consume) -> None:
        first = next(self.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        caches: dict[int, Any] = {}
        from d2merge.console import Progress

        bar = Progress("verify: forward batches", len(calls), "batch")
        for index, call in enumerate(calls):
            kwargs: dict[str, Any] = {}
            if call.keep_cache or call.cache_from is not None:
                kwargs["use_cache"] = True
            if call.cache_from is not None:
                cache = caches.pop(call.cache_from)
                cache.batch_repeat_interleave(call.repeat)
                kwargs["cache"] = cache
            if call.logits_to_keep is not None:
                kwargs["logits_to_keep"] = call.logits_to_keep
            out = self.model(input_ids=call.input_ids.to(device), attention_mask=call.attention_mask.to(device),
                             **kwargs)
            if call.keep_cache:
                caches[index] = out.cache
            logits = out.logits
            del out, kwargs
            consume(index, logits)
            bar.advance()
        bar.close()


@dataclass(frozen=True)
class Job:
    """Calls and what to do with each one's logits (``consume(index within the job, logits)``)."""

    calls: list[Call]
    consume: Consume


def run_jobs(forward: Forward, jobs: Sequence[Job]) -> None:
    """Every job's calls in one run: a block-streamed model then reads its weights once for all of them.

    verify's probes and its multiple-choice items are two jobs on the same model; run apart, a
    streamed model would read every block twice. Calls keep their order, so each job's logits
    are what it would get alone.
    """
    from dataclasses import replace

    calls: list[Call] = []
    owners: list[tuple[Job, int]] = []
    for job in jobs:
        offset = len(calls)
        for index, call in enumerate(job.calls):
            calls.append(call if call.cache_from is None else replace(call, cache_from=call.cache_from + offset))
            owners.append((job, index))

    def consume(index: int, logits: torch.Tensor) -> None:
        job, within = owners[index]
        job.consume(within, logits)

    forward.run(calls, consume)


def as_forward(model: nn.Module | Forward) -> Forward:
    """``model`` itself when it already runs calls, else the whole-model runner around it."""
    if hasattr(model, "run") and not isinstance(model, nn.Module):
        return model  # type: ignore[return-value]
    return WholeModel(model)
