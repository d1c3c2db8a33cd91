"""bench's HTML page, made from the :class:`~d2merge.bench.BenchReport` object.

Throughput per variant in every cell of the grid (batch x length), with the min-max spread as
whiskers so that a difference within noise looks like one; latency p50/p95; the ratios measured
in the same run; decode tokens/s; the settings and the machine facts bench recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from d2merge.reports.html import BarChart, Cell, Verdict, json_details, page, section, table, write_page

if TYPE_CHECKING:
    from d2merge.bench import BenchReport, BenchRow


def _cell_label(mode: str, batch: int, seq: int) -> str:
    return f"b{batch} s{seq}" if mode == "prefill" else f"decode b{batch}"


def _throughput_range(row: BenchRow) -> tuple[float, float]:
    """tokens/s at the slowest and the fastest timed run (tokens = tokens/s x median latency)."""
    tokens = row.tokens_per_s * row.latency_ms_p50 / 1e3
    return tokens / max(row.latency_ms_max / 1e3, 1e-9), tokens / max(row.latency_ms_min / 1e3, 1e-9)


def write_bench_page(report: BenchReport, path: str | Path) -> Path:
    """Write :func:`bench_page` to ``path`` atomically (temp file beside it, renamed into place)."""
    return write_page(path, bench_page(report))


def bench_page(report: BenchReport) -> str:
    variants = list(dict.fromkeys(r.variant for r in report.rows))  # measured order: base, unmerged, merged, ...
    ratios = report.ratios()
    ratio_names = list(dict.fromkeys(k for entry in ratios for k in entry if k not in ("mode", "batch", "seq")))
    sections: list[str] = []
    for mode, what in (("prefill", "one forward over batch x length"), ("decode", "one new token per step, KV cache")):
        cells = sorted({(r.batch, r.seq) for r in report.rows if r.mode == mode})
        if not cells:
            continue
        labels = [_cell_label(mode, b, s) for b, s in cells]
        found = {v: [report.find(v, mode, b, s) for b, s in cells] for v in variants}
        shown = {v: rows for v, rows in found.items() if any(rows)}
        throughput = BarChart(f"{mode}: tokens/s (median; whiskers: slowest to fastest run)", labels,
                              {v: [r.tokens_per_s if r else None for r in rows] for v, rows in shown.items()},
                              y_label="tokens / s", log=True,
                              whiskers={v: [_throughput_range(r) if r else None for r in rows]
                                        for v, rows in shown.items()})
        latency = BarChart(f"{mode}: latency p50 (whiskers: p50 to p95)", labels,
                           {v: [r.latency_ms_p50 if r else None for r in rows] for v, rows in shown.items()},
                           y_label="ms", log=True,
                           whiskers={v: [(r.latency_ms_p50, r.latency_ms_p95) if r else None for r in rows]
                                     for v, rows in shown.items()})
        rows = [[r.variant, r.batch, r.seq, f"{r.tokens_per_s:,.1f}", f"{r.latency_ms_p50:.2f}",
                 f"{r.latency_ms_p95:.2f}", f"{r.latency_ms_min:.2f}-{r.latency_ms_max:.2f}", r.runs,
                 Cell(f"{r.spread_pct:.1f}%")] for r in report.rows if r.mode == mode]
        sections.append(section(f"{mode.capitalize()} ({what})", throughput.svg(), latency.svg(),
                                table(["variant", "batch", "length", "tokens/s", "p50 ms", "p95 ms", "min-max ms",
                                       "runs", "spread"], rows)))
    ratio_rows = [[entry["mode"], entry["batch"], entry["seq"],
                   *[f"{entry[k]:.3f}x" if k in entry else "-" for k in ratio_names]] for entry in ratios]
    spread = max((r.spread_pct for r in report.rows), default=0.0)
    sections.append(section("Throughput ratios (measured in the same run)",
                            table(["mode", "batch", "length", *[k.replace("_over_", " / ") for k in ratio_names]],
                                  ratio_rows),
                            note=f"The widest min-max spread of a cell was {spread:.1f}% of its median: ratios closer "
                                 "to 1 than that are within noise."))
    data = report.to_json()
    settings = [[k, Cell(json.dumps(v), "text")] for k, v in sorted(data["settings"].items())]
    meta = [[k, Cell(json.dumps(v) if not isinstance(v, str) else v, "text")] for k, v in sorted(report.meta.items())]
    sections.append(section("Settings and machine", table(["setting", "value"], settings),
                            table(["recorded", "value"], meta),
                            json_details(data, flag="--json")))
    merged_vs = [e["merged_over_unmerged"] for e in ratios if e.get("merged_over_unmerged")]
    headline = (f"merged runs {min(merged_vs):.2f}x to {max(merged_vs):.2f}x the unmerged model's throughput"
                if merged_vs else f"{len(report.rows)} cells measured")
    return page("d2merge bench", subtitle=f"{report.meta.get('adapter', '')} on {report.meta.get('base', '')}",
                verdict=Verdict(headline), sections=sections)
