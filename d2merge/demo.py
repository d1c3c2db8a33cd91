"""``d2merge demo``: the whole job on a built-in tiny model, with no downloads.

Builds a small random-init Llama-style base and a D2-LoRA adapter with
non-zero factors, merges it, and checks every merged tensor against an fp64
recomputation. Each step prints one line, so a new user sees what the tool does.
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


def run_demo(workdir: str | Path | None = None, *, echo: Callable[[str], None] = print) -> DemoReport:
    """Run every demo step in ``workdir`` (a temp folder when None) and return the figures."""
    from d2merge.synthetic import save_random_adapter, save_tiny_base

    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="d2merge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    report = DemoReport(root)

    def step(name: str, fn: Callable[[], str]) -> None:
        started = time.perf_counter()
        detail = fn()
        report.steps.append((name, time.perf_counter() - started, detail))
        echo(f"[{len(report.steps)}] {name:<28} {detail}")

    base, adapter, merged = root / "base", root / "adapter-d2lora", root / "merged"

    def build_base() -> str:
        save_tiny_base(base, "llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, vocab_size=128, max_shard_size="100KB")
        return f"tiny random Llama at {base}"

    def build_adapter() -> str:
        save_random_adapter(base, adapter, "d2lora", r=8, lora_alpha=16, tau=0.5, norm_axis="out", residual=True)
        return f"D2-LoRA r=8 alpha=16 tau=0.5 (non-zero factors) at {adapter}"

    def do_merge() -> str:
        result = merge(base, adapter, merged, overwrite=True)
        report.figures["merge_plan"] = result.plan
        report.figures["merge_seconds"] = result.seconds
        return f"{len(result.plan.merged)} tensors merged into {merged} ({len(result.files)} files)"

    def check_reference() -> str:
        errors = reference_errors(report.figures["merge_plan"], merged)
        report.figures.update(errors)
        return (f"max |merged - fp64 reference| = {errors['max_abs_error']:.3g} "
                f"({errors['max_error_fp32_eps']:.2f} fp32 eps of the largest weight)")

    step("build base model", build_base)
    step("build D2-LoRA adapter", build_adapter)
    step("merge (streaming, fp32)", do_merge)
    step("check against fp64", check_reference)
    return report
