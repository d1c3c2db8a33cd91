"""merge-many vs one `d2merge merge` per adapter: wall time and peak RSS, each run its own process.

Builds the checkpoint of benchmarks/merge_speed.py (default: the 1.1B Llama shape, bf16,
about 2.2 GB) and N LoRA r=16 adapters on every linear layer (default 8, each with its own
values), then measures in one run:

- sequential: N `d2merge merge BASE ADAPTER_i -o OUT_i` runs one after the other
  (wall time summed, peak RSS the largest of the runs);
- merge-many: one `d2merge merge-many BASE MANIFEST -o OUTDIR` (one pass over the base),
  and, with ``--variants``, the same with ``--workers 2`` on threads or processes.

Peak RSS is ``ru_maxrss`` of each measured process (``os.wait4``); for ``--parallel
process`` it is the largest single process, not the sum over the workers. Outputs are
deleted after each measurement. Timings on a shared machine vary by about 15%: compare
ratios from the same run.

    nice -n 10 python benchmarks/merge_many.py                           # 8 adapters, 1.1B
    python benchmarks/merge_many.py --layers 2 --adapters 3 --variants many,threads,processes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import build_checkpoint, build_lora, run_measured  # noqa: E402

from d2merge.io.adapter import WEIGHTS_NAME, write_adapter  # noqa: E402
from d2merge.io.checkpoint import read_json  # noqa: E402
from d2merge.io.safetensors_file import SafetensorsFile  # noqa: E402

VARIANTS = {"many": [], "threads": ["--workers", "2", "--parallel", "thread"],
            "processes": ["--workers", "2", "--parallel", "process"]}


def wall_and_rss(argv: list[str], **kwargs: object) -> tuple[float, float]:
    """Wall seconds and peak RSS bytes of one measured child (merge_speed.run_measured's figures)."""
    figures = run_measured(argv, **kwargs)  # type: ignore[arg-type]
    return figures["wall"], figures["rss"]


def build_adapters(base: Path, root: Path, count: int, **shape: int) -> list[Path]:
    """``count`` LoRA adapters: the first from merge_speed.py, the others with their own random B."""
    first = root / "adapter-0"
    if not first.exists():
        build_lora(base, first, **shape)
    folders = [first]
    stored = SafetensorsFile(first / WEIGHTS_NAME)
    config = read_json(first / "adapter_config.json", "adapter_config.json")
    for i in range(1, count):
        folder = root / f"adapter-{i}"
        if not folder.exists():
            generator = torch.Generator().manual_seed(100 + i)
            tensors = {name: (torch.randn(stored.read(name).shape, generator=generator) * 0.01
                              if "lora_B" in name else stored.read(name).clone()) for name in stored.keys()}
            write_adapter(folder, config, tensors)
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--variants", default="many", help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the checkpoint (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-bench-many-"))
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if not base.exists():
        params = build_checkpoint(base, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                                  vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads, dtype=torch.bfloat16)
        print(f"built {params / 1e9:.2f}B-parameter bf16 checkpoint in {base}", flush=True)
    adapters = build_adapters(base, root, args.adapters, rank=args.rank, hidden=args.hidden, layers=args.layers,
                              intermediate=args.intermediate, kv_dim=args.kv_heads * (args.hidden // args.heads))
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps([str(a) for a in adapters]))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    cli = [sys.executable, "-m", "d2merge.cli"]

    figures: dict[str, object] = {"checkpoint_bytes": size, "rank": args.rank, "adapters": len(adapters)}
    outs = root / "sequential"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    walls, peaks = [], []
    for adapter in adapters:
        wall, rss = wall_and_rss(cli + ["merge", str(base), str(adapter), "-o", str(outs / adapter.name), "-q"])
        walls.append(wall)
        peaks.append(rss)
        print(f"sequential merge {adapter.name}: {wall:.2f}s, {rss / 1e9:.3f} GB", flush=True)
    shutil.rmtree(outs, ignore_errors=True)
    figures["sequential"] = {"wall_s": sum(walls), "per_merge_s": walls, "peak_rss_bytes": max(peaks)}
    for variant in variants:
        outdir = root / f"many-{variant}"
        shutil.rmtree(outdir, ignore_errors=True)
        wall, rss = wall_and_rss(cli + ["merge-many", str(base), str(manifest), "-o", str(outdir), "-q",
                                        *VARIANTS[variant]])
        shutil.rmtree(outdir, ignore_errors=True)
        figures[variant] = {"wall_s": wall, "peak_rss_bytes": rss, "over_sequential": wall / sum(walls)}
        print(f"merge-many {variant}: {wall:.2f}s, {rss / 1e9:.3f} GB", flush=True)

    print(f"\ncheckpoint {size / 1e9:.2f} GB, {len(adapters)} LoRA r={args.rank} adapters on all linear layers\n")
    print(f"{'path':<22} {'wall s':>8} {'x sequential':>13} {'peak RSS GB':>12}")
    print(f"{'sequential merges':<22} {sum(walls):8.2f} {1.0:13.2f} {max(peaks) / 1e9:12.3f}")
    for variant in variants:
        row = figures[variant]
        assert isinstance(row, dict)
        print(f"{'merge-many ' + variant:<22} {row['wall_s']:8.2f} {row['over_sequential']:13.2f} "
              f"{row['peak_rss_bytes'] / 1e9:12.3f}")
    print("\ntargets: merge-many <= 0.6x the sequential time, peak RSS <= 1.5 GB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
