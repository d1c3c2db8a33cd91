"""PEFT's LoRA option space over ten tiny architectures, with PEFT itself as the oracle.

The options are those PEFT's own tests exercise (tests/test_custom_models.py, tests/testing_common.py:
target_modules as a list, a regex and "all-linear", exclude_modules, layers_to_transform/layers_pattern,
rank_pattern/alpha_pattern, rsLoRA, DoRA, lora_bias, bias, modules_to_save, trainable_token_indices,
the inits, embeddings, Conv1D with fan_in_fan_out, fused Phi3 layers, MoE). Each case builds the adapter
with ``get_peft_model``, moves every trainable tensor off its initial value, saves it with
``save_pretrained`` and has exactly one of two outcomes:

- ``EQUAL``: d2merge's merge equals PEFT's ``merge_and_unload`` (fp32: within 1e-6 of each tensor's
  largest element; bf16 output: within 1 ulp of PEFT's fp32 merge rounded to bf16), the merged folder's
  logits equal PEFT's unmerged model's, and d2merge's own unmerged runtime (what ``verify`` runs)
  equals PEFT's forward;
- a refusal: one line, exit 2, nothing written, with the reason named.

``PEFT_MERGE_WRONG`` cases: on a tied model PEFT merges an embedding (or lm_head) change into the
one shared tensor, so its merged model differs from its own unmerged one (whose other tied layer
stays the base). There the reference is PEFT's unmerged model: the changed tensor equals PEFT's
merge, its tied partner stays the base (d2merge unties), and the test asserts that PEFT's merge is
indeed off, so a PEFT fix shows up here.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

peft = pytest.importorskip("peft")

VOCAB = 96
EQUAL = "equal"
PEFT_MERGE_WRONG = "peft-merge-wrong"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MOE = {"mixtral", "qwen3-moe", "gpt-oss"}  # checkpoints whose names transformers changes on load


def _config(arch: str) -> Any:
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch in ("llama", "llama-tied"):
        return tf.LlamaConfig(**common, tie_word_embeddings=arch == "llama-tied")
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8,
                                   tie_word_embeddings=True)
    if arch == "phi3":
        return tf.Phi3Config(**common, tie_word_embeddings=False)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "qwen3-moe":
        return tf.Qwen3MoeConfig(**common, head_dim=8, moe_intermediate_size=24, num_experts=3, num_experts_per_tok=2,
                                 decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
    if arch == "gpt-oss":
        return tf.GptOssConfig(**common, head_dim=8, num_local_experts=3, num_experts_per_tok=2, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                            eos_token_id=3)
    if arch == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64)
    raise ValueError(arch)


ENCODERS = {"bert"}


def _model_class(arch: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if arch in ENCODERS else AutoModelForCausalLM


class Bases:
    """Each (arch, dtype, sharded) base built once for the session; biases and norms perturbed off 0/1."""

    def __init__(self, root: Path):
        self.root, self.made = root, {}

    def __call__(self, arch: str, dtype: torch.dtype = torch.float32, sharded: bool = False) -> Path:
        key = (arch, dtype, sharded)
        if key not in self.made:
            torch.manual_seed(0)
            model = _model_class(arch).from_config(_config(arch), dtype=torch.float32)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for param in model.parameters():
                    if param.ndim == 1:
                        param.add_(0.05 * torch.randn(param.shape, generator=g))
            folder = self.root / f"{arch}-{str(dtype)[6:]}-{'sharded' if sharded else 'single'}"
            model.to(dtype).save_pretrained(folder, max_shard_size="40KB" if sharded else "1GB")
            self.made[key] = folder
        return self.made[key]


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Bases:
    return Bases(tmp_path_factory.mktemp("matrix-bases"))


@dataclass(frozen=True)
class Case:
    arch: str
    lora: dict[str, Any]
    expect: str = EQUAL  # EQUAL, PEFT_MERGE_WRONG, or a fragment of the refusal line
    dtype: torch.dtype = torch.float32  # the base's stored dtype (bf16 cases merge to bf16)
    sharded: bool = False
    save: dict[str, Any] = field(default_factory=dict)  # save_pretrained keywords


CASES: dict[str, Case] = {
    # --- target_modules forms, on every architecture ---------------------------------------------
    "llama-list": Case("llama", dict(target_modules=["q_proj", "v_proj"])),
    "llama-str-regex": Case("llama", dict(target_modules=r".*\.(q|k)_proj")),
    "llama-all-linear": Case("llama", dict(target_modules="all-linear")),
    "llama-exclude": Case("llama", dict(target_modules=ALL_LINEAR, exclude_modules=["down_proj", "k_proj"])),
    "llama-exclude-regex": Case("llama", dict(target_modules=ALL_LINEAR, exclude_modules=r".*layers\.0.*")),
    "llama-layers-to-transform": Case("llama", dict(target_modules=ATTN, layers_to_transform=[1],
                                                    layers_pattern="layers")),
    "llama-layers-int": Case("llama", dict(target_modules=["v_proj"], layers_to_transform=0)),
    "llama-rslora": Case("llama", dict(target_modules=ALL_LINEAR, r=8, lora_alpha=16, use_rslora=True)),
    "llama-patterns": Case("llama", dict(target_modules=ALL_LINEAR, rank_pattern={"layers.1.self_attn.q_proj": 2,
                                                                                  "v_proj": 6},
                                         alpha_pattern={"o_proj": 32, "layers.0.mlp.down_proj": 3})),
    "llama-dropout": Case("llama", dict(target_modules=["q_proj"], lora_dropout=0.1, lora_alpha=4)),
    "llama-modules-to-save": Case("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "llama-modules-to-save-suffix": Case("llama", dict(target_modules=["q_proj"], modules_to_save=["norm"])),
    "llama-embedding": Case("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "llama-embedding-no-base-layer": Case("llama", dict(target_modules=["embed_tokens"]),
                                          save=dict(save_embedding_layers=False)),
    "llama-lm-head": Case("llama", dict(target_modules=["lm_head", "v_proj"])),
    "llama-init-false": Case("llama", dict(target_modules=ATTN, init_lora_weights=False)),
    "llama-init-gaussian": Case("llama", dict(target_modules=ATTN, init_lora_weights="gaussian")),
    "llama-init-orthogonal": Case("llama", dict(target_modules=ATTN, init_lora_weights="orthogonal")),
    "llama-pissa": Case("llama", dict(target_modules=ALL_LINEAR, init_lora_weights="pissa", lora_alpha=16)),
    "llama-pissa-rslora-pattern": Case("llama", dict(target_modules=ATTN, init_lora_weights="pissa", use_rslora=True,
                                                     rank_pattern={"v_proj": 2}, lora_alpha=5)),
    "llama-olora": Case("llama", dict(target_modules=ALL_LINEAR, init_lora_weights="olora", lora_alpha=16)),
    "llama-pissa-dora": Case("llama", dict(target_modules=["q_proj", "up_proj"], init_lora_weights="pissa",
                                           use_dora=True)),
    "llama-pissa-niter": Case("llama", dict(target_modules=ATTN, init_lora_weights="pissa_niter_4"),
                              expect="randomised SVD"),
    "llama-dora": Case("llama", dict(target_modules=ALL_LINEAR, use_dora=True)),
    "llama-dora-rslora-pattern": Case("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
                                                    use_rslora=True, rank_pattern={"layers.0.mlp.up_proj": 8},
                                                    alpha_pattern={"v_proj": 2.0})),
    "llama-dora-embedding": Case("llama", dict(target_modules=["embed_tokens", "q_proj"], use_dora=True)),
    "llama-trainable-tokens": Case("llama", dict(target_modules=["q_proj"], trainable_token_indices=[3, 17, 5])),
    "llama-trainable-tokens-dict": Case("llama", dict(target_modules=["v_proj"],
                                                      trainable_token_indices={"embed_tokens": [9, 4]})),
    "llama-trainable-tokens-lm-head": Case("llama", dict(target_modules=["q_proj"], trainable_token_indices={
        "embed_tokens": [3, 4], "lm_head": [5]})),
    "llama-alora": Case("llama", dict(target_modules=["q_proj"], alora_invocation_tokens=[5, 6]),
                        expect="aLoRA adapter is active only after its invocation tokens"),
    "llama-target-parameters": Case("llama", dict(target_modules=["v_proj"],
                                                  target_parameters=["self_attn.q_proj.weight"])),
    "llama-layer-replication": Case("llama", dict(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]),
                                    expect="layer_replication"),
    # --- tied embeddings ----------------------------------------------------------------------------
    "llama-tied-attn": Case("llama-tied", dict(target_modules=ATTN)),
    "llama-tied-embedding": Case("llama-tied", dict(target_modules=["embed_tokens", "q_proj"]),
                                 expect=PEFT_MERGE_WRONG),
    "llama-tied-lm-head": Case("llama-tied", dict(target_modules=["lm_head"]), expect=PEFT_MERGE_WRONG),
    "llama-tied-trainable-tokens": Case("llama-tied", dict(target_modules=["q_proj"],
                                                           trainable_token_indices=[7, 2])),
    "llama-tied-dora-embedding": Case("llama-tied", dict(target_modules=["embed_tokens"], use_dora=True),
                                      expect=PEFT_MERGE_WRONG),
    # --- other architectures ---------------------------------------------------------------------------
    "qwen2-all-linear": Case("qwen2", dict(target_modules="all-linear")),
    "qwen2-lora-bias": Case("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True,
                                          lora_alpha=32)),
    "qwen2-lora-bias-no-base-bias": Case("qwen2", dict(target_modules=["q_proj", "o_proj"], lora_bias=True),
                                         expect="has no bias in the base"),
    "qwen2-bias-all": Case("qwen2", dict(target_modules=["q_proj", "v_proj"], bias="all")),
    "qwen2-bias-lora-only": Case("qwen2", dict(target_modules=["q_proj", "k_proj"], bias="lora_only")),
    "qwen2-bias-all-lora-bias": Case("qwen2", dict(target_modules=["k_proj"], bias="all", lora_bias=True)),
    "qwen2-dora": Case("qwen2", dict(target_modules=ATTN, use_dora=True)),
    "qwen2-pissa": Case("qwen2", dict(target_modules=ATTN + ["down_proj"], init_lora_weights="pissa")),
    "qwen3-attn": Case("qwen3", dict(target_modules=ATTN)),
    "qwen3-dora-mlp": Case("qwen3", dict(target_modules=["gate_proj", "up_proj", "down_proj"], use_dora=True)),
    "qwen3-olora": Case("qwen3", dict(target_modules=ALL_LINEAR, init_lora_weights="olora")),
    "mistral-all-linear": Case("mistral", dict(target_modules="all-linear", r=2)),
    "mistral-trainable-tokens": Case("mistral", dict(target_modules=["o_proj"], trainable_token_indices=[11])),
    "gemma3-attn": Case("gemma3", dict(target_modules=ATTN)),
    "gemma3-embedding": Case("gemma3", dict(target_modules=["embed_tokens"]), expect=PEFT_MERGE_WRONG),
    "gemma3-trainable-tokens": Case("gemma3", dict(target_modules=["q_proj"], trainable_token_indices=[4, 8])),
    "phi3-fused": Case("phi3", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),
    "phi3-dora-fused": Case("phi3", dict(target_modules=["qkv_proj", "gate_up_proj"], use_dora=True)),
    "gpt2-conv1d": Case("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-conv1d-dora": Case("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    "gpt2-conv1d-pissa": Case("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                           init_lora_weights="pissa")),
    "gpt2-conv1d-lora-bias": Case("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)),
    "gpt2-olora-fan-in-fan-out": Case("gpt2", dict(target_modules=["c_proj"], fan_in_fan_out=True,
                                                   init_lora_weights="olora"),
                                      expect="init_lora_weights 'olora' with fan_in_fan_out"),
    "gpt2-trainable-tokens-tied": Case("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True,
                                                    trainable_token_indices={"wte": [5, 6]})),
    "opt-attn-fc": Case("opt", dict(target_modules=["q_proj", "v_proj", "fc1", "fc2"])),
    "opt-dora": Case("opt", dict(target_modules=["q_proj", "out_proj"], use_dora=True)),
    "bert-encoder": Case("bert", dict(target_modules=["query", "value", "dense"])),
    "bert-dora": Case("bert", dict(target_modules=["query", "key"], use_dora=True)),
    "mixtral-attn": Case("mixtral", dict(target_modules=ATTN)),
    # PEFT turns the router target "gate" into target_parameters ["gate.weight"]; transformers 5 holds
    # it as mlp.gate but the checkpoint says block_sparse_moe.gate (a rename d2merge reads from transformers).
    "mixtral-router": Case("mixtral", dict(target_modules=["q_proj", "gate"])),
    # Fused experts in memory (E, 2I, H) / (E, H, I); stored per expert as w1, w3 (gate, up) and w2.
    "mixtral-experts": Case("mixtral", dict(target_modules=[], target_parameters=EXPERTS)),
    "mixtral-experts-attn-patterns": Case("mixtral", dict(target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS,
                                                          use_rslora=True, rank_pattern={"down_proj": 2},
                                                          alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 3})),
    "mixtral-experts-gate-up-only": Case("mixtral", dict(target_modules=[], target_parameters=["gate_up_proj"])),
    # transformers 4 names: PEFT maps w1/w3/w2 onto the fused parameters (gate_up_proj at rank 2r).
    "mixtral-experts-v4-names": Case("mixtral", dict(target_modules=["w1", "w2", "w3", "o_proj"])),
    "mixtral-router-experts": Case("mixtral", dict(target_modules=["gate"], target_parameters=EXPERTS)),
    "mixtral-experts-modules-to-save-router": Case("mixtral", dict(target_modules=[], target_parameters=EXPERTS,
                                                                   modules_to_save=["gate"])),
    "qwen3-moe-experts": Case("qwen3-moe", dict(target_modules=ATTN, target_parameters=EXPERTS)),
    "qwen3-moe-router": Case("qwen3-moe", dict(target_modules=["gate", "o_proj"])),
    # gpt-oss stores its experts fused, (E, in, out) (is_transposed), as it holds them.
    "gpt-oss-experts": Case("gpt-oss", dict(target_modules=["q_proj"], target_parameters=EXPERTS)),
    # --- bf16 bases (output bf16) and sharded bases ------------------------------------------------------
    "llama-bf16": Case("llama", dict(target_modules=ALL_LINEAR), dtype=torch.bfloat16),
    "llama-bf16-dora": Case("llama", dict(target_modules=ALL_LINEAR, use_dora=True), dtype=torch.bfloat16),
    "llama-bf16-embedding": Case("llama", dict(target_modules=["embed_tokens", "lm_head"]), dtype=torch.bfloat16),
    "qwen2-bf16-lora-bias": Case("qwen2", dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
                                 dtype=torch.bfloat16),
    "mixtral-bf16-experts": Case("mixtral", dict(target_modules=["gate"], target_parameters=EXPERTS),
                                 dtype=torch.bfloat16),
    "qwen3-moe-sharded-experts": Case("qwen3-moe", dict(target_modules=[], target_parameters=EXPERTS), sharded=True),
    "qwen3-bf16-pissa": Case("qwen3", dict(target_modules=ATTN, init_lora_weights="pissa"), dtype=torch.bfloat16),
    "gpt2-bf16-conv1d": Case("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                             dtype=torch.bfloat16),
    "llama-sharded": Case("llama", dict(target_modules=ALL_LINEAR, modules_to_save=["lm_head"]), sharded=True),
    "qwen2-sharded-dora": Case("qwen2", dict(target_modules=ALL_LINEAR, use_dora=True), sharded=True),
    "llama-sharded-bf16-tokens": Case("llama", dict(target_modules=ATTN, trainable_token_indices=[1, 50]),
                                      dtype=torch.bfloat16, sharded=True),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every trainable tensor away from its init (PEFT's B is zero, magnitudes are the base norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                param.mul_((1 + 0.3 * torch.randn(param.shape, generator=g)).abs())
            elif "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=g))
            else:  # modules_to_save, trained biases, trainable token rows
                param.add_(0.2 * torch.randn(param.shape, generator=g))


def _outputs(model: torch.nn.Module, ids: torch.Tensor, encoder: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.last_hidden_state if encoder else out.logits).float()


def _bf16_ulps(ours: torch.Tensor, reference: torch.Tensor) -> int:
    """Distance in bf16 steps between two bf16 tensors (0 where bit-equal)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).int()
        return torch.where(bits >= 0, bits, -(bits & 0x7FFF))
    return int((ordered(ours) - ordered(reference)).abs().max())


