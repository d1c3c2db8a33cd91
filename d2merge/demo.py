"""``d2merge demo``: the whole job on a built-in tiny model, with no downloads.

Builds a small random-init Llama-style base, trains a D2-LoRA adapter on the
built-in multiple-choice task, merges it, proves the merge (fp64 recomputation,
then merged vs unmerged logits and accuracy in fp32 and bf16), exports ONNX and
measures throughput. Each step prints one line, so a new user sees what the tool does.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from d2merge.io.safetensors_file import SafetensorsFile
from d2merge.merge import merge
from d2merge.plan import MergePlan


@dataclass
class DemoReport:
    workdir: Path
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        width = max(len(s[0]) for s in self.steps)
        lines = [f"{name:<{width}}  {seconds:6.2f}s  {detail}" for name, seconds, detail in self.steps]
        return "\n".join(lines)


def reference_errors(merge_plan: MergePlan, merged_folder: Path) -> dict[str, float]:
    """Largest error of the written merged tensors against an fp64 recomputation.

    Returned in absolute terms and relative to each tensor's largest magnitude
    in units of fp32 epsilon: fp32 math should stay within a few eps.
    """
    files: dict[str, SafetensorsFile] = {}
    worst_abs, worst_eps = 0.0, 0.0
    for item in merge_plan.merged:
        shard = merge_plan.shard_names[item.shard]
        sf = files.setdefault(shard, SafetensorsFile(merged_folder / shard))
        written = sf.read(item.name).to(torch.float64)
        w0 = merge_plan.base_weight(item)
        factors = merge_plan.adapter.factors(item.module)  # type: ignore[arg-type]
        exact = merge_plan.adapter.method.merged_weight(w0, factors, item.settings, compute_dtype=torch.float64)
        error = float((written - exact).abs().max())
        scale = float(exact.abs().max()) or 1.0
        worst_abs = max(worst_abs, error)
        worst_eps = max(worst_eps, error / scale / torch.finfo(torch.float32).eps)
    return {"max_abs_error": worst_abs, "max_error_fp32_eps": worst_eps}


def run_demo(workdir: str | Path | None = None, *, echo: Callable[[str], None] = print, train_steps: int = 400,
             quick: bool = False) -> DemoReport:
    """Run every demo step in ``workdir`` (a temp folder when None) and return the figures.

    Steps: build a tiny base, train a D2-LoRA adapter on the built-in task, merge it,
    check the merge against fp64, verify merged vs unmerged in fp32 and bf16, export
    and validate ONNX, and measure throughput. ``quick`` skips ONNX and bench.
    """
    from d2merge.bench import BenchSettings, bench
    from d2merge.export.onnx import export_onnx
    from d2merge.train import save_task_base, train_adapter
    from d2merge.verify import format_gap_table, verify

    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="d2merge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    report = DemoReport(root)

    def step(name: str, fn: Callable[[], str]) -> None:
        # The step's line comes first, so a slow step (training) never looks like a hang.
        echo(f"[{len(report.steps) + 1}] {name} ...")
        started = time.perf_counter()
        detail = fn()
        seconds = time.perf_counter() - started
        report.steps.append((name, seconds, detail))
        echo(f"    {detail} ({seconds:.1f}s)")

    base, adapter, merged = root / "base", root / "adapter-d2lora", root / "merged"
    eval_set, onnx_dir = root / "eval.jsonl", root / "onnx"

    def build_base() -> str:
        save_task_base(base)
        return f"tiny random-init Llama with a word-level tokenizer at {base}"

    def train() -> str:
        result = train_adapter(base, adapter, "d2lora", steps=train_steps, tau=0.5, eval_out=eval_set)
        report.figures["train"] = result
        return (f"D2-LoRA r=8 tau=0.5, {result.steps} steps: held-out accuracy "
                f"{100 * result.accuracy_before:.1f}% -> {100 * result.accuracy_after:.1f}% (chance 25%)")

    def do_merge() -> str:
        result = merge(base, adapter, merged, overwrite=True)
        report.figures["merge_plan"] = result.plan
        report.figures["merge_seconds"] = result.seconds
        return f"{len(result.plan.merged)} tensors merged into {merged} in {result.seconds:.2f}s"

    def check_reference() -> str:
        errors = reference_errors(report.figures["merge_plan"], merged)
        report.figures.update(errors)
        return (f"max |merged - fp64 reference| = {errors['max_abs_error']:.3g} "
                f"({errors['max_error_fp32_eps']:.2f} fp32 eps of the largest weight)")

    def do_verify() -> str:
        result = verify(base, adapter, dtypes=("fp32", "bf16"), mc_eval=eval_set)
        report.figures["verify"] = result
        return "PASS (fp32 and bf16 within thresholds)" if result.passed else "FAIL: " + "; ".join(result.failures())

    def do_export() -> str:
        result = export_onnx(merged, onnx_dir, dtype="fp32")
        report.figures["onnx"] = result
        return (f"{result.onnx_path} (opset {result.opset}): ONNX Runtime vs PyTorch max abs diff "
                f"{result.max_abs_diff:.2g} <= {result.tolerance:.0e}")

    def do_bench() -> str:
        settings = BenchSettings(batch_sizes=(1, 8), seq_lens=(32,), decode_tokens=8, warmup=1, repeats=3)
        result = bench(base, adapter, merged=merged, onnx=report.figures["onnx"].onnx_path, settings=settings)
        report.figures["bench"] = result
        cell = next(r for r in result.ratios() if r["mode"] == "prefill" and r["batch"] == 8)
        return (f"batch 8 x 32: merged/unmerged {cell['merged_over_unmerged']:.2f}x, "
                f"ONNX/PyTorch {cell['onnx_over_pytorch']:.2f}x (table below)")

    step("build base model", build_base)
    step("train D2-LoRA adapter", train)
    step("merge (streaming, fp32)", do_merge)
    step("check against fp64", check_reference)
    step("verify merged vs unmerged", do_verify)
    echo("\n" + format_gap_table(report.figures["verify"]) + "\n")
    if not quick:
        step("export ONNX + validate", do_export)
        step("bench", do_bench)
        echo("\n" + report.figures["bench"].table())
    return report
