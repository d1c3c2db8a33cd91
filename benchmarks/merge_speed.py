"""Merge speed and memory: d2merge vs copying the files vs the PEFT path, each in its own process.

Builds a synthetic Llama-layout bf16 checkpoint by streaming writes (never the
whole model in memory) and a LoRA r=16 adapter on every linear layer, then
measures in one run, round-robin, ``--repeat`` times (medians reported):

- ``cp -r + sync``:  ``cp -r`` of the base folder, then ``sync`` of the copied files (the floor the
  issue measures against)
- ``O_DIRECT floor``: reading and writing every byte with O_DIRECT through aligned buffers (what a
  merge that must produce new bytes costs at least, without the page cache)
- ``d2merge``:        ``d2merge merge BASE ADAPTER -o OUT`` (sources hashed), ``--no-hash-sources``,
  and ``--dtype fp32`` (memory with fp32 output)
- ``d2merge cuda``:   with ``--cuda``, ``--device cuda`` (bf16 and fp32 output; on a machine with a GPU)
- ``d2merge (before)``: the same command with another checkout first on PYTHONPATH (``--compare``)
- ``peft``:           transformers load + PeftModel.from_pretrained + merge_and_unload + save_pretrained

``--cache warm`` reads the base into page cache first; ``--cache cold`` evicts our
own files (``posix_fadvise(DONTNEED)``, nothing else on the machine) before each
run; each measured run follows an unmeasured one of the same command (``--no-prime``: not;
see PRIME below). Wall, user and system seconds and peak RSS are each child's own
(``os.wait4``). ``--profile`` adds one in-process merge per cache mode with the
phase breakdown (import, plan, read, compute, write, fsync, hash; wall and CPU).
Timings on shared machines vary by about 15%: compare ratios from the same run.

    python benchmarks/merge_speed.py --shape 1.1b --repeat 3 --cache both --profile
    python benchmarks/merge_speed.py --shape 7b --cache cold --skip-peft   # ~13.5 GB, deleted after
    python benchmarks/merge_speed.py --layers 2 --repeat 1 --skip-peft    # a quick small run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from d2merge.io.adapter import write_adapter
from d2merge.io.direct_io import resident_fraction
from d2merge.io.safetensors_file import StreamingWriter

SHAPES = {  # hidden, layers, intermediate, vocab, heads, kv_heads
    "1.1b": dict(hidden=2048, layers=22, intermediate=5632, vocab=32000, heads=32, kv_heads=4),
    "7b": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32, kv_heads=32),
}


def build_checkpoint(folder: Path, *, hidden: int, layers: int, intermediate: int, vocab: int, heads: int,
                     kv_heads: int, dtype: torch.dtype, max_file_bytes: int = 5 * 10**9) -> int:
    """A Llama-layout checkpoint written tensor by tensor (never the whole model in memory)."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    head_dim = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    generator = torch.Generator().manual_seed(0)
    # Values from one random block at shifting offsets: a 7B build would otherwise spend minutes in randn.
    pool = (torch.randn(1 << 22, generator=generator) * 0.02).to(dtype)
    entries = [(name, dtype, shape) for name, shape in shapes]
    with StreamingWriter(folder / "model.safetensors", entries, {"format": "pt"}) as writer:
        for i, (name, shape) in enumerate(shapes):
            if len(shape) == 1:
                writer.write(name, torch.ones(shape, dtype=dtype))
                continue
            n = torch.Size(shape).numel()
            reps = -(-(n + i) // pool.numel())
            writer.write(name, pool.repeat(reps)[i:i + n].view(shape))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         tie_word_embeddings=False)
    config.dtype = dtype
    config.save_pretrained(folder)
    return sum(torch.Size(s).numel() for _, s in shapes)