def _scale(t: torch.Tensor) -> float:
    return max(float(t.abs().max()), 1e-30)


def _run(name: str, bases: Bases, tmp_path: Path, cli_runner: Callable[..., Any],
         read_tensors: Callable[[Path], dict[str, torch.Tensor]]) -> None:
    from d2merge.io.transformers_folder import quiet_transformers

    case = CASES[name]
    encoder = case.arch in ENCODERS
    base = bases(case.arch, case.dtype, case.sharded)
    adapter, out = tmp_path / "adapter", tmp_path / "merged"
    cls = _model_class(case.arch)
    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(base, dtype=torch.float32)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        lora = dict(r=4, lora_alpha=8) | case.lora
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora))
        _randomize(peft_model, seed=len(name))
        peft_model.save_pretrained(adapter, **case.save)
    refusal = case.expect not in (EQUAL, PEFT_MERGE_WRONG)
    if not refusal:  # (PEFT cannot merge several of the refused ones either: aLoRA, lora_bias without a bias)
        ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
        peft_model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unmerged = _outputs(peft_model, ids, encoder)
            merged_by_peft = peft_model.merge_and_unload()
        theirs = {k: v.clone() for k, v in merged_by_peft.state_dict().items()}
        peft_merged = _outputs(merged_by_peft, ids, encoder)

    argv = ["merge", base, adapter, "-o", out, "--no-hash-sources"]
    if case.dtype == torch.float32:
        argv += ["--dtype", "fp32"]
    if case.sharded:
        argv += ["--max-shard-size", "40KB"]
    result = cli_runner(argv)
    if refusal:
        lines = result.err.strip().splitlines()
        assert result.code == 2, f"{name}: expected a refusal, got exit {result.code}: {result.err}"
        assert len(lines) == 1 and lines[0].startswith("d2merge: error:"), result.err
        assert case.expect in lines[0], lines[0]
        print(f"\nmatrix {name}: refused: {lines[0].split(': ', 2)[-1][:160]}")
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
        return
    assert result.code == 0, f"{name}: {result.err}"
    ours = read_tensors(out)
    config = json.loads((out / "config.json").read_text())
    tied = bool(json.loads((base / "config.json").read_text()).get("tie_word_embeddings", False)) and not encoder
    embedding = next((n for n in base_state if n.endswith(("embed_tokens.weight", "wte.weight"))), None)
    head = "lm_head.weight"
    changed = [n for n in theirs if not torch.equal(theirs[n], base_state[n])]
    assert changed, f"{name}: the adapter must change the model"

    expected = dict(theirs)
    if case.expect == PEFT_MERGE_WRONG:
        # PEFT merged the change into the one tensor both tied layers share; its unmerged model
        # changes only the adapted layer. d2merge unties: the partner keeps the base's values.
        assert tied and config["tie_word_embeddings"] is False
        adapted = embedding if any(t in ("embed_tokens",) for t in case.lora["target_modules"]) else head
        partner = head if adapted == embedding else embedding
        expected[partner] = base_state[embedding]
        assert float((peft_merged - unmerged).abs().max()) > 1e-3, "PEFT's tied merge is right now: update the case"
    elif tied:
        assert config.get("tie_word_embeddings", True) is True, f"{name}: the tie must be kept"
    worst = 0.0  # fp32: largest |d2merge - peft| / scale; bf16: largest ulp distance
    for tensor_name, tensor in ours.items():
        if tensor_name not in expected and case.arch in MOE:
            continue  # stored under the checkpoint's names; checked through the loaded model below
        reference = expected[tensor_name]
        assert tensor.shape == reference.shape, tensor_name
        if case.dtype == torch.float32:
            assert tensor.dtype == torch.float32, tensor_name
            error = float((tensor - reference).abs().max())
            assert error <= 1e-6 * _scale(reference), f"{name} {tensor_name}: |d2merge - peft| = {error:.3g}"
            worst = max(worst, error / _scale(reference))
        else:
            assert tensor.dtype == torch.bfloat16, tensor_name
            ulps = _bf16_ulps(tensor, reference.to(torch.bfloat16))
            assert ulps <= 1, f"{name} {tensor_name}: {ulps} bf16 ulps from PEFT's fp32 merge"
            worst = max(worst, ulps)
    # Names transformers renames on load (Mixtral's block_sparse_moe) are compared through the loaded model.
    with quiet_transformers():
        loaded = cls.from_pretrained(out, dtype=case.dtype).state_dict()
    assert set(loaded) == set(expected)
    for tensor_name in set(expected) - set(ours):
        assert tied or tensor_name not in base_state or case.arch in MOE, tensor_name
        tensor, reference = loaded[tensor_name], expected[tensor_name]
        if case.dtype == torch.float32:
            error = float((tensor - reference).abs().max())
            assert error <= 1e-6 * _scale(reference), f"{name} {tensor_name}: |d2merge - peft| = {error:.3g}"
            worst = max(worst, error / _scale(reference))
        else:
            ulps = _bf16_ulps(tensor, reference.to(torch.bfloat16))
            assert ulps <= 1, f"{name} {tensor_name}: {ulps} bf16 ulps from PEFT's fp32 merge"
            worst = max(worst, ulps)

    # The merged folder loads and computes PEFT's unmerged outputs.
    with quiet_transformers():
        merged_model = cls.from_pretrained(out, dtype=torch.float32).eval()
    merged = _outputs(merged_model, ids, encoder)
    tolerance = (1e-4 if case.dtype == torch.float32 else 5e-2) * _scale(unmerged)
    logit_gap = float((merged - unmerged).abs().max())
    assert logit_gap <= tolerance, f"{name}: merged logits differ from PEFT's unmerged"
    unit = "of scale" if case.dtype == torch.float32 else "bf16 ulp"
    print(f"\nmatrix {name}: {case.expect}, weights {worst:.3g} {unit}, logits {logit_gap:.3g} from PEFT unmerged")

    # d2merge's own unmerged runtime (what verify compares against) computes PEFT's forward.
    if not encoder and case.dtype == torch.float32:
        from d2merge.runtime import load_unmerged

        with quiet_transformers():
            runtime = load_unmerged(base, adapter)
        ours_unmerged = _outputs(runtime, ids, encoder)
        assert float((ours_unmerged - unmerged).abs().max()) <= 1e-5 * _scale(unmerged), \
            f"{name}: d2merge's runtime differs from PEFT's forward"


