"""Train an adapter on a real pretrained model with your own data, merge it, and verify the merge.

Any transformers causal LM folder with its tokenizer works as BASE (the test suite uses
SmolLM2-135M-Instruct). DATA is yours: a JSONL file of {"prompt", "choices", "answer"}
items (trained on the right answer's tokens, held-out accuracy measured before and after),
or any other file as plain text (next-token loss). Nothing is downloaded.

    python examples/train_on_your_model.py BASE DATA.jsonl --method dora --workdir ./run
    python examples/train_on_your_model.py BASE notes.txt --eval-data eval.jsonl --steps 200
    python examples/train_on_your_model.py BASE --english-task --workdir ./run   # no data at hand?

--english-task writes d2merge's built-in English multiple-choice task (capitals, opposites,
plurals, sums; fact-disjoint held-out split) as DATA and eval files first. The workdir then
holds adapter/, eval.jsonl and merged-<dtype>/ folders, ready for the CLI:

    d2merge verify BASE run/adapter run/merged-bf16 --mc-eval run/eval.jsonl --report run/verify.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from d2merge.api import merge
from d2merge.tasks import write_jsonl
from d2merge.train import train_adapter
from d2merge.verify import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="a transformers causal LM folder with its tokenizer")
    parser.add_argument("data", type=Path, nargs="?", help="your data: MC JSONL or plain text")
    parser.add_argument("--english-task", action="store_true", help="use d2merge's built-in English MC task")
    parser.add_argument("--eval-data", type=Path, default=None, help="held-out MC JSONL (default: split off DATA)")
    parser.add_argument("--method", default="lora", choices=["lora", "dora", "d2lora", "dual_lora"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--target-modules", default=r".*\.self_attn\.(q_proj|v_proj)",
                        help="PEFT-style full-match regex over module names")
    parser.add_argument("--dtypes", default="fp32,bf16", help="merge and verify in these output dtypes")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a new temp folder)")
    args = parser.parse_args()
    if (args.data is None) == (not args.english_task):
        parser.error("give DATA or --english-task (one of them)")

    root = args.workdir or Path(tempfile.mkdtemp(prefix="d2merge-train-"))
    root.mkdir(parents=True, exist_ok=True)
    data, eval_data = args.data, args.eval_data
    if args.english_task:
        from d2merge.english_task import split

        train_items, held_out = split(held_out=200, seed=0)
        data = write_jsonl(root / "train.jsonl", train_items)
        eval_data = write_jsonl(root / "eval-given.jsonl", held_out)

    result = train_adapter(args.base, root / "adapter", args.method, data=data, eval_data=eval_data,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, r=args.r,
                           target_modules=args.target_modules, eval_out=root / "eval.jsonl", progress=True)
    print(result.summary())
    mc_eval = result.eval_set  # None for plain text without --eval-data: verify then uses probes only
    for dtype in args.dtypes.split(","):
        merged = merge(args.base, result.adapter, root / f"merged-{dtype}", dtype=dtype, overwrite=True).output
        report = verify(args.base, result.adapter, merged, mc_eval=mc_eval, report=root / f"verify-{dtype}.json")
        print(report.table())
        print(f"{dtype}: {'PASS' if report.passed else 'FAIL'}\n")
    print(f"files in {root}")


if __name__ == "__main__":
    main()
