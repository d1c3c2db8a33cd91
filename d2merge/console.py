"""Life on the screen: a first line at once, then progress with an ETA for every step that takes a while.

A command that imports torch on a busy machine shows nothing for ten seconds, and a bench
cell or a verify pass can run for minutes; a user cannot tell that from a hang. So every
command says what it is doing before its first heavy import (:func:`first_line`), and every
step of more than a few seconds reports how far it is and about how long is left
(:class:`Progress` for counted work: cells, passes, training steps; :func:`still_working`
for one opaque call such as an ONNX export). On a terminal the progress is one line redrawn
in place and erased when the step ends; in a log (stderr not a terminal) it is a plain line
every ``D2MERGE_PROGRESS_EVERY`` seconds (15 by default), so a CI log shows life without
drowning. ``--quiet`` (or ``D2MERGE_QUIET=1``) turns all of it off; results and errors still print.

Torch-free: the CLI imports this before anything heavy; its commands are :class:`ConsoleCommand`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

import click

_STATE = {"quiet": False}
# A step shorter than this shows nothing: progress is for the steps a user would wonder about.
QUIET_FOR_SECONDS = 2.0
REDRAW_SECONDS = 0.5  # on a terminal
LOG_EVERY_SECONDS = 15.0  # in a log; D2MERGE_PROGRESS_EVERY overrides


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no first line, no progress (for CI logs). Results and errors are unaffected."""
    _STATE["quiet"] = bool(quiet)


def quiet() -> bool:
    return _STATE["quiet"] or os.environ.get("D2MERGE_QUIET", "") not in ("", "0")


def _stream() -> TextIO:
    return sys.stderr


def _on_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _log_every() -> float:
    try:
        return max(0.0, float(os.environ.get("D2MERGE_PROGRESS_EVERY", LOG_EVERY_SECONDS)))
    except ValueError:
        return LOG_EVERY_SECONDS


def first_line(text: str) -> None:
    """Say what the command is doing, before torch loads. Terminal only: in a log or a pipe the
    command line itself is there, and a script that reads stderr gets only results and errors."""
    stream = _stream()
    if quiet() or not _on_terminal(stream):
        return
    stream.write(text + "\n")
    stream.flush()


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``: how long, for a person."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


class Progress:
    """Counted work (``total`` items) with elapsed time and an ETA from the pace so far.

    Nothing is shown during the first :data:`QUIET_FOR_SECONDS`; then, on a terminal, one line
    redrawn in place (erased by :meth:`close`), in a log a line every ``D2MERGE_PROGRESS_EVERY``
    seconds (the first after one such interval). ``clock`` and ``stream`` are for tests.
    """

    def __init__(self, what: str, total: int, unit: str = "step", *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, terminal: bool | None = None):
        self.what, self.total, self.unit = what, max(0, int(total)), unit
        self.done = 0
        self.stream = stream or _stream()
        self.clock = clock
        self.terminal = _on_terminal(self.stream) if terminal is None else terminal
        self.enabled = not quiet()
        self.started = clock()
        self.shown_at: float | None = None
        self.drawn = False

    def line(self) -> str:
        elapsed = self.clock() - self.started
        units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
        text = f"{self.what}: {self.done}/{self.total} {units}, {format_seconds(elapsed)}"
        if 0 < self.done < self.total:
            left = elapsed / self.done * (self.total - self.done)
            text += f", about {format_seconds(left)} left"
        return text

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        self._maybe_show()

    def _maybe_show(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        every = REDRAW_SECONDS if self.terminal else _log_every()
        # in a log the first line waits a whole interval too: a short step adds nothing to it
        if now - self.started < (QUIET_FOR_SECONDS if self.terminal else every):
            return
        if self.shown_at is not None and now - self.shown_at < every:
            return
        self.shown_at = now
        if self.terminal:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:  # the step is over: its line goes, the step's own result line follows
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@contextmanager
def still_working(what: str, *, expected_seconds: float | None = None, stream: TextIO | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """One opaque call (an ONNX export, a genai build, a validation): elapsed time while it runs,
    and an ETA when ``expected_seconds`` (from a measured pace) is known. A daemon thread draws it,
    so the call itself is untouched."""
    stream = stream or _stream()
    if quiet():
        yield
        return
    terminal = _on_terminal(stream)
    started = clock()
    stop = threading.Event()
    drawn = []

    def draw() -> None:
        every = REDRAW_SECONDS if terminal else _log_every()
        if stop.wait(QUIET_FOR_SECONDS if terminal else every):
            return
        while not stop.is_set():
            elapsed = clock() - started
            text = f"{what}: {format_seconds(elapsed)}"
            if expected_seconds:
                text += (f", about {format_seconds(expected_seconds - elapsed)} left" if elapsed < expected_seconds
                         else ", taking longer than expected")
            try:
                stream.write("\r" + text + "\x1b[K" if terminal else text + "\n")
                stream.flush()
            except (OSError, ValueError):
                return
            drawn.append(True)
            if stop.wait(every or 0.5):
                return

    thread = threading.Thread(target=draw, name="d2merge-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if drawn and terminal:
            stream.write("\r\x1b[K")
            stream.flush()


QUIET_HELP = "No first line and no progress (for CI logs); results and errors still print."


def say(message: str) -> None:
    """A stage line on stderr ("measuring base ..."), unless --quiet: stdout keeps the results."""
    if not quiet():
        click.echo(message, err=True)


class ConsoleCommand(click.Command):
    """Every ``d2merge`` command: ``-q/--quiet`` (added where the command has none) and a first line on
    the terminal before any heavy import, so that a loaded machine never shows a blank screen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(p.name == "quiet" for p in self.params):
            self.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                                            callback=lambda ctx, _param, value: ctx.meta.update(quiet=value),
                                            help=QUIET_HELP))

    def invoke(self, ctx: click.Context) -> Any:
        # the command's own --quiet, or the one added above (kept in ctx.meta, not passed to the command)
        set_quiet(bool(ctx.params.get("quiet", ctx.meta.get("quiet"))))
        first_line(f"d2merge {ctx.info_name}: starting (torch loads first: a few seconds, longer on a busy "
                   "machine) ...")
        return super().invoke(ctx)


class ConsoleGroup(click.Group):
    """The ``d2merge`` group: its commands are :class:`ConsoleCommand`."""

    command_class = ConsoleCommand
