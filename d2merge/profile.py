"""Where a merge's time goes: wall and CPU seconds per phase (plan, read, compute, write, fsync, hash).

Why its own module: the benchmark (``benchmarks/merge_speed.py --profile``)
needs the split to show what to speed up next, and it must cost nothing when
nobody asks: :func:`phase` is a no-op unless :func:`collect` is active. Phases
nest and report *self* time (a read inside a compute counts as read only);
each thread keeps its own stack, so the writer and hashing threads' phases
add up alongside the main thread's (their sum can exceed the wall time: they
overlap).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Phases:
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, wall: float, cpu: float) -> None:
        with self.lock:
            self.wall[name] = self.wall.get(name, 0.0) + wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: {"wall_s": round(self.wall[name], 4), "cpu_s": round(self.cpu.get(name, 0.0), 4)}
                for name in self.wall}


_active: Phases | None = None
_stacks = threading.local()


@contextmanager
def collect() -> Iterator[Phases]:
    """Record phases for the code run inside (one collection at a time)."""
    global _active
    phases = _active = Phases()
    try:
        yield phases
    finally:
        _active = None


@contextmanager
def phase(name: str) -> Iterator[None]:
    phases = _active
    if phases is None:
        yield
        return
    stack = getattr(_stacks, "stack", None)
    if stack is None:
        stack = _stacks.stack = []
    frame = [0.0, 0.0]  # wall and CPU seconds of nested phases, not ours
    stack.append(frame)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        stack.pop()
        phases.add(name, wall - frame[0], cpu - frame[1])
        if stack:
            stack[-1][0] += wall
            stack[-1][1] += cpu


def add(name: str, wall: float, cpu: float) -> None:
    """Record time measured elsewhere (a thread's total CPU, say)."""
    if _active is not None:
        _active.add(name, wall, cpu)
