"""Training on the built-in task: the task is deterministic, held out, and learnable; Dual LoRA warms up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from d2merge.errors import D2MergeError
from d2merge.io.adapter import load_adapter
from d2merge.methods.dual_lora import DualLoRALayer
from d2merge.runtime import attach, load_unmerged
from d2merge.synthetic import build_tiny_tokenizer
from d2merge.tasks import (MCExample, accuracy, choice_scores, eval_examples, majority_example, predictions,
                           read_jsonl, train_stream, write_jsonl)
from d2merge.train import (answer_loss, build_task_model, check_task_vocabulary, fold_warmup, save_task_base,
                           start_dual_lora_warmup, task_adapter_config, train_adapter)


@pytest.fixture(scope="session")
def task_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_task_base(tmp_path_factory.mktemp("task") / "base")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer(128)


def test_task_is_deterministic_and_well_formed(tokenizer) -> None:
    first, second = eval_examples(50, seed=3), eval_examples(50, seed=3)
    assert first == second
    assert eval_examples(50, seed=4) != first
    check_task_vocabulary(tokenizer)
    for example in first:
        words = example.prompt.split()
        counts = [words.count(c) for c in example.choices]
        # The right answer occurs strictly more often than every other choice.
        assert counts[example.answer] == max(counts)
        assert sorted(counts)[-2] == counts[example.answer] - 1
        assert len(example.choices) == 4 and len(set(example.choices)) == 4


def test_training_stream_never_repeats_an_eval_prompt() -> None:
    held_out = eval_examples(200, seed=0)
    prompts = {e.prompt for e in held_out}
    stream = train_stream(seed=0, exclude=held_out)
    assert all(next(stream).prompt not in prompts for _ in range(3000))


def test_jsonl_round_trip_and_errors(tmp_path: Path) -> None:
    examples = eval_examples(5)
    path = write_jsonl(tmp_path / "eval.jsonl", examples)
    assert read_jsonl(path) == examples
    assert json.loads(path.read_text().splitlines()[0]).keys() == {"prompt", "choices", "answer"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(D2MergeError, match="bad.jsonl:1"):
        read_jsonl(bad)


def test_choice_scores_sum_the_answer_tokens(tokenizer) -> None:
    """A model that always predicts one word must pick it whenever it is a choice."""
    red = tokenizer.convert_tokens_to_ids("red")

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None):
            out = torch.zeros(*input_ids.shape, 128)
            out[..., red] = 5.0
            return type("Out", (), {"logits": out})()

    examples = [MCExample("cat dog which is more", ("dog", "red", "cat", "blue"), 0),
                MCExample("up up which is more", ("up", "down", "left", "red"), 0)]
    picked = predictions(choice_scores(Fixed(), tokenizer, examples))
    assert picked == [1, 3]
    assert accuracy(examples, picked) == 0.0


def test_dual_lora_needs_the_warmup() -> None:
    """From attach's init (every B zero) no factor gets a gradient; after the warm-up start all do."""
    def grads(model: torch.nn.Module) -> dict[str, float]:
        model.zero_grad()
        answer_loss(model, build_tiny_tokenizer(128), eval_examples(8)).backward()
        return {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0
                for n, p in model.named_parameters() if p.requires_grad}

    config = task_adapter_config("dual_lora", target_modules=("v_proj", "down_proj"))
    stuck = attach(build_task_model(), config).train()
    assert max(grads(stuck).values()) == 0.0

    model = attach(build_task_model(), config).train()
    start_dual_lora_warmup(model, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, build_task_model().train()(ids).logits)  # dW == 0 at warmup 0
    for layer in model.modules():
        if isinstance(layer, DualLoRALayer):
            layer.warmup = 0.1
    flowing = grads(model)
    assert all(g > 0 for n, g in flowing.items() if "lora_B" in n)


