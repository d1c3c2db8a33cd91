"""The one option-model base: fields that carry their help, choices, range, flag and context.

Every command's settings are a frozen dataclass of :class:`OptionModel` whose fields are made by
:func:`option`. The metadata is the single source of what the command line shows (flag, help,
choices, metavar, default) and of what is refused: a value outside its choices or range, and a
setting given where it does nothing (``applies_with``: ``genai_precision`` only with
``format='onnx-genai'``). The checks run in one place (:meth:`OptionModel.__post_init__`), so a
Python caller and the CLI get the same refusal, before any heavy import or any work.

Errors name the *option* (``density=1.5 is outside [0, 1]``); the CLI renders the same
:class:`~d2merge.errors.OptionError` with its flags (``--density 1.5 is outside [0, 1]``) from the
metadata. The error and its renderer live in d2merge.errors, so any layer raises one (io's
``overwrite=True``) without importing the option models.
Torch-free: imported by ``d2merge --help``.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, ClassVar, Iterable, Mapping, TypeVar

from d2merge.errors import OneOf, OptionError, Spelled, _cli_value, escaped, option_error  # noqa: F401 (re-exported)

Model = TypeVar("Model", bound="OptionModel")


@dataclass(frozen=True)
class When:
    """A condition on another option: its value is one of ``values``, or (``values`` empty) it is set."""

    name: str
    values: tuple[Any, ...] = ()

    def holds(self, value: Any) -> bool:
        return value in self.values if self.values else bool(value)


def when(name: str, *values: Any) -> When:
    """``when("format", "gguf")``: format is gguf; ``when("push_to")``: push_to is set (not None, not False)."""
    return When(name, tuple(values))


def option(default: Any = MISSING, *, help: str, flag: str | None = None, choices: Iterable[Any] | None = None,
           min: float | None = None, max: float | None = None, min_open: bool = False,
           applies_with: When | tuple[When, ...] = (), context_hint: str | None = None, range_hint: str | None = None,
           metavar: str | None = None, default_help: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with the metadata every consumer reads (the CLI, the checks, the docs).

    ``flag``: the command-line flag [default: ``--`` + the name with dashes]. ``min``/``max``: an
    inclusive range (``min_open``: the lower bound excluded). ``applies_with``: the conditions under
    which the option does anything; given otherwise it is refused, never ignored. ``context_hint``:
    what to do instead, with ``{name}`` placeholders; ``range_hint`` what a value outside the range should
    be instead (the bounds themselves without it). ``default_help``: the ``[default: ...]`` text
    where the default is None and means something. ``cli=False``: no flag (a library-only setting).
    """
    conditions = (applies_with,) if isinstance(applies_with, When) else tuple(applies_with)
    metadata = {"help": help, "flag": flag, "choices": None if choices is None else tuple(choices),
                "min": min, "max": max, "min_open": min_open, "applies_with": conditions,
                "context_hint": context_hint, "range_hint": range_hint, "metavar": metavar, "default_help": default_help, "cli": cli}
    return field(default=default, metadata=metadata)


def option_like(model: type[OptionModel], name: str, **changes: Any) -> Any:
    """Another model's option (its default, choices, range, flag), with some metadata changed:
    merge-many's ``dtype`` is merge's, with its own help. One declaration of the choices, not two."""
    f = next(f for f in fields(model) if f.name == name)
    metadata = {**f.metadata, **{k: v for k, v in changes.items() if k != "default"}}
    metadata["applies_with"] = tuple(metadata.get("applies_with") or ())
    return field(default=changes.get("default", f.default), metadata=metadata)