def build_lora(base: Path, folder: Path, *, rank: int, hidden: int, layers: int, intermediate: int, kv_dim: int) -> None:
    """A PEFT-compatible LoRA adapter (config fields PEFT itself writes) with non-zero B."""
    generator = torch.Generator().manual_seed(1)
    dims = {"q_proj": (hidden, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate)}
    tensors = {}
    for i in range(layers):
        for name, (out_f, in_f) in dims.items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{group}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn((rank, in_f), generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn((out_f, rank), generator=generator) * 0.01
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "lora_dropout": 0.0, "target_modules": list(dims), "base_model_name_or_path": str(base),
              "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
              "inference_mode": True}
    write_adapter(folder, config, tensors)


# Runs one command and reports its own wall time, CPU times and peak RSS. It is a small process
# of its own because a child forked from this (large) benchmark process would count the parent's
# pages in ru_maxrss before it execs.
LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
print(json.dumps({"wall": time.perf_counter() - started, "rss": usage.ru_maxrss * 1024, "code": code,
                  "user": usage.ru_utime, "sys": usage.ru_stime,
                  "stderr": proc.stderr.read().decode(errors="replace")[-2000:]}))
"""


def run_measured(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, float]:
    """wall/user/sys seconds and peak RSS bytes of one child process.

    ``cwd`` matters: ``python -m``/``-c`` put the working directory first on sys.path, ahead of
    PYTHONPATH, so a child started in a checkout imports that checkout's d2merge whatever
    ``--compare`` asks for. The benchmark runs its children in its work folder.
    """
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], env=env, capture_output=True, text=True, check=True,
                          cwd=cwd)
    figures = json.loads(done.stdout)
    if figures["code"] != 0:
        raise RuntimeError(f"{argv[:4]} failed ({figures['code']}): {figures['stderr']}")
    return figures


CP_SCRIPT = """
import subprocess, sys, os
src, dst = sys.argv[1], sys.argv[2]
subprocess.run(["cp", "-r", src, dst], check=True)
subprocess.run(["sync", *[os.path.join(dst, n) for n in os.listdir(dst)]], check=True)
"""

# The least a merge that produces new bytes can cost without the page cache: O_DIRECT reads
# and writes through aligned buffers (the unaligned tail through ordinary handles).
ODIRECT_SCRIPT = """
import mmap, os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
block = mmap.mmap(-1, 64 * 1024 * 1024)
view = memoryview(block)
for name in sorted(os.listdir(src)):
    size = os.path.getsize(os.path.join(src, name))
    fin = os.open(os.path.join(src, name), os.O_RDONLY | os.O_DIRECT)
    fout = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
    done = 0
    while size - done >= 4096:
        n = os.readv(fin, [view[: min(len(view), (size - done) // 4096 * 4096)]])
        os.write(fout, view[:n]); done += n
    os.close(fin)
    if done < size:
        with open(os.path.join(src, name), "rb") as f:
            f.seek(done); tail = f.read()
        fd = os.open(os.path.join(dst, name), os.O_WRONLY); os.pwrite(fd, tail, done); os.close(fd)
    os.fsync(fout); os.close(fout)
"""

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

# One in-process merge with the phase breakdown (d2merge/profile.py); import measured first. Like the
# CLI, it starts hashing a warm base before importing torch.
PROFILE_SCRIPT = """
import json, resource, sys, time
wall0, cpu0 = time.perf_counter(), time.process_time()
if sys.argv[4] == "1":
    try:
        from d2merge.io.source_hashes import hash_ahead_of_merge
    except ImportError:  # an older checkout
        hash_ahead_of_merge = lambda base, adapter: None
    hash_ahead_of_merge(sys.argv[1], sys.argv[2])
from d2merge import merge, profile  # the package's names: the same in an older checkout (--compare)
figures = {"import": {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}}
wall1, cpu1 = time.perf_counter(), time.process_time()
with profile.collect() as phases:
    merge(sys.argv[1], sys.argv[2], sys.argv[3], hash_sources=sys.argv[4] == "1")
figures.update(phases.as_dict())
figures["merge total"] = {"wall_s": time.perf_counter() - wall1, "cpu_s": time.process_time() - cpu1}
figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(figures))
"""


# PRIME: each measured run follows an unmeasured run of the same command, whose output is deleted
# just before it. On a VM whose host takes freed guest memory back (this project's machines), a
# process that fills 2 GB of fresh page cache otherwise pays about 3 s/GB while the host backs the
# pages, and which command pays depends on what ran before it: `cp` ranged 1.3-9.6 s. Memory freed
# just before a run is reused at once, as on an ordinary machine.


def evict(paths: list[Path]) -> None:
    """Drop our own files from the page cache (never anyone else's: no drop_caches)."""
    for path in paths:
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(paths: list[Path]) -> None:
    block = bytearray(16 * 1024 * 1024)
    for path in paths:
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            with open(file, "rb", buffering=0) as fh:
                while fh.readinto(block):
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    for name in ("hidden", "layers", "intermediate", "vocab", "heads", "kv-heads"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the shape's value")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported")
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default="both")
    parser.add_argument("--no-prime", dest="prime", action="store_false",
                        help="do not run each command once, unmeasured, right before each measured run (see PRIME)")
    parser.add_argument("--skip-peft", action="store_true", help="skip the (slow, memory-hungry) PEFT path")
    parser.add_argument("--skip-fp32", action="store_true", help="skip the fp32-output merge")
    parser.add_argument("--cuda", action="store_true",
                        help="also measure `--device cuda` (the arithmetic on a GPU; bf16 and fp32 output)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="another d2merge checkout (e.g. main) measured alongside as 'd2merge (before)'")
    parser.add_argument("--profile", action="store_true", help="print the phase breakdown of one merge per cache mode")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the checkpoint (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the built checkpoint in --workdir")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base, adapter = root / "base", root / "adapter"
    try:
        if not base.exists():
            params = build_checkpoint(base, dtype=torch.bfloat16, **shape)
            print(f"built {params / 1e9:.2f}B-parameter bf16 checkpoint in {base}", flush=True)
        if not adapter.exists():
            build_lora(base, adapter, rank=args.rank, hidden=shape["hidden"], layers=shape["layers"],
                       intermediate=shape["intermediate"],
                       kv_dim=shape["kv_heads"] * (shape["hidden"] // shape["heads"]))
        figures = measure(args, root, base, adapter)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        if not (args.keep and args.workdir):
            shutil.rmtree(root, ignore_errors=True)


def measure(args: argparse.Namespace, root: Path, base: Path, adapter: Path) -> dict:
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    here = str(Path(__file__).resolve().parent.parent)

    def env_for(checkout: str) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": checkout}

    d2merge = [sys.executable, "-m", "d2merge.cli", "merge", str(base), str(adapter), "-q", "-o"]
    runs: list[tuple[str, object, dict[str, str]]] = [
        ("cp -r + sync", lambda out: [sys.executable, "-c", CP_SCRIPT, str(base), str(out)], env_for(here)),
        ("O_DIRECT floor", lambda out: [sys.executable, "-c", ODIRECT_SCRIPT, str(base), str(out)], env_for(here)),
        ("d2merge", lambda out: d2merge + [str(out)], env_for(here)),
        ("d2merge no-hash", lambda out: d2merge + [str(out), "--no-hash-sources"], env_for(here)),
    ]
    if not args.skip_fp32:
        runs.append(("d2merge fp32 out", lambda out: d2merge + [str(out), "--dtype", "fp32"], env_for(here)))
    if args.cuda:
        runs.append(("d2merge cuda", lambda out: d2merge + [str(out), "--device", "cuda"], env_for(here)))
        runs.append(("d2merge cuda fp32", lambda out: d2merge + [str(out), "--device", "cuda", "--dtype", "fp32"],
                     env_for(here)))
    if args.compare:
        runs.append(("d2merge (before)", lambda out: d2merge + [str(out)], env_for(str(args.compare.resolve()))))
    if not args.skip_peft:
        runs.append(("peft", lambda out: [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)],
                     env_for(here)))
    modes = ["warm", "cold"] if args.cache == "both" else [args.cache]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    profiles: dict[str, dict] = {}
    for mode in modes:
        set_cache = evict if mode == "cold" else warm
        for _ in range(args.repeat):
            for label, argv_for, env in runs:
                out = root / f"out-{label.replace(' ', '-')}"
                if args.prime:
                    set_cache([base, adapter])
                    run_measured(argv_for(out), env=env, cwd=root)  # type: ignore[operator]
                shutil.rmtree(out, ignore_errors=True)
                set_cache([base, adapter])
                cached = resident_fraction(list(base.glob("*.safetensors")))
                if cached is not None and (cached > 0.1 if mode == "cold" else cached < 0.9):
                    print(f"  warning: {100 * cached:.0f}% of the base is in page cache for a {mode} run", flush=True)
                results.setdefault((mode, label), []).append(
                    run_measured(argv_for(out), env=env, cwd=root))  # type: ignore[operator]
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {mode} {label}: {results[(mode, label)][-1]['wall']:.2f} s", flush=True)
        if args.profile:
            out = root / "out-profile"
            set_cache([base, adapter])
            done = subprocess.run([sys.executable, "-c", PROFILE_SCRIPT, str(base), str(adapter), str(out), "1"],
                                  env=env_for(here), capture_output=True, text=True, check=True, cwd=root)
            profiles[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(out, ignore_errors=True)

    figures: dict = {"checkpoint_bytes": size, "rank": args.rank, "repeat": args.repeat, "shape": args.shape,
                     "results": {}, "profile": profiles}
    print(f"\ncheckpoint {size / 1e9:.2f} GB ({args.shape}), LoRA r={args.rank} on all linear layers, "
          f"medians of {args.repeat}\n")
    print(f"{'cache':<5} {'path':<17} {'wall s':>7} {'min-max s':>12} {'user s':>7} {'sys s':>7} {'RSS GB':>7} "
          f"{'/ cp':>6}")
    for mode in modes:
        floor = statistics.median(r["wall"] for r in results[(mode, "cp -r + sync")])
        for label, _, _ in runs:
            got = results[(mode, label)]
            walls = [r["wall"] for r in got]
            row = {"wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
                   "user_s": statistics.median(r["user"] for r in got), "sys_s": statistics.median(r["sys"] for r in got),
                   "peak_rss_bytes": statistics.median(r["rss"] for r in got)}
            row["over_cp"] = row["wall_s"] / floor
            figures["results"][f"{mode} {label}"] = row
            print(f"{mode:<5} {label:<17} {row['wall_s']:7.2f} {min(walls):5.2f}-{max(walls):<6.2f} "
                  f"{row['user_s']:7.2f} {row['sys_s']:7.2f} {row['peak_rss_bytes'] / 1e9:7.3f} {row['over_cp']:6.2f}")
        if not args.skip_peft:
            ratio = figures["results"][f"{mode} peft"]["wall_s"] / figures["results"][f"{mode} d2merge"]["wall_s"]
            figures["results"][f"{mode} peft_over_d2merge"] = ratio
            print(f"{mode:<5} PEFT path / d2merge: {ratio:.1f}x")
    for mode, phases in profiles.items():
        print(f"\nphases ({mode} cache, one merge; threads overlap, so CPU can exceed wall):")
        for name, value in phases.items():
            if isinstance(value, dict):
                print(f"  {name:<14} wall {value['wall_s']:7.2f} s   cpu {value['cpu_s']:7.2f} s")
        print(f"  peak RSS {phases['peak_rss_bytes'] / 1e9:.3f} GB")
    return figures


if __name__ == "__main__":
    main()
