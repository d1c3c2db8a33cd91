"""transformers' Trainer trains an attached model; its checkpoints and final adapter are what `d2merge merge` reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2merge.api import merge
from d2merge.errors import D2MergeError
from d2merge.hf_trainer import ADAPTER_SUBFOLDER, IGNORE_INDEX, AnswerCollator, answer_features, train_multiple_choice
from d2merge.runtime import attach, load_base_model, load_fp32_model, load_unmerged
from d2merge.tasks import MCExample, eval_examples
from d2merge.train import save_task_base, task_adapter_config, task_tokenizer


@pytest.fixture(scope="module")
def task_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_task_base(tmp_path_factory.mktemp("trainer") / "base")


def test_features_label_only_the_answer(task_base: Path) -> None:
    tokenizer = task_tokenizer(task_base, 128)
    example = MCExample("red red blue which is more", ("blue", "red"), 1)
    (row,) = answer_features(tokenizer, [example])
    answer = tokenizer(" red", add_special_tokens=False)["input_ids"]
    assert row["input_ids"][-len(answer):] == answer
    assert row["labels"] == [IGNORE_INDEX] * (len(row["input_ids"]) - len(answer)) + answer
    (cut,) = answer_features(tokenizer, [example], max_length=3)
    assert len(cut["input_ids"]) == 3 and cut["input_ids"][-len(answer):] == answer
    batch = AnswerCollator(0)([row, cut])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(row["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (len(row["input_ids"]) - 3)
    assert (batch["labels"][1, 3:] == IGNORE_INDEX).all()


@pytest.mark.slow  # a few Trainer steps and two merges of a tiny model: 5-10 s
@pytest.mark.parametrize("method", ["d2lora", "dual_lora"])
def test_trainer_trains_and_saves_what_merge_reads(task_base: Path, tmp_path: Path, method: str) -> None:
    tokenizer = task_tokenizer(task_base, 128)
    model = load_base_model(task_base)
    attach(model, task_adapter_config(method, r=4, target_modules=("q_proj", "v_proj", "down_proj")))
    final = tmp_path / "adapter"
    losses = train_multiple_choice(model, tokenizer, eval_examples(32, seed=9), tmp_path / "run", epochs=1,
                                   batch_size=8, lr=1e-3, save_to=final, save_strategy="steps", save_steps=2)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    checkpoint = tmp_path / "run" / "checkpoint-2" / ADAPTER_SUBFOLDER
    assert (checkpoint / "adapter_config.json").is_file()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for number, adapter in enumerate((checkpoint, final)):
        unmerged = load_unmerged(task_base, adapter)
        merged_folder = merge(task_base, adapter, tmp_path / f"merged-{number}", dtype="fp32").output
        with torch.no_grad():
            expected = unmerged(input_ids=ids).logits
            got = load_fp32_model(merged_folder)(input_ids=ids).logits
        assert (got - expected).abs().max() < 1e-4
    # Training moved the adapter: the final model differs from the base (every method starts at it).
    with torch.no_grad():
        assert (load_unmerged(task_base, final)(input_ids=ids).logits
                - load_base_model(task_base)(input_ids=ids).logits).abs().max() > 1e-3
    # The final adapter is the trained model (Dual LoRA's warm-up folded in), not the first checkpoint.
    with torch.no_grad():
        assert (load_unmerged(task_base, final)(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5


def test_trainer_refuses_a_model_without_an_adapter(task_base: Path, tmp_path: Path) -> None:
    model = load_base_model(task_base)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(True)  # something to train, but no adapter
    with pytest.raises(D2MergeError, match="no adapter attached"):
        train_multiple_choice(model, task_tokenizer(task_base, 128), eval_examples(8, seed=1), tmp_path / "run",
                              epochs=1)
