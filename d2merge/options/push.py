"""The Hub settings of ``d2merge push`` and ``merge --push-to``: one model, so both commands show the same flags.

In ``merge`` each applies only with ``push_to`` (a setting for a push that will not happen is
refused); ``push`` always pushes, so there the condition is not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from d2merge.options.base import OptionModel, option, when
from d2merge.version import __version__

_WITH_PUSH = when("push_to")


@dataclass(frozen=True)
class PushOptions(OptionModel):
    """How to push (the repo id is ``push``'s argument, ``merge``'s ``--push-to``)."""

    what: ClassVar[str] = "push option"

    private: bool = option(False, applies_with=_WITH_PUSH,
                           help="Create the repo as private. Only applies when the push creates it; an existing repo "
                                "keeps its visibility.")
    revision: str | None = option(None, metavar="BRANCH", applies_with=_WITH_PUSH,
                                  help="Commit to this branch instead of main (created from main if missing). "
                                       "refs/pr/N adds a commit to an open pull request.")
    create_pr: bool = option(False, applies_with=_WITH_PUSH,
                             help="Open a pull request against main instead of committing to it (works on repos you "
                                  "can only read).")
    commit_message: str | None = option(None, metavar="TEXT", applies_with=_WITH_PUSH, help="Commit title.",
                                        default_help=f"Upload merged model with d2merge {__version__}")
    token: str | None = option(None, metavar="TOKEN", applies_with=_WITH_PUSH,
                               help="Hugging Face token with write access.",
                               default_help="HF_TOKEN, else the `hf auth login` cache; prefer those, a --token is "
                                            "visible in the process list")

    def validate(self) -> None:
        if self.create_pr and self.revision not in (None, "main"):
            raise self.error("{create_pr} opens a pull request against main, so it cannot be combined with {revision=}",
                             hint="drop one of them; to add commits to an open pull request use {revision=refs/pr/N}")
        if self.commit_message is not None and not self.commit_message.strip():
            raise self.error("the commit message is empty", hint="pass a non-empty {commit_message}")

    def __repr__(self) -> str:  # never print a token
        return (f"PushOptions(private={self.private}, revision={self.revision!r}, create_pr={self.create_pr}, "
                f"commit_message={self.commit_message!r}, token={'***' if self.token else None})")
