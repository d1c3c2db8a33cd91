"""Train an adapter (D2-LoRA, Dual LoRA, LoRA, DoRA) on any causal LM and your data, from attach's init.

This exists so that the merge gap is measured on an adapter that learned
something: a random adapter has no decisions for a merge to flip. The data is
yours (multiple-choice JSONL or plain text, :func:`train_adapter`), or the
built-in synthetic task for a tiny model trained from scratch. Training uses
the runtime modules of :mod:`d2merge.runtime` (the same forward verify runs
unmerged) and saves the adapter in PEFT's layout for ``d2merge merge``.

Every method starts exactly at the base model (every B zero). Dual LoRA needs a
warm-up to leave that point at all; see :class:`d2merge.methods.dual_lora.DualLoRALayer`.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from d2merge.errors import D2MergeError
from d2merge.methods.dual_lora import B_MAG_INIT, DualLoRALayer
from d2merge.methods.adapter_layer import AdapterLayer
from d2merge.tasks import (CATEGORIES, FILLER, QUESTION, MCExample, accuracy, choice_scores, encode_choices,
                           eval_examples, load_tokenizer, predictions, read_jsonl, token_logprobs,
                           train_stream, write_jsonl)

# The task base: a tiny Llama, big enough to learn the task in a few hundred steps on two CPU cores.
TASK_BASE_CONFIG: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
                                    "num_kv_heads": 2, "vocab_size": 128, "max_positions": 64}
# A 0.02-std random lm_head after the final RMSNorm caps every logit near +-1.3 (||row|| * ||h|| =
# 0.16 * 8), so no adapter can make an answer likely: without the gain the loss stalled at 4.2 nats
# (ln 128 = 4.85). Scaling lm_head by 10 gives logits about the range of a pretrained model's (+-13).
OUTPUT_GAIN = 10.0
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# From a sweep on the task base (400 steps, batch 32): at 1e-2 D2-LoRA's loss climbs back after
# 150 steps; at 1e-3 every method reaches 96-97% held-out accuracy.
DEFAULT_LR = 1e-3
DUAL_LORA_B_MAG_INIT = B_MAG_INIT  # Dual LoRA's warm-up start (d2merge.methods.dual_lora)


@dataclass(frozen=True)
class TrainResult:
    """What a training run did: the loss curve and held-out accuracy before and after."""

    adapter: Path
    method: str
    steps: int
    losses: list[float]
    accuracy_before: float | None  # None when there is no multiple-choice held-out set (plain text)
    accuracy_after: float | None
    eval_examples: int
    seconds: float
    eval_set: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        head = sum(self.losses[:10]) / max(len(self.losses[:10]), 1)
        tail = sum(self.losses[-10:]) / max(len(self.losses[-10:]), 1)
        text = f"{self.method}: {self.steps} steps in {self.seconds:.1f} s, loss {head:.3f} -> {tail:.3f}"
        if self.accuracy_before is not None and self.accuracy_after is not None:
            text += (f", held-out accuracy {100 * self.accuracy_before:.1f}% -> {100 * self.accuracy_after:.1f}% "
                     f"({self.eval_examples} examples)")
        return text


def build_task_model(*, seed: int = 0) -> nn.Module:
    """The random-init base the built-in task trains on (tiny Llama, lm_head scaled by OUTPUT_GAIN)."""
    from d2merge.synthetic import build_tiny_model

    model = build_tiny_model("llama", seed=seed, **TASK_BASE_CONFIG)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(OUTPUT_GAIN)
    return model


def save_task_base(folder: str | Path, *, seed: int = 0) -> Path:
    """Write the task base (with the word-level tokenizer) as a Hugging Face folder."""
    from d2merge.synthetic import build_tiny_tokenizer, save_quietly

    folder = Path(folder)
    model = build_task_model(seed=seed)
    save_quietly(model, folder)
    build_tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def task_tokenizer(base_folder: str | Path, vocab_size: int) -> Any:
    """The base's own tokenizer when it has one, else the tiny word-level tokenizer."""
    from d2merge.synthetic import build_tiny_tokenizer

    tokenizer = load_tokenizer(base_folder)
    return build_tiny_tokenizer(vocab_size) if tokenizer is None else tokenizer


