"""merge-many's report: each job's row (:class:`JobOutcome`) and the run's summary (:class:`ManyReport`).

Plain records, made by the checks and the passes (:mod:`d2merge.many.checks`, :mod:`d2merge.many.run`),
carried as JSON rows through worker processes and Ray tasks, printed as the table, saved as the
JSON report and drawn as the HTML page (``d2merge.reports.many_page``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from d2merge.planning import MergePlan

# Statuses of a job in the report.
PLANNED, SKIPPED, MERGED, FAILED, VERIFY_FAILED, NOT_RUN = (
    "planned", "skipped", "merged", "failed", "verify_failed", "not_run")


@dataclass
class JobOutcome:
    """What happened to one job: the report's row."""

    name: str
    adapter: str
    output: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    verify: dict[str, Any] | None = None  # {"passed": bool, "failures": [...]} when verified
    method: str | None = None
    plan: MergePlan | None = field(default=None, repr=False, compare=False)  # in-process runs only

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": self.adapter, "output": self.output, "status": self.status,
                "seconds": round(self.seconds, 3), "error": self.error, "verify": self.verify, "method": self.method}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobOutcome":
        return cls(**{k: data[k] for k in ("name", "adapter", "output", "status", "seconds", "error", "verify",
                                           "method")})


@dataclass
class ManyReport:
    """The run's summary: one outcome per job, in manifest order."""

    base: str
    outdir: str
    outcomes: list[JobOutcome]
    seconds: float = 0.0
    runner: str = "local"
    peak_inflight_bytes: int = 0

    @property
    def exit_code(self) -> int:
        """0 all succeeded (or skipped), 1 a verification failed, 2 a job could not run."""
        statuses = {o.status for o in self.outcomes}
        if statuses & {FAILED, NOT_RUN}:
            return 2
        return 1 if VERIFY_FAILED in statuses else 0

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        return counts

    def table(self) -> str:
        width = max([len(o.name) for o in self.outcomes] + [3])
        lines = [f"{'job':<{width}}  {'status':<13}  {'seconds':>7}  output / error"]
        for o in self.outcomes:
            verdict = ""
            if o.verify is not None:
                verdict = "  verify " + ("PASS" if o.verify["passed"] else "FAIL: " + "; ".join(o.verify["failures"]))
            detail = o.error if o.error else o.output + verdict
            lines.append(f"{o.name:<{width}}  {o.status:<13}  {o.seconds:>7.2f}  {detail}")
        lines.append(", ".join(f"{n} {s}" for s, n in self.counts().items())
                     + f" of {len(self.outcomes)} jobs in {self.seconds:.2f}s ({self.runner})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "outdir": self.outdir, "runner": self.runner, "seconds": round(self.seconds, 3),
                "exit_code": self.exit_code, "counts": self.counts(), "peak_inflight_bytes": self.peak_inflight_bytes,
                "jobs": [o.to_json() for o in self.outcomes]}

    def save(self, path: str | Path) -> Path:
        from d2merge.io.output import save_json

        return save_json(Path(path), self.to_json())
