"""benchmarks/paper_table.py: the paper's table from cells, on a toy setting end to end, resumed from its cache."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import paper_table as pt  # noqa: E402

from d2merge.benchmark_tasks import TaskSplit  # noqa: E402
from d2merge.tasks import eval_examples  # noqa: E402


def _cell(accuracy: float, merged: dict[str, float], losses: list[float], *, flips: int = 0,
          speed: tuple[float, float] = (10.0, 20.0)) -> dict[str, Any]:
    items = 10
    right = round(accuracy * items)
    predictions = [0] * right + [1] * (items - right)

    def scored(acc: float, flipped: int, per_second: float) -> dict[str, Any]:
        preds = list(predictions)
        for i in range(flipped):
            preds[i] = 1 - preds[i]
        return {"accuracy": acc, "predictions": preds, "seconds": items / per_second, "items_per_second": per_second}

    return {"unmerged": scored(accuracy, 0, speed[0]), "losses": losses,
            "merged": {dt: scored(acc, flips, speed[1]) for dt, acc in merged.items()}}


def test_table_figures_from_cells() -> None:
    settings = pt.Settings(base="/x/base", tasks=("t1", "t2"), methods=("lora", "lora_2r", "d2lora"), seeds=(0, 1))
    cells = {("t1", "base", 0): {"unmerged": {"accuracy": 0.3, "predictions": [], "items_per_second": 1.0}},
             ("t2", "base", 0): {"unmerged": {"accuracy": 0.5, "predictions": [], "items_per_second": 1.0}}}
    for task, shift in (("t1", 0.0), ("t2", 0.2)):
        for seed in (0, 1):
            cells[(task, "lora", seed)] = _cell(0.4 + shift, {"fp32": 0.4 + shift, "bf16": 0.5 + shift},
                                                [1.0, 2.0 + seed, 3.0], flips=1 if seed == 0 else 0)
            cells[(task, "lora_2r", seed)] = _cell(0.5 + shift, {"fp32": 0.5 + shift, "bf16": 0.5 + shift},
                                                   [1.0, 1.0, 1.0])
    # t2 lacks D2-LoRA seed 1 and t1 all of D2-LoRA's cells: macro figures use t2 only, and say so.
    cells[("t2", "d2lora", 0)] = _cell(0.8, {"fp32": 0.8, "bf16": 0.7}, [1.0, 1.5, 3.0], speed=(5.0, 20.0))
    table = pt.build_table(cells, settings)
    assert table.complete_tasks == ["t2"] and table.notes and table.cells == 11 and table.planned == 14
    assert table.accuracy["lora"]["t1"] == pytest.approx(40.0) and table.seeds_done["d2lora"]["t2"] == 1
    assert table.accuracy["d2lora"]["t1"] is None
    assert table.macro["lora"] == pytest.approx(60.0) and table.macro["d2lora"] == pytest.approx(80.0)
    assert table.differences["d2lora - lora"] == pytest.approx(20.0)
    assert table.differences["d2lora - lora_2r"] == pytest.approx(10.0)
    assert table.differences["dual_lora - lora"] is None
    # Volatility: mean over steps of the across-seed std; LoRA's seeds differ at step 2 only.
    assert table.volatility["lora"] == pytest.approx(statistics.stdev([2.0, 3.0]) / 3)
    assert table.volatility["lora_2r"] == 0.0 and table.volatility["d2lora"] is None  # one seed: none
    assert table.volatility_reduction_pct is None
    lora_gap = table.merge_gap["bf16"]["lora"]
    assert lora_gap["mean_pp"] == pytest.approx(10.0) and lora_gap["worst_pp"] == pytest.approx(10.0)
    assert table.merge_gap["fp32"]["lora"]["flips"] == 2 and table.merge_gap["fp32"]["lora"]["items"] == 40
    assert table.merge_gap["bf16"]["d2lora"]["mean_pp"] == pytest.approx(10.0)
    assert table.throughput["lora"] == pytest.approx(2.0) and table.throughput["d2lora"] == pytest.approx(4.0)
    text = pt.render_markdown(table, settings)
    assert "| D2-LoRA r - LoRA r | +20.0 | +2.2 |" in text and "partial" in text
    assert "| LoRA r | 0.00 | 0.00 | 2/40 | 10.00 | 10.00 | 2/40 |" in text


@pytest.mark.slow  # trains 5 tiny adapters with Trainer and merges each twice: ~15-30 s on 2 busy cores
def test_toy_table_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from d2merge.train import save_task_base, task_tokenizer

    base = save_task_base(tmp_path / "base")
    tokenizer = task_tokenizer(base, 128)
    items = eval_examples(40, seed=3)
    splits = {"toy": TaskSplit("toy", items[:16], items[16:])}
    settings = pt.Settings(base=str(base), tasks=("toy",), methods=("lora", "d2lora"), seeds=(0, 1),
                           train_samples=16, eval_samples=24, epochs=1, rank=2, lr=1e-3,
                           target_modules=("q_proj", "v_proj"))
    logged: list[str] = []
    cells = pt.run(settings, tmp_path / "cache", tokenizer=tokenizer, splits=splits, log=logged.append)
    assert len(cells) == 5 and sum("cell" in line for line in logged) == 5
    for (task, method, seed), cell in cells.items():
        assert cell["eval_items"] == 24 and len(cell["unmerged"]["predictions"]) == 24
        if method != "base":
            assert len(cell["losses"]) == 2 and set(cell["merged"]) == {"fp32", "bf16"}
            # fp32 merged answers as the unmerged model did: the merge is exact up to float noise.
            assert cell["merged"]["fp32"]["predictions"] == cell["unmerged"]["predictions"]
    assert cells[("toy", "d2lora", 0)]["trainable_parameters"] == 2 * cells[("toy", "lora", 0)]["trainable_parameters"]
    table = pt.build_table(cells, settings)
    assert table.complete_tasks == ["toy"] and table.volatility["d2lora"] is not None
    assert table.merge_gap["fp32"]["d2lora"]["mean_pp"] == 0.0
    # A second run reads every cell from the cache and trains nothing.
    monkeypatch.setattr(pt, "run_cell", lambda *a, **k: pytest.fail("a cached cell was recomputed"))
    again = pt.run(settings, tmp_path / "cache", tokenizer=tokenizer, splits=splits, log=logged.append)
    assert again == cells
    assert pt.cached_cells(settings, tmp_path / "cache") == cells
    # Settings that change a result get their own cache folder.
    assert pt.Settings(base=str(base), lr=1e-4).key() != pt.Settings(base=str(base)).key()
    assert pt.Settings(base=str(base), seeds=(0,)).key() == pt.Settings(base=str(base)).key()


def test_command_line_table_only_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    base.mkdir()
    out, figures = tmp_path / "table.md", tmp_path / "table.json"
    assert pt.main(["--base", str(base), "--cache", str(tmp_path / "cache"), "--tasks", "arc_easy",
                    "--table-only", "--out", str(out), "--json", str(figures)]) == 0
    assert "Cells measured: 0 of 11 planned" in out.read_text() and '"planned": 11' in figures.read_text()
    capsys.readouterr()
    page = tmp_path / "table.html"
    assert pt.main(["--base", str(base), "--cache", str(tmp_path / "cache"), "--tasks", "arc_easy",
                    "--table-only", "--html", str(page)]) == 0
    html = page.read_text()
    assert "0 of 11 cells" in html and "D2-LoRA r - LoRA 2r" in html and "<svg" in html and "<script" not in html
    capsys.readouterr()
    assert pt.main(["--base", str(base), "--methods", "lora,vera", "--table-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'vera'" in err


def test_default_base_on_a_fresh_machine_creates_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run's cache folder does not exist yet: converting the default base must not fail on it."""
    import d2merge.io.gguf_source as gguf_source

    written: list[Path] = []

    def convert(gguf: Path, folder: Path) -> None:
        assert folder.parent.is_dir(), "the cache folder must exist before the conversion writes into it"
        written.append(folder)

    monkeypatch.setattr(gguf_source, "smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(gguf_source, "hf_folder_from_gguf", convert)
    cache = tmp_path / "never" / "made"
    assert pt.default_base(cache) == cache / "smollm2-135m-instruct"
    assert written == [cache / "smollm2-135m-instruct"]