@pytest.mark.parametrize("name", list(CASES))
def test_peft_matrix(name: str, bases: Bases, tmp_path: Path, cli_runner: Any, read_tensors: Any) -> None:
    _run(name, bases, tmp_path, cli_runner, read_tensors)


def test_the_matrix_covers_the_issue() -> None:
    archs = {c.arch for c in CASES.values()}
    assert {"llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "gpt2", "opt", "bert", "mixtral"} <= archs
    assert len(CASES) >= 50
    assert any(c.dtype == torch.bfloat16 for c in CASES.values()) and any(c.sharded for c in CASES.values())
    assert any(c.arch in ("llama-tied", "gpt2", "gemma3") for c in CASES.values())


# --- target_parameters: what the matrix cannot show as a PEFT case ------------------------------------


def _moe_adapter(bases: Bases, arch: str, folder: Path, **lora: Any) -> tuple[Path, Path]:
    """A PEFT target_parameters adapter on a tiny MoE base, every factor moved off its init."""
    from d2merge.io.transformers_folder import quiet_transformers

    base = bases(arch)
    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore")
        model = _model_class(arch).from_pretrained(base, dtype=torch.float32)
        peft_model = peft.get_peft_model(model, peft.LoraConfig(
            **(dict(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS) | lora)))
        _randomize(peft_model, seed=3)
        peft_model.save_pretrained(folder)
    return base, folder


def _refusal(cli_runner: Callable[..., Any], argv: list[Any], out: Path) -> str:
    result = cli_runner(argv)
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and lines[0].startswith("d2merge: error:"), result.err
    assert not out.exists()
    return lines[0]


def test_mixtral_expert_tensors_get_their_slice_of_the_fused_update(bases: Bases) -> None:
    """gate_up_proj = [w1; w3] per expert (gate first, as the forward's chunk reads it), down_proj = w2."""
    from d2merge.io.checkpoint_layout import CheckpointLayout
    from d2merge.io.checkpoint import open_base
    from d2merge.io.model_structure import meta_model
    from d2merge.methods.target_parameters import resolve

    checkpoint = open_base(bases("mixtral"))
    model = meta_model(checkpoint.config)
    targets = resolve(model, EXPERTS)
    gate_up = targets["model.layers.1.mlp.experts.base_layer"]  # the first parameter is the inner wrapper
    assert (gate_up.parameter, gate_up.shape, gate_up.in_out) == ("gate_up_proj", (3, 96, 32), False)
    assert targets["model.layers.1.mlp.experts"].parameter == "down_proj"
    layout = CheckpointLayout(model, {n: checkpoint.tensors.info(n) for n in checkpoint.tensors.keys()})
    pieces = {stored: (p.expert, p.dim, p.start, p.stop) for stored, p in layout.pieces(gate_up)}
    stored = "model.layers.1.block_sparse_moe.experts.{}.{}.weight"
    assert pieces == {stored.format(e, w): (e, 0, start, start + 48)
                      for e in range(3) for w, start in (("w1", 0), ("w3", 48))}
    down = {stored: p.expert for stored, p in layout.pieces(targets["model.layers.1.mlp.experts"])}
    assert down == {stored.format(e, "w2"): e for e in range(3)}
    assert layout.stored_name("model.layers.1.mlp.gate.weight") == "model.layers.1.block_sparse_moe.gate.weight"
    gpt_oss = resolve(meta_model(open_base(bases("gpt-oss")).config), ["mlp.experts.gate_up_proj"])
    assert gpt_oss["model.layers.0.mlp.experts"].in_out  # gpt-oss stores (E, in, out)


def test_a_conversion_d2merge_cannot_invert_is_refused(bases: Bases, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operation other than stack + concatenate (here an interleave) leaves the stored layout unknown."""
    import transformers.conversion_mapping as conversion_mapping
    from transformers.core_model_loading import Interleave, MergeModulelist, WeightConverter, WeightRenaming

    from d2merge.io.checkpoint import open_base
    from d2merge.io.checkpoint_layout import CheckpointLayout
    from d2merge.io.model_structure import meta_model
    from d2merge.methods.target_parameters import resolve

    def interleaved(model: Any, **kwargs: Any) -> list[Any]:
        return [WeightRenaming(".block_sparse_moe.", ".mlp."),
                WeightConverter([".experts.*.w1.weight"], ".experts.gate_up_proj",
                                operations=[MergeModulelist(dim=0), Interleave(dim=1)])]

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", interleaved)
    checkpoint = open_base(bases("mixtral"))
    model = meta_model(checkpoint.config)
    layout = CheckpointLayout(model, {n: checkpoint.tensors.info(n) for n in checkpoint.tensors.keys()})
    why = layout.pieces(resolve(model, EXPERTS)["model.layers.0.mlp.experts.base_layer"])
    assert isinstance(why, str) and "MergeModulelist then Interleave" in why


def test_gpt_oss_mxfp4_experts_are_refused(bases: Bases, tmp_path: Path, cli_runner: Any) -> None:
    """Real gpt-oss checkpoints store the experts MXFP4-quantized (*_blocks, *_scales): nothing to add dW to."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, adapter = _moe_adapter(bases, "gpt-oss", tmp_path / "adapter")
    quantized = tmp_path / "mxfp4"
    shutil.copytree(base, quantized)
    tensors = load_file(quantized / "model.safetensors")
    for name in [n for n in tensors if n.endswith("experts.gate_up_proj")]:
        tensors.pop(name)
        tensors[name + "_blocks"] = torch.zeros(3, 96, 1, 16, dtype=torch.uint8)
        tensors[name + "_scales"] = torch.zeros(3, 96, 1, dtype=torch.uint8)
    save_file(tensors, quantized / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    line = _refusal(cli_runner, ["merge", quantized, adapter, "-o", out, "--no-hash-sources"], out)
    assert "target parameter 'model.layers.0.mlp.experts.gate_up_proj' [3, 32, 96]" in line
    assert "the checkpoint holds no tensor transformers loads into it" in line


@pytest.mark.parametrize("field, value, expect", [
    ("use_dora", True, "PEFT's ParamWrapper does not support DoRA"),
    ("init_lora_weights", "pissa", "init_lora_weights 'pissa'"),
    ("target_parameters", ["mlp.experts.no_such_proj"], "match no parameter of the base model"),
])
def test_what_peft_param_wrapper_cannot_have_is_refused(field: str, value: Any, expect: str, bases: Bases,
                                                        tmp_path: Path, cli_runner: Any) -> None:
    base, adapter = _moe_adapter(bases, "mixtral", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    assert expect in _refusal(cli_runner, ["merge", base, adapter, "-o", out, "--no-hash-sources"], out)


def test_factors_that_do_not_fit_their_parameter_are_refused(bases: Bases, tmp_path: Path, cli_runner: Any) -> None:
    """rank_pattern giving gate_up_proj another rank than its factors have: a shape refusal, not a wrong slice."""
    base, adapter = _moe_adapter(bases, "mixtral", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"gate_up_proj": 1}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    line = _refusal(cli_runner, ["merge", base, adapter, "-o", out, "--no-hash-sources"], out)
    assert "does not fit the parameter 'model.layers.0.mlp.experts.gate_up_proj' [3, 96, 32] (3 expert(s), r=1)" \
        in line


def test_inspect_and_verify_on_expert_adapters(bases: Bases, tmp_path: Path, cli_runner: Any) -> None:
    base, adapter = _moe_adapter(bases, "mixtral", tmp_path / "adapter", target_modules=["gate"])
    plain = cli_runner(["inspect", adapter])
    assert plain.code == 0 and "target_parameters=" in plain.out and "pass --base" in plain.out
    result = cli_runner(["inspect", adapter, "--base", base, "--json"])
    assert result.code == 0, result.err
    modules = {m["module"]: m for m in json.loads(result.out)["modules"]}
    inner = modules["model.layers.0.mlp.experts.base_layer"]
    assert (inner["parameter"], inner["experts"], inner["rank"]) == ("gate_up_proj", 3, 2) and inner["update_norm"] > 0
    assert modules["model.layers.0.mlp.gate"]["parameter"] == "weight"
    out = tmp_path / "merged"
    assert cli_runner(["merge", base, adapter, "-o", out, "--dtype", "fp32", "--no-hash-sources"]).code == 0
    verified = cli_runner(["verify", base, adapter, out])
    assert verified.code == 0 and "PASS" in verified.out, verified.out + verified.err


V4_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3-moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("arch, rslora", [("mixtral", False), ("qwen3-moe", False), ("mixtral", True)])
def test_adapters_keyed_by_the_checkpoints_names_equal_peft(arch: str, rslora: bool, bases: Bases, tmp_path: Path,
                                                             cli_runner: Any, read_tensors: Any) -> None:
    """An adapter trained with transformers 4 names each expert's w1/w3/w2 (and the router) as stored.

    PEFT 0.21 converts such an adapter onto the fused parameters when it loads it; d2merge merges
    each factor pair into its stored tensor, and its runtime adds it into the fused parameter's
    slice. Both must equal PEFT's merge and PEFT's forward.

    Except with rsLoRA, where PEFT's conversion is off (PEFT_MERGE_WRONG-like): it fuses w1 and
    w3 into one rank-2r factor with alpha 2*alpha, so its scale 2a/sqrt(2r) is sqrt(2) times the
    a/sqrt(r) the adapter was trained with, in its merge and in its forward alike. d2merge keeps
    the trained scale; the test asserts PEFT's gate_up_proj update is exactly sqrt(2) times
    d2merge's (so a PEFT fix shows up here) and that everything else equals PEFT.
    """
    from safetensors.torch import save_file

    from d2merge.runtime import load_unmerged

    from d2merge.io.transformers_folder import quiet_transformers

    base = bases(arch)
    config = json.loads((base / "config.json").read_text())
    block, gate, up, down = V4_NAMES[arch]
    experts = config.get("num_local_experts") or config["num_experts"]
    hidden, inter = config["hidden_size"], config.get("moe_intermediate_size") or config["intermediate_size"]
    g = torch.Generator().manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"base_model.model.model.layers.{layer}.{block}"
        shapes = {f"experts.{e}.{p}": shape for e in range(experts)
                  for p, shape in ((gate, (inter, hidden)), (up, (inter, hidden)), (down, (hidden, inter)))}
        shapes["gate"] = (experts, hidden)
        for module, (out_features, in_features) in shapes.items():
            tensors[f"{prefix}.{module}.lora_A.weight"] = 0.2 * torch.randn(2, in_features, generator=g)
            tensors[f"{prefix}.{module}.lora_B.weight"] = 0.2 * torch.randn(out_features, 2, generator=g)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    lora = peft.LoraConfig(r=2, lora_alpha=6, use_rslora=rslora, target_modules=[gate, up, down, "gate"]).to_dict()
    lora.update(peft_type="LORA", task_type=None, target_modules=sorted({gate, up, down, "gate"}))
    (adapter / "adapter_config.json").write_text(json.dumps(lora, default=str))

    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore")
        model = _model_class(arch).from_pretrained(base, dtype=torch.float32)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        peft_model = peft.PeftModel.from_pretrained(model, adapter).eval()
        unmerged = _outputs(peft_model, ids, False)
        theirs = peft_model.merge_and_unload().state_dict()
    out = tmp_path / "merged"
    result = cli_runner(["merge", base, adapter, "-o", out, "--dtype", "fp32", "--no-hash-sources"])
    assert result.code == 0, result.err
    with quiet_transformers():
        merged = _model_class(arch).from_pretrained(out, dtype=torch.float32).eval()
    ours = merged.state_dict()
    assert any("experts" in n and not torch.equal(theirs[n], base_state[n]) for n in theirs)
    if rslora:
        for n in [n for n in theirs if n.endswith("gate_up_proj")]:
            peft_update, our_update = theirs[n] - base_state[n], ours[n] - base_state[n]
            assert float((peft_update - 2 ** 0.5 * our_update).abs().max()) <= 1e-5 * _scale(peft_update)
            theirs[n] = ours[n]
    worst = max(float((ours[n] - t).abs().max()) / _scale(t) for n, t in theirs.items())
    assert worst <= 1e-6
    if rslora:  # PEFT's forward carries its rescale too: nothing more to compare it with
        print(f"\nmatrix {arch}-checkpoint-names-rslora: PEFT's conversion scales gate_up_proj by sqrt(2); "
              f"the rest {worst:.3g} of scale")
        return
    logits = float((_outputs(merged, ids, False) - unmerged).abs().max())
    assert logits <= 1e-4 * _scale(unmerged)
    with quiet_transformers():
        runtime = load_unmerged(base, adapter)
    runtime_gap = float((_outputs(runtime, ids, False) - unmerged).abs().max())
    assert runtime_gap <= 1e-5 * _scale(unmerged)
    print(f"\nmatrix {arch}-checkpoint-names: weights {worst:.3g} of scale, logits {logits:.3g}, runtime {runtime_gap:.3g}")
