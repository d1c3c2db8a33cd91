"""Module and tensor names in the order a person reads them: layers.2 before layers.10.

Text order puts ``layers.10`` between ``layers.1`` and ``layers.2``, so a 30-layer plan
reads 0, 1, 10, 11, ..., 2, 20; every listing a user reads (``inspect``, ``--dry-run``)
sorts with :func:`natural_key` instead. Torch-free.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key comparing runs of digits as numbers and the rest as text."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _NUMBER.split(name) if part)
