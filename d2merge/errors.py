"""The one error type users see: a single line that names the file or tensor and what to do.

:class:`OptionError` is the one that names options: ``overwrite=True`` to a Python caller,
``--overwrite`` on the command line (the CLI renders it with :meth:`OptionError.for_cli`). It
lives here, below every layer, so io or an exporter refuses by option without importing the
option models (d2merge.options), whose metadata gives a flag that is not ``--`` + the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

# {name}: the option; {name=}: the option and its value; {name=text}: the option and that value;
# {{ and }}: a brace (text from elsewhere, a server's message or a tensor name, goes in through escaped()).
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([a-z_][a-z0-9_]*)(?:(=)([^{}]*))?\}")


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


class OptionError(D2MergeError):
    """A refused option value, naming options by ``{name}`` placeholders rendered two ways.

    ``str()`` (a Python caller) names the option (``density``, ``density=1.5``); :meth:`for_cli`
    names its flag (``--density``, ``--density 1.5``) as the model's metadata spells it.
    ``{name}`` is the option alone, ``{name=}`` the option with its value.
    """

    def __init__(self, template: str, *, values: Mapping[str, Any], flags: Mapping[str, str],
                 hint: str | None = None, path: object | None = None, tensor: str | None = None):
        self.template = template
        self.hint_template = hint
        self.values = dict(values)
        self.flags = dict(flags)
        super().__init__(self._render(template, cli=False), path=path, tensor=tensor,
                         hint=None if hint is None else self._render(hint, cli=False))

    def _render(self, text: str, *, cli: bool) -> str:
        def flag_of(name: str) -> str:
            return self.flags.get(name, "--" + name.replace("_", "-"))

        def one(match: re.Match[str]) -> str:
            if match.group(1) is None:
                return match.group(0)[0]
            name, with_value, literal = match.group(1), match.group(2) == "=", match.group(3) or ""
            value: Any = _literal(literal) if literal else self.values.get(name)
            if not with_value:  # the option alone: its name, or its flag
                return flag_of(name) if cli else name
            if isinstance(value, Spelled):
                return f"{flag_of(name)} {value.cli}" if cli else f"{name}={value.python}"
            if not cli:
                if isinstance(value, OneOf):
                    return f"{name} in {value.values!r}"
                return f"{name}={_python_value(value)}"
            flag = flag_of(name)
            if value is True:
                return flag
            if value is False:
                return f"--no-{flag[2:]}"
            if isinstance(value, OneOf):
                return f"{flag} {'|'.join(map(str, value.values))}"
            return f"{flag} {_cli_value(value)}"

        return _PLACEHOLDER.sub(one, text)

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (merge-many --parallel process, Ray)
        return (_rebuild, (self.template, self.values, self.flags, self.hint_template, self.path, self.tensor))

    def for_cli(self) -> str:
        """The same one line with the command line's flags instead of the options' names."""
        return D2MergeError(self._render(self.template, cli=True), path=self.path, tensor=self.tensor,
                            hint=None if self.hint_template is None else self._render(self.hint_template, cli=True)
                            ).args[0]


def _rebuild(template: str, values: dict[str, Any], flags: dict[str, str], hint: str | None, path: str | None,
             tensor: str | None) -> OptionError:
    return OptionError(template, values=values, flags=flags, hint=hint, path=path, tensor=tensor)


@dataclass(frozen=True)
class OneOf:
    """A condition's several values, shown ``format in ('hf', 'gguf')`` or ``--format hf|gguf``."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Spelled:
    """A value written differently by the two callers: ``weights=(0.5, 0.5)`` in Python,
    ``--weights 0.5,0.5`` on the command line (both texts as shown, not repr'd)."""

    python: str
    cli: str


def _literal(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def escaped(text: object) -> str:
    """``text`` as it is inside an :class:`OptionError`'s template (its braces are not placeholders)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def option_error(template: str, *, hint: str | None = None, path: object | None = None, tensor: str | None = None,
                 model: HasFlags | None = None, flags: Mapping[str, str] | None = None,
                 **values: Any) -> OptionError:
    """An :class:`OptionError` raised outside a model (a rule found while the work runs: a rank above a
    module's size). ``{name}`` placeholders name options; ``model`` gives flags that are not
    ``--`` + the name (``genai_precision`` is ``--precision``), ``flags`` such flags by hand (a
    function's parameter that a flag of another name sets: ``plot_report``'s is ``--plot``)."""
    return OptionError(template, values=values, flags={**({} if model is None else model.flags()), **(flags or {})},
                       hint=hint, path=path, tensor=tensor)


def _python_value(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else repr(value)


def _cli_value(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


class HasFlags(Protocol):
    """An option model, as :func:`option_error` sees it: its fields' flags by name."""

    def flags(self) -> dict[str, str]: ...


class VerificationFailed(Exception):
    """verify ran correctly and a threshold was exceeded (CLI exit code 1)."""
