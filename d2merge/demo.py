"""``d2merge demo``: the whole job on a built-in tiny model, with no downloads.

Builds a small random-init Llama-style base, trains a D2-LoRA adapter on the
built-in multiple-choice task, merges it, proves the merge (fp64 recomputation,
then merged vs unmerged logits and accuracy in fp32 and bf16), exports ONNX and
measures throughput. Each step prints one line, so a new user sees what the tool does.

A newcomer's machine is often busy (a CI runner, a laptop doing other work), so the demo
sizes itself from the speed it measures: the training steps from the pace of its first
steps, the ONNX exporter and the timing grid from what is left of :data:`DEMO_SECONDS`.
A busy machine gets a shorter demo, not a ten times slower one.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from d2merge.api import merge
from d2merge.demo_figures import DEMO_SECONDS
from d2merge.io.safetensors_file import SafetensorsFile
from d2merge.planning import MergePlan


# Training: at most this long (the pace of the first steps decides how many fit), 60 to 400 steps:
# 60 steps reach 86.5% held-out accuracy, 100 steps 91%, 400 steps 96.5% (chance 25%).
TRAIN_SECONDS = 12.0
TRAIN_STEPS = (60, 400)
# What the later steps cost on the development machine, idle, one thread (in CPU-seconds, which
# is what they take there when nothing else runs; 2026-12-07), and its training pace: the pace
# measured here over that one scales the estimates, so a machine twice as slow plans for twice the time.
IDLE_STEP_SECONDS = 0.055
IDLE_SECONDS = {"onnx_dynamo": 14.0, "onnx_legacy": 3.0, "bench_full": 6.0, "bench_small": 2.5}
@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the demo, the caller's count given back: the tiny model's matrices gain
    nothing from a second thread, and on a busy machine that thread waits for a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class DemoReport:
    workdir: Path
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        width = max(len(s[0]) for s in self.steps)
        lines = [f"{name:<{width}}  {seconds:6.2f}s  {detail}" for name, seconds, detail in self.steps]
        return "\n".join(lines)

    def summary(self) -> str:
        """What the demo showed, in sentences a newcomer reads right (ratios only where the runs allow)."""
        lines = ["summary:"]
        if "max_error_fp32_eps" in self.figures:
            lines.append(f"  merge   exact to {self.figures['max_error_fp32_eps']:.2f} fp32 eps of the largest weight "
                         "(fp32 arithmetic, one rounding)")
        verdict = self.figures.get("verify")
        if verdict is not None:
            gaps = ", ".join(f"{r.dtype} {r.mc.merge_gap_pp:+.2f} pp" for r in verdict.results if r.mc is not None)
            lines.append(f"  verify  {'PASS' if verdict.passed else 'FAIL'} in "
                         + " and ".join(r.dtype for r in verdict.results) + (f"; merge gap {gaps}" if gaps else ""))
        if "skipped" in self.figures:
            lines.append("  skipped the ONNX export and the bench (this machine is too busy now: see above)")
        bench = self.figures.get("bench")
        if bench is not None:
            cell = self.figures["bench_cell"]
            lines.append(f"  speed   batch {cell[1]} x {cell[2]} tokens (prefill), {bench.settings.repeats} timed runs each:")
            for name, what in (("merged_over_unmerged", "merged vs base + adapter unmerged"),
                               ("merged_over_base", "merged vs the plain base (no adapter)"),
                               ("onnx_over_pytorch", "ONNX Runtime vs PyTorch (merged)")):
                found = bench.compare(name, *cell)
                if found is not None:
                    lines.append(f"          {what}: {found.sentence()}")
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


def run_demo(workdir: str | Path | None = None, *, echo: Callable[[str], None] = print,
             train_steps: int | None = None, quick: bool = False, seconds: float = DEMO_SECONDS) -> DemoReport:
    """Run every demo step in ``workdir`` (a temp folder when None) and return the figures.

    Steps: build a tiny base, train a D2-LoRA adapter on the built-in task, merge it,
    check the merge against fp64, verify merged vs unmerged in fp32 and bf16, export
    and validate ONNX, and measure throughput. ``quick`` skips ONNX and bench.
    ``train_steps`` fixes the training length; without it the pace of the first steps decides
    (TRAIN_STEPS, TRAIN_SECONDS). ``seconds`` is the whole demo's target: the ONNX exporter and
    the timing grid are chosen to fit what is left of it at the measured speed.
    """
    with one_thread():
        return _run_demo(workdir, echo, train_steps, quick, seconds)


def _run_demo(workdir: str | Path | None, echo: Callable[[str], None], train_steps: int | None, quick: bool,
              seconds: float) -> DemoReport:
    from d2merge.bench import BenchSettings, bench
    from d2merge.export.onnx import export_onnx
    from d2merge.train import save_task_base, train_adapter
    from d2merge.verify import format_gap_table, verify

    started = time.perf_counter()
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="d2merge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    report = DemoReport(root)

    def step(name: str, fn: Callable[[], str]) -> None:
        # The step's line comes first, so a slow step (training) never looks like a hang.
        echo(f"[{len(report.steps) + 1}] {name} ...")
        step_started = time.perf_counter()
        detail = fn()
        took = time.perf_counter() - step_started
        report.steps.append((name, took, detail))
        echo(f"    {detail} ({took:.1f}s)")

    def left() -> float:
        return seconds - (time.perf_counter() - started)

    base, adapter, merged = root / "base", root / "adapter-d2lora", root / "merged"
    eval_set, onnx_dir = root / "eval.jsonl", root / "onnx"

    def build_base() -> str:
        save_task_base(base)
        return f"tiny random-init Llama with a word-level tokenizer at {base}"

    def train() -> str:
        fewest, most = TRAIN_STEPS
        budget = {} if train_steps is not None else {"seconds": TRAIN_SECONDS, "min_steps": fewest}
        clock: dict[int, float] = {}
        result = train_adapter(base, adapter, "d2lora", steps=train_steps or most, tau=0.5, eval_out=eval_set,
                               log=lambda done, _loss: clock.setdefault(done, time.perf_counter()), log_every=10,
                               **budget)
        report.figures["train"] = result
        # How much slower than the development machine idle this one runs now (> 1: slower): the
        # pace of the steps after the first ten (which include the first calls' warm-up).
        first, last = min(clock), max(clock)
        if last > first:
            report.figures["slowdown"] = (clock[last] - clock[first]) / (last - first) / IDLE_STEP_SECONDS
        sized = "" if train_steps is not None or result.steps == most else ", as many as fit this machine's pace"
        return (f"D2-LoRA r=8 tau=0.5, {result.steps} steps{sized}: held-out accuracy "
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

    def estimate(name: str) -> float:
        return IDLE_SECONDS[name] * max(1.0, report.figures.get("slowdown", 1.0))

    def do_export() -> str:
        # PyTorch's supported exporter when it fits, else the legacy one (several times faster; the
        # graph is validated the same way). `d2merge export-onnx` defaults to dynamo.
        exporter = "dynamo" if estimate("onnx_dynamo") + estimate("bench_small") <= left() else "legacy"
        result = export_onnx(merged, onnx_dir, dtype="fp32", exporter=exporter)
        report.figures["onnx"] = result
        why = "" if exporter == "dynamo" else ", the legacy exporter: dynamo would not fit this machine's pace"
        return (f"{result.onnx_path} (opset {result.opset}{why}): ONNX Runtime vs PyTorch max abs diff "
                f"{result.max_abs_diff:.2g} <= {result.tolerance:.0e}")

    def do_bench() -> str:
        full = estimate("bench_full") <= left()
        settings = (BenchSettings(batch_sizes=(1, 8), seq_lens=(32,), decode_tokens=8, warmup=1, repeats=5) if full
                    else BenchSettings(batch_sizes=(8,), seq_lens=(32,), decode_batch_sizes=(), decode_tokens=0,
                                       warmup=1, repeats=5))
        result = bench(base, adapter, merged=merged, onnx=report.figures["onnx"].onnx_path, settings=settings)
        report.figures["bench"] = result
        report.figures["bench_cell"] = ("prefill", 8, 32)
        grid = "batch 1 and 8 x 32 tokens, and decode" if full else "batch 8 x 32 tokens only, to fit this machine's pace"
        return f"{grid}: table and summary below"

    step("build base model", build_base)
    step("train D2-LoRA adapter", train)
    step("merge (streaming, fp32)", do_merge)
    step("check against fp64", check_reference)
    step("verify merged vs unmerged", do_verify)
    echo("\n" + format_gap_table(report.figures["verify"]) + "\n")
    behind = not quick and left() < -seconds  # already past twice the target: this machine is crawling
    if behind:
        report.figures["skipped"] = (f"the ONNX export and the bench: {time.perf_counter() - started:.0f} s "
                                     f"gone against a {seconds:.0f} s target on this machine now (run "
                                     f"`d2merge export-onnx {merged} -o model.onnx` and `d2merge bench` when it is "
                                     "quieter)")
        echo(f"skipped {report.figures['skipped']}")
    if not quick and not behind:
        step("export ONNX + validate", do_export)
        step("bench", do_bench)
        echo("\n" + report.figures["bench"].table())
    report.figures["seconds"] = time.perf_counter() - started
    echo("\n" + report.summary())
    return report
