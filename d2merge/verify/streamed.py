"""Run a transformers causal LM one decoder block at a time: a 7B verify in the memory of one block.

The model is built from its config by transformers' own classes with every parameter on the
meta device (no memory). A list of calls (``d2merge.forward.Call``) then runs in three kinds
of stage, each materializing only what it runs, read from the checkpoint through
``d2merge.io`` and upcast to fp32, and freeing it before the next stage:

- **head**: the model's own forward with each decoder block replaced by a recorder; it runs
  the embeddings, positions, rotary tables and masks exactly as transformers builds them,
  records what each block is called with, and stops before the first block runs;
- **block i**, for i = 0..L-1: block i materialized (with the adapter's runtime modules
  attached and, for the rounding floor, its parameters rounded) and run on every call's
  hidden states, which are kept between blocks;
- **tail**: the model's forward again, each block replaced by a replay that hands back the
  last block's output, so the final norm, the head (tied or not) and any logit soft-capping
  run as the model class defines them.

Calls run in the same batches as on the whole model, so the logits are bitwise those of the
whole-model forward on CPU (tests/unit/verify/test_streamed.py checks it on every tiny architecture).
A call that continues another's KV cache (the multiple-choice prompt sharing) keeps one
block's cache at a time: the prompt's keys for block i are written when the prompt runs
block i, repeated for its choices, used by the choices' call and dropped.

Reads: a prefetch thread reads block i+1's tensors (O_DIRECT from a cold checkpoint) into
a ring of one block's buffers while block i runs, so on a 7B the disk and the arithmetic
overlap instead of taking turns. A ``checker`` (:class:`ReadChecker`, the weight check) is told
each pass's block reads before they start and sees every tensor read, in the main thread: one
read of the merged files serves the forward and the weight check.

Hidden states of every call are held between blocks: their size is known before the run,
printed, and held to ``budget`` bytes by running the calls in chunks (each chunk reads the
weights once more). An architecture this cannot split (no single list of decoder blocks, a
parameter the checkpoint does not store under its name or shape) is refused by
:func:`streamable`, and verify then loads it whole, saying so.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from d2merge.device import ComputeDevice
from d2merge.forward import Call, Consume, keeps_last_logits, shares_prompts
from d2merge.io.adapter import Adapter
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.io.tensor_reader import TensorReader
from d2merge.verify.limits import round_parameter


@dataclass(frozen=True)
class Rounding:
    """The rounding floor's change to the base weights (``verify.limits.apply_rounding``)."""

    dtype: torch.dtype
    rewritten: frozenset[str]
    seed: int


class ReadChecker(Protocol):
    """What a run tells the weight check: the block reads to come, then each tensor as it is read."""

    def expect(self, blocks: Sequence[Sequence[str]]) -> None:
        """A pass is about to read these stored tensors, in this order: each decoder block's, block by block."""

    def check(self, name: str, tensor: torch.Tensor) -> None:
        """The stored tensor ``name`` was read; valid until the run's next read."""


class _Stop(Exception):
    """Raised by the last recorder: the head stage needs nothing after the blocks' inputs."""


