"""A built-in synthetic multiple-choice task, and the scoring that verify's merge gap uses.

The paper reports the merge gap as the change in multiple-choice accuracy when
the adapter is merged. To measure that without downloading a benchmark, this
module generates one from the tiny word-level tokenizer's vocabulary
(:func:`d2merge.synthetic.build_tiny_tokenizer`): **which word occurs most**.

    prompt:  "blue red the red green a red blue which is more"
    choices: ["red", "green", "blue", "yellow"]   answer: 0

Each prompt lists words of one category (colours, animals, directions, numbers,
sizes), one of them strictly more often than any other, mixed with filler words.
The rule needs no memorised facts, so the held-out eval set is made of new
sequences the model never saw, and a random-init transformer plus an adapter
learns it within a few hundred steps on a CPU (attention that averages the
prompt and an output map from each word to itself is enough).

Scoring is the one lm-evaluation-harness uses for such benchmarks: each choice
is appended to the prompt and scored by the log-likelihood of its tokens (summed,
or averaged per token); the highest score is the model's answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from d2merge.errors import D2MergeError
from d2merge.forward import Call, Forward, Job, as_forward, run_jobs, shares_prompts

# Categories whose words are all single tokens of the tiny tokenizer.
CATEGORIES: tuple[tuple[str, ...], ...] = (
    ("red", "green", "blue", "yellow"),
    ("cat", "dog", "bird", "fish"),
    ("up", "down", "left", "right"),
    ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    ("big", "small", "hot", "cold"),
)
FILLER = ("the", "a", "an", "of", "to", "in", "and", "or", "is", "was")
QUESTION = "which is more"
NUM_CHOICES = 4
# Train and eval examples come from different seed streams; this offset keeps them apart.
EVAL_SEED_OFFSET = 1_000_003
SCORE_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice item: ``answer`` is the index of the right entry of ``choices``."""

    prompt: str
    choices: tuple[str, ...]
    answer: int

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "choices": list(self.choices), "answer": self.answer}


def majority_example(rng: random.Random) -> MCExample:
    """One 'which word occurs most' item drawn from ``rng``.

    The winner occurs 3 or 4 times and the runner-up exactly once less, so the
    model must count rather than spot the only repeated word.
    """
    category = rng.choice(CATEGORIES)
    choices = tuple(rng.sample(category, NUM_CHOICES))
    answer = rng.randrange(NUM_CHOICES)
    top = rng.choice((3, 4))
    others = [i for i in range(NUM_CHOICES) if i != answer]
    rng.shuffle(others)
    counts = {answer: top, others[0]: top - 1}
    for i in others[1:]:
        counts[i] = rng.randrange(0, top - 1)
    words = [choices[i] for i, n in counts.items() for _ in range(n)]
    words += [rng.choice(FILLER) for _ in range(rng.randrange(0, 4))]
    rng.shuffle(words)
    return MCExample(" ".join(words + [QUESTION]), choices, answer)


