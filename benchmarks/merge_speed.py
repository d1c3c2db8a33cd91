"""Merge speed and memory: d2merge vs the copy floor vs the PEFT path, each in its own process.

Builds a synthetic checkpoint (default: a 1.1B-parameter Llama, hidden 2048, 22
layers, intermediate 5632, vocab 32000, bf16, about 2.2 GB) and a LoRA r=16
adapter on every linear layer, then measures in one run:

- d2merge:    `d2merge merge BASE ADAPTER -o OUT` (wall time and peak RSS of the process)
- copy floor: copying the same weight files (shutil: kernel-side copy_file_range), fsync'd as d2merge does
- write floor: the same copy through user memory (read + write + fsync): what producing new bytes costs
- PEFT path:  transformers load + PeftModel.from_pretrained + merge_and_unload + save_pretrained

Peak RSS is each child process's own ``ru_maxrss`` (from ``os.wait4``), so the
figures do not mix. Timings on shared machines vary by about 15%: use
``--repeat`` to get medians, and compare ratios measured in the same run.

    python benchmarks/merge_speed.py                       # the default 1.1B model
    python benchmarks/merge_speed.py --layers 4 --skip-peft  # a quick smaller run
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
from d2merge.io.safetensors_file import StreamingWriter


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
    entries = [(name, dtype, shape) for name, shape in shapes]
    with StreamingWriter(folder / "model.safetensors", entries, {"format": "pt"}) as writer:
        for name, shape in shapes:
            tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            writer.write(name, tensor.to(dtype))
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


# Runs one command and reports its own wall time and peak RSS. It is a small process of its
# own because a child forked from this (large) benchmark process would count the parent's
# pages in ru_maxrss before it execs.
LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
print(json.dumps({"wall": time.perf_counter() - started, "rss": usage.ru_maxrss * 1024, "code": code,
                  "stderr": proc.stderr.read().decode(errors="replace")[-2000:]}))
"""


def run_measured(argv: list[str], *, env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], env=env, capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout)
    if figures["code"] != 0:
        raise RuntimeError(f"{argv[:4]} failed ({figures['code']}): {figures['stderr']}")
    return figures["wall"], figures["rss"]


COPY_SCRIPT = """
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    fd = os.open(os.path.join(dst, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

# The least a merge can cost: it must write new bytes from user memory, which on some
# filesystems is much slower than the kernel-side copy shutil uses (copy_file_range).
WRITE_SCRIPT = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
block = bytearray(64 * 1024 * 1024)
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name), "rb", buffering=0) as fin:
        fd = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        view = memoryview(block)
        while n := fin.readinto(block):
            os.write(fd, view[:n])
        os.fsync(fd); os.close(fd)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement; medians are reported")
    parser.add_argument("--skip-peft", action="store_true", help="skip the (slow, memory-hungry) PEFT path")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the checkpoint (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base, adapter = root / "base", root / "adapter"
    if not base.exists():
        params = build_checkpoint(base, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                                  vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads, dtype=torch.bfloat16)
        print(f"built {params / 1e9:.2f}B-parameter bf16 checkpoint in {base}", flush=True)
    if not adapter.exists():
        build_lora(base, adapter, rank=args.rank, hidden=args.hidden, layers=args.layers,
                   intermediate=args.intermediate, kv_dim=args.kv_heads * (args.hidden // args.heads))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    d2merge_cli = [sys.executable, "-m", "d2merge.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    results: dict[str, list[tuple[float, int]]] = {"copy floor": [], "write floor": [], "d2merge": [],
                                                   "d2merge no-hash": [], "peft": []}
    for _ in range(args.repeat):
        for label, argv_for in (
            ("copy floor", lambda out: [sys.executable, "-c", COPY_SCRIPT, str(base), str(out)]),
            ("write floor", lambda out: [sys.executable, "-c", WRITE_SCRIPT, str(base), str(out)]),
            ("d2merge", lambda out: d2merge_cli + ["merge", str(base), str(adapter), "-o", str(out), "-q"]),
            ("d2merge no-hash", lambda out: d2merge_cli + ["merge", str(base), str(adapter), "-o", str(out), "-q",
                                                           "--no-hash-sources"]),
            ("peft", lambda out: [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]),
        ):
            if label == "peft" and args.skip_peft:
                continue
            out = root / f"out-{label.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            results[label].append(run_measured(argv_for(out), env=env))
            shutil.rmtree(out, ignore_errors=True)

    figures = {"checkpoint_bytes": size, "rank": args.rank, "repeat": args.repeat}
    print(f"\ncheckpoint {size / 1e9:.2f} GB, LoRA r={args.rank} on all linear layers, {args.repeat} run(s), medians\n")
    print(f"{'path':<16} {'wall s':>8} {'min-max s':>13} {'peak RSS GB':>12}")
    for label, runs in results.items():
        if not runs:
            continue
        walls = [w for w, _ in runs]
        rss = statistics.median(r for _, r in runs)
        figures[label] = {"wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
                          "peak_rss_bytes": rss}
        print(f"{label:<16} {statistics.median(walls):8.2f} {min(walls):6.2f}-{max(walls):<6.2f} {rss / 1e9:12.3f}")
    d2 = figures["d2merge"]["wall_s"]
    figures["d2merge_over_copy_floor"] = d2 / figures["copy floor"]["wall_s"]
    figures["d2merge_over_write_floor"] = d2 / figures["write floor"]["wall_s"]
    print(f"\nd2merge / copy floor: {figures['d2merge_over_copy_floor']:.2f}x (target <= 2x); "
          f"/ write floor (user-space copy): {figures['d2merge_over_write_floor']:.2f}x")
    print(f"d2merge peak RSS: {figures['d2merge']['peak_rss_bytes'] / 1e9:.3f} GB (target <= 0.6 GB)")
    if results["peft"]:
        figures["peft_over_d2merge"] = figures["peft"]["wall_s"] / d2
        print(f"PEFT path / d2merge: {figures['peft_over_d2merge']:.1f}x faster (target >= 5x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
