"""Training a d2merge adapter with transformers' ``Trainer`` (and so with TRL's trainers, which subclass it).

:func:`d2merge.runtime.attach` turns a transformers model into one whose only trainable
parameters are the adapter's factors; it stays a ``PreTrainedModel``, so ``Trainer`` trains it
as it is. Two things ``Trainer`` cannot know are added by :class:`AdapterCallback`: each
method's training start (Dual LoRA's warm-up ramp, :func:`d2merge.train.start_training`) and,
at every checkpoint and at the end, the adapter written in PEFT's layout, which is what
``d2merge merge`` reads (``Trainer.save_model`` would write the whole model instead).

Multiple-choice items train on the right answer's tokens only (the prompt's labels are -100),
tokenised exactly as :func:`d2merge.tasks.encode_choices` scores them: the prompt, then the
answer with one leading space, tokenised apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from d2merge.errors import D2MergeError
from d2merge.tasks import MCExample

IGNORE_INDEX = -100  # the label transformers' loss skips
ADAPTER_SUBFOLDER = "adapter"  # output_dir/checkpoint-N/adapter: what ``d2merge merge`` reads


def answer_features(tokenizer: Any, examples: Sequence[MCExample], *, max_length: int | None = None
                    ) -> list[dict[str, list[int]]]:
    """One training row per item: prompt + right answer, labels on the answer's tokens only.

    ``max_length`` cuts the prompt from the left (its end, next to the answer, is kept).
    """
    rows = []
    for i, example in enumerate(examples):
        prompt = list(tokenizer(example.prompt)["input_ids"])
        answer = list(tokenizer(" " + example.choices[example.answer], add_special_tokens=False)["input_ids"])
        if not answer:
            raise D2MergeError(f"example {i}: its answer tokenises to nothing")
        if max_length is not None:
            if len(answer) >= max_length:
                raise D2MergeError(f"example {i}: its answer alone is {len(answer)} tokens, max_length {max_length}")
            prompt = prompt[max(0, len(prompt) + len(answer) - max_length):]
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return rows


class AnswerCollator:
    """Right-pads a batch of :func:`answer_features` rows (labels padded with -100)."""

    def __init__(self, pad_token_id: int | None):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class AdapterCallback(TrainerCallback):
    """What ``Trainer`` needs to train a d2merge adapter: the method's training start, its warm-up, its saving.

    ``warmup_steps`` is the length of the ramp a method asks for (Dual LoRA); default a tenth of
    the run. Every checkpoint folder ``Trainer`` writes also gets the adapter (adapter_config.json
    and adapter_model.safetensors) in ``checkpoint-N/adapter``, which ``d2merge merge`` reads; at the
    end the warm-up is folded into the factors, and ``save_to`` (if given) receives the adapter.
    """

    def __init__(self, *, seed: int = 0, warmup_steps: int | None = None, save_to: str | Path | None = None):
        self.seed = seed
        self.warmup_steps = warmup_steps
        self.save_to = None if save_to is None else Path(save_to)
        self.ramp: int | None = None
        self.losses: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from d2merge.train import set_warmup, start_training

        _check_attached(model)
        if start_training(model, generator=torch.Generator().manual_seed(self.seed + 1)):
            steps = max(1, state.max_steps)
            self.ramp = max(1, steps // 10) if self.warmup_steps is None else max(1, self.warmup_steps)
            set_warmup(model, 0.0)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from d2merge.train import set_warmup

        if self.ramp is not None:
            set_warmup(model, min(1.0, state.global_step / self.ramp))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        import copy

        from d2merge.runtime.trainable import save_adapter
        from d2merge.train import fold_warmup

        # A subfolder: Trainer has already written its own files (the whole model, optimizer
        # state) into checkpoint-N, and an adapter folder is written atomically as a whole.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_SUBFOLDER
        if self.ramp is None:
            save_adapter(model, folder)
            return
        # Mid-ramp, the saved factors must already hold the ramp (the merge formula has none),
        # but folding the live model would end its warm-up: fold a copy instead.
        snapshot = copy.deepcopy(model)
        fold_warmup(snapshot)
        save_adapter(snapshot, folder)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from d2merge.runtime.trainable import save_adapter
        from d2merge.train import fold_warmup

        fold_warmup(model)
        self.ramp = None
        if self.save_to is not None:
            save_adapter(model, self.save_to)


def _check_attached(model: Any) -> None:
    if getattr(model, "d2merge_config", None) is None:
        raise D2MergeError("the model Trainer got has no adapter attached by d2merge.runtime.attach()",
                           hint="call d2merge.runtime.attach(model, config) before building the Trainer")


def train_multiple_choice(model: Any, tokenizer: Any, examples: Sequence[MCExample], output_dir: str | Path, *,
                          epochs: float = 2.0, batch_size: int = 8, lr: float = 2e-4, seed: int = 0,
                          max_length: int | None = 256, warmup_ratio: float = 0.1, device: str = "cpu",
                          save_to: str | Path | None = None, **training_args: Any) -> list[float]:
    """Train an attached model on multiple-choice items with ``Trainer``; returns the loss at every step
    (every logged step, if ``logging_steps`` is overridden).

    ``training_args`` go to ``TrainingArguments`` as they are (``gradient_accumulation_steps``,
    ``lr_scheduler_type``, ``save_strategy``...). The adapter is saved to ``save_to`` when given.
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments

    features = answer_features(tokenizer, examples, max_length=max_length)
    steps_per_epoch = -(-len(features) // batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    settings: dict[str, Any] = dict(output_dir=str(output_dir), per_device_train_batch_size=batch_size,
                                    num_train_epochs=epochs, learning_rate=lr, weight_decay=0.0, seed=seed,
                                    data_seed=seed, warmup_steps=int(warmup_ratio * total), logging_steps=1,
                                    save_strategy="no", report_to=[], disable_tqdm=True,
                                    use_cpu=device == "cpu", dataloader_num_workers=0)
    settings.update(training_args)
    callback = AdapterCallback(seed=seed, save_to=save_to)
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=features,
                      data_collator=AnswerCollator(tokenizer.pad_token_id), callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the losses are returned; printing each step's dict is noise
    trainer.train()
    model.eval()
    return callback.losses
