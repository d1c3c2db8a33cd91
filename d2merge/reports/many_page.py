"""merge-many's HTML page, made from the :class:`~d2merge.many.report.ManyReport` object.

One row per job: status, seconds, verify verdict (and what failed), the output, and a link to
the job's own verify page when the job was verified (written beside this page by
:func:`d2merge.options.many.job_page_path`, one file per job, so that the pages of a hundred jobs stay small).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from d2merge.reports.html import BarChart, Cell, Raw, Verdict, esc, json_details, link, page, section, table, write_page

if TYPE_CHECKING:
    from d2merge.many.report import JobOutcome, ManyReport

_GOOD = {"merged", "skipped", "planned"}


def failures_of(outcome: JobOutcome) -> list[str]:
    return list((outcome.verify or {}).get("failures", []))


def write_many_page(report: ManyReport, path: str | Path) -> Path:
    """Write :func:`many_page` to ``path`` atomically, its links to the job pages relative to it."""
    return write_page(path, many_page(report, path))


def many_page(report: ManyReport, html: str | Path | None = None) -> str:
    """The run's page; ``html`` (where it will be written) makes the links to job pages relative to it."""
    folder = Path(html).expanduser().absolute().parent if html is not None else None
    rows: list[list[object]] = []
    for o in report.outcomes:
        verdict: object = "-"
        if o.verify is not None:
            text = "PASS" if o.verify["passed"] else "FAIL: " + "; ".join(o.verify["failures"])
            verdict = Cell(text, "text " + ("pass" if o.verify["passed"] else "fail"))
            page_file = o.verify.get("html")
            if page_file:
                href = os.path.relpath(page_file, folder) if folder is not None else Path(page_file).as_uri()
                verdict = Cell(Raw(f'<span class="{"pass" if o.verify["passed"] else "fail"}">{esc(text)}</span> '
                                   f"({link(href, 'verify page')})"), "text")
        status = Cell(o.status, "" if o.status in _GOOD else "fail")
        rows.append([Cell(o.name, "text name"), status, f"{o.seconds:.2f}", o.method or "-", verdict,
                     Cell(o.error or o.output, "text")])
    counts = report.counts()
    code = report.exit_code
    failed = [o.name for o in report.outcomes if o.status not in _GOOD]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(report.outcomes)} jobs"
    planned_only = all(o.status == "planned" for o in report.outcomes)  # a dry run: no verdict yet
    verdict = Verdict(summary + (f"; needs a look: {', '.join(failed)}" if failed else ""),
                      None if planned_only else code == 0,
                      [f"{o.name}: {o.error or 'verification failed: ' + '; '.join(failures_of(o))}"
                       for o in report.outcomes if o.status not in _GOOD])
    times = BarChart("seconds per job (merge, then verify)", [o.name for o in report.outcomes],
                     {"seconds": [o.seconds for o in report.outcomes]}, y_label="s", height=260)
    data = report.to_json()
    facts = [["base", Cell(report.base, "text")], ["output folder", Cell(report.outdir, "text")],
             ["runner", report.runner], ["wall time", f"{report.seconds:.2f} s"],
             ["peak bytes in flight", f"{report.peak_inflight_bytes:,}"], ["exit code", code]]
    sections = [section("Jobs", table(["job", "status", "seconds", "method", "verify", "output / error"], rows)),
                section("Time", times.svg()),
                section("Run", table(["", ""], facts),
                        json_details(data))]
    return page("d2merge merge-many", subtitle=f"{len(report.outcomes)} adapters over {report.base}", verdict=verdict,
                sections=sections)
