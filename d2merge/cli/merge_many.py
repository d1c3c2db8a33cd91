"""``d2merge merge-many``: every adapter of a manifest into one base, reading the base once."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from d2merge.cli.flags import options_from
from d2merge.console import QUIET_HELP, ConsoleCommand, say
from d2merge.errors import D2MergeError, VerificationFailed
from d2merge.options.many import ManyOptions


@click.command("merge-many", cls=ConsoleCommand)
@click.argument("base", metavar="BASE")
@click.argument("manifest", metavar="MANIFEST", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "outdir", type=click.Path(file_okay=False), default=None,
              help="Folder that receives one output per job (created if missing). Required unless --dry-run.")
@options_from(ManyOptions)
@click.option("--ray", "ray_address", metavar="auto|local|ADDRESS", default=None,
              help="Run the jobs as Ray tasks: auto (the cluster `ray start` set up), local (start one here), or a "
                   "cluster ADDRESS. Paths must be shared by every node. Needs the 'ray' extra.")
@click.option("--dry-run", is_flag=True, help="Plan and check every job, print the plans, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plans as JSON.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the summary as JSON: per job the output, status, seconds, verify verdict, error.")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
def merge_many_command(base: str, manifest: str, outdir: str | None, ray_address: str | None, dry_run: bool,
                       as_json: bool, report_path: str | None, quiet: bool, **options: Any) -> None:
    """Merge every adapter of MANIFEST into BASE, reading the base once: one output per job under OUTDIR.

    \b
    MANIFEST  JSON or YAML: a list of adapter folders (outputs named after them), or
              {defaults: {...}, jobs: [{adapter, name, dtype, format, max_shard_size,
              tied_embeddings, verify}, ...]}; see docs/merge-many.md
    Every job is planned and checked before anything is written; a rerun skips
    jobs whose output is complete with matching provenance and redoes the rest.
    Exit codes: 0 all jobs done, 1 a verification failed, 2 a job could not run.

    \b
    Examples:
      d2merge merge-many ./llama-3b adapters.yaml -o ./merged --dry-run
      d2merge merge-many ./llama-3b adapters.json -o ./merged --dtype bf16 --report report.json
      d2merge merge-many ./llama-3b adapters.yaml -o /shared/merged --ray auto
    """
    settings = ManyOptions(**options)  # a bad flag first, before any path is looked at
    from d2merge.output_names import check_report_file

    check_report_file(report_path, "--report")  # before the merges, not after them
    from d2merge.many import merge_many

    if outdir is None and not dry_run:
        raise click.UsageError("missing -o/--out OUTDIR (or use --dry-run to see the plans)")
    report = merge_many(base, manifest, outdir or ".", settings, dry_run=dry_run, ray=ray_address,
                        progress=not quiet and sys.stderr.isatty(), echo=say)
    if dry_run:
        if as_json:
            click.echo(json.dumps([{**o.to_json(), "plan": o.plan.summary() if o.plan else None}
                                   for o in report.outcomes], indent=2, default=str))
        else:
            for o in report.outcomes:
                click.echo(f"== job {o.name} -> {o.output}: {o.status}" + (f": {o.error}" if o.error else "")
                           + (" (complete, provenance matches)" if o.status == "skipped" else ""))
                if o.plan is not None and o.status != "skipped":
                    click.echo(o.plan.describe())
                click.echo("")
            click.echo(report.table())
    else:
        click.echo(report.table())
    if report_path:
        report.save(report_path)
    if report.exit_code == 2:
        failed = [o for o in report.outcomes if o.status == "failed"]
        not_run = sum(o.status == "not_run" for o in report.outcomes)
        raise D2MergeError(f"{len(failed)} of {len(report.outcomes)} jobs failed"
                           + (f", {not_run} not run (nothing was written; --keep-going runs them)" if not_run else "")
                           + (f"; first: {failed[0].error}" if failed else ""))
    if report.exit_code == 1:
        raise VerificationFailed(", ".join(o.name for o in report.outcomes if o.status == "verify_failed")
                                 + " failed verification")