def flag_for(f: Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class OptionModel:
    """Base of every option model: checks in ``__post_init__``, ``with_overrides``, the fields' metadata.

    A subclass is a ``@dataclass(frozen=True)`` whose fields come from :func:`option`; rules between
    two of its fields that metadata cannot say go in :meth:`validate`, raising :meth:`error`.
    """

    what: ClassVar[str] = "option"  # "unknown merge option(s)" in with_overrides' TypeError

    def __post_init__(self) -> None:
        values = self.values()
        for f in fields(self):
            check_value(type(self), f, values[f.name])
        given = {f.name for f in fields(self) if _differs_from_default(f, values[f.name])}
        refuse_out_of_context([type(self)], values, given)
        self.validate()

    def validate(self) -> None:
        """Rules between fields (one option needs another, two exclude each other); none by default."""

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def error(self, template: str, *, hint: str | None = None, path: object | None = None,
              tensor: str | None = None) -> OptionError:
        """An :class:`OptionError` whose ``{name}`` placeholders are this model's options (with their values)."""
        return OptionError(template, values=self.values(), flags=type(self).flags(), hint=hint, path=path,
                           tensor=tensor)

    def with_overrides(self: Model, **overrides: Any) -> Model:
        """These options with some fields changed; an unknown name is a TypeError, as for a function."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown {self.what}(s): {', '.join(sorted(unknown))}")
        return replace(self, **overrides) if overrides else self

    @classmethod
    def resolve(cls: type[Model], options: Model | None, overrides: Mapping[str, Any]) -> Model:
        """``options`` (or the defaults) with the keyword overrides of a call like ``merge(..., dtype="bf16")``."""
        return (options or cls()).with_overrides(**overrides)

    @classmethod
    def flags(cls) -> dict[str, str]:
        return {f.name: flag_for(f) for f in fields(cls)}

    @classmethod
    def help_of(cls, name: str) -> str:
        """The help text of one field (for a flag the CLI declares by hand, e.g. with another type)."""
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)

    @classmethod
    def default_of(cls, name: str) -> Any:
        return next(f.default for f in fields(cls) if f.name == name)


def _differs_from_default(f: Field[Any], value: Any) -> bool:
    return f.default is MISSING or value != f.default


def check_value(model: type[OptionModel], f: Field[Any], value: Any) -> None:
    """One field's value against its choices and range (None, where allowed, is "not set")."""
    if value is None:
        return
    flags = model.flags()
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise OptionError(f"invalid {{{f.name}=}}", values={f.name: value}, flags=flags,
                          hint=f"choose one of {', '.join(map(str, choices))}")
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is None and high is None or isinstance(value, bool):
        return
    open_low = bool(f.metadata.get("min_open"))
    if high is None:
        bounds = f"{'above' if open_low else 'at least'} {low:g}"
    else:
        bounds = f"{'(' if open_low else '['}{'-inf' if low is None else format(low, 'g')}, {high:g}]"
    hint = f.metadata.get("range_hint")  # the bounds are in the message; a hint only where it adds something
    if isinstance(value, float) and math.isnan(value):
        raise OptionError(f"{{{f.name}}} is NaN", values={f.name: value}, flags=flags, hint=hint)
    below = low is not None and (value <= low if open_low else value < low)
    if not below and (high is None or value <= high):
        return
    if high is None:
        raise OptionError(f"{{{f.name}}} must be {bounds}, got {_cli_value(value)}", values={f.name: value},
                          flags=flags, hint=hint)
    raise OptionError(f"{{{f.name}=}} is outside {bounds}", values={f.name: value}, flags=flags, hint=hint)


def context_of(f: Field[Any]) -> tuple[When, ...]:
    return tuple(f.metadata.get("applies_with") or ())


def refuse_out_of_context(models: Iterable[type[OptionModel]], values: Mapping[str, Any], given: Iterable[str]) -> None:
    """Refuse the first option in ``given`` whose ``applies_with`` does not hold in ``values``.

    ``models`` may be several (a command's flags come from more than one model); a condition on an
    option none of them has is not checked here (the caller checks it where that option lives).
    """
    given = set(given)
    every = [f for model in models for f in fields(model)]
    flags = {f.name: flag_for(f) for f in every}
    for f in every:
        conditions = context_of(f)
        if f.name not in given or not conditions or any(c.name not in values for c in conditions):
            continue
        if all(c.holds(values[c.name]) for c in conditions):
            continue
        needs = " and ".join(_condition_text(c) for c in conditions)
        hint = f.metadata.get("context_hint")
        raise OptionError(f"{{{f.name}}} does nothing here: it applies only with {needs}",
                          values={**values, **{c.name: _shown(c) for c in conditions}}, flags=flags, hint=hint)


def _condition_text(condition: When) -> str:
    # A placeholder per condition: rendered "format='gguf'" for Python, "--format gguf" for the CLI.
    return f"{{{condition.name}=}}" if condition.values else f"{{{condition.name}}}"


def _shown(condition: When) -> Any:
    if len(condition.values) > 1:
        return OneOf(condition.values)
    return condition.values[0] if condition.values else True
