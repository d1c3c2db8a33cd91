"""The ``d2merge`` command line: one module per command, flags generated from ``d2merge.options``.

``app`` holds the group and the entry points (:func:`main` for tests and scripts, :func:`run` for
the ``d2merge`` script and ``python -m d2merge``/``python -m d2merge.cli``); ``flags`` turns option
models into click options and refuses a flag given out of its context.
"""

from __future__ import annotations

from d2merge.cli.app import cli, main, run
from d2merge.cli.session import DEBUG as _DEBUG  # noqa: F401  (tests and drivers reset it in place)

__all__ = ["cli", "main", "run"]
