"""The one JSON reader of d2merge: configs, indexes, safetensors headers, eval sets, Hub replies.

Python's parser has two ways to fail that are not JSON syntax errors: an integer with more
than 4300 digits (``ValueError`` from int()) and deep nesting (``RecursionError``). Both are
cheap for a hostile file to trigger, so both become the same one-line error as bad syntax,
and integers are capped far below the point where parsing them costs anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from d2merge.errors import D2MergeError

MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_INT_DIGITS = 1000  # far below int()'s own 4300-digit limit; no count or offset needs more than 20
JSON_HINT = "fix the file or download it again"


class _TooManyDigits(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooManyDigits(f"an integer with {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def parse_json(text: str | bytes, what: str, path: str | Path | None = None) -> Any:
    """Parse JSON from a file or a reply; any failure is a one-line D2MergeError naming ``what``."""
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise D2MergeError(f"{what} is not valid JSON (line {exc.lineno}: {exc.msg})", path=path,
                           hint=JSON_HINT) from None
    except _TooManyDigits as exc:
        raise D2MergeError(f"{what} is not usable JSON: {exc}", path=path, hint=JSON_HINT) from None
    except RecursionError:
        raise D2MergeError(f"{what} is not usable JSON: nested too deeply", path=path, hint=JSON_HINT) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise D2MergeError(f"{what} is not valid JSON ({' '.join(str(exc).split())[:120]})", path=path,
                           hint=JSON_HINT) from None


def read_text(path: str | Path, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A small UTF-8 text file (configs, prompts, eval sets), with one-line errors naming it."""
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise D2MergeError(f"{what} is larger than {max_bytes} bytes", path=path, hint=JSON_HINT)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise D2MergeError(f"{what} not found", path=path, hint="check the path; the folder may be incomplete") from None
    except UnicodeDecodeError:
        raise D2MergeError(f"{what} is not UTF-8 text", path=path, hint=JSON_HINT) from None
    except IsADirectoryError:
        raise D2MergeError(f"{what} is a folder, not a file", path=path, hint="pass the file itself") from None
    except OSError as exc:
        raise D2MergeError(f"cannot read {what}: {exc.strerror or exc}", path=path,
                           hint="check that the file exists and is readable") from None


def read_json(path: str | Path, what: str) -> Any:
    """A small JSON file, with one-line errors naming it."""
    return parse_json(read_text(path, what), what, path)
