"""verify's HTML page, made from the :class:`~d2merge.verify.report.VerifyReport` object (never from its text).

What a reviewer looks for, top to bottom: the verdict and the failing check in words; each
column beside its rounding floor and limit; where the weight error sits (layer x module
heatmap in ulps, the worst tensors); how the logit differences are distributed against the
floor's and per probe (max |diff|, KL, top-1); the multiple-choice flips each way; then the
provenance (versions, sha256 of the sources, options, thresholds) and the JSON report itself.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any, Sequence

from pathlib import Path

from d2merge.reports.html import (BarChart, Cell, Raw, Verdict, details, esc, fmt, heatmap, json_details, page,
                                  section, table, write_page)

if TYPE_CHECKING:  # the page needs no torch: d2merge.verify's package imports it
    from d2merge.verify.report import VerifyReport
    from d2merge.verify.results import DtypeResult, LayerCheck

# Tensors are grouped by the first number in their name (the layer) and their module's last part.
_LAYER = re.compile(r"\.(\d+)\.")
# How many of the worst tensors the page lists before the full table (kept in a <details>).
WORST_SHOWN = 20
# Caps that keep a page small whatever the run's size (a MoE base checks tens of thousands of
# tensors; --prompts may hold thousands of lines): past them the page says what it left out and
# where the whole is (the JSON report, --report).
ALL_TENSORS_SHOWN = 500
PROBES_SHOWN = 64
THRESHOLD_NAMES = ("floor_multiple", "alpha", "max_ulp", "max_abs_diff", "min_top1", "max_gap_pp")


def check_name(failure: str) -> str:
    """The check a failure line belongs to ("logit check", "weight check", ...), in words."""
    head = failure.split(":", 1)[0].strip()
    if head.endswith("check"):
        return head
    return "weight check"  # missing tensors, copied tensors that differ: the tensor-by-tensor check


def verdict_of(report: VerifyReport) -> Verdict:
    columns = ", ".join(r.dtype for r in report.results)
    if report.passed:
        return Verdict(f"the merged model matches base + adapter within every limit ({columns})", True)
    failed: list[str] = []
    for r in report.results:
        for failure in r.failures:
            name = f"{r.dtype} {check_name(failure)}"
            if name not in failed:
                failed.append(name)
    return Verdict("failed: " + ", ".join(failed), False, report.failures())


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def summary_table(report: VerifyReport) -> Raw:
    """The columns beside their floors and limits: the text table's content, with flagged cells."""
    results = report.results
    rows: list[list[object]] = []

    def row(label: str, cells: Sequence[object], sub: bool = False) -> None:
        rows.append([Cell(label, "sub") if sub else label, *cells])

    def flagged(text: str, bad: bool) -> Cell:
        return Cell(text, "fail" if bad else "")

    def failing(r: DtypeResult, check: str) -> bool:
        return any(check_name(f) == check for f in r.failures)

    row("max |logit diff|", [flagged(_sci(r.logits.max_abs_diff) if r.logits else "-", failing(r, "logit check"))
                             for r in results])
    row("rounding floor", [_sci(r.floor.max_abs_diff) if r.floor else "-" for r in results], sub=True)
    row("limit", [f"{_sci(r.limits.max_abs_diff)} ({r.limits.max_abs_diff_from})" if r.limits else "-"
                  for r in results], sub=True)
    row("mean |logit diff|", [_sci(r.logits.mean_abs_diff) if r.logits else "-" for r in results])
    row("rounding floor", [_sci(r.floor.logits.mean_abs_diff) if r.floor else "-" for r in results], sub=True)
    row("KL mean (unmerged || merged)", [_sci(r.logits.kl_mean) if r.logits else "-" for r in results])
    row("rounding floor", [_sci(r.floor.logits.kl_mean) if r.floor else "-" for r in results], sub=True)
    row("KL max", [_sci(r.logits.kl_max) if r.logits else "-" for r in results])
    row("top-1 agreement", [flagged(_pct(r.logits.top1_agreement) if r.logits else "-", failing(r, "top-1 check"))
                            for r in results])
    row("argmax flips", [str(r.logits.argmax_flips) if r.logits else "-" for r in results])
    row("rounding floor", [str(r.floor.logits.argmax_flips) if r.floor else "-" for r in results], sub=True)
    row("p (more than rounding)", [f"{r.top1_flips_p:.3g}" if r.top1_flips_p is not None else "-"
                                   for r in results], sub=True)
    if any(r.mc is not None for r in results):
        gap_bad = [failing(r, "merge gap check") for r in results]
        row("MC accuracy unmerged", [_pct(r.mc.accuracy_unmerged) if r.mc else "-" for r in results])
        row("MC accuracy merged", [_pct(r.mc.accuracy_merged) if r.mc else "-" for r in results])
        row("merge gap (pp)", [flagged(f"{r.mc.merge_gap_pp:+.2f}" if r.mc else "-", bad)
                               for r, bad in zip(results, gap_bad)])
        row("95% interval (pp)", [f"{r.mc.gap_ci_pp[0]:+.2f} to {r.mc.gap_ci_pp[1]:+.2f}" if r.mc else "-"
                                  for r in results], sub=True)
        row("right->wrong / wrong->right", [f"{r.mc.right_to_wrong} / {r.mc.wrong_to_right}" if r.mc else "-"
                                            for r in results], sub=True)
        row("McNemar exact p", [f"{r.mc.mcnemar_p:.3g}" if r.mc else "-" for r in results], sub=True)
        row("answers flipped", [str(len(r.mc.flipped)) if r.mc else "-" for r in results])
        row("rounding floor", [str(r.mc.rounding_flips) if r.mc and r.mc.rounding_flips is not None else "-"
                               for r in results], sub=True)
    row("merged tensors checked", [str(len(r.layers)) for r in results])
    row("max weight error (ulp)", [flagged(f"{r.max_ulp_error:.3g}", failing(r, "weight check")) for r in results])
    row("limit (ulp)", [f"{r.thresholds.max_ulp:g}" for r in results], sub=True)
    row("max weight abs error", [_sci(r.max_abs_error) for r in results])
    row("copied tensors exact", [flagged(f"{r.copied_checked - len(r.copied_mismatched)}/{r.copied_checked}",
                                         bool(r.copied_mismatched)) for r in results])
    if any(r.missing_tensors for r in results):
        row("tensors missing", [flagged(str(len(r.missing_tensors)), bool(r.missing_tensors)) for r in results])
    if any(r.not_checked for r in results):
        row("tensors judged by logits only", [str(len(r.not_checked)) for r in results])
    row("result", [Cell("PASS" if r.passed else "FAIL", "pass" if r.passed else "fail") for r in results])
    return table(["", *[r.dtype for r in results]], rows)