def check_task_vocabulary(tokenizer: Any) -> None:
    """Every task word must be one known token, or the task is not the one described."""
    words = {w for c in CATEGORIES for w in c} | set(FILLER) | set(QUESTION.split())
    unknown = sorted(w for w in words if tokenizer.convert_tokens_to_ids(w) in (None, tokenizer.unk_token_id))
    if unknown:
        raise D2MergeError(f"the base's tokenizer lacks the task's words ({', '.join(unknown[:5])})",
                           hint="train on a base written by d2merge.train.save_task_base")


def task_adapter_config(method: str, *, r: int = 8, lora_alpha: float = 16.0,
                        target_modules: Sequence[str] | str = ALL_LINEAR, **fields: Any) -> dict[str, Any]:
    """adapter_config.json fields for a fresh adapter of ``method`` (Dual LoRA: r_mag = r_dir = r).

    ``target_modules`` is a list of module-name suffixes or, as in PEFT, one string matched
    as a full regex against module names (e.g. the attention of the last layers only).
    """
    from d2merge.synthetic import adapter_config

    config = adapter_config(method, r=r, lora_alpha=lora_alpha, target_modules=(), **fields)
    config["target_modules"] = target_modules if isinstance(target_modules, str) else list(target_modules)
    return config


def start_training(model: nn.Module, *, generator: torch.Generator | None = None) -> int:
    """Each adapter layer's own training start (its method's hook); returns how many need a warm-up ramp."""
    return sum(layer.start_training(generator) for layer in model.modules() if isinstance(layer, AdapterLayer))


def start_dual_lora_warmup(model: nn.Module, *, generator: torch.Generator | None = None,
                           init: float = DUAL_LORA_B_MAG_INIT) -> int:
    """Give every Dual LoRA layer a small positive B_mag and warmup 0 (dW stays zero); returns the count."""
    layers = [m for m in model.modules() if isinstance(m, DualLoRALayer)]
    for layer in layers:
        layer.start_training(generator, init)
    return len(layers)


def set_warmup(model: nn.Module, value: float) -> None:
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.set_warmup(value)


