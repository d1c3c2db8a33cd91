"""The real pretrained LLM fixture (SmolLM2-135M-Instruct): it loads, and it answers as itself."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_fixture_is_a_working_instruct_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2merge.io.transformers_folder import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
