"""What ``convert --to lora`` costs on a real model: retained energy and KL against the original adapter.

Trains small DoRA, D2-LoRA and Dual LoRA adapters on SmolLM2-135M-Instruct (the English task,
the test suite's recipe: rank 8 on q/v of the last six layers, 24 steps), converts each to a
plain LoRA at ranks 8, 16, 32, 64 and at its exact rank, and compares, on the held-out prompts,
the converted adapter's logits (d2merge's unmerged LoRA forward, fp32) with the original
adapter's: mean KL(original || converted) per token, top-1 agreement, and the least energy any
module kept.

    python benchmarks/convert_tradeoff.py --base /path/to/smollm2-folder --json tradeoff.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

SMOLLM2_TRAINING = {"steps": 24, "batch_size": 8, "r": 8, "lora_alpha": 16.0, "lr": 3e-3, "seed": 0,
                    "target_modules": r"model\.layers\.(2[4-9])\.self_attn\.(q_proj|v_proj)"}
RANKS = (8, 16, 32, 64)


def logits_on(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(ids).logits[0].float() for ids in batches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--methods", default="dora,d2lora,dual_lora")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from d2merge.adapter_ops.convert import convert_to_lora
    from d2merge.options.adapter_ops import ConvertOptions
    from d2merge.english_task import split
    from d2merge.runtime import load_unmerged
    from d2merge.train import train_adapter

    torch.set_num_threads(1)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-tradeoff-"))
    root.mkdir(parents=True, exist_ok=True)
    train, held_out = split(held_out=200, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    batches = [tokenizer(item.prompt + " " + item.choices[item.answer], return_tensors="pt")["input_ids"]
               for item in held_out[: args.prompts]]
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for method in [m for m in args.methods.split(",") if m]:
        adapter = root / method
        if not (adapter / "adapter_config.json").is_file():
            train_adapter(args.base, adapter, method, data=train, eval_data=[], progress=False, **SMOLLM2_TRAINING)
        reference = logits_on(load_unmerged(args.base, adapter).eval(), batches)
        rows: dict[str, dict[str, float]] = {}
        for rank in (*RANKS, None):
            label = str(rank) if rank else "exact"
            out = root / f"{method}-r{label}"
            result = convert_to_lora(adapter, args.base, out, ConvertOptions(rank=rank, overwrite=True))
            got = logits_on(load_unmerged(args.base, out).eval(), batches)
            kl, agree, tokens = 0.0, 0, 0
            for want, have in zip(reference, got):
                p = torch.log_softmax(want.double(), -1)
                q = torch.log_softmax(have.double(), -1)
                kl += float((p.exp() * (p - q)).sum())
                agree += int((want.argmax(-1) == have.argmax(-1)).sum())
                tokens += want.shape[0]
            params = sum(m.rank * sum(m.shape) for m in result.modules)
            rows[label] = {"mean_kl": kl / tokens, "top1_agreement": agree / tokens,
                           "min_energy": min(m.energy for m in result.modules),
                           "max_rank": max(m.rank for m in result.modules), "parameters": params}
            print(f"{method:<9} rank {label:<5} KL {kl / tokens:.3e}  top-1 {agree / tokens:.4f}  "
                  f"least energy {rows[label]['min_energy']:.6f}  params {params}", flush=True)
        figures[method] = rows
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
