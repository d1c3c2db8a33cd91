"""Peak memory of `d2merge verify` relative to one model, each measured in its own process.

verify must never hold the unmerged and the merged model at once: it runs the
unmerged model, keeps its logits, frees it, then loads each merged model in
turn. This script checks that claim on a model big enough for the difference
to show (default: a random-init Llama of 134M parameters, 536 MB in fp32):

- one model: load base + adapter (unmerged) and run the probes, nothing else;
- verify:    the full ``verify(base, adapter, dtypes=...)`` run, merging on the fly.

Each child reports its RSS after imports (the interpreter, torch, transformers:
the same in both) and its peak RSS (``VmHWM``; Linux only). The figures reported are the
peaks above that baseline. A first model load also costs a fixed amount that does
not grow with the model (transformers' modelling code, kernel workspaces; about
130 MB here), measured by the same one-model run on a 2-layer tiny model and
subtracted for the "x the model" figures. The target is verify <= 1.3x one model.

    python benchmarks/verify_memory.py                     # 134M parameters, fp32 + bf16 columns
    python benchmarks/verify_memory.py --layers 4 --hidden 512 --dtypes fp32   # a quick smaller run

``--shape 1.1b`` / ``--shape 7b`` measure the block-streamed verify at the scale users fine-tune
instead: a random Llama-shaped bf16 base (benchmarks/merge_speed.py's builder, 2.2 GB / 13.5 GB)
with a LoRA r=16 on every linear layer, merged by ``d2merge merge``, then
``d2merge verify BASE ADAPTER MERGED`` in its own process: peak RSS of the whole process
(``os.wait4``), wall time, the phases (each stage line verify prints, time-stamped), and the
floor it is judged against: reading the base and the merged file once (timed here: the
faster of a read through the page cache and one with O_DIRECT, as verify reads a cold file)
plus the forward passes' arithmetic (2 x parameters x probe tokens per model run, three
runs: unmerged, rounding floor, merged) at the machine's measured fp32 matmul rate;
and the same in CPU time (the read's CPU time plus the arithmetic at the matmul rate per CPU
second), which a shared machine's load does not move the way it moves wall time. Each run
prints the load average at its start and end, and each stage line the GB the process had
read by then (/proc/PID/io rchar).
Then the negative case: one q_proj of the merged file scaled by 1.01 in place must exit 1.

    python benchmarks/verify_memory.py --shape 1.1b --workdir /tmp/vm11 --json vm11.json
    nice -n 10 python benchmarks/verify_memory.py --shape 7b --workdir /tmp/vm7 > vm7.txt 2>&1

``--mc-base FOLDER`` (a real model with a tokenizer, e.g. SmolLM2-135M) measures
``d2merge verify BASE ADAPTER --mc-eval`` on 200 English-task items (a random LoRA r=8 on all
linear layers, merged on the fly) with this checkout and with ``--before CHECKOUT`` (whole
models, before streaming), each in its own process: time and peak RSS.

    python benchmarks/verify_memory.py --mc-base ~/.cache/d2merge/paper-table/smollm2-135m-instruct --before /work/main
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

CHILD = r"""
import json, sys
import psutil
import torch
import transformers
from d2merge.runtime import load_unmerged
from d2merge.verify import probe_logits, random_probes, verify

mode, base, adapter, dtypes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(2)
baseline = psutil.Process().memory_info().rss
if mode == "one-model":
    model = load_unmerged(base, adapter)
    probes = random_probes(model.config.vocab_size, count=8, length=32, seed=0)
    probe_logits(model, probes, 8)
    passed = None
else:
    report = verify(base, adapter, dtypes=dtypes.split(","))
    passed = report.passed
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report
# the parent's size at the fork. VmHWM belongs to the memory map exec created.
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "passed": passed}))
"""


def build_tiny(folder: Path) -> None:
    """The fixed-overhead reference: the same flow on a model too small to matter (about 0.1 MB)."""
    from d2merge.synthetic import save_random_adapter, save_tiny_base

    save_tiny_base(folder / "base", "llama", tokenizer=False)
    save_random_adapter(folder / "base", folder / "adapter", "d2lora")


def build(folder: Path, *, hidden: int, layers: int, intermediate: int, vocab: int, heads: int, rank: int) -> int:
    """Save a random-init Llama and a D2-LoRA adapter on every linear layer; returns the fp32 model bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from d2merge.synthetic import save_random_adapter

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder / "base")
    del model
    # Factors of 0.02 keep dW comparable to the 0.02-std base weights, as a trained adapter's would be.
    save_random_adapter(folder / "base", folder / "adapter", "d2lora", r=rank, lora_alpha=2.0 * rank,
                        magnitude=0.02)
    return model_bytes


