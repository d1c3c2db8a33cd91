"""Click flags generated from the option models, and the refusal of a flag given out of its context.

One source for names, defaults, help, choices and ranges: the fields of ``d2merge.options``. A
command declares by hand only what is not an option (its arguments, its output paths, ``--quiet``).
Torch-free, as every module of the CLI at import time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import click

from d2merge.options.base import OptionModel, flag_for, refuse_out_of_context

_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float}


def _help(f: dataclasses.Field[Any]) -> str:
    text = f.metadata.get("help", "")
    if f.metadata.get("default_help"):
        text += f" [default: {f.metadata['default_help']}]"
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None or high is not None:  # shown as click shows its ranges; the model checks them
        below = "<" if f.metadata.get("min_open") else "<="
        if high is None:
            shown = f"x{'>' if below == '<' else '>='}{low:g}"
        else:
            shown = ("" if low is None else f"{low:g}{below}") + f"x<={high:g}"
        text += f"  [{shown}]"
    return text


def click_option(f: dataclasses.Field[Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One click option for one field: flag, type, choices, default and help from its metadata.

    Values are not range-checked by click: the model refuses them in one line naming the flag.
    """
    flag, name, help_text, kind = flag_for(f), f.name, _help(f), str(f.type)
    metavar = f.metadata.get("metavar")
    if kind == "bool":
        if not f.default:
            return click.option(flag, name, is_flag=True, default=False, help=help_text)
        if flag.startswith("--no-"):  # a flag that turns a default-on setting off (--no-validate)
            return click.option(flag, name, is_flag=True, flag_value=False, default=True, help=help_text)
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=True, show_default=True, help=help_text)
    if kind == "bool | None":
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    value_type = _TYPES.get(kind, str)
    choices = f.metadata.get("choices")
    click_type: Any = click.Choice([str(c) for c in choices]) if choices else value_type
    # click.Choice hands back text; an int field with choices (--int4-block-size) gets its int
    callback = _converter(value_type) if choices and value_type is not str else None
    default = f.default if f.default is not dataclasses.MISSING else None
    return click.option(flag, name, type=click_type, default=None if default is None else default,
                        show_default=default is not None, metavar=metavar, callback=callback, help=help_text)


def _converter(convert: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        return None if value is None else convert(value)

    return callback


def options_from(model: type[OptionModel], *, only: Iterable[str] | None = None,
                 exclude: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options for ``model``'s fields (``only`` some, in the model's order), as a decorator."""
    wanted = None if only is None else set(only)
    chosen = [f for f in dataclasses.fields(model) if f.metadata.get("cli", True) and f.name not in set(exclude)
              and (wanted is None or f.name in wanted)]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(chosen):
            fn = click_option(f)(fn)
        return fn

    return decorate


def given_on_command_line(ctx: click.Context) -> set[str]:
    return {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def refuse_flags_out_of_context(ctx: click.Context, models: Iterable[type[OptionModel]], values: dict[str, Any]) -> None:
    """A flag given where it does nothing is an error before any work, never silently ignored.

    Given on the command line counts, whatever the value (``--precision fp32`` with ``--format gguf``
    is refused too); the rule of each flag is its field's ``applies_with``.
    """
    refuse_out_of_context(models, values, given_on_command_line(ctx))


def values_of(model: type[OptionModel], params: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``model`` among a command's parameters."""
    return {f.name: params[f.name] for f in dataclasses.fields(model) if f.name in params}


def float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=flag) from None


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values
