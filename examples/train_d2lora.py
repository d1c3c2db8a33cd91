"""Train a D2-LoRA adapter on the built-in multiple-choice task, then measure its merge gap.

Everything is local and seeded: a random-init tiny Llama (d2merge.train.save_task_base),
the synthetic "which word occurs most" task (d2merge.tasks), and an adapter trained
from attach's initialisation (every B zero, so training starts at the base model).
About 15 s of training on two CPU cores for D2-LoRA's 400 steps.

    python examples/train_d2lora.py                          # D2-LoRA, then verify fp32 and bf16 merges
    python examples/train_d2lora.py --method dual_lora       # or lora, dora
    python examples/train_d2lora.py --workdir ./run --no-verify

The folder then holds base/, adapter/ and eval.jsonl, ready for the CLI:

    d2merge merge run/base run/adapter -o run/merged --dtype bf16
    d2merge verify run/base run/adapter run/merged --mc-eval run/eval.jsonl
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from d2merge.train import save_task_base, train_adapter
from d2merge.verify import format_gap_table, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="d2lora", choices=["d2lora", "dual_lora", "lora", "dora"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float, default=None, help="D2-LoRA's tau (default 0.5, the paper's main setting)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a new temp folder)")
    parser.add_argument("--no-verify", action="store_true", help="stop after training")
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="d2merge-train-"))
    root.mkdir(parents=True, exist_ok=True)
    base = save_task_base(root / "base", seed=args.seed)
    extra = {"tau": args.tau} if args.tau is not None and args.method == "d2lora" else {}
    result = train_adapter(base, root / "adapter", args.method, steps=args.steps, seed=args.seed,
                           eval_out=root / "eval.jsonl",
                           log=lambda step, loss: print(f"step {step:4d}  loss {loss:.4f}"), **extra)
    print(result.summary())
    print(f"adapter: {result.adapter}\neval set: {result.eval_set}")
    if args.no_verify:
        return
    report = verify(base, result.adapter, dtypes=("fp32", "bf16"), mc_eval=result.eval_set)
    print()
    print(format_gap_table(report))
    if not report.passed:
        print("\n".join(report.failures()))


if __name__ == "__main__":
    main()
