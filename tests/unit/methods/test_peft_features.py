"""The PEFT features merged since PEFT 0.21 layouts were read: residual bases, and verify on each.

- PiSSA / OLoRA saved without conversion: the residual base d2merge rebuilds
  (methods/residual_base.py) equals the one PEFT's ``pissa_init`` / ``olora_init`` leave in the
  layer, within 1e-6 of the weight's largest element, for square, wide, tall and Conv1D layers.
- ``merge --verify`` passes on every new kind of adapter (PiSSA, OLoRA, lora_bias, trainable tokens
  on a tied embedding, DoRA on an embedding): the runtime verify runs follows the same table.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from d2merge.methods.residual_base import residual_base

peft = pytest.importorskip("peft")


def _peft_layer(weight: torch.Tensor, init: str, r: int, alpha: float, *, fan_in_fan_out: bool = False,
                use_rslora: bool = False) -> tuple[torch.Tensor, float]:
    """The base weight PEFT's LoRA layer holds after its init; and the scale it used."""
    from peft.tuners.lora import Linear as LoraLinear

    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(weight.shape[0], weight.shape[1])  # Conv1D(nf=out, nx=in) stores (in, out)
        base.weight.data = weight.T.clone()
    else:
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        base.weight.data = weight.clone()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init, fan_in_fan_out=fan_in_fan_out,
                             use_rslora=use_rslora, target_modules=["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LoraLinear(base, "default", config, r=r, lora_alpha=alpha, is_target_conv_1d_layer=fan_in_fan_out)
    residual = layer.get_base_layer().weight.detach()
    return (residual.T if fan_in_fan_out else residual), layer.scaling["default"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("shape, r, alpha, rslora", [((32, 32), 4, 8, False), ((48, 32), 8, 16, True),
                                                     ((32, 48), 2, 5, False), ((64, 16), 16, 16, False)])
def test_residual_base_equals_peft(init: str, shape: tuple[int, int], r: int, alpha: float, rslora: bool) -> None:
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + r))
    theirs, scale = _peft_layer(w0, init, r, alpha, use_rslora=rslora)
    ours = residual_base(w0, init, r, scale)
    error = float((ours - theirs).abs().max()) / float(w0.abs().max())
    assert error <= 1e-6, f"{init} {shape}: relative error {error:.3g}"
    # The residual is not W0: an adapter merged into W0 instead would carry the top-r part twice.
    assert float((ours - w0).abs().max()) > 0.1 * float(w0.abs().max())


def test_pissa_residual_of_a_conv1d_layer_is_peft_s() -> None:
    w0 = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))  # (out, in)
    theirs, scale = _peft_layer(w0, "pissa", 4, 8, fan_in_fan_out=True)
    assert float((residual_base(w0, "pissa", 4, scale) - theirs).abs().max()) <= 1e-6 * float(w0.abs().max())


def test_the_fp64_reference_uses_peft_s_fp32_residual() -> None:
    """verify's fp64 reference must rebuild the residual PEFT trained on, which its fp32 SVD/QR defines."""
    w0 = torch.randn(40, 32, generator=torch.Generator().manual_seed(5))
    for init in ("pissa", "olora"):
        fp64 = residual_base(w0.double(), init, 4, 2.0)
        assert fp64.dtype == torch.float64
        assert torch.equal(fp64, residual_base(w0, init, 4, 2.0).double())


@pytest.fixture(scope="module")
def qwen2_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers as tf

    config = tf.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qwen2-tied")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("lora", [
    dict(target_modules=["q_proj", "down_proj"], init_lora_weights="pissa"),
    dict(target_modules=["q_proj", "down_proj"], init_lora_weights="olora"),
    dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
    dict(target_modules=["q_proj"], trainable_token_indices=[3, 9]),
    dict(target_modules=["embed_tokens", "q_proj"], use_dora=True),
], ids=["pissa", "olora", "lora-bias", "trainable-tokens-tied", "dora-embedding"])
def test_merge_verify_passes(lora: dict[str, Any], qwen2_tied: Path, tmp_path: Path, cli_runner: Any) -> None:
    from transformers import AutoModelForCausalLM

    from d2merge.io.transformers_folder import quiet_transformers

    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(qwen2_tied),
                                    peft.LoraConfig(r=4, lora_alpha=8, **lora))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=g))
        model.save_pretrained(tmp_path / "adapter")
    result = cli_runner(["merge", qwen2_tied, tmp_path / "adapter", "-o", tmp_path / "merged", "--verify",
                         "--no-hash-sources"])
    assert result.code == 0, result.err
    assert "PASS" in result.out + result.err


def test_training_from_a_pissa_init_is_refused(qwen2_tied: Path) -> None:
    """attach() would put fresh factors on a residual base: a model missing its top-r part."""
    from transformers import AutoModelForCausalLM

    from d2merge.errors import D2MergeError
    from d2merge.runtime import attach

    model = AutoModelForCausalLM.from_pretrained(qwen2_tied)
    with pytest.raises(D2MergeError, match="trains only from the plain init"):
        attach(model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                       "init_lora_weights": "pissa"})
