"""Byte sizes as users write them (``--max-shard-size 5GB``) and as d2merge prints them.

Decimal units (kB = 1000 bytes), as the Hugging Face Hub and transformers'
``max_shard_size`` use them; ``GiB``-style binary units are accepted too.
"""

from __future__ import annotations

import re

from d2merge.errors import D2MergeError

_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
        if not match:
            raise D2MergeError(f"invalid size {text!r}", hint="write it like 5GB, 500MB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        size = int(number * base ** _POWERS[unit.rstrip("I")])
    if size <= 0:
        raise D2MergeError(f"size must be positive, got {text!r}")
    return size


def format_size(size: int) -> str:
    """Decimal units with one decimal, as the Hub shows them: ``812 B``, ``2.2 GB``."""
    if size < 1000:
        return f"{size} B"
    value, units = size / 1000, ["kB", "MB", "GB", "TB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]}"
