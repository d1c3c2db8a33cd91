"""PEFT-made LoRA, DoRA and PiSSA adapters on the real SmolLM2-135M-Instruct, merged by d2merge and by PEFT.

Real weights have uneven row norms and outliers that random tiny models lack: DoRA's norms and
the fp32 rounding of a merge behave differently there. Each adapter is built with PEFT on every
linear layer of the 30 blocks, its factors moved off PEFT's init by a realistic amount, and
d2merge's fp32 merge is compared tensor by tensor with ``merge_and_unload`` (within 1e-6 of each
tensor's largest element), and the merged model's logits on a real prompt with PEFT's unmerged
model's.

PiSSA on three blocks only (the first, a middle and the last, every linear kind in each): its
cost is the full SVD of each targeted matrix, twice (PEFT's init and d2merge's rebuilt residual),
about 40 s for all 210 on CI's cores. Every matrix goes through the same residual code
(methods/residual_base.py), so 21 real matrices of all seven shapes prove what 210 would.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")

LINEAR_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
PISSA_BLOCKS = (0, 14, 29)


@pytest.mark.parametrize("kind", ["lora", "dora", "pissa"])
def test_peft_adapter_on_smollm2_merges_as_peft_merges(kind: str, smollm2: Path, tmp_path: Path,
                                                      read_tensors: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2merge import merge
    from d2merge.io.transformers_folder import quiet_transformers

    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(smollm2)
        targets: str | list[str] = "all-linear"
        init = {}
        if kind == "pissa":
            init = {"init_lora_weights": "pissa"}
            targets = [f"model.layers.{i}.{name}" for i in PISSA_BLOCKS for name in LINEAR_KINDS]
        peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                use_dora=kind == "dora", **init))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.05 * torch.randn(param.shape, generator=g))
                elif "lora_B" in name:  # PEFT's B is zero (PiSSA's is not); training moves it a little
                    param.add_(0.01 * torch.randn(param.shape, generator=g))
        peft_model.save_pretrained(tmp_path / "adapter")
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged_by_peft = peft_model.merge_and_unload()
    theirs = merged_by_peft.state_dict()

    merge(smollm2, tmp_path / "adapter", tmp_path / "merged", dtype="fp32", hash_sources=False)
    ours, base = read_tensors(tmp_path / "merged"), read_tensors(smollm2)
    worst, changed = 0.0, 0
    for name, tensor in ours.items():
        reference = theirs[name]
        error = float((tensor - reference).abs().max()) / max(float(reference.abs().max()), 1e-30)
        assert error <= 1e-6, f"{name}: |d2merge - peft| is {error:.3g} of the tensor's scale"
        worst = max(worst, error)
        changed += not torch.equal(tensor, base[name].float())
    blocks = len(PISSA_BLOCKS) if kind == "pissa" else 30
    assert changed == blocks * len(LINEAR_KINDS)  # every linear layer of every targeted block, nothing else
    with quiet_transformers():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(ids).logits
    logit_gap = float((logits - unmerged).abs().max())
    assert logit_gap <= 1e-3, f"merged logits {logit_gap:.3g} from PEFT's unmerged model"
    print(f"\nsmollm2 {kind}: max |d2merge - peft| / scale = {worst:.3g}, "
          f"max |logit(merged) - logit(peft unmerged)| = {logit_gap:.3g}")
