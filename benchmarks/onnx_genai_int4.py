"""onnxruntime-genai int4 settings on SmolLM2-135M: quality on real text against fp32, size, decode speed.

SmolLM2-135M-Instruct merged with the random D2-LoRA adapter of benchmarks/gguf_quality.py (fp32
folder), built with ``export_genai(precision="int4", int4=Int4Options(...))`` for each setting,
then ``d2merge verify BASE ADAPTER BUILD`` on the built-in English sentences: mean/max KL(unmerged
fp32 || build), top-1 agreement, perplexity ratio; the build's size on disk; greedy decode tok/s
of ``--tokens`` tokens after a short prompt (best of ``--runs``). Prints a markdown table; the
defaults of ``Int4Options`` are chosen from it (docs/onnx-genai.md).

    nice -n 10 python benchmarks/onnx_genai_int4.py [--settings default,k_quant] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# name -> Int4Options fields
SETTINGS = {
    "default": {},
    "rtn": {"algorithm": "rtn"},
    "k_quant": {"algorithm": "k_quant"},
    "k_quant_last": {"algorithm": "k_quant_last"},
    "k_quant_mixed": {"algorithm": "k_quant_mixed"},
    "rtn_last": {"algorithm": "rtn_last"},
    "block64": {"block_size": 64},
    "block128": {"block_size": 128},
    "block16": {"block_size": 16},
    "asymmetric": {"symmetric": False},
    "accuracy1": {"accuracy_level": 1},
}


def decode_tok_s(folder: Path, prompt: list[int], tokens: int, runs: int) -> float:
    from d2merge.export.onnx_genai import GenaiCausalLM

    model = GenaiCausalLM(folder)
    best = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        made = len(model.greedy(prompt, tokens)) - len(prompt)
        best = max(best, made / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from gguf_quality import smollm2_merge

    from d2merge.export.onnx_genai import Int4Options, export_genai
    from d2merge.tasks import load_tokenizer
    from d2merge.verify import verify

    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-genai-int4-"))
    root.mkdir(parents=True, exist_ok=True)
    base, adapter, merged = smollm2_merge(root)
    prompt = list(load_tokenizer(base)("The capital of France is")["input_ids"])
    rows = []
    print("| setting | size | mean KL | max KL | top-1 | ppl ratio | decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for name in [s for s in args.settings.split(",") if s]:
        out = root / f"int4-{name}"
        if not out.exists():
            export_genai(merged, out, precision="int4", int4=Int4Options(**SETTINGS[name]), validate=False)
        report = verify(base, adapter, out, thresholds={"max_abs_diff": 1e9, "min_top1": 0.0})
        logits = report.results[0].logits
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        speed = decode_tok_s(out, prompt, args.tokens, args.runs)
        rows.append({"setting": name, "options": SETTINGS[name], "bytes": size, "kl_mean": logits.kl_mean,
                     "kl_max": logits.kl_max, "top1": logits.top1_agreement, "ppl_ratio": logits.ppl_ratio,
                     "decode_tok_s": speed})
        print(f"| {name} | {size / 1e6:.1f} MB | {logits.kl_mean:.4f} | {logits.kl_max:.3f} | "
              f"{100 * logits.top1_agreement:.1f}% | {logits.ppl_ratio:.4f} | {speed:.1f} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "probes": report.probes}, indent=2) + "\n")
    print(f"files in {root} (delete when done)")


if __name__ == "__main__":
    main()
