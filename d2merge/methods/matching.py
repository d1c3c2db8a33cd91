"""Every regex d2merge evaluates on module names, in one place, with a bounded cost.

PEFT matches ``target_modules`` (a string: full match), ``exclude_modules`` and the
keys of ``rank_pattern`` / ``alpha_pattern`` (a dotted suffix) as Python regexes taken
from the adapter config. A pattern such as ``([a-z_.0-9]+)+!`` backtracks for hours
in ``re``. The ``regex`` module (already a dependency of transformers) keeps Python's
regex meaning and takes a per-match timeout; google-re2 is linear-time but drops
backreferences and lookarounds, so PEFT configs using them would change meaning.
"""

from __future__ import annotations

from typing import Any, Mapping

import regex

from d2merge.errors import D2MergeError

# Seconds one match may take; a module name is short, so a legitimate pattern needs microseconds.
MATCH_TIMEOUT_S = 0.05


def _compiled(pattern: str, field: str, source: str | None, shown: str | None = None) -> "regex.Pattern[str]":
    """``shown``: what the user wrote, when ``pattern`` wraps it (rank/alpha pattern keys)."""
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, TypeError, ValueError, RecursionError) as exc:
        raise D2MergeError(f"{field} {shown if shown is not None else repr(pattern)} is not a valid pattern: {exc}",
                           path=source,
                           hint="write it as a Python regular expression, as PEFT reads it") from None


def match(pattern: str, name: str, *, field: str, source: str | None = None, full: bool = True,
          shown: str | None = None) -> bool:
    """Whether ``pattern`` matches ``name`` (``full``: re.fullmatch, else re.match), within MATCH_TIMEOUT_S."""
    compiled = _compiled(pattern, field, source, shown)
    shown = shown if shown is not None else repr(pattern)
    try:
        found = (compiled.fullmatch if full else compiled.match)(name, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise D2MergeError(f"{field} {shown} takes too long to match a module name "
                           f"(over {MATCH_TIMEOUT_S * 1000:.0f} ms on '{name}'; catastrophic backtracking)",
                           path=source, hint="simplify the pattern: no nested repetition such as (a+)+") from None
    return found is not None


def suffix_pattern(key: str) -> str:
    """PEFT's rank/alpha pattern: the key is a regex on a dotted suffix of the module name."""
    return rf"(.*\.)?({key})$"


def check_pattern_keys(patterns: Mapping[str, Any], field: str, source: str | None = None) -> None:
    """Compile every key of ``rank_pattern`` / ``alpha_pattern`` (naming the bad key)."""
    for key in patterns:
        _compiled(suffix_pattern(key), f"{field} key", source, repr(key))


def pattern_key(patterns: Mapping[str, Any], module: str, *, field: str = "pattern",
                source: str | None = None) -> str | None:
    """The first key of ``patterns`` that applies to ``module``, as PEFT's ``get_pattern_key`` finds it."""
    for key in patterns:
        if match(suffix_pattern(key), module, field=f"{field} key", source=source, full=False, shown=repr(key)):
            return key
    return module if module in patterns else None


def is_target(target_modules: str | tuple[str, ...] | list[str] | None, module: str,
              exclude_modules: str | tuple[str, ...] | list[str] | None = None, *, source: str | None = None) -> bool:
    """Whether PEFT's ``check_target_module_exists`` would put an adapter on ``module``.

    A string is a full-match regex; a list matches the name or a dotted suffix.
    ``exclude_modules`` is read the same way and wins.
    """
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if match(exclude_modules, module, field="exclude_modules", source=source):
                return False
        elif module in exclude_modules or any(module.endswith(f".{e}") for e in exclude_modules):
            return False
    if isinstance(target_modules, str):
        return match(target_modules, module, field="target_modules", source=source)
    if not target_modules:
        return False
    return module in target_modules or any(module.endswith(f".{t}") for t in target_modules)
