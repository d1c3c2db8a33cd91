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
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