def eval_examples(count: int = 200, *, seed: int = 0) -> list[MCExample]:
    """The held-out eval set: ``count`` distinct items from the eval seed stream."""
    rng = random.Random(seed + EVAL_SEED_OFFSET)
    seen: set[str] = set()
    examples: list[MCExample] = []
    while len(examples) < count:
        example = majority_example(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
    return examples


def train_stream(*, seed: int = 0, exclude: Sequence[MCExample] = ()) -> Iterator[MCExample]:
    """An endless stream of training items, skipping any prompt in ``exclude`` (the eval set)."""
    rng = random.Random(seed)
    held_out = {e.prompt for e in exclude}
    while True:
        example = majority_example(rng)
        if example.prompt not in held_out:
            yield example


def write_jsonl(path: str | Path, examples: Sequence[MCExample]) -> Path:
    """Write items as JSONL (``{"prompt", "choices", "answer"}`` per line), the format verify reads."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples), encoding="utf-8")
    except OSError as exc:
        raise D2MergeError(f"cannot write eval set: {exc.strerror or exc}", path=path) from None
    return path


def read_jsonl(path: str | Path) -> list[MCExample]:
    """Read and validate a multiple-choice JSONL file; a bad line is a one-line error naming it."""
    from d2merge.io.json_file import parse_json, read_text

    path = Path(path)
    lines = read_text(path, "eval file").splitlines()
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        item = parse_json(line, "line", where)
        if not isinstance(item, dict):
            raise D2MergeError("each line must be a JSON object", path=where)
        prompt, choices, answer = item.get("prompt"), item.get("choices"), item.get("answer")
        if not isinstance(prompt, str):
            raise D2MergeError("'prompt' must be a string", path=where)
        if (not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices)):
            raise D2MergeError("'choices' must be a list of at least two non-empty strings", path=where)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise D2MergeError(f"'answer' must be an index into choices (0..{len(choices) - 1})", path=where)
        examples.append(MCExample(prompt, tuple(choices), answer))
    if not examples:
        raise D2MergeError("eval file holds no examples", path=path)
    return examples


# ----- tokens and scoring ---------------------------------------------------------------------


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: str | Path) -> Any | None:
    """The tokenizer saved in a model folder, or None when it has none.

    A folder whose tokenizer_config names a generic class (the word-level tokenizer of
    d2merge.synthetic) is loaded as exactly that: AutoTokenizer would otherwise pick the
    class of the config's model_type (Qwen2Tokenizer for a tiny Qwen2), which rebuilds a
    BPE pipeline around the word-level vocabulary and turns " red" into no tokens at all.
    """
    folder = Path(folder)
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    from d2merge.io import transformers_folder
    from d2merge.io.json_file import read_json

    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path, "tokenizer_config.json") if config_path.is_file() else {}
    if not isinstance(config, dict):
        config = {}
    try:
        generic = (folder / "tokenizer.json").exists() and config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
        return transformers_folder.load_tokenizer(folder, fast_generic=generic)
    except (OSError, ValueError) as exc:
        raise D2MergeError(f"cannot load the tokenizer: {' '.join(str(exc).split())[:200]}", path=folder) from None



@dataclass(frozen=True)
class ChoiceBatch:
    """Every (example, choice) pair as one right-padded sequence, with the choice tokens marked."""

    input_ids: torch.Tensor  # (pairs, length)
    attention_mask: torch.Tensor  # (pairs, length)
    choice_mask: torch.Tensor  # (pairs, length): 1 where the token belongs to the choice
    example_index: torch.Tensor  # (pairs,)
    num_choices: list[int]


def encode_choices(tokenizer: Any, examples: Sequence[MCExample]) -> ChoiceBatch:
    """Tokenise prompt and continuation separately (continuation with a leading space), as lm-eval does.

    Separate tokenisation keeps the prompt's tokens identical across choices, so
    only the choice tokens differ between the sequences being compared.
    """
    rows: list[tuple[list[int], int]] = []
    index: list[int] = []
    for i, example in enumerate(examples):
        prompt_ids = list(tokenizer(example.prompt)["input_ids"])
        for j, choice in enumerate(example.choices):
            choice_ids = list(tokenizer(" " + choice, add_special_tokens=False)["input_ids"])
            if not prompt_ids or not choice_ids:  # by number: the user's text is never printed
                what = "prompt" if not prompt_ids else f"choice {j}"
                raise D2MergeError(f"example {i}: its {what} tokenises to nothing")
            rows.append((prompt_ids + choice_ids, len(choice_ids)))
            index.append(i)
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    choice_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, n_choice) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        choice_mask[row, len(ids) - n_choice: len(ids)] = 1
    return ChoiceBatch(input_ids, attention, choice_mask, torch.tensor(index),
                       [len(e.choices) for e in examples])


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for every position t >= 1, in fp32: shape (batch, length - 1).

    One sequence at a time: a batch-sized fp32 log-softmax over a 150k vocabulary is gigabytes.
    """
    rows = []
    for row in range(logits.shape[0]):
        logprobs = torch.log_softmax(logits[row, :-1].float(), dim=-1)
        rows.append(logprobs.gather(-1, input_ids[row, 1:, None]).squeeze(-1))
    return torch.stack(rows)


@torch.no_grad()
def choice_scores(model: nn.Module | Forward, tokenizer: Any, examples: Sequence[MCExample], *,
                  reduction: str = "sum", batch_size: int = 64, encoded: ChoiceBatch | None = None
                  ) -> list[list[float]]:
    """Each example's per-choice log-likelihood scores (``sum`` over the choice tokens, or ``mean``).

    ``model`` is a loaded model or a runner of calls (``d2merge.forward``: verify's block-streamed
    models); either way the same calls run, so both give the same scores.
    """
    job, result = choice_job(model, tokenizer, examples, reduction=reduction, batch_size=batch_size,
                             encoded=encoded)
    run_jobs(as_forward(model), [job])
    return result()


def choice_job(model: nn.Module | Forward, tokenizer: Any, examples: Sequence[MCExample], *, reduction: str = "sum",
               batch_size: int = 64, encoded: ChoiceBatch | None = None
               ) -> tuple[Job, Callable[[], list[list[float]]]]:
    """The calls ``choice_scores`` runs on ``model`` and, once they ran, the scores.

    verify runs them in the same run as its probes (``d2merge.forward.run_jobs``).
    """
    if reduction not in SCORE_REDUCTIONS:
        raise D2MergeError(f"unknown score reduction {reduction!r}; choose one of {', '.join(SCORE_REDUCTIONS)}")
    batch = encoded or encode_choices(tokenizer, examples)
    forward = as_forward(model)
    if _shares_prompts(model) if isinstance(model, nn.Module) else forward.shares_prompts:
        keep_last = forward.keeps_last_logits if hasattr(forward, "keeps_last_logits") else False
        return _job_sharing_prompts(batch, reduction=reduction, batch_size=batch_size, keep_last=keep_last)
    calls = [Call(batch.input_ids[start: start + batch_size], batch.attention_mask[start: start + batch_size])
             for start in range(0, batch.input_ids.shape[0], batch_size)]
    totals: list[torch.Tensor] = [torch.empty(0)] * len(calls)

    def score(index: int, logits: torch.Tensor) -> None:
        start = index * batch_size
        ids = calls[index].input_ids.to(logits.device)
        picked = token_logprobs(logits, ids) * batch.choice_mask[start: start + batch_size, 1:].to(logits.device)
        summed = picked.sum(-1)
        if reduction == "mean":
            summed = summed / batch.choice_mask[start: start + batch_size].sum(-1).to(logits.device)
        totals[index] = summed.double().cpu()

    def result() -> list[list[float]]:
        flat = torch.cat(totals).tolist()
        scores: list[list[float]] = []
        position = 0
        for n in batch.num_choices:
            scores.append(flat[position: position + n])
            position += n
        return scores

    return Job(calls, score), result


def _shares_prompts(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers decoder that can continue from a KV cache of the prompt."""
    return shares_prompts(model)


def _job_sharing_prompts(batch: ChoiceBatch, *, reduction: str, batch_size: int, keep_last: bool
                         ) -> tuple[Job, Callable[[], list[list[float]]]]:
    """``choice_job`` with each prompt run once: its KV cache is repeated for the example's choices.

    An example's choices share its prompt tokens (``encode_choices`` keeps them identical), so
    running prompt + choice for every choice computes the prompt once per choice; with four
    choices and short answers that was three quarters of the work. The prompt's last logits
    score each choice's first token; the choice tokens, run on the cached prompt, score the
    rest. Same causal attention, so the scores are those of the full sequences up to float
    noise. Examples are grouped by prompt length and choice count: no padding inside a prompt.
    Each group is a prompt call and, when a choice has more than one token, a choice call that
    continues the prompt's cache (``d2merge.forward.Call``).
    """
    lengths = batch.attention_mask.sum(-1).tolist()
    choice_lengths = batch.choice_mask.sum(-1).tolist()
    first_row, row = [], 0
    for n in batch.num_choices:
        first_row.append(row)
        row += n
    prompt_length = [lengths[r] - choice_lengths[r] for r in first_row]
    order = sorted(range(len(first_row)), key=lambda e: (prompt_length[e], batch.num_choices[e]))
    groups: list[list[int]] = []
    for e in order:
        if (groups and len(groups[-1]) < batch_size and prompt_length[groups[-1][0]] == prompt_length[e]
                and batch.num_choices[groups[-1][0]] == batch.num_choices[e]):
            groups[-1].append(e)
        else:
            groups.append([e])
    calls: list[Call] = []
    plans: list[tuple[int, list[int], torch.Tensor, int, int | None]] = []  # (choices, rows, ids, prompt, choice call)
    for group in groups:
        width, choices = prompt_length[group[0]], batch.num_choices[group[0]]
        prompt_ids = torch.stack([batch.input_ids[first_row[e], :width] for e in group])
        rows = [first_row[e] + j for e in group for j in range(choices)]
        # The choice's last token is scored by the position before it and predicts nothing: not run.
        longest = max(choice_lengths[r] for r in rows)
        ids = torch.zeros((len(rows), longest), dtype=torch.long)
        mask = torch.zeros((len(rows), width + longest - 1), dtype=torch.long)
        mask[:, :width] = 1
        for i, r in enumerate(rows):
            ids[i, : choice_lengths[r]] = batch.input_ids[r, width: width + choice_lengths[r]]
            mask[i, width: width + choice_lengths[r] - 1] = 1
        prompt_call = len(calls)
        calls.append(Call(prompt_ids, torch.ones_like(prompt_ids), keep_cache=longest > 1,
                          logits_to_keep=1 if keep_last else None))
        choice_call = None
        if longest > 1:
            choice_call = len(calls)
            calls.append(Call(ids[:, :-1], mask, cache_from=prompt_call, repeat=choices))
        plans.append((choices, rows, ids, prompt_call, choice_call))
    first_logprobs: dict[int, torch.Tensor] = {}
    per_row: dict[int, float] = {}
    plan_of_choice_call = {plan[4]: plan for plan in plans if plan[4] is not None}
    plan_of_prompt_call = {plan[3]: plan for plan in plans}

    def finish(plan: tuple[int, list[int], torch.Tensor, int, int | None], logits: torch.Tensor | None) -> None:
        choices, rows, ids, prompt_call, _ = plan
        first = first_logprobs.pop(prompt_call)
        for i, r in enumerate(rows):
            n = choice_lengths[r]
            total = first[i // choices, ids[i, 0]]
            if n > 1:
                assert logits is not None
                logprobs = torch.log_softmax(logits[i, : n - 1].float(), dim=-1)
                total = total + logprobs.gather(-1, ids[i, 1:n, None].to(logits.device)).sum()
            per_row[r] = float(total / n if reduction == "mean" else total)

    def score(index: int, logits: torch.Tensor) -> None:
        if index in plan_of_prompt_call:
            first_logprobs[index] = torch.log_softmax(logits[:, -1].float(), dim=-1)
            plan = plan_of_prompt_call[index]
            if plan[4] is None:
                finish(plan, None)
        else:
            finish(plan_of_choice_call[index], logits)

    def result() -> list[list[float]]:
        return [[per_row[first_row[e] + j] for j in range(n)] for e, n in enumerate(batch.num_choices)]

    return Job(calls, score), result


def predictions(scores: Sequence[Sequence[float]]) -> list[int]:
    """The chosen index per example (the first of equal maxima, as argmax does)."""
    return [max(range(len(s)), key=lambda i: (s[i], -i)) for s in scores]


def accuracy(examples: Sequence[MCExample], predicted: Sequence[int]) -> float:
    return sum(int(p == e.answer) for e, p in zip(examples, predicted)) / max(len(examples), 1)
