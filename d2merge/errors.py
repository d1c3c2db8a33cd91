"""The one error type users see: a single line that names the file or tensor and what to do."""

from __future__ import annotations


class D2MergeError(Exception):
    """A problem with the user's inputs or environment, reported as one line (CLI exit code 2).

    Anything else escaping the library is a bug in d2merge and keeps its traceback.
    """

    def __init__(self, message: str, *, path: object | None = None, tensor: str | None = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.hint = hint
        self.reason = message
        super().__init__(self._one_line())

    def _one_line(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path)
        if self.tensor:
            parts.append(f"tensor '{self.tensor}'")
        where = ": ".join(parts)
        text = f"{where}: {self.reason}" if where else self.reason
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split())  # never more than one line


class VerificationFailed(Exception):
    """verify ran correctly and a threshold was exceeded (CLI exit code 1)."""
