"""Time and peak RSS of a merge of several adapters (``merge BASE A1 A2 ... --weights``) beside one adapter's.

Builds, with merge_speed.py's streaming builder, a random bf16 Llama-layout base at a model
shape (the 1.1B widths; ``--layers`` fewer layers for a quick run), a LoRA r=16 on every
linear layer and a DoRA of the same factors (adapter_ops.py's builder), then measures, each in
its own process (wall, CPU and peak RSS from ``os.wait4``, merge_speed.run_measured):

- ``merge BASE LORA``                                    (one adapter: the usual merge)
- ``merge BASE LORA DORA --weights 0.5,0.5``             (two methods, the weighted sum)
- ``merge BASE LORA DORA LORA DORA --weights ...``       (four adapters)

The claim it checks: memory does not grow with the number of adapters (each tensor is
merged in row blocks for every adapter in turn), CPU grows with the adapters' arithmetic.

    nice -n 10 python benchmarks/merge_several.py --layers 4 --json merge_several.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_ops import build_dora  # noqa: E402
from merge_speed import SHAPES, build_checkpoint, build_lora, run_measured  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer layers at the same widths (quick runs)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-merge-several-"))
    root.mkdir(parents=True, exist_ok=True)
    base, lora, dora = root / "base", root / "lora", root / "dora"
    if not base.exists():
        params = build_checkpoint(base, dtype=torch.bfloat16, **shape)
        print(f"built a {params / 1e9:.2f}B-parameter bf16 base in {base}", flush=True)
    if not lora.exists():
        build_lora(base, lora, rank=16, hidden=shape["hidden"], layers=shape["layers"],
                   intermediate=shape["intermediate"], kv_dim=shape["kv_heads"] * (shape["hidden"] // shape["heads"]))
    if not dora.exists():
        build_dora(base, lora, dora)
    d2merge = [sys.executable, "-m", "d2merge", "merge", str(base)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = ["-o", str(root / "merged"), "--overwrite", "--no-hash-sources", "-q"]
    runs = {
        "1 adapter (lora)": [*d2merge, str(lora), *out],
        "2 adapters (lora + dora)": [*d2merge, str(lora), str(dora), "--weights", "0.5,0.5", *out],
        "4 adapters (2 lora + 2 dora)": [*d2merge, str(lora), str(dora), str(lora), str(dora),
                                         "--weights", "0.3,0.3,0.2,0.2", *out],
    }
    figures: dict[str, object] = {"shape": shape}
    for label, argv in runs.items():
        got = run_measured(argv, env=env, cwd=root)
        figures[label] = {"wall_s": got["wall"], "user_s": got["user"], "sys_s": got["sys"], "peak_rss_bytes": got["rss"]}
        print(f"{label:<30} {got['wall']:7.1f} s wall {got['user'] + got['sys']:7.1f} CPU-s  "
              f"peak RSS {got['rss'] / 1e9:.3f} GB", flush=True)
    figures["base_bytes"] = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
