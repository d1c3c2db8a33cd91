"""The verify report: its JSON form (docs/verify-report.md, schema_version 1) and its readable tables."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from d2merge.version import __version__
from d2merge.verify.results import DtypeResult, RoundingFloor, method_summary
from d2merge.options.verify import VerifyOptions

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
    # {"versions": {package: version}, "sha256": {source file: digest}}: see collect_provenance
    provenance: dict[str, Any] = field(default_factory=dict)

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
                "mc_eval": self.mc_eval, "options": asdict(self.options), "results": results,
                "provenance": self.provenance}

    def table(self, *, failures: bool = True) -> str:
        """The readable report; ``failures=False`` leaves out the failures list, for a caller that
        prints them itself (the CLI's final line), so that each failure is printed once."""
        return format_report(self, failures=failures)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` (sorted keys) to ``path``."""
        from d2merge.io.output import save_json

        return save_json(Path(path), self.to_json())  # atomic: a reader never sees half a report


def collect_provenance(base_files: Sequence[Path], adapter_files: Sequence[Path],
                       merged_folder: Path | None = None) -> dict[str, Any]:
    """Versions of what computed the figures and the sha256 of the sources whose digest is cheap.

    Adapter files are small and hashed here. A base file is named by its sha256 when it sits in
    the Hugging Face cache (its blob name); a local base is not read a second time only to hash it,
    so it is listed as such. A MERGED folder d2merge wrote records the sha256 of the sources its
    merge read (its model card): they are kept as ``recorded_by_merge``, and
    ``adapter_matches_merge`` says whether the adapter verified is the one that was merged.
    """
    import platform
    import sys

    from d2merge.io.output import sha256_file
    from d2merge.io.source_hashes import hub_blob_sha256

    versions = {"d2merge": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "peft"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__version__", None):
            versions[name] = str(module.__version__)
    digests: dict[str, str] = {}
    for path in adapter_files:
        if Path(path).is_file():
            digests[str(path)] = hub_blob_sha256(Path(path)) or sha256_file(Path(path))
    for path in base_files:
        digests[str(path)] = hub_blob_sha256(Path(path)) or "not hashed (a local file)"
    provenance: dict[str, Any] = {"versions": versions, "sha256": digests}
    card = Path(merged_folder) / "README.md" if merged_folder is not None else None
    if card is not None and card.is_file():
        from d2merge.export.model_card import recorded_source_hashes

        try:
            recorded = recorded_source_hashes(card.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            recorded = {}
        if recorded:
            provenance["recorded_by_merge"] = recorded
            ours = {f"adapter/{Path(p).name}": digests[str(p)] for p in adapter_files if str(p) in digests}
            common = [label for label in ours if label in recorded]
            if common:
                provenance["adapter_matches_merge"] = all(recorded[label] == ours[label] for label in common)
    return provenance


def _fmt_sci(value: float) -> str:
    return f"{value:.2e}"


def _fmt_pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(widths[0]) if i == 0 else str(cell).rjust(widths[i])
                       for i, cell in enumerate(row)) for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def format_report(report: VerifyReport, *, failures: bool = True) -> str:
    """The full readable report: one column per output dtype, then any failures (unless ``failures`` is False)."""
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
    if any(r.logits is not None and r.logits.ppl_ratio is not None for r in results):
        row("perplexity merged / unmerged", [f"{r.logits.ppl_ratio:.4f}" if r.logits and r.logits.ppl_ratio
                                             is not None else "-" for r in results])
        row("  perplexity unmerged", [f"{r.logits.ppl_unmerged:.3f}" if r.logits and r.logits.ppl_unmerged
                                      is not None else "-" for r in results])
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
    if any(r.thresholds.max_kl is not None for r in results):
        row("limits: max KL mean", [f"{r.thresholds.max_kl:g}" if r.thresholds.max_kl is not None else "-"
                                    for r in results])
    if any(r.thresholds.max_ppl_ratio is not None for r in results):
        row("limits: max perplexity ratio", [f"{r.thresholds.max_ppl_ratio:g}" if r.thresholds.max_ppl_ratio
                                             is not None else "-" for r in results])
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
    failed = report.failures() if failures else []
    if failed:
        text += "\n\nfailures:\n" + "\n".join(f"  {f}" for f in failed)
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
