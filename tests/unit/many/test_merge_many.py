"""`d2merge merge-many`: one pass over the base writes every job's output, byte for byte what `merge` writes.

The oracle is `d2merge merge` itself: each job's output must equal, file for file and byte
for byte, a single merge of that job. Around it: every plan checked before any write, the
manifest's refusals, resuming after kill -9 by provenance, local workers, and the same
through Ray on a local cluster this module starts (127.0.0.1, 2 CPUs) and shuts down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from d2merge.errors import D2MergeError
from d2merge.io.output import TEMP_MARKER
from d2merge.io.safetensors_file import SafetensorsFile
from d2merge.many import Job, load_manifest, merge_many
from helpers import checkout_env

SHARD = "20KB"
METHODS = ("lora", "dora", "d2lora", "dual_lora")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (names relative to it, hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def single_merge(cli_runner: Callable, tmp: Path, base: Path, adapter: Path, *args: str) -> Path:
    """What `d2merge merge` writes for one job alone (the oracle)."""
    out = tmp / "single" / (adapter.name + (".safetensors" if "safetensors" in args else ""))
    out.parent.mkdir(exist_ok=True)
    result = cli_runner(["merge", base, adapter, "-o", out, *args])
    assert result.code == 0, result.err
    return out


def assert_same_output(single: Path, many: Path) -> None:
    if single.is_file():
        assert many.read_bytes() == single.read_bytes()
        return
    expected, got = tree(single), tree(many)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], f"{many.name}/{name} differs from a single merge"


@pytest.fixture
def four_methods(tiny_bases: Any, make_adapter: Callable) -> tuple[Path, list[Path]]:
    base = tiny_bases("llama", sharded=True)
    return base, [make_adapter(base, method, seed=10 + i) for i, method in enumerate(METHODS)]


def write_manifest(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_outputs_are_byte_identical_to_single_merges(four_methods: tuple[Path, list[Path]], tmp_path: Path,
                                                     cli_runner: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapters = four_methods
    lora, dora, d2lora, dual = adapters
    manifest = write_manifest(tmp_path / "jobs.json", {"defaults": {"max_shard_size": SHARD}, "jobs": [
        str(lora), {"adapter": str(dora), "dtype": "bf16"}, str(d2lora),
        {"adapter": str(dual), "format": "safetensors", "dtype": "fp16"}]})
    reads: list[tuple[str, str]] = []
    original = SafetensorsFile.read

    def counting(self: SafetensorsFile, name: str, buffer: Any = None) -> Any:
        if Path(self.path).parent == base:
            reads.append((self.path.name, name))
        return original(self, name, buffer)

    monkeypatch.setattr(SafetensorsFile, "read", counting)
    result = cli_runner(["merge-many", base, manifest, "-o", tmp_path / "out", "--report", tmp_path / "r.json"])
    monkeypatch.setattr(SafetensorsFile, "read", original)
    assert result.code == 0, result.err
    # one pass: every base tensor read exactly once for all four jobs together (the bf16 and fp16
    # jobs cast every tensor, so each one is read; a tensor no job changes is copied file to file)
    assert len(reads) == len(set(reads)) == sum(len(SafetensorsFile(f).keys()) for f in base.glob("*.safetensors"))

    out = tmp_path / "out"
    assert_same_output(single_merge(cli_runner, tmp_path, base, lora, "--max-shard-size", SHARD), out / lora.name)
    assert_same_output(single_merge(cli_runner, tmp_path, base, dora, "--max-shard-size", SHARD, "--dtype", "bf16"),
                       out / dora.name)
    assert_same_output(single_merge(cli_runner, tmp_path, base, d2lora, "--max-shard-size", SHARD), out / d2lora.name)
    assert_same_output(single_merge(cli_runner, tmp_path, base, dual, "--format", "safetensors", "--dtype", "fp16"),
                       out / f"{dual.name}.safetensors")
    assert len(list((out / lora.name).glob("model-*.safetensors"))) > 1  # the shards and index were exercised
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exit_code"] == 0 and [j["status"] for j in report["jobs"]] == ["merged"] * 4
    assert [j["method"] for j in report["jobs"]] == list(METHODS)
    assert all(j["seconds"] > 0 and j["error"] is None for j in report["jobs"])


def test_shards_out_of_tensor_order_match_single_merges(tiny_bases: Any, make_adapter: Callable, tmp_path: Path,
                                                        cli_runner: Callable) -> None:
    """A tensor over the shard limit gets a shard of its own ahead of the one being filled (huggingface_hub's
    split), so a job's shards are not contiguous in tensor order: several are open at once."""
    from d2merge.api import plan

    base = tiny_bases("llama")
    adapters = [make_adapter(base, "lora", seed=81), make_adapter(base, "d2lora", seed=82)]
    shards = [t.shard for t in plan(base, adapters[0], max_shard_size="6KB").tensors]
    assert shards != sorted(shards)  # the case this test is about
    report = merge_many(base, [str(a) for a in adapters], tmp_path / "out", max_shard_size="6KB")
    assert report.exit_code == 0, report.table()
    for adapter in adapters:
        assert_same_output(single_merge(cli_runner, tmp_path, base, adapter, "--max-shard-size", "6KB"),
                           tmp_path / "out" / adapter.name)


