"""The verify report: its JSON form (docs/verify-report.md, schema_version 1) and its readable tables."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from d2merge import __version__
from d2merge.verify.results import DtypeResult, RoundingFloor, method_summary
from d2merge.verify_options import VerifyOptions

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class VerifyReport:
    """Everything verify measured; ``to_json`` follows docs/verify-report.md (schema_version 1)."""

    base: str
    adapter: str
    method: str
    probes: dict[str, Any]
    mc_eval: str | None
    options: VerifyOptions
    results: list[DtypeResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[str]:
        return [f"{r.dtype}: {f}" for r in self.results for f in r.failures]

    def result(self, dtype: str) -> DtypeResult:
        for r in self.results:
            if r.dtype == dtype:
                return r
        raise KeyError(dtype)

    def to_json(self) -> dict[str, Any]:
        results = []
        for r in self.results:
            item = asdict(r)
            item.update(passed=r.passed, max_abs_error=r.max_abs_error, max_ulp_error=r.max_ulp_error,
                        worst_layer=r.worst_layer, method_summary=method_summary(r.layers))
            results.append(item)
        return {"schema_version": SCHEMA_VERSION, "d2merge_version": __version__, "passed": self.passed,
                "base": self.base, "adapter": self.adapter, "method": self.method, "probes": dict(self.probes),
                "mc_eval": self.mc_eval, "options": asdict(self.options), "results": results}

    def table(self) -> str:
        return format_report(self)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` (sorted keys) to ``path``."""
        from d2merge.io.output import write_json

        path = Path(path)
        temp = path.with_name(f".{path.name}.d2merge-tmp-{os.getpid()}")
        try:
            write_json(temp, self.to_json())
            os.replace(temp, path)  # atomic: a reader never sees half a report
        finally:
            temp.unlink(missing_ok=True)
        return path


def _fmt_sci(value: float) -> str:
    return f"{value:.2e}"


