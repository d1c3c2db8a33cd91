"""The merge phase profile: self time per phase, per thread, and nothing recorded unless collected."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import d2merge.profile as profile


def test_nested_phases_report_self_time() -> None:
    with profile.collect() as phases:
        started = time.perf_counter()
        with profile.phase("outer"):
            time.sleep(0.02)
            with profile.phase("nested"):
                time.sleep(0.05)
        total = time.perf_counter() - started

        def in_thread() -> None:
            with profile.phase("thread"):  # another thread's stack: recorded, not nested in "outer"
                time.sleep(0.01)

        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join()
    assert phases.wall["nested"] >= 0.05 and phases.wall["outer"] >= 0.02 and phases.wall["thread"] >= 0.01
    # self time: the nested sleep is counted once, in "nested"
    assert phases.wall["outer"] + phases.wall["nested"] <= total
    assert phases.wall["outer"] <= total - phases.wall["nested"] + 1e-6
    assert set(phases.as_dict()["outer"]) == {"wall_s", "cpu_s"}


def test_nothing_recorded_outside_collect() -> None:
    with profile.phase("ignored"):
        pass
    with profile.collect() as phases:
        pass
    assert phases.wall == {}


def test_a_merge_reports_its_phases(tiny_bases, make_adapter, tmp_path: Path) -> None:
    from d2merge.api import merge

    base = tiny_bases("llama")
    with profile.collect() as phases:
        merge(base, make_adapter(base, "lora"), tmp_path / "out")
    assert {"plan", "read", "compute", "write", "fsync", "hash"} <= set(phases.wall)
    # the hashing thread reports its own CPU time (thread_time, nanosecond clock): it hashed the base and
    # the adapter, so a zero means its time was lost (never added, or measured on the wrong thread)
    assert phases.cpu["hash (thread)"] > 0