def test_tied_and_conv1d_base_matches_single_merges(tiny_bases: Any, make_adapter: Callable, tmp_path: Path,
                                                    cli_runner: Callable) -> None:
    """GPT-2: Conv1D (fan_in_fan_out) layers and a tied lm_head the untie policy writes separately."""
    base = tiny_bases("gpt2")
    plain = make_adapter(base, "lora", seed=3)
    head = make_adapter(base, "dora", seed=4, target_modules=("c_attn", "lm_head"))
    manifest = write_manifest(tmp_path / "jobs.json", [str(plain), str(head)])
    report = merge_many(base, manifest, tmp_path / "out")
    assert report.exit_code == 0, report.table()
    for adapter in (plain, head):
        assert_same_output(single_merge(cli_runner, tmp_path, base, adapter), tmp_path / "out" / adapter.name)


def test_bad_adapter_reported_before_any_write_and_keep_going(tiny_bases: Any, make_adapter: Callable,
                                                              tmp_path: Path, cli_runner: Callable) -> None:
    base = tiny_bases("llama")
    good = [make_adapter(base, "lora", seed=21), make_adapter(base, "d2lora", seed=22)]
    wrong = make_adapter(tiny_bases("gpt2"), "lora", seed=23)  # trained on another base
    manifest = write_manifest(tmp_path / "jobs.json", [str(good[0]), {"adapter": str(wrong), "name": "broken"},
                                                        str(good[1])])
    out = tmp_path / "out"

    result = cli_runner(["merge-many", base, manifest, "-o", out, "--report", tmp_path / "r.json"])
    assert result.code == 2
    assert "job 'broken'" in result.err and "is not in the base model" in result.err
    assert list(out.iterdir()) == []  # nothing written, not even a temp folder
    report = json.loads((tmp_path / "r.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["not_run", "failed", "not_run"]

    result = cli_runner(["merge-many", base, manifest, "-o", out, "--keep-going", "--report", tmp_path / "r.json"])
    assert result.code == 2
    assert "job 'broken'" in result.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["merged", "failed", "merged"]
    assert report["jobs"][1]["error"].startswith("job 'broken': ") and "\n" not in report["jobs"][1]["error"]
    assert sorted(p.name for p in out.iterdir()) == sorted(a.name for a in good)
    for adapter in good:
        assert_same_output(single_merge(cli_runner, tmp_path, base, adapter), out / adapter.name)


def test_dry_run_prints_every_plan_and_writes_nothing(four_methods: tuple[Path, list[Path]], tmp_path: Path,
                                                      cli_runner: Callable) -> None:
    base, adapters = four_methods
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text("".join(f"- {a}\n" for a in adapters))
    result = cli_runner(["merge-many", base, manifest, "-o", tmp_path / "out", "--dry-run"])
    assert result.code == 0, result.err
    for adapter in adapters:
        assert f"== job {adapter.name} -> " in result.out and f"adapter  {adapter}" in result.out
    assert result.out.count("model.layers.0.self_attn.q_proj.weight  merge") == len(adapters)
    assert not (tmp_path / "out").exists()
    as_json = cli_runner(["merge-many", base, manifest, "--dry-run", "--json"])
    plans = json.loads(as_json.out)
    assert [p["plan"]["method"] for p in plans] == list(METHODS) and {p["status"] for p in plans} == {"planned"}


@pytest.mark.parametrize("text, message", [
    ('[{"adapter": "a", "rank": 4}]', "manifest job 1 (a): unknown field 'rank'"),
    ('[{"adapter": "a", "format": "onnx"}]', "format 'onnx' is not written by merge-many"),
    ('["x/a", "y/a"]', "jobs 1 and 2 both write 'a'"),
    ('[{"adapter": "a", "name": "../up"}]', "is not a plain file name"),
    ('[{"adapter": "a", "verify": {"max_top": 1}}]', "unknown verify threshold 'max_top'"),
    ('[{"adapter": "a", "dtype": "int8"}]', "unknown dtype 'int8'"),
    ('{"jobs": [], "defaults": {}}', "manifest lists no jobs"),
    ('{"jobs": ["a"], "default": {}}', "unknown top-level manifest field 'default'"),
    ('[{"adapter": "a", "format": "safetensors", "verify": true}]', "verify works on a Hugging Face folder"),
])
def test_manifest_refusals_name_the_job(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "jobs.json"
    path.write_text(text)
    with pytest.raises(D2MergeError, match=None) as caught:
        load_manifest(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_manifest_forms(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- adapters/one\n- /abs/two\n")
    jobs = load_manifest(tmp_path / "list.yaml", {"dtype": "bf16"})
    assert [(j.name, j.adapter, j.dtype) for j in jobs] == [
        ("one", tmp_path / "adapters" / "one", "bf16"), ("two", Path("/abs/two"), "bf16")]
    (tmp_path / "full.yml").write_text(
        "defaults: {dtype: fp16, max_shard_size: 2GB}\n"
        "jobs:\n  - {adapter: a, name: a-bf16, dtype: bf16, verify: {max_abs_diff: 0.5, min_top1: 0.9}}\n"
        "  - {adapter: b, format: safetensors, tied_embeddings: tie}\n")
    first, second = load_manifest(tmp_path / "full.yml", {"dtype": "fp32"})
    assert (first.name, first.dtype, first.max_shard_size, first.verify) == ("a-bf16", "bf16", "2GB", True)
    assert dict(first.thresholds) == {"max_abs_diff": 0.5, "min_top1": 0.9}
    assert (second.dtype, second.format, second.tied_embeddings, second.verify) == ("fp16", "safetensors", "tie", False)
    assert second.output(tmp_path) == tmp_path / "b.safetensors"
    (tmp_path / "broken.yaml").write_text("- a\n  - : [\n")
    with pytest.raises(D2MergeError, match=r"broken.yaml: manifest is not valid YAML \(line"):
        load_manifest(tmp_path / "broken.yaml")


# The child merges job by job (one job per pass) and dies by SIGKILL, as from kill -9 or the OOM
# killer, after the third job has written a few tensors into its temp folder.
KILLED_RUN = """
import os, signal, sys
from d2merge.many import merge_many
base, manifest, out, victim = sys.argv[1:5]
written = {"n": 0}
def on_tensor(job, item):
    if job == victim:
        written["n"] += 1
        if written["n"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
merge_many(base, manifest, out, max_jobs_per_pass=1, on_tensor=on_tensor)
"""


def test_kill_9_then_rerun_skips_finished_and_redoes_the_rest(four_methods: tuple[Path, list[Path]],
                                                              tmp_path: Path, cli_runner: Callable) -> None:
    base, adapters = four_methods
    manifest = write_manifest(tmp_path / "jobs.json", [str(a) for a in adapters])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(base), str(manifest), str(out), adapters[2].name],
                          capture_output=True, text=True, env=checkout_env(OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert adapters[0].name in names and adapters[1].name in names
    assert adapters[2].name not in names and adapters[3].name not in names  # nothing that looks complete
    assert any(TEMP_MARKER in n for n in names)  # the killed job's temp folder, hidden
    finished = {a.name: (out / a.name / "README.md").stat().st_mtime_ns for a in adapters[:2]}

    result = cli_runner(["merge-many", base, manifest, "-o", out, "--report", tmp_path / "r.json"])
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["skipped", "skipped", "merged", "merged"]
    assert {a.name: (out / a.name / "README.md").stat().st_mtime_ns for a in adapters[:2]} == finished
    assert sorted(p.name for p in out.iterdir()) == sorted(a.name for a in adapters)  # the temp is gone
    for adapter in adapters:
        assert_same_output(single_merge(cli_runner, tmp_path, base, adapter), out / adapter.name)


def test_rerun_redoes_a_job_whose_sources_changed_only_with_overwrite(tiny_bases: Any, make_adapter: Callable,
                                                                      tmp_path: Path, writable_copy: Callable,
                                                                      cli_runner: Callable) -> None:
    base = tiny_bases("llama")
    kept = make_adapter(base, "lora", seed=31)
    changed = writable_copy(make_adapter(base, "dora", seed=32), "changing")
    manifest = write_manifest(tmp_path / "jobs.json", [str(kept), str(changed)])
    out = tmp_path / "out"
    assert merge_many(base, manifest, out).exit_code == 0
    config = json.loads((changed / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * config["lora_alpha"]
    (changed / "adapter_config.json").write_text(json.dumps(config))

    refused = merge_many(base, manifest, out)
    assert [o.status for o in refused.outcomes] == ["skipped", "failed"] and refused.exit_code == 2
    assert "output exists but is not this job's complete result" in refused.outcomes[1].error
    redone = merge_many(base, manifest, out, overwrite=True)
    assert [o.status for o in redone.outcomes] == ["skipped", "merged"] and redone.exit_code == 0
    assert_same_output(single_merge(cli_runner, tmp_path, base, changed), out / "changing")


def test_a_job_failing_mid_pass_leaves_the_others_whole(tiny_bases: Any, make_adapter: Callable, tmp_path: Path,
                                                         cli_runner: Callable) -> None:
    """A NaN in one adapter is found only while merging: that job fails, its temp goes, the others finish."""
    from d2merge.io.adapter import WEIGHTS_NAME, write_adapter

    base = tiny_bases("llama")
    good = make_adapter(base, "lora", seed=71)
    source = make_adapter(base, "dora", seed=72)
    stored = SafetensorsFile(source / WEIGHTS_NAME)
    tensors = {name: stored.read(name).clone() for name in stored.keys()}
    poisoned = next(name for name in tensors if "layers.1" in name and "lora_B" in name)
    tensors[poisoned][0, 0] = float("nan")
    nan = tmp_path / "nan-adapter"
    write_adapter(nan, json.loads((source / "adapter_config.json").read_text()), tensors)
    manifest = write_manifest(tmp_path / "jobs.json", [str(nan), str(good)])
    out = tmp_path / "out"
    result = cli_runner(["merge-many", base, manifest, "-o", out, "--workers", "2"])
    assert result.code == 2
    assert "job 'nan-adapter'" in result.err and "NaN/Inf" in result.err and poisoned in result.err
    assert sorted(p.name for p in out.iterdir()) == [good.name]  # no temp left, nothing that looks complete
    assert_same_output(single_merge(cli_runner, tmp_path, base, good), out / good.name)


@pytest.mark.parametrize("parallel", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_workers_write_the_same_bytes(four_methods: tuple[Path, list[Path]], tmp_path: Path, parallel: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapters = four_methods
    jobs = [str(a) for a in adapters]
    reads: list[str] = []
    original = SafetensorsFile.read

    def counting(self: SafetensorsFile, name: str, buffer: Any = None) -> Any:
        if Path(self.path).parent == base:
            reads.append(name)
        return original(self, name, buffer)

    monkeypatch.setattr(SafetensorsFile, "read", counting)
    one = merge_many(base, jobs, tmp_path / "one", max_shard_size=SHARD)
    monkeypatch.setattr(SafetensorsFile, "read", original)
    # dtype kept: only the adapted tensors are read (once); the rest is copied file to file
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 7 * 2 and all("_proj." in n for n in reads)
    two = merge_many(base, jobs, tmp_path / "two", max_shard_size=SHARD, workers=2, parallel=parallel)
    assert one.exit_code == two.exit_code == 0, two.table()
    for adapter in adapters:
        assert_same_output(tmp_path / "one" / adapter.name, tmp_path / "two" / adapter.name)


def test_memory_budget_bounds_the_pass(four_methods: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """A small cap still gives the same bytes; the pass never holds much more than one step's tensors."""
    base, adapters = four_methods
    jobs = [str(a) for a in adapters]
    roomy = merge_many(base, jobs, tmp_path / "roomy", max_shard_size=SHARD)
    tight = merge_many(base, jobs, tmp_path / "tight", max_shard_size=SHARD, max_inflight="1KB")
    largest = max(SafetensorsFile(f).tensors[n].nbytes for f in base.glob("*.safetensors")
                  for n in SafetensorsFile(f).keys())
    assert tight.peak_inflight_bytes <= (len(adapters) + 1) * largest < roomy.peak_inflight_bytes * 10
    for adapter in adapters:
        assert_same_output(tmp_path / "roomy" / adapter.name, tmp_path / "tight" / adapter.name)


@pytest.mark.slow
def test_verify_per_job_and_exit_1(tiny_bases: Any, make_adapter: Callable, tmp_path: Path,
                                   cli_runner: Callable) -> None:
    base = tiny_bases("llama")
    strict = make_adapter(base, "lora", seed=41)
    manifest = write_manifest(tmp_path / "jobs.json", [
        {"adapter": str(strict), "dtype": "bf16", "verify": {"max_abs_diff": 0.0}}])
    out = tmp_path / "out"
    result = cli_runner(["merge-many", base, manifest, "-o", out, "--report", tmp_path / "r.json"])
    assert result.code == 1, result.err
    report = json.loads((tmp_path / "r.json").read_text())
    row = report["jobs"][0]
    assert row["status"] == "verify_failed" and row["verify"]["passed"] is False
    assert any("logit" in f for f in row["verify"]["failures"])
    assert "## Verification (merged vs unmerged)" in (out / strict.name / "README.md").read_text()
    # a rerun skips the finished merge but verifies it again: CI must not turn green
    again = cli_runner(["merge-many", base, manifest, "-o", out, "--report", tmp_path / "r.json"])
    assert again.code == 1
    assert json.loads((tmp_path / "r.json").read_text())["jobs"][0]["status"] == "verify_failed"
    # with thresholds it meets, the same output passes on the next rerun, still without a new merge
    write_manifest(manifest, [{"adapter": str(strict), "dtype": "bf16", "verify": {"max_abs_diff": 1e6}}])
    relaxed = cli_runner(["merge-many", base, manifest, "-o", out, "--report", tmp_path / "r.json"])
    assert relaxed.code == 0, relaxed.err
    row = json.loads((tmp_path / "r.json").read_text())["jobs"][0]
    assert row["status"] == "skipped" and row["verify"]["passed"] is True


def test_ray_missing_or_unreachable_is_one_line(tiny_bases: Any, make_adapter: Callable, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_bases("llama")
    jobs = [str(make_adapter(base, "lora", seed=51))]
    pytest.importorskip("ray")
    import socket

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(D2MergeError, match=rf"cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        merge_many(base, jobs, tmp_path / "out", ray=f"127.0.0.1:{port}")
    with pytest.raises(D2MergeError, match="invalid Ray address 'nowhere'"):
        merge_many(base, jobs, tmp_path / "out", ray="nowhere")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(D2MergeError, match=r"^ray needs the ray package.*pip install 'd2merge\[ray\]'"):
        merge_many(base, jobs, tmp_path / "out", ray="auto")


# ----- Ray ----------------------------------------------------------------------------------
# One test, one cluster: under xdist a second worker must not find (and lose) this worker's cluster.


@pytest.mark.slow
def test_ray_identical_outputs_retried_worker_and_per_job_failures(four_methods: tuple[Path, list[Path]],
                                                                   tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    base, adapters = four_methods
    jobs = [Job(a.name, a, max_shard_size=SHARD) for a in adapters]
    local = merge_many(base, jobs, tmp_path / "local")
    assert local.exit_code == 0
    marker = tmp_path / "killed-once"

    def kill_first_worker(job: str, item: Any) -> None:
        # runs inside a Ray worker: the first tensor written anywhere kills that worker's process
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def fail_one(job: str, item: Any) -> None:
        if job == adapters[1].name:
            raise D2MergeError("disk gone", path="/nowhere")

    assert not ray.is_initialized()
    path = checkout_env()["PYTHONPATH"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        report = merge_many(base, jobs, tmp_path / "ray", ray="auto", on_tensor=kill_first_worker)
        assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died mid-task
        assert report.exit_code == 0 and report.runner == "ray", report.table()
        assert [o.status for o in report.outcomes] == ["merged"] * len(adapters)
        for adapter in adapters:
            assert_same_output(tmp_path / "local" / adapter.name, tmp_path / "ray" / adapter.name)
        assert not [p for p in (tmp_path / "ray").iterdir() if TEMP_MARKER in p.name]

        # a rerun through Ray finds every output complete: all skipped, nothing rewritten
        again = merge_many(base, jobs, tmp_path / "ray", ray="auto")
        assert [o.status for o in again.outcomes] == ["skipped"] * len(adapters)

        # a job failing inside a task fails alone: its task's other job and the other task finish
        failing = merge_many(base, jobs, tmp_path / "failing", ray="auto", on_tensor=fail_one)
        assert [o.status for o in failing.outcomes] == ["merged", "failed", "merged", "merged"]
        assert failing.exit_code == 2
        assert failing.outcomes[1].error == f"job '{adapters[1].name}': /nowhere: disk gone"
        assert sorted(p.name for p in (tmp_path / "failing").iterdir()) == sorted(
            a.name for i, a in enumerate(adapters) if i != 1)
    finally:
        ray.shutdown()
