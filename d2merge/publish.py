"""Merge, then optionally verify and push, as one call: what ``d2merge merge --verify --push-to`` runs.

The order is the safety policy: nothing is pushed unless the merge completed
and, when verification was asked for, it passed. A verify table, when one
was run, is written into the model card before anything leaves the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from d2merge.api import MergeOptions
from d2merge.export.formats import ExportOutcome, merge_as
from d2merge.export.hf_folder import add_verify_table_to_card
from d2merge.options.merge import MergeRunOptions
from d2merge.options.push import PushOptions


@dataclass(frozen=True)
class PushSettings:
    """Where and how to push (the options of ``d2merge push``)."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class PublishResult:
    outcome: ExportOutcome
    verify: Any = None  # VerifyReport when verification ran
    push: Any = None  # PushResult when pushed

    @property
    def passed(self) -> bool:
        return self.verify is None or self.verify.passed


def merge_verify_push(base: Any, adapter: Any, out: str | Path, *, options: MergeOptions | None = None,
                      output_format: str = "hf", verify: bool = False, push: PushSettings | None = None,
                      require_verify: bool = False, progress: bool = False,
                      echo: Callable[[str], None] | None = None, **format_options: Any) -> PublishResult:
    """Merge into ``out``; verify it (``verify`` or ``require_verify``); push it when all went well."""
    say = echo or (lambda _msg: None)
    # verify and the push work on a Hugging Face folder (d2merge.options.merge's rules, checked before any work)
    MergeRunOptions(format=output_format, verify=verify, push_to=None if push is None else push.repo_id,
                    require_verify=require_verify)
    if push is not None:  # the push's own rules (--create-pr with a branch, ...) before the merge, not after it
        PushOptions(private=push.private, revision=push.revision, create_pr=push.create_pr,
                    commit_message=push.commit_message)
    verify = verify or require_verify
    if push is not None:
        from d2merge.hub import check_can_push

        check_can_push()
    outcome = merge_as(base, adapter, out, format=output_format, options=options, progress=progress, **format_options)
    report = None
    if verify:
        from d2merge.verify import verify as run_verify

        say("verifying merged vs unmerged ...")
        report = run_verify(base, adapter, outcome.output, echo=say)
        add_verify_table_to_card(outcome.output, outcome.merge.plan, outcome.merge.source_hashes, report.table())
        if not report.passed:
            return PublishResult(outcome, report)
    pushed = None
    if push is not None:
        from d2merge.hub import push_folder

        pushed = push_folder(outcome.output, push.repo_id, private=push.private, revision=push.revision,
                             create_pr=push.create_pr, commit_message=push.commit_message, token=push.token)
    return PublishResult(outcome, report, pushed)
