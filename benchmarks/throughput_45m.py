"""Inference throughput of merged vs unmerged adapters on a ~45M-parameter model, in one run.

Builds a random-init Llama (hidden 512, 4 layers, vocab 32000, ~45M parameters)
and D2-LoRA and DoRA adapters (r=16, every linear layer), then runs
``d2merge bench`` on each: batch 8 x seq 128 prefill and batch-1 decode, for
the base, unmerged, merged (PyTorch) and merged (ONNX Runtime) variants.
Reports medians and the ratios measured in the same run:

- merged vs base overhead (target <= 2%: a merged model is the base architecture)
- merged / unmerged throughput, per method
- ONNX Runtime / PyTorch throughput

    python benchmarks/throughput_45m.py [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from d2merge.bench import BenchSettings, bench
from d2merge.synthetic import save_random_adapter, save_tiny_base

MODEL = {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8,
         "vocab_size": 32000, "max_positions": 512}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="d2merge-45m-"))
    base = save_tiny_base(root / "base", "llama", **MODEL)
    settings = BenchSettings(batch_sizes=(8,), seq_lens=(128,), decode_batch_sizes=(1,), decode_prompt_len=128,
                             decode_tokens=args.decode_tokens, warmup=args.warmup, repeats=args.repeats)
    figures: dict[str, object] = {}
    for method, fields in (("d2lora", {"tau": 0.5}), ("dora", {})):
        adapter = save_random_adapter(base, root / f"adapter-{method}", method, r=16, lora_alpha=32,
                                      magnitude=0.02, **fields)
        # ONNX once (it measures the merged graph, the same for both methods' shapes)
        variants = ("base", "unmerged", "merged", "onnx") if method == "d2lora" else ("base", "unmerged", "merged")
        report = bench(base, adapter, variants=variants, settings=settings, echo=print)
        print(f"\n== {method} ==\n{report.table()}\n")
        figures[method] = report.to_json()
    params = figures["d2lora"]["meta"]["parameters"]  # type: ignore[index]
    print(f"model: {params / 1e6:.1f}M parameters")
    for method in ("d2lora", "dora"):
        for cell in figures[method]["ratios"]:  # type: ignore[index]
            overhead = 100 * (1 / cell["merged_over_base"] - 1) if "merged_over_base" in cell else float("nan")
            line = (f"{method:<7} {cell['mode']:<8} batch {cell['batch']} seq {cell['seq']}: "
                    f"merged/unmerged {cell.get('merged_over_unmerged', float('nan')):.2f}x, "
                    f"merged vs base overhead {overhead:+.1f}%")
            if "onnx_over_pytorch" in cell:
                line += f", ONNX/PyTorch {cell['onnx_over_pytorch']:.2f}x"
            print(line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
