"""``d2merge convert --to lora``: any adapter d2merge merges, as a plain PEFT LoRA that servers load.

vLLM refuses DoRA and ``modules_to_save``; TGI reads only lora_A/lora_B, r and alpha. A DoRA,
D2-LoRA or Dual LoRA update is not a product of its factors (the norm projection rescales
W0's rows), so each module's full update dW = W_merged - W0 is factored by a truncated SVD:
exact to fp32 rounding at the update's own rank (usually the module's full size for these
methods), its best approximation below it, with the energy kept reported per module.
A PiSSA/OLoRA LoRA (whose base PEFT rebuilds on load) becomes a LoRA on the original base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2merge.adapter_ops.factor import FactorReport, factor_update
from d2merge.options.adapter_ops import ConvertOptions
from d2merge.options.base import option_error
from d2merge.adapter_ops.updates import plan_updates, update_of
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.adapter_writer import LoraModule, check_adapter_output, lora_tensors, plain_lora_config, write_lora_adapter
from d2merge.methods.base import EMBEDDING
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.planning import MergePlan

REPORT_NAME = "d2merge_report.json"


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    method: str
    modules: tuple[FactorReport, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "method": self.method, "modules": [m.to_json() for m in self.modules],
                "min_retained_energy": min((m.energy for m in self.modules), default=1.0),
                "parameters": sum(m.rank * sum(m.shape) for m in self.modules)}

    def describe(self) -> str:
        return factor_table(f"converted a {self.method} adapter into a plain LoRA: {self.out}", self.modules)


def factor_table(title: str, rows: tuple[FactorReport, ...] | list[FactorReport]) -> str:
    """One line per module: shape, rank kept of the update's rank, energy kept, relative error."""
    width = max((len(r.module) for r in rows), default=6)
    lines = [title, f"{'module':<{width}}  {'shape':>11}  rank/update  energy      rel.error"]
    for r in rows:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        lines.append(f"{r.module:<{width}}  {shape:>11}  {r.rank:>4}/{r.full_rank:<6}  {r.energy:.8f}  "
                     f"{r.relative_error:.3g}")
    if rows:
        worst = min(rows, key=lambda r: r.energy)
        lines.append(f"{len(rows)} module(s); least energy kept {worst.energy:.8f} ({worst.module})")
    return "\n".join(lines)


def check_rank_fits(plan: MergePlan, rank: int | None) -> None:
    """--rank above a module's smaller dimension is refused before any work, naming the module."""
    if rank is None:
        return
    for item in plan.merged:
        assert item.settings is not None
        rows, cols = item.shape
        if rank > min(rows, cols):
            raise option_error(f"{{rank=}} is above the size of module '{item.settings.module}' "
                               f"({rows}x{cols}), so no rank-{rank} factor exists", path=plan.adapter.weights_file,
                               tensor=item.name, hint=f"choose {{rank={min(rows, cols)}}} or less, or use {{energy}}",
                               rank=rank)


def lora_modules(adapter: Adapter, base: str | Path | BaseCheckpoint, options: ConvertOptions
                 ) -> tuple[MergePlan, list[LoraModule], list[FactorReport]]:
    """Every module of ``adapter`` as plain LoRA factors (A, B with scale 1), one module in memory at a time."""
    plan = plan_updates(base, adapter, "convert")
    check_rank_fits(plan, options.rank)
    modules: list[LoraModule] = []
    rows: list[FactorReport] = []
    for item in plan.merged:
        update = update_of(plan, item)
        a, b, row = factor_update(update.update, update.module, rank=options.rank, energy=options.energy,
                                       randomized=options.svd == "randomized")
        modules.append(LoraModule(update.module, update.layer_kind, a, b))
        rows.append(row)
    return plan, modules, rows


def convert_to_lora(adapter: str | Path | Adapter, base: str | Path, out: str | Path,
                    options: ConvertOptions | None = None, *, allow_pickle: bool = False,
                    report: str | Path | None = None) -> ConvertResult:
    """Write ``adapter`` (on ``base``) as a plain LoRA folder ``out``; nothing is written on a refusal."""
    options = options or ConvertOptions()
    options.require_target("lora")
    loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=allow_pickle)
    out_path = check_adapter_output(out, [loaded.path, Path(base)], overwrite=options.overwrite)
    plan, modules, rows = lora_modules(loaded, base, options)
    config = plain_lora_config(modules, base_model_name_or_path=loaded.config.base_model_name_or_path,
                               task_type=loaded.config.raw.get("task_type"),
                               fan_in_fan_out=loaded.config.fan_in_fan_out
                               and any(m.layer_kind != EMBEDDING for m in modules))
    result = ConvertResult(out_path, loaded.method.name, tuple(rows))
    write_lora_adapter(out_path, config, lora_tensors(modules), overwrite=options.overwrite)
    if report is not None:
        from d2merge.io.output import write_json

        write_json(Path(report), result.to_json())
    return result