class _Recorder(nn.Module):
    """Stands in for decoder block ``index`` during the head stage: records its inputs, runs nothing."""

    def __init__(self, index: int, last: bool, sink: list[Any]):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.sink.append((self.index, hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


class NotSplittable(Exception):
    """The model's forward does more between its blocks than hand one block's output to the next."""


class _Replay(nn.Module):
    """Stands in for a decoder block during the tail stage: the last one returns the streamed output."""

    def __init__(self, last: bool, source: dict[str, Any]):
        super().__init__()
        self.last, self.source = last, source

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.source["hidden"] if self.last else hidden_states
        return (out,) if self.source["tuple"] else out


def _buffers_to(module: nn.Module, device: torch.device) -> nn.Module:
    """The module's buffers (rotary tables...) on ``device``; parameters are uploaded as they are read.

    ``module.to`` would try to copy the parameters a stage leaves on meta.
    """
    for sub in module.modules():
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                sub._buffers[name] = buffer.to(device)
    return module


class _Zeros(nn.Module):
    """The input embeddings in the tail stage, whose blocks are replays: zeros of the right shape."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*input_ids.shape, self.width), device=input_ids.device)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers goes to the meta device; buffers stay real.

    Buffers (rotary inverse frequencies, position ids) are computed from the config and are
    not all in the checkpoint, so they are built for real; parameters are read later, one
    block at a time. ``torch.empty`` does not touch its pages, so the host copy made before
    the move costs neither memory nor time. (accelerate's ``init_empty_weights`` does the
    same; accelerate is not a dependency of d2merge.)
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def skeleton(checkpoint: BaseCheckpoint) -> nn.Module:
    """The checkpoint's model class built from its config (no remote code), parameters on meta, eval mode."""
    from transformers import AutoModelForCausalLM

    from d2merge.io.transformers_folder import load_config
    from d2merge.io.transformers_folder import quiet_transformers

    assert checkpoint.folder is not None
    config = load_config(checkpoint.folder)
    with quiet_transformers(), parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    return model.eval()


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The one ModuleList holding the model's decoder blocks (``model.layers``, ``transformer.h``...)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count and count]
    return found[0] if len(found) == 1 else None


def stored_names(model: nn.Module, checkpoint: BaseCheckpoint) -> dict[str, str] | str:
    """Each parameter's (memory name) stored tensor, or why one has none.

    The checkpoint stores a parameter under its name, or without / with the model's
    ``base_model_prefix`` (GPT-2's ``h.0...`` for ``transformer.h.0...``); a tied parameter
    (the head on the embeddings) under any of its names. Shapes must match: a tensor that
    transformers fuses or converts on load (MoE experts) is not read here.
    """
    keys = set(checkpoint.tensors.keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_object: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_object.setdefault(id(param), []).append(name)
    names: dict[str, str] = {}
    for aliases in by_object.values():
        stored = None
        for name in aliases:
            for candidate in (name, name.removeprefix(f"{prefix}.") if prefix else name, f"{prefix}.{name}"):
                if candidate in keys:
                    stored = candidate
                    break
            if stored is not None:
                break
        if stored is None:
            return f"parameter {aliases[0]} is not stored under its name in the checkpoint"
        param = model.get_parameter(aliases[0])
        if tuple(checkpoint.tensors.info(stored)[1]) != tuple(param.shape):
            return f"tensor {stored} is stored as {list(checkpoint.tensors.info(stored)[1])}, the model holds " \
                   f"{list(param.shape)}"
        for name in aliases:
            names[name] = stored
    return names


def streamable(checkpoint: BaseCheckpoint) -> tuple[nn.Module, str, dict[str, str]] | str:
    """(skeleton, the blocks' name, stored names) when the model can run block by block, else why not."""
    if checkpoint.folder is None or checkpoint.config is None:
        return "a bare safetensors file has no config.json to build the model from"
    try:
        model = skeleton(checkpoint)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        return f"transformers cannot build it from its config: {' '.join(str(exc).split())[:200]}"
    blocks = decoder_blocks(model)
    if blocks is None:
        return "no single list of num_hidden_layers decoder blocks in the model"
    names = stored_names(model, checkpoint)
    if isinstance(names, str):
        return names
    return model, blocks[0], names


@dataclass
class _CallState:
    hidden: torch.Tensor | None = None
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    cache: Any = None  # the real KV cache of a call that keeps one
    placeholder: Any = None  # what the recorded inputs name in its place


class StreamedModel:
    """A base (optionally + adapter, optionally rounded) or merged checkpoint, run block by block.

    ``run(calls, consume)`` is the whole-model forward of ``d2merge.forward.WholeModel``
    with at most one block's weights in memory. ``budget``: bytes of hidden states held
    between blocks; calls beyond it run in further passes over the weights.
    """

    def __init__(self, checkpoint: BaseCheckpoint, parts: tuple[nn.Module, str, dict[str, str]], *,
                 adapter: Adapter | None = None, rounding: Rounding | None = None,
                 device: ComputeDevice | None = None, budget: int = 1 << 30,
                 say: Callable[[str], None] | None = None, fallback: Callable[[str], Any] | None = None,
                 checker: ReadChecker | None = None):
        self.checkpoint = checkpoint
        self.checker = checker
        self.fallback = fallback  # (why) -> the whole model, for a forward found unsplittable at its first call
        self.model, self.blocks_name, self.stored = parts
        self.adapter, self.rounding = adapter, rounding
        self.device = device or ComputeDevice("cpu")
        self.budget = budget
        self.say = say or (lambda message: None)
        self.blocks: nn.ModuleList = self.model.get_submodule(self.blocks_name)  # type: ignore[assignment]
        self.shares_prompts = shares_prompts(self.model)
        self.keeps_last_logits = self.shares_prompts and keeps_last_logits(self.model)
        config = self.model.config
        self.text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hidden_size = int(getattr(self.text_config, "hidden_size"))
        self.materialized = 0  # stages materialized so far (the tests count them)
        self._reader = TensorReader(slots=1)  # replaced per pass by a prefetching one (_block_reader)
        self._spare: dict[tuple[int, ...], list[torch.Tensor]] = {}  # fp32 tensors of a finished block
        self._live: list[torch.Tensor] = []  # fp32 tensors of the block being run

    # ----- what a stage holds -------------------------------------------------------------

    def _materialize(self, module: nn.Module, prefix: str, skip: str | None = None, *, block: bool = False) -> None:
        """Every meta parameter of ``module`` read from the checkpoint in fp32 on the device (ties kept).

        Always a copy: a source may hand out its own tensor (a pickle base is held in memory,
        and ``.to(torch.float32)`` of an fp32 tensor is that tensor), which the floor's rounding
        would otherwise change in place. ``block``: a
        decoder block, whose reads go through one reused buffer and whose fp32 tensors come
        from the previous block's (:meth:`_recycle`); fresh memory is page-faulted in, which
        at 7B cost as much as the copies themselves (a third of verify's time was the kernel's).
        """
        made: dict[int, nn.Parameter] = {}
        reuse = block and self.device.type == "cpu"
        with torch.no_grad():
            for sub, name, param, stored in self._meta_parameters(module, prefix, skip):
                if id(param) not in made:
                    if reuse:
                        tensor = self._reader.read(self.checkpoint.tensors, stored)
                        spares = self._spare.get(tuple(tensor.shape))
                        fp32 = spares.pop() if spares else torch.empty(tensor.shape, dtype=torch.float32)
                        fp32.copy_(tensor)
                        self._live.append(fp32)
                    else:
                        tensor = self.checkpoint.tensors.read(stored)
                        fp32 = torch.empty(tensor.shape, dtype=torch.float32).copy_(tensor)
                    if self.checker is not None:
                        self.checker.check(stored, tensor)
                    del tensor
                    made[id(param)] = nn.Parameter(self.device.upload(fp32), requires_grad=False)
                sub._parameters[name] = made[id(param)]
        if reuse:
            self._reader.done()  # the last buffer back to the prefetch thread, which reads the next block into it
        self.materialized += 1

    def _meta_parameters(self, module: nn.Module, prefix: str, skip: str | None = None
                         ) -> Iterator[tuple[nn.Module, str, nn.Parameter, str]]:
        """(owner, name, parameter, stored name) of each parameter still on meta, in the order they are read."""
        for module_name, sub in module.named_modules(prefix=prefix):
            if skip is not None and (module_name == skip or module_name.startswith(skip + ".")):
                continue
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_meta:
                    yield sub, name, param, self.stored[f"{module_name}.{name}" if module_name else name]

    def _block_reads(self, index: int) -> list[str]:
        """The stored tensors block ``index`` reads, in :meth:`_materialize`'s order (a tied one once)."""
        seen: set[int] = set()
        reads = []
        for _, _, param, stored in self._meta_parameters(self.blocks[index], f"{self.blocks_name}.{index}"):
            if id(param) not in seen:
                seen.add(id(param))
                reads.append(stored)
        return reads

    def _block_reader(self) -> TensorReader:
        """A reader whose thread reads the blocks' tensors ahead, up to one whole block, while a block runs.

        One buffer per tensor of a block (their sizes settle on the first block: a 7B's bf16
        block is 0.4 GB); O_DIRECT when most of the checkpoint is not in the page cache, as the
        merge engine reads a cold base (``direct=None``).
        """
        tensors = self.checkpoint.tensors
        if self.device.type != "cpu" or getattr(tensors, "byte_range", None) is None:
            return TensorReader(slots=1)  # in memory already (a pickle), or uploaded as read: nothing to overlap
        reads = [self._block_reads(index) for index in range(len(self.blocks))]
        if self.checker is not None:
            self.checker.expect(reads)
        return TensorReader(slots=max(len(block) for block in reads),
                            schedule=[(tensors, name) for block in reads for name in block], direct=None)

    def _recycle(self) -> None:
        """The finished block's fp32 tensors kept for the next block (same shapes), not freed and faulted in again.

        Called once the block module and its outputs are dropped: nothing else holds them.
        """
        for tensor in self._live:
            self._spare.setdefault(tuple(tensor.shape), []).append(tensor)
        self._live = []

    def _release(self) -> None:
        """The spare tensors and the read buffer freed (a run's end: the next model starts from nothing)."""
        self._reader.close()
        self._spare, self._live, self._reader = {}, [], TensorReader(slots=1)

    def _finish(self, model: nn.Module, module: nn.Module, prefix: str, inside: Callable[[str], bool]) -> None:
        """Round the stage's parameters (the floor's model) and attach the adapter's modules that it holds."""
        if self.rounding is not None:
            rewritten = set(self.rounding.rewritten)
            for name, param in module.named_parameters(prefix=prefix):
                round_parameter(name, param, rewritten, self.rounding.dtype, seed=self.rounding.seed)
        if self.adapter is not None:
            from d2merge.runtime.attaching import attach_adapter, restricted

            part = restricted(self.adapter, inside)
            if part.modules or part.replacements:
                attach_adapter(model, part)

    def _unused_embedding(self, model: nn.Module, head: bool) -> str | None:
        """The embedding a stage never needs: the untied head before the blocks, the input embeddings after.

        The head stage stops at the first block; the tail stage's blocks are replays that ignore
        their input. Left out (on meta, or zeros of the right shape), each halves what the outer
        stages hold: a 7B Llama's embeddings and head are 0.5 GB each in fp32. Kept when tied or
        when the adapter changes them.
        """
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        if inputs is None or outputs is None or getattr(outputs, "weight", None) is getattr(inputs, "weight", 1):
            return None
        module = outputs if head else inputs
        name = next((n for n, m in model.named_modules() if m is module), None)
        adapted = [*self.adapter.modules, *self.adapter.replacements] if self.adapter is not None else []
        if name is None or any(k == name or k.startswith(name + ".") for k in adapted):
            return None
        return name

    def _outer(self, stand_ins: list[nn.Module]) -> nn.Module:
        """The model with every parameter outside the blocks materialized and the blocks replaced."""
        model = copy.deepcopy(self.model)
        blocks: nn.ModuleList = model.get_submodule(self.blocks_name)  # type: ignore[assignment]
        for i, stand_in in enumerate(stand_ins):
            blocks[i] = stand_in
        head = isinstance(stand_ins[0], _Recorder)
        unused = self._unused_embedding(model, head)
        if unused is not None and not head:
            parent, _, child = unused.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _Zeros(self.hidden_size))
        self._materialize(model, "", skip=unused)
        prefix = self.blocks_name + "."
        self._finish(model, model, "", lambda name: not name.startswith(prefix))
        return _buffers_to(model, self.device.torch_device).eval()

    def _block(self, index: int) -> nn.Module:
        """Block ``index`` materialized, rounded and with its adapter modules, in place in the skeleton."""
        block = copy.deepcopy(self.blocks[index])
        name = f"{self.blocks_name}.{index}"
        self._materialize(block, name, block=True)
        original = self.blocks[index]
        self.blocks[index] = block
        try:
            self._finish(self.model, block, name, lambda module: module.startswith(name + "."))
            return _buffers_to(self.blocks[index], self.device.torch_device).eval()
        finally:
            self.blocks[index] = original

    # ----- the calls ------------------------------------------------------------------------

    def activation_bytes(self, calls: Sequence[Call]) -> int:
        """Bytes of fp32 hidden states the calls hold between blocks."""
        return sum(call.positions for call in calls) * self.hidden_size * 4

    def chunks(self, calls: Sequence[Call]) -> list[list[int]]:
        """Call indices in runs whose hidden states fit the budget; a cache's user stays with its source."""
        chunks: list[list[int]] = []
        used = 0
        for index, call in enumerate(calls):
            cost = call.positions * self.hidden_size * 4
            joins = call.cache_from is not None or not chunks
            if not joins and used + cost > self.budget:
                chunks.append([])
                used = 0
            if not chunks:
                chunks.append([])
            chunks[-1].append(index)
            used += cost
        return chunks

    def _placeholder(self, rows: int, past: int) -> Any:
        """A KV cache that reports ``past`` cached tokens for ``rows`` rows and holds (almost) nothing.

        The model builds a continuing call's positions and mask from its cache's length; at
        the head and tail stages no block has run yet (or any more), so this stands in for the
        real cache, which the block stage swaps in.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        empty = torch.zeros((1, 1, 1, 1), device=self.device.torch_device).expand(rows, 1, past, 1)
        for layer in range(len(self.blocks)):
            cache.update(empty, empty, layer)
        return cache

    def _kwargs(self, call: Call, states: dict[int, _CallState], index: int, *, head: bool) -> dict[str, Any]:
        device = self.device.torch_device
        kwargs: dict[str, Any] = {"input_ids": call.input_ids.to(device),
                                  "attention_mask": call.attention_mask.to(device), "use_cache": False}
        if call.logits_to_keep is not None:
            kwargs["logits_to_keep"] = call.logits_to_keep
        if call.keep_cache and head:
            from transformers import DynamicCache

            states[index].cache = DynamicCache(config=self.model.config)
            kwargs.update(use_cache=True, cache=states[index].cache)
        if call.cache_from is not None:
            source = states[call.cache_from]
            rows = call.input_ids.shape[0]
            past = call.attention_mask.shape[1] - call.input_ids.shape[1]
            placeholder = self._placeholder(rows, past)
            if head:
                states[index].placeholder = placeholder
                states[index].cache = source.cache
            kwargs.update(use_cache=True, cache=placeholder)
        return kwargs

    @torch.no_grad()
    def run(self, calls: Sequence[Call], consume: Consume) -> None:
        total = self.activation_bytes(calls)
        chunks = self.chunks(calls)
        self.say(f"  {len(calls)} forward batch(es): {total / 2**20:.1f} MiB of hidden states between blocks, "
                 f"{len(chunks)} pass(es) over the weights (--max-activation-memory {self.budget / 2**20:.0f} MiB)")
        try:
            for number, chunk in enumerate(chunks):
                try:
                    self._run_chunk(calls, chunk, consume)
                except NotSplittable as exc:
                    if number or self.fallback is None:  # pragma: no cover - the first head stage finds it
                        raise
                    # Found at the first head stage, before any block ran or any logits were handed on.
                    self.fallback(str(exc)).run(calls, consume)
                    return
        finally:
            self._release()

    def _run_chunk(self, calls: Sequence[Call], chunk: list[int], consume: Consume) -> None:
        count = len(self.blocks)
        states = {index: _CallState() for index in chunk}
        sink: list[Any] = []
        model = self._outer([_Recorder(i, i == count - 1, sink) for i in range(count)])
        for index in chunk:
            sink.clear()
            try:
                model(**self._kwargs(calls[index], states, index, head=True))
            except _Stop:
                pass
            # Streaming replays block i on block i-1's output: the model must call each block once, in
            # order, on the previous block's output as returned (a model that changes the hidden
            # states between blocks, or shares a block, runs whole instead).
            if [entry[0] for entry in sink] != list(range(count)) or any(
                    sink[i][1] is not sink[i - 1][1] for i in range(1, count)):
                raise NotSplittable("its forward does more between decoder blocks than pass the hidden states on")
            states[index].hidden = sink[0][1]
            states[index].inputs = [(args, kwargs) for _, _, args, kwargs in sink]
        sink.clear()
        del model
        self._reader.close()
        self._reader = self._block_reader()
        returns_tuple = False
        from d2merge.console import Progress

        # elapsed and time left for a verify pass (on a terminal; in a log every D2MERGE_PROGRESS_EVERY s)
        bar = Progress("verify: decoder blocks", count, "block")
        for i in range(count):
            block = self._block(i)
            for index in chunk:
                state, call = states[index], calls[index]
                args, kwargs = state.inputs[i]
                if call.cache_from is not None:
                    real = state.cache
                    real.layers[i].batch_repeat_interleave(call.repeat)
                    args = tuple(real if v is state.placeholder else v for v in args)
                    kwargs = {k: real if v is state.placeholder else v for k, v in kwargs.items()}
                out = block(state.hidden, *args, **kwargs)
                returns_tuple = isinstance(out, tuple)
                state.hidden = out[0] if returns_tuple else out
                if call.cache_from is not None:
                    state.cache.layers[i].reset()  # this block's keys are used up: one block's cache at a time
                state.inputs[i] = ((), {})
            del block, out
            self._recycle()
            bar.advance()
        bar.close()
        self._release()  # the spare block is not kept through the tail (a 7B head is 0.5 GB in fp32)
        source: dict[str, Any] = {"tuple": returns_tuple}
        model = self._outer([_Replay(i == count - 1, source) for i in range(count)])
        tail_states = {index: _CallState() for index in chunk}
        for index in chunk:
            source["hidden"] = states[index].hidden
            kwargs = self._kwargs(calls[index], tail_states, index, head=False)
            logits = model(**kwargs).logits
            states[index] = _CallState()
            source["hidden"] = None
            consume(index, logits.cpu())
            del logits
        del model


def open_forward(checkpoint: BaseCheckpoint, *, adapter: Adapter | None = None, rounding: Rounding | None = None,
                 device: ComputeDevice | None = None, budget: int = 1 << 30,
                 say: Callable[[str], None] | None = None, load: Callable[..., nn.Module] | None = None,
                 allow_pickle: bool = False, checker: ReadChecker | None = None) -> Any:
    """``checkpoint`` (+ ``adapter``, ``rounding``) as a runner of calls: block by block, or whole if it must.

    Whole (``load``: ``d2merge.runtime.load_fp32_model``) only where :func:`streamable` says the
    architecture cannot be split; one line then says why and what the whole model costs.
    ``checker`` sees each tensor a block-by-block run reads (a whole load reads on its own).
    """
    say = say or (lambda message: None)
    device = device or ComputeDevice("cpu")
    parts = streamable(checkpoint)

    def whole(why: str) -> Any:
        return _whole(checkpoint, why, adapter=adapter, rounding=rounding, device=device, say=say, load=load,
                      allow_pickle=allow_pickle)

    if isinstance(parts, str):
        return whole(parts)
    return StreamedModel(checkpoint, parts, adapter=adapter, rounding=rounding, device=device, budget=budget,
                         say=say, fallback=whole, checker=checker)


def _whole(checkpoint: BaseCheckpoint, parts: str, *, adapter: Adapter | None, rounding: Rounding | None,
           device: ComputeDevice, say: Callable[[str], None], load: Callable[..., nn.Module] | None,
           allow_pickle: bool) -> Any:
    from d2merge.forward import WholeModel
    from d2merge.runtime.attaching import attach_adapter
    from d2merge.runtime.loading import load_fp32_model
    from d2merge.verify.limits import apply_rounding

    count = 0
    for name in checkpoint.tensors.keys():
        dtype, shape = checkpoint.tensors.info(name)
        if dtype.is_floating_point:
            count += int(torch.Size(shape).numel())
    say(f"  running {checkpoint.location.name} whole, not block by block ({parts}): about "
        f"{count * 4 / 2**30:.2f} GiB of fp32 weights")
    model = (load or load_fp32_model)(checkpoint.location, allow_pickle=allow_pickle)
    if rounding is not None:
        apply_rounding(model, set(rounding.rewritten), rounding.dtype, seed=rounding.seed)
    if adapter is not None:
        attach_adapter(model, adapter)
    return WholeModel(model.to(device.torch_device).eval())