def _fmt_pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(widths[0]) if i == 0 else str(cell).rjust(widths[i])
                       for i, cell in enumerate(row)) for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def format_report(report: VerifyReport) -> str:
    """The full readable report: one column per output dtype, then any failures."""
    results = report.results
    probes = report.probes
    if probes["source"] == "random":
        probe_text = f"{probes['count']} random sequences x {probes['length']} tokens (seed {probes['seed']})"
    elif probes["source"] == "sentences":
        probe_text = f"{probes['count']} built-in English sentences"
    else:
        probe_text = f"{probes['count']} prompts from {probes['file']}"
    head = [f"base     {report.base}", f"adapter  {report.adapter}  ({report.method})",
            f"probes   {probe_text}, {probes['positions']} positions"]
    if report.mc_eval is not None:
        count = next((r.mc.examples for r in results if r.mc is not None), 0)
        head.append(f"mc-eval  {report.mc_eval} ({count} examples, score {report.options.mc_score})")
    rows: list[list[str]] = []

    def row(label: str, cells: list[str]) -> None:
        rows.append([label, *cells])

    def floor_cell(r: DtypeResult, text: Callable[[RoundingFloor], str]) -> str:
        return text(r.floor) if r.floor is not None else "-"

    row("max |logit diff|", [_fmt_sci(r.logits.max_abs_diff) if r.logits else "-" for r in results])
    row("  rounding floor", [floor_cell(r, lambda f: _fmt_sci(f.max_abs_diff)) for r in results])
    row("  limit", [f"{_fmt_sci(r.limits.max_abs_diff)} ({r.limits.max_abs_diff_from})" if r.limits else "-"
                    for r in results])
    row("mean |logit diff|", [_fmt_sci(r.logits.mean_abs_diff) if r.logits else "-" for r in results])
    row("  rounding floor", [floor_cell(r, lambda f: _fmt_sci(f.logits.mean_abs_diff)) for r in results])
    row("KL mean (unmerged||merged)", [_fmt_sci(r.logits.kl_mean) if r.logits else "-" for r in results])
    row("  rounding floor", [floor_cell(r, lambda f: _fmt_sci(f.logits.kl_mean)) for r in results])
    row("KL max", [_fmt_sci(r.logits.kl_max) if r.logits else "-" for r in results])
    row("top-1 agreement", [_fmt_pct(r.logits.top1_agreement) if r.logits else "-" for r in results])
    row("argmax flips", [str(r.logits.argmax_flips) if r.logits else "-" for r in results])
    row("  rounding floor", [floor_cell(r, lambda f: str(f.logits.argmax_flips)) for r in results])
    row("  p (more than rounding)", [f"{r.top1_flips_p:.3g}" if r.top1_flips_p is not None else "-"
                                     for r in results])
    if any(r.mc is not None for r in results):
        row("MC accuracy unmerged", [_fmt_pct(r.mc.accuracy_unmerged) if r.mc else "-" for r in results])
        row("MC accuracy merged", [_fmt_pct(r.mc.accuracy_merged) if r.mc else "-" for r in results])
        row("merge gap (pp)", [f"{r.mc.merge_gap_pp:+.2f}" if r.mc else "-" for r in results])
        row("  95% CI (pp)", [f"{r.mc.gap_ci_pp[0]:+.2f} to {r.mc.gap_ci_pp[1]:+.2f}" if r.mc else "-"
                              for r in results])
        row("  right->wrong / wrong->right", [f"{r.mc.right_to_wrong} / {r.mc.wrong_to_right}" if r.mc else "-"
                                              for r in results])
        row("  McNemar exact p", [f"{r.mc.mcnemar_p:.3g}" if r.mc else "-" for r in results])
        row("answers flipped", [str(len(r.mc.flipped)) if r.mc else "-" for r in results])
        row("  rounding floor", [str(r.mc.rounding_flips) if r.mc and r.mc.rounding_flips is not None else "-"
                                 for r in results])
        row("  p (more than rounding)", [f"{r.mc.flips_vs_rounding_p:.3g}"
                                         if r.mc and r.mc.flips_vs_rounding_p is not None else "-" for r in results])
    def weighed(r: DtypeResult, text: str) -> str:
        return "-" if r.informational else text  # a --original-base column is another model: no weight check

    row("merged tensors checked", [weighed(r, f"{len(r.layers)}") for r in results])
    row("max weight abs error", [weighed(r, _fmt_sci(r.max_abs_error)) for r in results])
    row("max weight error (ulp)", [weighed(r, f"{r.max_ulp_error:.3g}") for r in results])
    row("copied tensors exact", [weighed(r, f"{r.copied_checked - len(r.copied_mismatched)}/{r.copied_checked}")
                                 for r in results])
    if any(r.not_checked for r in results):
        row("tensors by logits only", [str(len(r.not_checked)) for r in results])
    summaries = [method_summary(r.layers) for r in results]
    for key in dict.fromkeys(k for s in summaries for k in s):
        row(f"{report.method}: {key}", [f"{s[key]:.6g}" if key in s else "-" for s in summaries])
    row("limits: floor multiple", [f"{r.thresholds.floor_multiple:g}" for r in results])
    row("limits: test level (alpha)", [f"{r.thresholds.alpha:g}" for r in results])
    row("limits: max ulp", [f"{r.thresholds.max_ulp:g}" for r in results])
    if any(r.thresholds.min_top1 is not None for r in results):
        row("limits: min top-1", [_fmt_pct(r.thresholds.min_top1) if r.thresholds.min_top1 is not None else "-"
                                  for r in results])
    if any(r.thresholds.max_gap_pp is not None for r in results):
        row("limits: max |gap| (pp)", [f"{r.thresholds.max_gap_pp:g}" if r.thresholds.max_gap_pp is not None
                                       else "-" for r in results])
    row("result", ["(shown)" if r.informational else "PASS" if r.passed else "FAIL" for r in results])
    text = "\n".join(head) + "\n\n" + _table(["", *[r.dtype for r in results]], rows)
    flips = [(r.dtype, r.mc.flipped) for r in results if r.mc is not None and r.mc.flipped]
    if flips:
        text += "\n\nflipped answers (example: unmerged choice -> merged choice, right answer):"
        for dtype, flipped in flips:
            shown = ", ".join(f"#{f.index} {f.unmerged}->{f.merged} ({f.answer})" for f in flipped[:8])
            more = f" and {len(flipped) - 8} more" if len(flipped) > 8 else ""
            text += f"\n  {dtype}: {shown}{more}"
    failures = report.failures()
    if failures:
        text += "\n\nfailures:\n" + "\n".join(f"  {f}" for f in failures)
    return text


def format_gap_table(reports: VerifyReport | Sequence[VerifyReport]) -> str:
    """The merge-gap summary the demo prints: one column per output dtype, across one or more reports."""
    if isinstance(reports, VerifyReport):
        reports = [reports]
    results = [r for report in reports for r in report.results]
    if not results:
        return "(no results)"
    rows = []
    if any(r.mc is not None for r in results):
        rows.append(["accuracy unmerged", *[_fmt_pct(r.mc.accuracy_unmerged) if r.mc else "-" for r in results]])
        rows.append(["accuracy merged", *[_fmt_pct(r.mc.accuracy_merged) if r.mc else "-" for r in results]])
        rows.append(["merge gap (pp)", *[f"{r.mc.merge_gap_pp:+.2f}" if r.mc else "-" for r in results]])
        rows.append(["  95% CI (pp)", *[f"{r.mc.gap_ci_pp[0]:+.2f} to {r.mc.gap_ci_pp[1]:+.2f}" if r.mc else "-"
                                        for r in results]])
        rows.append(["answers flipped", *[str(len(r.mc.flipped)) if r.mc else "-" for r in results]])
    rows.append(["max |logit diff|", *[_fmt_sci(r.logits.max_abs_diff) if r.logits else "-" for r in results]])
    rows.append(["  rounding floor", *[_fmt_sci(r.floor.max_abs_diff) if r.floor else "-" for r in results]])
    rows.append(["top-1 agreement", *[_fmt_pct(r.logits.top1_agreement) if r.logits else "-" for r in results]])
    rows.append(["max weight error (ulp)", *[f"{r.max_ulp_error:.3g}" for r in results]])
    rows.append(["result", *["PASS" if r.passed else "FAIL" for r in results]])
    return _table(["", *[r.dtype for r in results]], rows)
