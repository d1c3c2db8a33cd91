"""Train an adapter (D2-LoRA, Dual LoRA, LoRA, DoRA) on the built-in task, from attach's initialisation.

This exists so that the merge gap is measured on an adapter that learned
something: a random adapter has no decisions for a merge to flip. Training uses
the runtime modules of :mod:`d2merge.runtime` (the same forward verify runs
unmerged) and saves the adapter in PEFT's layout for ``d2merge merge``.

Every method starts exactly at the base model (every B zero). Dual LoRA needs a
warm-up to leave that point at all; see :class:`d2merge.methods.dual_lora.DualLoRALayer`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from d2merge.errors import D2MergeError
from d2merge.methods.dual_lora import DualLoRALayer
from d2merge.tasks import (CATEGORIES, FILLER, QUESTION, MCExample, accuracy, choice_scores, encode_choices,
                           eval_examples, load_tokenizer, predictions, token_logprobs, train_stream,
                           write_jsonl)

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
# Dual LoRA warm-up: B_mag starts uniform in [0, DUAL_LORA_B_MAG_INIT) and dW is scaled by a
# factor ramping 0 -> 1 over the first warm-up steps (folded into B_mag before saving).
DUAL_LORA_B_MAG_INIT = 1e-3


@dataclass(frozen=True)
class TrainResult:
    """What a training run did: the loss curve and held-out accuracy before and after."""

    adapter: Path
    method: str
    steps: int
    losses: list[float]
    accuracy_before: float
    accuracy_after: float
    eval_examples: int
    seconds: float
    eval_set: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        head = sum(self.losses[:10]) / max(len(self.losses[:10]), 1)
        tail = sum(self.losses[-10:]) / max(len(self.losses[-10:]), 1)
        return (f"{self.method}: {self.steps} steps in {self.seconds:.1f} s, loss {head:.3f} -> {tail:.3f}, "
                f"held-out accuracy {100 * self.accuracy_before:.1f}% -> {100 * self.accuracy_after:.1f}% "
                f"({self.eval_examples} examples, chance 25%)")


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
                        target_modules: Sequence[str] = ALL_LINEAR, **fields: Any) -> dict[str, Any]:
    """adapter_config.json fields for a fresh adapter of ``method`` (Dual LoRA: r_mag = r_dir = r)."""
    from d2merge.synthetic import adapter_config

    return adapter_config(method, r=r, lora_alpha=lora_alpha, target_modules=tuple(target_modules), **fields)


def start_dual_lora_warmup(model: nn.Module, *, generator: torch.Generator | None = None,
                           init: float = DUAL_LORA_B_MAG_INIT) -> int:
    """Give every Dual LoRA layer a small positive B_mag and warmup 0 (dW stays zero); returns the count."""
    layers = [m for m in model.modules() if isinstance(m, DualLoRALayer)]
    with torch.no_grad():
        for layer in layers:
            b_mag = layer.factors["lora_B_mag"]
            b_mag.copy_(torch.rand(b_mag.shape, generator=generator).to(b_mag) * init)
            layer.warmup = 0.0
    return len(layers)


def set_warmup(model: nn.Module, value: float) -> None:
    for module in model.modules():
        if isinstance(module, DualLoRALayer):
            module.warmup = value


def fold_warmup(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, DualLoRALayer):
            module.fold_warmup()


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


def train_adapter(base_folder: str | Path, out_adapter_folder: str | Path, method: str = "d2lora", *,
                  steps: int = 400, seed: int = 0, r: int = 8, lora_alpha: float = 16.0, lr: float | None = None,
                  batch_size: int = 32, target_modules: Sequence[str] = ALL_LINEAR, eval_size: int = 200,
                  eval_out: str | Path | None = None, warmup_steps: int | None = None,
                  log: Callable[[int, float], None] | None = None, log_every: int = 50,
                  **config_fields: Any) -> TrainResult:
    """Train a fresh ``method`` adapter on the built-in task and save it to ``out_adapter_folder``.

    ``eval_out`` also writes the held-out eval set as JSONL for ``d2merge verify --mc-eval``.
    ``config_fields`` go into adapter_config.json (e.g. ``tau=1.0`` or ``norm_axis="in"`` for D2-LoRA).
    """
    from d2merge.runtime import attach, load_base_model, save_adapter

    if steps < 1:
        raise D2MergeError(f"steps must be at least 1, got {steps}")
    started = time.perf_counter()
    model = load_base_model(base_folder)
    tokenizer = task_tokenizer(base_folder, model.config.vocab_size)
    check_task_vocabulary(tokenizer)
    config = task_adapter_config(method, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                 base_model_name_or_path=str(base_folder), **config_fields)
    attach(model, config, seed=seed)
    if method == "dual_lora":
        start_dual_lora_warmup(model, generator=torch.Generator().manual_seed(seed + 1))
        warmup_steps = max(1, steps // 10) if warmup_steps is None else max(1, warmup_steps)
    held_out = eval_examples(eval_size, seed=seed)
    accuracy_before = evaluate(model, tokenizer, held_out)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr or DEFAULT_LR, weight_decay=0.0)
    stream = train_stream(seed=seed, exclude=held_out)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        if warmup_steps is not None:
            set_warmup(model, min(1.0, step / warmup_steps))
        loss = answer_loss(model, tokenizer, list(itertools.islice(stream, batch_size)))
        if not math.isfinite(loss.item()):
            raise D2MergeError(f"training diverged at step {step} (loss {loss.item()})", hint="lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(step, loss.item())
    fold_warmup(model)
    model.eval()
    accuracy_after = evaluate(model, tokenizer, held_out)
    adapter = save_adapter(model, out_adapter_folder)
    eval_set = write_jsonl(eval_out, held_out) if eval_out is not None else None
    return TrainResult(adapter=adapter, method=method, steps=steps, losses=losses, accuracy_before=accuracy_before,
                       accuracy_after=accuracy_after, eval_examples=len(held_out),
                       seconds=time.perf_counter() - started, eval_set=eval_set, config=config)
