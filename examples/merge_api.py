"""Merge an adapter from Python, the way the `d2merge merge` command does.

    python examples/merge_api.py BASE ADAPTER OUT [--dtype bf16]
    python examples/merge_api.py --demo          # builds a tiny base + D2-LoRA adapter first
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import d2merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="BASE ADAPTER OUT")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--demo", action="store_true", help="build a tiny random base and adapter to merge")
    args = parser.parse_args()

    if args.demo:
        from d2merge.synthetic import save_random_adapter, save_tiny_base

        root = Path(tempfile.mkdtemp(prefix="d2merge-example-"))
        base, adapter, out = root / "base", root / "adapter", root / "merged"
        save_tiny_base(base, "llama")
        save_random_adapter(base, adapter, "d2lora", r=4, tau=0.5)
    elif len(args.paths) == 3:
        base, adapter, out = map(Path, args.paths)
    else:
        parser.error("give BASE ADAPTER OUT, or --demo")

    info = d2merge.load_adapter(adapter)
    print(f"adapter: {info.method.name}, r={info.config.r}, {len(info.modules)} modules")
    plan = d2merge.plan(base, adapter, dtype=args.dtype)
    print(plan.describe())
    try:
        result = d2merge.merge(base, adapter, out, dtype=args.dtype)
    except d2merge.D2MergeError as exc:  # one line, naming the file and tensor
        raise SystemExit(f"error: {exc}")
    print(f"wrote {', '.join(result.files)} to {result.output} in {result.seconds:.2f}s")


if __name__ == "__main__":
    main()