def fold_warmup(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.finish_training()


def answer_loss(model: nn.Module, tokenizer: Any, examples: Sequence[MCExample]) -> torch.Tensor:
    """Mean negative log-likelihood of each right answer's tokens given its prompt (SFT on the answer)."""
    answers = [MCExample(e.prompt, (e.choices[e.answer],), 0) for e in examples]
    batch = encode_choices(tokenizer, answers)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    picked = token_logprobs(logits, batch.input_ids) * batch.choice_mask[:, 1:]
    return -picked.sum(-1).mean()


def evaluate(model: nn.Module, tokenizer: Any, examples: Sequence[MCExample], *, reduction: str = "sum") -> float:
    """Held-out multiple-choice accuracy (eval mode, restored to the previous mode afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return accuracy(examples, predictions(choice_scores(model, tokenizer, examples, reduction=reduction)))
    finally:
        model.train(was_training)


# ----- user data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TextData:
    """Plain text for next-token loss: the token ids of the whole text, cut into windows at training time."""

    ids: list[int]
    source: str


def load_training_data(data: str | Path | Sequence[MCExample] | Sequence[str], tokenizer: Any
                       ) -> list[MCExample] | TextData:
    """A user dataset: ``.jsonl`` of ``{"prompt", "choices", "answer"}``, any other file as plain text,
    or in memory a list of :class:`MCExample` (multiple choice) or of strings (plain text)."""
    from d2merge.io.checkpoint import read_text

    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.suffix == ".jsonl":
            return read_jsonl(path)
        text = read_text(path, "training text")
        source = str(path)
    else:
        items = list(data)
        if not items:
            raise D2MergeError("the training data is empty")
        if all(isinstance(i, MCExample) for i in items):
            return items  # type: ignore[return-value]
        if not all(isinstance(i, str) for i in items):
            raise D2MergeError("training data must be MCExample items or strings (plain text)")
        text = "\n\n".join(items)  # type: ignore[arg-type]
        source = "<texts>"
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) < 2:
        raise D2MergeError("the training text tokenises to fewer than two tokens", path=source)
    return TextData(ids, source)


def text_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over a batch of equal-length token windows."""
    logits = model(input_ids=windows, attention_mask=torch.ones_like(windows)).logits
    return -token_logprobs(logits, windows).mean()


def text_windows(data: TextData, *, length: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless seeded stream of ``length``-token windows of the text (the whole text if shorter)."""
    rng = random.Random(seed)
    ids = data.ids
    length = min(length, len(ids))
    while True:
        start = rng.randrange(0, len(ids) - length + 1)
        yield torch.tensor(ids[start: start + length])


def mc_stream(items: Sequence[MCExample], *, seed: int) -> Iterator[MCExample]:
    """The training items over and over, reshuffled (seeded) on every pass."""
    rng = random.Random(seed)
    order = list(items)
    while True:
        rng.shuffle(order)
        yield from order


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# Steps timed before a time budget decides how many more fit (see train_model's ``seconds``).
PACE_STEPS = 10


def steps_within(seconds: float, pace: float, *, most: int, fewest: int) -> int:
    """How many steps of ``pace`` seconds fit in ``seconds``, between ``fewest`` and ``most``."""
    fitting = int(seconds / pace) if pace > 0 else most
    return max(min(fewest, most), min(most, fitting))


def train_model(model: nn.Module, tokenizer: Any, data: Iterator[MCExample] | Iterator[torch.Tensor], *,
                steps: int, batch_size: int, lr: float, progress: bool | None = None,
                log: Callable[[int, float], None] | None = None, log_every: int = 50,
                before_step: Callable[[int], None] | None = None, description: str = "training",
                seconds: float | None = None, min_steps: int = 1) -> list[float]:
    """AdamW on the model's trainable parameters; any model (a PEFT model too): returns the losses.

    ``data`` yields MC items (loss on the right answer's tokens) or token windows (next-token
    loss). ``progress``: steps done, elapsed and time left (``d2merge.console.Progress``: on a
    terminal, or a line now and then in a log; False: none). ``seconds``: a time budget; the
    pace of the first PACE_STEPS steps decides how many of ``steps`` fit (never fewer than
    ``min_steps``), so a busy machine trains less instead of taking ten times longer.
    """
    from d2merge.console import Progress

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise D2MergeError("the model has no trainable parameters (attach an adapter first)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    bar = Progress(description, steps, "step")
    bar.enabled = bar.enabled and progress is not False
    with bar:
        for step in range(steps):
            if seconds is not None and step == PACE_STEPS and step < steps:
                pace = (time.perf_counter() - started) / step
                steps = steps_within(seconds, pace, most=steps, fewest=max(min_steps, step))
                bar.total = steps
            if step >= steps:
                break
            if before_step is not None:
                before_step(step)
            batch = list(itertools.islice(data, batch_size))
            if isinstance(batch[0], MCExample):
                loss = answer_loss(model, tokenizer, batch)  # type: ignore[arg-type]
            else:
                loss = text_loss(model, torch.stack(batch))  # type: ignore[arg-type]
            value = loss.item()
            if not math.isfinite(value):
                raise D2MergeError(f"training diverged at step {step} (loss {value})", hint="lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(value)
            bar.advance()
            if log is not None and (step % log_every == 0 or step == steps - 1):
                log(step, value)
    return losses


def train_adapter(base_folder: str | Path, out_adapter_folder: str | Path, method: str = "d2lora", *,
                  data: str | Path | Sequence[MCExample] | Sequence[str] | None = None,
                  eval_data: str | Path | Sequence[MCExample] | None = None, tokenizer: Any = None,
                  steps: int = 400, seed: int = 0, r: int = 8, lora_alpha: float = 16.0, lr: float | None = None,
                  batch_size: int = 32, target_modules: Sequence[str] | str = ALL_LINEAR, eval_size: int = 200,
                  eval_out: str | Path | None = None, warmup_steps: int | None = None, max_length: int = 128,
                  progress: bool | None = None, log: Callable[[int, float], None] | None = None,
                  log_every: int = 50, seconds: float | None = None, min_steps: int = 1,
                  **config_fields: Any) -> TrainResult:
    """Train a fresh ``method`` adapter on ``base_folder`` and save it to ``out_adapter_folder`` (PEFT layout).

    ``base_folder`` is any transformers causal LM folder. ``data`` is the user's dataset (see
    :func:`load_training_data`: multiple-choice JSONL, plain text, or items in memory); without it,
    the built-in synthetic task (which needs a base written by :func:`save_task_base`). For
    multiple-choice data, ``eval_data`` (or else ``eval_size`` items split off ``data``, seeded)
    is the held-out set whose accuracy is measured before and after; plain text trains on
    next-token loss over ``max_length``-token windows and measures accuracy only with ``eval_data``.
    ``tokenizer`` defaults to the base folder's own. ``eval_out`` writes the held-out set as JSONL
    for ``d2merge verify --mc-eval``. ``config_fields`` go into adapter_config.json (``tau=1.0``...).
    ``seconds`` caps the training time (fewer steps, never fewer than ``min_steps``: see
    :func:`train_model`); ``TrainResult.steps`` is the number run.
    """
    from d2merge.runtime.trainable import attach, save_adapter
    from d2merge.runtime.loading import load_base_model

    if steps < 1:
        raise D2MergeError(f"steps must be at least 1, got {steps}")
    started = time.perf_counter()
    model = load_base_model(base_folder)
    held_out: list[MCExample] | None
    stream: Iterator[Any]
    if data is None:
        tokenizer = tokenizer or task_tokenizer(base_folder, model.config.vocab_size)
        check_task_vocabulary(tokenizer)
        held_out = eval_examples(eval_size, seed=seed)
        stream = train_stream(seed=seed, exclude=held_out)
    else:
        if tokenizer is None:
            tokenizer = load_tokenizer(base_folder)
            if tokenizer is None:
                raise D2MergeError("training on your data needs the base's tokenizer, and the base has none",
                                   path=base_folder, hint="pass tokenizer=... or use a folder with tokenizer files")
        dataset = load_training_data(data, tokenizer)
        held_out = None if eval_data is None else (
            read_jsonl(eval_data) if isinstance(eval_data, (str, Path)) else list(eval_data))
        if isinstance(dataset, TextData):
            limit = max_positions(model)
            stream = text_windows(dataset, length=min(max_length, limit or max_length), seed=seed)
        else:
            if held_out is None:
                if len(dataset) <= eval_size:
                    raise D2MergeError(f"{len(dataset)} multiple-choice items leave none for training after "
                                       f"eval_size {eval_size}", hint="lower eval_size or pass eval_data")
                shuffled = list(dataset)
                random.Random(seed).shuffle(shuffled)
                held_out, dataset = shuffled[:eval_size], shuffled[eval_size:]
            stream = mc_stream(dataset, seed=seed)
    config = task_adapter_config(method, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                 base_model_name_or_path=str(base_folder), **config_fields)
    attach(model, config, seed=seed)
    before_step = None
    if start_training(model, generator=torch.Generator().manual_seed(seed + 1)):
        ramp = max(1, steps // 10) if warmup_steps is None else max(1, warmup_steps)
        before_step = lambda step: set_warmup(model, min(1.0, step / ramp))  # noqa: E731
    accuracy_before = evaluate(model, tokenizer, held_out) if held_out else None
    losses = train_model(model, tokenizer, stream, steps=steps, batch_size=batch_size, lr=lr or DEFAULT_LR,
                         progress=progress, log=log, log_every=log_every, before_step=before_step,
                         description=f"training {method}", seconds=seconds, min_steps=min_steps)
    fold_warmup(model)
    model.eval()
    accuracy_after = evaluate(model, tokenizer, held_out) if held_out else None
    adapter = save_adapter(model, out_adapter_folder)
    eval_set = write_jsonl(eval_out, held_out) if eval_out is not None and held_out else None
    return TrainResult(adapter=adapter, method=method, steps=len(losses), losses=losses, accuracy_before=accuracy_before,
                       accuracy_after=accuracy_after, eval_examples=len(held_out or ()),
                       seconds=time.perf_counter() - started, eval_set=eval_set, config=config)