def _layer_grid(layers: Sequence[LayerCheck]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(row labels, module names, worst ulp per cell): layer number x module, the max where several tensors meet."""
    cells: dict[tuple[str, str], float] = {}
    row_keys: dict[str, int] = {}
    for layer in layers:
        found = _LAYER.search(f".{layer.tensor}.")
        row = f"layer {found.group(1)}" if found else "other"
        order = int(found.group(1)) if found else 1 << 30
        module = layer.module.rsplit(".", 1)[-1] if layer.module else layer.tensor.rsplit(".", 2)[-2]
        row_keys.setdefault(row, order)
        cells[(row, module)] = max(cells.get((row, module), 0.0), layer.max_ulp_error)
    rows = sorted(row_keys, key=lambda r: (row_keys[r], r))
    modules = list(dict.fromkeys(module for _, module in cells))
    return rows, modules, [[cells.get((r, m)) for m in modules] for r in rows]


def weights_section(report: VerifyReport) -> Raw:
    parts: list[str] = []
    for r in report.results:
        if not r.layers:
            parts.append(f"<p>{esc(r.dtype)}: no merged tensor was checked.</p>")
            continue
        rows, modules, values = _layer_grid(r.layers)
        parts.append(heatmap(f"{r.dtype}: worst weight error per layer and module (ulp of {r.dtype})", rows, modules,
                             values, limit=r.thresholds.max_ulp, unit="ulp"))
        worst = sorted(r.layers, key=lambda layer: layer.max_ulp_error, reverse=True)
        header = ["tensor", "error (ulp)", "ulp at value", "abs error", *sorted({k for x in worst for k in x.method})]
        keys = header[4:]

        def cells(layer: LayerCheck) -> list[object]:
            bad = layer.max_ulp_error > r.thresholds.max_ulp
            return [Cell(layer.tensor, "text"), Cell(f"{layer.max_ulp_error:.3g}", "fail" if bad else ""),
                    f"{layer.max_ulp_error_at_value:.3g}", _sci(layer.max_abs_error),
                    *[f"{layer.method[k]:.4g}" if k in layer.method else "-" for k in keys]]

        parts.append(f"<h3>{esc(r.dtype)}: the {min(WORST_SHOWN, len(worst))} tensors with the largest error</h3>")
        parts.append(table(header, [cells(x) for x in worst[:WORST_SHOWN]]))
        if len(worst) > WORST_SHOWN:
            shown = sorted(worst[:ALL_TENSORS_SHOWN], key=lambda x: x.tensor)
            title = (f"{r.dtype}: all {len(worst)} merged tensors" if len(worst) <= ALL_TENSORS_SHOWN else
                     f"{r.dtype}: the {ALL_TENSORS_SHOWN} largest errors of {len(worst)} merged tensors "
                     "(all of them: the JSON report, --report)")
            parts.append(details(title, table(header, [cells(x) for x in shown])))
        if r.copied_mismatched or r.missing_tensors:
            listed = [f"differs from the base: {t}" for t in r.copied_mismatched]
            listed += [f"missing: {t}" for t in r.missing_tensors]
            parts.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in listed[:50]) + "</ul>")
    return section("Weights: each merged tensor against an fp64 recomputation", *parts,
                   note="Error in ulps of the output dtype at the scale of the merge's terms; a correct merge rounds "
                        "once (about 0.5 ulp in bf16/fp16). Copied tensors are compared bit for bit.")


def _bin_labels(edges: Sequence[float]) -> list[str]:
    labels = [f"<{fmt(edges[0])}"]
    labels += [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges, edges[1:])]
    return labels + [f">={fmt(edges[-1])}"]


def logits_section(report: VerifyReport) -> Raw:
    from d2merge.verify.results import ABS_DIFF_EDGES

    parts: list[str] = []
    for r in report.results:
        if r.logits is None:
            parts.append(f"<p>{esc(r.dtype)}: the merged model was not run (tensors missing).</p>")
            continue
        charts: list[str] = []
        floor = r.floor.logits if r.floor is not None else None
        if r.logits.abs_diff_counts:
            series: dict[str, Sequence[float | None]] = {}
            for name, stats in ((f"merged {r.dtype}", r.logits), ("rounding floor", floor)):
                if stats is not None and stats.abs_diff_counts:
                    total = sum(stats.abs_diff_counts) or 1
                    series[name] = [c / total if c else None for c in stats.abs_diff_counts]
            marker = None
            if r.limits and r.limits.max_abs_diff > 0:  # bin 1 starts at ABS_DIFF_EDGES[0], one decade per bin
                where = 1 + math.log10(r.limits.max_abs_diff / ABS_DIFF_EDGES[0])
                marker = (min(max(where, 0.0), len(ABS_DIFF_EDGES) + 1.0), f"limit {fmt(r.limits.max_abs_diff)}")
            charts.append(BarChart(f"{r.dtype}: |logit difference| over every position and token (share per decade)",
                                   _bin_labels(ABS_DIFF_EDGES), series, y_label="share of entries", log=True,
                                   x_marker=marker).svg())
        count = len(r.logits.probe_max_abs_diff)
        if count:
            # Past PROBES_SHOWN, the probes where the merged model moved most (max |diff|), in probe order.
            probes = sorted(sorted(range(count), key=lambda i: -r.logits.probe_max_abs_diff[i])[:PROBES_SHOWN])
            which = "per probe" if count <= PROBES_SHOWN else f"on the {PROBES_SHOWN} of {count} probes that moved most"
            labels = [f"#{i}" for i in probes]

            def per_probe(field_name: str) -> dict[str, Sequence[float | None]]:
                out: dict[str, Sequence[float | None]] = {
                    f"merged {r.dtype}": [getattr(r.logits, field_name)[i] for i in probes]}
                values = getattr(floor, field_name) if floor is not None else []
                if len(values) == count:
                    out["rounding floor"] = [values[i] for i in probes]
                return out

            limit_line = (r.limits.max_abs_diff, f"limit {fmt(r.limits.max_abs_diff)}") if r.limits else None
            charts.append(BarChart(f"{r.dtype}: max |logit difference| {which}", labels,
                                   per_probe("probe_max_abs_diff"), y_label="max |diff|", log=True,
                                   limit=limit_line).svg())
            charts.append(BarChart(f"{r.dtype}: mean KL(unmerged || merged) {which}", labels,
                                   {k: [v if v else None for v in s] for k, s in per_probe("probe_kl_mean").items()},
                                   y_label="KL (nats)", log=True).svg())
            charts.append(BarChart(f"{r.dtype}: top-1 agreement {which}", labels, per_probe("probe_top1_agreement"),
                                   y_label="share of positions", y_max=1.0).svg())
        parts.append(f"<h3>{esc(r.dtype)}</h3><div class=\"grid\">" + "".join(f"<div>{c}</div>" for c in charts)
                     + "</div>")
    probes = report.probes
    return section("Logits on the probes, against the rounding floor", *parts,
                   note=f"Probes: {probes.get('count')} ({probes.get('source')}), {probes.get('positions')} positions. "
                        "The rounding floor is the unmerged model against itself with its base weights rounded "
                        "once to the output dtype: what storing that dtype costs with no merge at all.")


def mc_section(report: VerifyReport) -> Raw | None:
    results = [r for r in report.results if r.mc is not None]
    if not results:
        return None
    chart = BarChart("answers flipped, each way, beside rounding's flips", [r.dtype for r in results],
                     {"right->wrong": [r.mc.right_to_wrong for r in results],  # type: ignore[union-attr]
                      "wrong->right": [r.mc.wrong_to_right for r in results],  # type: ignore[union-attr]
                      "flips from rounding alone": [r.mc.rounding_flips for r in results]},  # type: ignore[union-attr]
                     y_label="answers", width=520, height=260)
    parts: list[str] = [chart.svg()]
    for r in results:
        assert r.mc is not None
        if not r.mc.flipped:
            parts.append(f"<p>{esc(r.dtype)}: no answer flipped.</p>")
            continue
        rows = [[f.index, f.unmerged, f.merged, f.answer,
                 Cell("right->wrong", "fail") if f.unmerged == f.answer else
                 Cell("wrong->right", "pass") if f.merged == f.answer else "wrong->wrong"] for f in r.mc.flipped]
        parts.append(details(f"{r.dtype}: {len(rows)} flipped answers (example index, choices)",
                             table(["example", "unmerged chose", "merged chose", "right answer", "direction"], rows)))
    return section(f"Multiple-choice answers ({report.mc_eval})", *parts,
                   note="A correct merge flips about as many answers as rounding alone does, in no preferred direction "
                        "(McNemar exact test, and the flips against rounding's).")


def provenance_section(report: VerifyReport, data: dict[str, Any]) -> Raw:
    prov = data.get("provenance") or {}
    rows: list[list[object]] = [["base", Cell(report.base, "text")], ["adapter", Cell(report.adapter, "text")],
                                ["method", Cell(report.method, "text")]]
    rows += [[f"merged ({r.dtype})", Cell(r.merged or "merged on the fly into a temp folder", "text")]
             for r in report.results]
    rows += [[f"{name} version", Cell(value, "text")] for name, value in sorted((prov.get("versions") or {}).items())]
    rows += [[Cell(f"sha256 {name}", "text"), Cell(value, "text")] for name, value in
             sorted((prov.get("sha256") or {}).items())]
    rows += [[Cell(f"sha256 {name}, as the merge recorded it", "text"), Cell(value, "text")] for name, value in
             sorted((prov.get("recorded_by_merge") or {}).items())]
    if "adapter_matches_merge" in prov:
        same = prov["adapter_matches_merge"]
        rows.append(["adapter verified = adapter merged",
                     Cell("yes (same sha256)" if same else "NO: the adapter's sha256 differs from the merge's record",
                          "text pass" if same else "text fail")])
    options = [[name, Cell(json.dumps(value), "text")] for name, value in sorted(data["options"].items())]
    thresholds = [[r.dtype, *[Cell("-" if getattr(r.thresholds, k) is None else f"{getattr(r.thresholds, k):g}")
                              for k in THRESHOLD_NAMES]]
                  for r in report.results]
    return section("Provenance", table(["", ""], rows),
                   "<h3>Options</h3>", table(["option", "value"], options),
                   "<h3>Thresholds</h3>", table(["dtype", "floor multiple", "alpha", "max ulp", "max |diff|",
                                                 "min top-1", "max |gap| pp"], thresholds),
                   json_details(data, "The JSON report (docs/verify-report.md)"))


def write_verify_page(report: VerifyReport, path: str | Path) -> Path:
    """Write :func:`verify_page` to ``path`` atomically (temp file beside it, renamed into place)."""
    return write_page(path, verify_page(report))


def verify_page(report: VerifyReport) -> str:
    """The whole page for one verify run."""
    data = report.to_json()
    sections = [section("Columns beside their rounding floors and limits", summary_table(report)),
                weights_section(report), logits_section(report)]
    mc = mc_section(report)
    if mc is not None:
        sections.append(mc)
    sections.append(provenance_section(report, data))
    return page(f"d2merge verify: {report.method} adapter", verdict=verdict_of(report),
                subtitle=f"{report.adapter} merged into {report.base} (d2merge {data['d2merge_version']})",
                sections=sections)