def run_child(mode: str, folder: Path, dtypes: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder / "base"), str(folder / "adapter"), dtypes],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtypes", default="fp32,bf16", help="verify's --dtypes (one merged model per entry)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--shape", choices=("1.1b", "7b"), default=None,
                        help="measure the block-streamed verify of a merge at this scale instead (see above)")
    parser.add_argument("--probes", type=int, default=8, help="--shape: random probes")
    parser.add_argument("--probe-length", type=int, default=32, help="--shape: tokens per probe")
    parser.add_argument("--no-negative", dest="negative", action="store_false",
                        help="--shape: skip the q_proj x 1.01 run that must fail")
    parser.add_argument("--keep", action="store_true", help="--shape: keep --workdir's models")
    parser.add_argument("--drop-caches", action="store_true",
                        help="--shape: empty the page cache (root) before the floor's read and before each verify, "
                             "so both read from the disk; without it the figures depend on what an earlier run "
                             "left cached (a 7B base and merge, 27 GB, do not both fit in 24 GB)")
    parser.add_argument("--weights-only", action="store_true",
                        help="--shape: measure the weight check alone, correct and with q_proj x 1.01")
    parser.add_argument("--mc-base", type=Path, default=None,
                        help="measure verify --mc-eval (200 items) on this real base instead (see above)")
    parser.add_argument("--before", type=Path, default=None, help="--mc-base: the checkout measured as 'before'")
    args = parser.parse_args()
    if args.mc_base:
        mc_before_after(args)
        return
    if args.shape:
        at_scale(args)
        return

    folder = args.workdir or Path(tempfile.mkdtemp(prefix="d2merge-verify-mem-"))
    try:
        model_bytes = build(folder, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                            vocab=args.vocab, heads=args.heads, rank=args.rank)
        build_tiny(folder / "tiny")
        fixed = run_child("one-model", folder / "tiny", args.dtypes)
        one = run_child("one-model", folder, args.dtypes)
        full = run_child("verify", folder, args.dtypes)
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)

    def above(result: dict) -> int:
        return result["peak_rss"] - result["baseline_rss"]

    overhead = above(fixed)
    figures = {
        "model_fp32_bytes": model_bytes,
        "dtypes": args.dtypes,
        "fixed_overhead_bytes": overhead,
        "one_model": {**one, "peak_above_baseline": above(one),
                      "x_model": round((above(one) - overhead) / model_bytes, 3)},
        "verify": {**full, "peak_above_baseline": above(full),
                   "x_model": round((above(full) - overhead) / model_bytes, 3)},
        "verify_over_one_model": round(above(full) / above(one), 3),
    }
    mb = 1e6
    print(f"model (fp32)           {model_bytes / mb:7.0f} MB")
    print(f"baseline RSS (imports) {one['baseline_rss'] / mb:7.0f} MB")
    print(f"fixed first-load cost  {overhead / mb:7.0f} MB (one-model run on a tiny model)")
    for name in ("one_model", "verify"):
        r = figures[name]
        print(f"{name.replace('_', ' '):<10} peak {r['peak_rss'] / mb:6.0f} MB, above baseline "
              f"{r['peak_above_baseline'] / mb:5.0f} MB; less the fixed cost = {r['x_model']:.2f}x the model "
              f"({r['seconds']} s)")
    print(f"verify / one model    {figures['verify_over_one_model']:.2f}x   (target <= 1.3x; verify passed: "
          f"{full['passed']})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


# The block-streamed verify at scale (--shape): one process per command, stderr lines time-stamped.
STAMPED = """
import json, os, subprocess, sys, time


def read_bytes(pid):
    # rchar: bytes the process got from read() calls (safetensors tensors are read, not mapped)
    try:
        with open(f"/proc/{pid}/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return None


started = time.perf_counter()
load = os.getloadavg()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
lines = []
for line in proc.stderr:
    lines.append([round(time.perf_counter() - started, 2), read_bytes(proc.pid), line.rstrip()])
out = proc.stdout.read()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"wall": time.perf_counter() - started, "rss": usage.ru_maxrss * 1024,
                  "cpu": usage.ru_utime + usage.ru_stime, "load_start": load, "load_end": os.getloadavg(),
                  "code": os.waitstatus_to_exitcode(status), "lines": lines, "stdout": out[-4000:]}))
"""


def print_phases(lines: list, started_bytes: int | None = None) -> None:
    """Each stage line verify printed, with its time stamp and the GB the process had read by then."""
    for stamp, read, line in lines:
        shown = f"{read / 1e9:7.1f} GB read" if read is not None else " " * 15
        print(f"  {stamp:8.1f} s {shown}  {line}", flush=True)


def stamped(argv: list[str], cwd: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-c", STAMPED, *argv], capture_output=True, text=True, check=True,
                          env=env, cwd=cwd)
    return json.loads(done.stdout)


def matmul_rate() -> tuple[float, float]:
    """fp32 multiply-adds per wall second and per CPU second of a (256 x 2048) @ (2048 x 2048) product.

    Per CPU second as well: on a shared machine the wall rate says how busy the others are,
    the CPU rate what a core of this machine does (both threads' CPU time counted).
    """
    import torch

    a, b = torch.randn(256, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    started, cpu, runs = time.perf_counter(), time.process_time(), 20
    for _ in range(runs):
        a @ b
    flops = runs * 2 * 256 * 2048 * 2048
    return flops / (time.perf_counter() - started), flops / (time.process_time() - cpu)


def read_seconds(paths: list[Path]) -> tuple[float, float]:
    """(wall, CPU) seconds of reading ``paths`` once through the page cache, 64 MB at a time."""
    started, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - started, time.process_time() - cpu


def direct_read_seconds(paths: list[Path]) -> tuple[float, float] | None:
    """(wall, CPU) seconds of reading ``paths`` once with O_DIRECT into one aligned 64 MB buffer; None if refused.

    verify reads a cold checkpoint this way (no page-cache copy, hardly any CPU), so the floor
    takes the faster of the two reads: verify is not judged against a slower way to read.
    """
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return None
    buffer = mmap.mmap(-1, 64 << 20)  # page-aligned, as O_DIRECT wants
    started, cpu = time.perf_counter(), time.process_time()
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                while os.readv(fd, [buffer]) > 0:
                    pass
            finally:
                os.close(fd)
    except OSError:
        return None
    finally:
        buffer.close()
    return time.perf_counter() - started, time.process_time() - cpu


@contextmanager
def scaled_tensor(folder: Path, name: str, factor: float) -> Iterator[None]:
    """One tensor of a safetensors folder multiplied by ``factor`` in place (a wrong merge, for the negative
    case) while the block runs; its former bytes are written back afterwards, so a kept --workdir stays a
    correct merge."""
    import torch

    from d2merge.io.checkpoint import open_base
    from d2merge.io.safetensors_file import SafetensorsFile

    checkpoint = open_base(folder)
    path = checkpoint.tensors.file_of(name)
    tensor = (checkpoint.tensors.read(name).float() * factor).to(checkpoint.tensors.info(name)[0])
    info = SafetensorsFile(path).tensors[name]
    with open(path, "r+b") as fh:
        fh.seek(info.start)
        former = fh.read(info.nbytes)
        fh.seek(info.start)
        fh.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    try:
        yield
    finally:
        with open(path, "r+b") as fh:
            fh.seek(info.start)
            fh.write(former)


def drop_caches() -> None:
    """Empty the page cache (root only), so that reads are timed from the disk as a first run meets them."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({exc.strerror}); run as root, "
                         "or leave the flag out") from None


WEIGHTS_ONLY = r"""
import json, sys, time
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import open_base
from d2merge.planning import build_plan
from d2merge.verify import check_weights

from dataclasses import replace

base, adapter, merged, prefix = sys.argv[1:5]
started, cpu = time.perf_counter(), time.process_time()
plan = build_plan(open_base(base), load_adapter(adapter), dtype="fp32")
plan = replace(plan, tensors=tuple(item for item in plan.tensors if item.name.startswith(prefix)))
layers, copied, mismatched, missing = check_weights(plan, open_base(merged))
worst = max(layers, key=lambda layer: layer.max_ulp_error)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu, 1),
                  "peak_rss_bytes": peak, "merged_checked": len(layers), "copied_checked": copied,
                  "copied_mismatched": mismatched, "missing": missing, "worst_tensor": worst.tensor,
                  "worst_ulp": worst.max_ulp_error}))