def test_fold_warmup_keeps_the_forward() -> None:
    model = attach(build_task_model(), task_adapter_config("dual_lora", target_modules=("q_proj",))).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DualLoRALayer):
                for param in layer.factors.values():
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
                layer.warmup = 0.3
    ids = torch.randint(4, 128, (2, 10), generator=generator)
    with torch.no_grad():
        before = model(ids).logits
        fold_warmup(model)
        after = model(ids).logits
    assert all(layer.warmup == 1.0 for layer in model.modules() if isinstance(layer, DualLoRALayer))
    assert (before - after).abs().max() <= 1e-5
    assert (before - build_task_model()(ids).logits).abs().max() > 1e-3


@pytest.mark.slow  # 4-10 s, more on a busy machine
def test_d2lora_training_learns_the_task(task_base: Path, tmp_path: Path) -> None:
    result = train_adapter(task_base, tmp_path / "adapter", "d2lora", steps=100, seed=0, eval_size=100,
                           eval_out=tmp_path / "eval.jsonl")
    head, tail = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert tail < 0.5 * head
    assert result.accuracy_before < 0.45
    assert result.accuracy_after >= 0.6  # chance is 0.25
    # The saved adapter reproduces the trained model's accuracy through the loaders and the runtime.
    examples = read_jsonl(result.eval_set)
    assert len(examples) == 100
    model = load_unmerged(task_base, result.adapter)
    saved = accuracy(examples, predictions(choice_scores(model, build_tiny_tokenizer(128), examples)))
    assert saved == pytest.approx(result.accuracy_after)
    assert load_adapter(result.adapter).config.options["tau"] == 0.5


def test_dual_lora_training_leaves_chance(task_base: Path, tmp_path: Path) -> None:
    result = train_adapter(task_base, tmp_path / "adapter", "dual_lora", steps=60, batch_size=16, seed=0,
                           eval_size=100)
    assert result.losses[-1] < result.losses[0]
    assert result.accuracy_after >= 0.45


def test_train_rejects_a_base_without_the_task_words(tmp_path: Path) -> None:
    from d2merge.synthetic import save_tiny_base

    base = save_tiny_base(tmp_path / "base", "llama", vocab_size=32)  # the tokenizer stops before 'seven'
    with pytest.raises(D2MergeError, match="lacks the task's words"):
        train_adapter(base, tmp_path / "adapter", steps=1)


def test_majority_example_uses_its_rng_only() -> None:
    import random

    assert majority_example(random.Random(9)) == majority_example(random.Random(9))


def test_train_on_user_text_and_mc_data(tiny_bases: Any, tmp_path: Path) -> None:
    """Any causal LM with its tokenizer: plain text (next-token loss) and a user MC JSONL, progress bar off."""
    base = tiny_bases("gpt2")  # Conv1D layers, tied embeddings: not the task base
    text = train_adapter(base, tmp_path / "text", "lora", data=["the cat is red and the dog is blue"] * 4,
                         steps=3, batch_size=2, target_modules=("c_attn",), max_length=8, progress=False)
    assert text.accuracy_before is None and len(text.losses) == 3
    assert load_adapter(text.adapter).method.name == "lora"
    items = [MCExample("the cat is", ("red", "blue"), i % 2) for i in range(12)]
    data = write_jsonl(tmp_path / "mc.jsonl", items)
    mc = train_adapter(base, tmp_path / "mc", "d2lora", data=data, eval_size=4, steps=2, batch_size=4,
                       target_modules=("c_attn",), progress=False, eval_out=tmp_path / "held.jsonl")
    assert mc.eval_examples == 4 and mc.accuracy_after is not None and len(read_jsonl(mc.eval_set)) == 4
    with pytest.raises(D2MergeError, match="leave none for training"):
        train_adapter(base, tmp_path / "x", data=data, eval_size=12, steps=1)


def test_english_task_split_keeps_facts_apart() -> None:
    from d2merge.english_task import FAMILIES, split

    train, held_out = split()
    assert len(held_out) == 200 and len(train) > 150
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert all(len(e.choices) == 4 and len(set(e.choices)) == 4 for e in train + held_out)
    assert {e.prompt.split()[1] for e in held_out} == {"capital", "opposite", "plural", "plus"}
    assert split() == split() and split("plurals", held_out=10)[1][0].prompt.startswith("The plural of")
    assert len(FAMILIES) == 4