"""


def weights_only(root: Path, args: argparse.Namespace) -> None:
    """The weight check alone (``check_weights``: what a merged run's reads feed), correct and with q_proj x 1.01.

The second check covers layer 0's tensors only (the scaled one among them).

    For a machine too loaded to finish the whole verify at 7B: the phase that set its 3.04 GB
    peak, measured in its own process (peak RSS, wall and CPU time).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    figures = {}
    name = "model.layers.0.self_attn.q_proj.weight"
    for label in ("correct", "q_proj x 1.01"):
        load = os.getloadavg()[0]
        with nullcontext() if label == "correct" else scaled_tensor(root / "merged", name, 1.01):
            done = subprocess.run([sys.executable, "-c", WEIGHTS_ONLY, str(root / "base"), str(root / "adapter"),
                                   str(root / "merged"), "" if label == "correct" else "model.layers.0."],
                                  capture_output=True, text=True, check=True, env=env)
        figures[label] = {**json.loads(done.stdout.strip().splitlines()[-1]), "load": [load, os.getloadavg()[0]]}
        print(f"weight check alone ({label}): {json.dumps(figures[label])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def at_scale(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from merge_speed import SHAPES, build_checkpoint, build_lora

    shape = dict(SHAPES[args.shape])
    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-verify-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    base, adapter, merged = root / "base", root / "adapter", root / "merged"
    figures: dict = {"shape": args.shape, **shape}
    try:
        if not base.exists():
            params = build_checkpoint(base, dtype=torch.bfloat16, **shape)
            print(f"built a {params / 1e9:.2f}B-parameter bf16 base in {base}", flush=True)
        if not adapter.exists():
            build_lora(base, adapter, rank=args.rank, hidden=shape["hidden"], layers=shape["layers"],
                       intermediate=shape["intermediate"],
                       kv_dim=shape["kv_heads"] * (shape["hidden"] // shape["heads"]))
        if not merged.exists():
            subprocess.run([sys.executable, "-m", "d2merge.cli", "merge", str(base), str(adapter), "-q", "-o",
                            str(merged), "--no-hash-sources"], check=True, cwd=root,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        if args.weights_only:
            weights_only(root, args)
            return
        params = sum(torch.Size(s).numel() for s in _shapes_of(base))
        files = sorted(base.glob("*.safetensors")) + sorted(merged.glob("*.safetensors"))
        figures["parameters"] = params
        figures["page_cache"] = "dropped before the read and before each verify" if args.drop_caches else "as found"
        if args.drop_caches:
            drop_caches()
        read_wall, read_cpu = read_seconds(files)
        figures["read_buffered_s"] = round(read_wall, 1)
        if args.drop_caches:
            drop_caches()
        direct = direct_read_seconds(files)
        if direct is not None:
            figures["read_direct_s"] = round(direct[0], 1)
            read_wall, read_cpu = min((read_wall, read_cpu), direct)
        figures["read_both_once_s"], figures["read_both_once_cpu_s"] = round(read_wall, 1), round(read_cpu, 1)
        print(f"reading both files once: {figures['read_buffered_s']} s through the page cache, "
              f"{figures.get('read_direct_s', '-')} s with O_DIRECT; the floor takes the faster", flush=True)
        rate, cpu_rate = matmul_rate()
        tokens = args.probes * args.probe_length
        figures["matmul_rate_gflops"] = round(rate / 1e9, 1)
        figures["matmul_rate_gflops_per_cpu_s"] = round(cpu_rate / 1e9, 1)
        figures["forward_arithmetic_s"] = round(3 * 2 * params * tokens / rate, 1)
        figures["forward_arithmetic_cpu_s"] = round(3 * 2 * params * tokens / cpu_rate, 1)
        figures["floor_s"] = round(figures["read_both_once_s"] + figures["forward_arithmetic_s"], 1)
        figures["floor_cpu_s"] = round(read_cpu + figures["forward_arithmetic_cpu_s"], 1)
        command = ["-m", "d2merge.cli", "verify", str(base), str(adapter), str(merged), "--probe-source", "random",
                   "--num-probes", str(args.probes), "--probe-length", str(args.probe_length)]
        if args.drop_caches:
            drop_caches()
        run = stamped([sys.executable, *command], root)
        figures["verify"] = {"exit": run["code"], "wall_s": round(run["wall"], 1), "cpu_s": round(run["cpu"], 1),
                             "peak_rss_bytes": run["rss"], "load": [run["load_start"], run["load_end"]],
                             "phases": run["lines"]}
        figures["file_bytes"] = {"base": sum(p.stat().st_size for p in base.glob("*.safetensors")),
                                 "merged": sum(p.stat().st_size for p in merged.glob("*.safetensors"))}
        figures["verify_over_floor"] = round(run["wall"] / figures["floor_s"], 2)
        figures["verify_cpu_over_floor_cpu"] = round(run["cpu"] / figures["floor_cpu_s"], 2)
        print(f"verify: exit {run['code']}, {run['wall']:.1f} s wall, {run['cpu']:.1f} s CPU "
              f"(floor {figures['floor_s']} s = read "
              f"{figures['read_both_once_s']} s + arithmetic {figures['forward_arithmetic_s']} s at "
              f"{figures['matmul_rate_gflops']} GFLOP/s: {figures['verify_over_floor']}x; in CPU time "
              f"{run['cpu']:.1f} s against {figures['floor_cpu_s']} s = read {figures['read_both_once_cpu_s']} s + "
              f"arithmetic {figures['forward_arithmetic_cpu_s']} s at {figures['matmul_rate_gflops_per_cpu_s']} "
              f"GFLOP per CPU-s: {figures['verify_cpu_over_floor_cpu']}x), peak RSS {run['rss'] / 1e9:.2f} GB",
              flush=True)
        print(f"  load average {run['load_start'][0]:.1f} at the start, {run['load_end'][0]:.1f} at the end", flush=True)
        total = next((read for _, read, _ in reversed(run["lines"]) if read is not None), None)
        figures["verify"]["read_bytes_by_last_line"] = total
        print(f"  files: base {figures['file_bytes']['base'] / 1e9:.2f} GB, merged "
              f"{figures['file_bytes']['merged'] / 1e9:.2f} GB; verify had read "
              f"{(total or 0) / 1e9:.1f} GB by its last stage line", flush=True)
        print_phases(run["lines"])
        if args.negative:
            with scaled_tensor(merged, "model.layers.0.self_attn.q_proj.weight", 1.01):
                if args.drop_caches:
                    drop_caches()
                bad = stamped([sys.executable, *command], root)
            figures["negative"] = {"exit": bad["code"], "wall_s": round(bad["wall"], 1), "cpu_s": round(bad["cpu"], 1),
                                   "peak_rss_bytes": bad["rss"], "load": [bad["load_start"], bad["load_end"]],
                                   "verify_over_floor": round(bad["wall"] / figures["floor_s"], 2),
                                   "verify_cpu_over_floor_cpu": round(bad["cpu"] / figures["floor_cpu_s"], 2),
                                   "phases": bad["lines"], "stdout": bad["stdout"]}
            print(f"q_proj x 1.01: exit {bad['code']} ({bad['wall']:.1f} s wall, {bad['cpu']:.1f} s CPU: "
                  f"{figures['negative']['verify_over_floor']}x the floor, CPU "
                  f"{figures['negative']['verify_cpu_over_floor_cpu']}x; peak RSS {bad['rss'] / 1e9:.2f} GB; load "
                  f"average {bad['load_start'][0]:.1f} -> {bad['load_end'][0]:.1f})", flush=True)
            print_phases(bad["lines"])
            print(bad["stdout"][-1500:], flush=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def mc_before_after(args: argparse.Namespace) -> None:
    from d2merge.english_task import split
    from d2merge.synthetic import save_random_adapter
    from d2merge.tasks import write_jsonl

    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-verify-mc-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        adapter, eval_file = root / "adapter", root / "eval.jsonl"
        if not adapter.exists():
            save_random_adapter(args.mc_base, adapter, "lora", r=8, lora_alpha=16.0, magnitude=0.01,
                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"))
        write_jsonl(eval_file, split(held_out=200, seed=0)[1][:200])
        command = ["-m", "d2merge.cli", "verify", str(args.mc_base), str(adapter), "--mc-eval", str(eval_file)]
        figures = {}
        here = Path(__file__).resolve().parent.parent
        for label, checkout in (("before", args.before), ("after", here)):
            if checkout is None:
                continue
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(checkout)}
            done = subprocess.run([sys.executable, "-c", STAMPED, sys.executable, *command], capture_output=True,
                                  text=True, check=True, env=env, cwd=root)
            run = json.loads(done.stdout)
            figures[label] = {"checkout": str(checkout), "exit": run["code"], "wall_s": round(run["wall"], 1),
                              "cpu_s": round(run["cpu"], 1), "load": [run["load_start"], run["load_end"]],
                              "peak_rss_bytes": run["rss"], "phases": run["lines"]}
            print(f"{label:<6} ({checkout}): exit {run['code']}, {run['wall']:.1f} s wall, {run['cpu']:.1f} s CPU, "
                  f"peak RSS {run['rss'] / 1e9:.2f} GB", flush=True)
            print(f"  load average {run['load_start'][0]:.1f} at the start, {run['load_end'][0]:.1f} at the end",
                  flush=True)
            print_phases(run["lines"])
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _shapes_of(folder: Path) -> list[tuple[int, ...]]:
    from d2merge.io.checkpoint import open_base

    tensors = open_base(folder).tensors
    return [tuple(tensors.info(name)[1]) for name in tensors.keys()]


if __name__ == "__main__":
    main()
