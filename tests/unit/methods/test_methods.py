"""The methods' math, without disk: fp32 against fp64, runtime forward against the merged weight.

Every check runs on random factors with non-trivial magnitudes (B non-zero, DoRA magnitudes away
from the base norms), so a dropped term or a wrong orientation shows up as a large error, and the
tolerances are tight enough that a second rounding or a cast through a narrower dtype fails them.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from d2merge.errors import D2MergeError
from d2merge.io.adapter import load_adapter, write_adapter
from d2merge.methods import EMBEDDING, LINEAR, Method, ModuleSettings, get_method, parse_adapter_config
from d2merge.methods.dual_lora import dual_sign
from d2merge.methods.lora import LORA_BIAS
from d2merge.methods.adapter_layer import layer_shape
from d2merge.synthetic import adapter_config, random_factors

EPS32 = torch.finfo(torch.float32).eps
# fp32 merge vs fp64 merge of the same fp32 inputs: every element within this many fp32 eps of
# the tensor's largest magnitude (one rounding per operation, a handful of operations).
FP32_EPS_BUDGET = 8
RUNTIME_ATOL = 1e-5
OUT, IN = 24, 40
MODULE = "model.layers.0.self_attn.q_proj"

D2LORA_VARIANTS = [
    pytest.param(dict(tau=tau, norm_axis=axis, residual=residual),
                 id=f"tau{tau}-{axis}-{'res' if residual else 'nores'}")
    for tau in (0.5, 1.0) for axis in ("out", "in") for residual in (True, False)
]
# (method, config fields) for every formula variant the runtime checks cover.
VARIANTS = [
    pytest.param("lora", {}, id="lora"),
    pytest.param("lora", dict(use_rslora=True), id="lora-rslora"),
    pytest.param("dora", {}, id="dora"),
    pytest.param("dual_lora", {}, id="dual_lora"),
    *[pytest.param("d2lora", p.values[0], id=f"d2lora-{p.id}") for p in D2LORA_VARIANTS],
    pytest.param("d2lora", dict(tau=0.5, norm_axis="out", residual=True, eps=2.0), id="d2lora-eps"),
]


def make_settings(method: str, *, kind: str = LINEAR, fan_in_fan_out: bool = False, r: int = 4,
                  lora_alpha: float = 8.0, **fields: Any) -> tuple[Method, ModuleSettings]:
    config = parse_adapter_config(adapter_config(method, r=r, lora_alpha=lora_alpha, **fields))
    m = get_method(config.method)
    return m, m.module_settings(config, MODULE, kind, fan_in_fan_out)


def random_base(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Mixed magnitudes: a few large entries so rows/columns have quite different norms.
    w = 0.3 * torch.randn(shape, generator=g)
    w *= torch.exp(torch.randn(shape[0], 1, generator=g))
    return w


def factors_for(method: Method, settings: ModuleSettings, w0_oriented: torch.Tensor, seed: int,
                magnitude: float = 0.4) -> dict[str, torch.Tensor]:
    out_f, in_f = w0_oriented.shape
    return random_factors(method.name, settings, out_f, in_f, generator=torch.Generator().manual_seed(seed),
                          w0=w0_oriented, magnitude=magnitude)


def assert_fp32_close_to_fp64(got: torch.Tensor, ref: torch.Tensor, *, mask: torch.Tensor | None = None) -> None:
    assert got.dtype == torch.float32 and ref.dtype == torch.float64
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    error = (got.double() - ref).abs()
    if mask is not None:
        error = error[mask]
    bound = FP32_EPS_BUDGET * EPS32 * float(ref.abs().max())
    worst = float(error.max())
    assert worst <= bound, f"fp32 merge is {worst / (EPS32 * float(ref.abs().max())):.1f} fp32 eps off fp64"


def merge_both(method: Method, settings: ModuleSettings, w0: torch.Tensor, factors: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    got = method.merged_weight(w0, factors, settings)
    ref = method.merged_weight(w0.double(), {k: v.double() for k, v in factors.items()}, settings,
                               compute_dtype=torch.float64)
    return got, ref


# ---- fp32 against fp64 -----------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{}, dict(use_rslora=True), dict(lora_alpha=32.0, r=8)],
                         ids=["plain", "rslora", "alpha32-r8"])
@pytest.mark.parametrize("orientation", ["linear", "fan_in_fan_out", "embedding"])
def test_lora_fp32_matches_fp64(fields: dict[str, Any], orientation: str) -> None:
    kind = EMBEDDING if orientation == "embedding" else LINEAR
    method, settings = make_settings("lora", kind=kind, fan_in_fan_out=orientation == "fan_in_fan_out", **fields)
    w0 = random_base((OUT, IN), seed=1)  # on disk; (in, out) for the transposed layouts
    oriented = w0 if orientation == "linear" else w0.T
    factors = factors_for(method, settings, oriented, seed=2)
    got, ref = merge_both(method, settings, w0, factors)
    assert got.shape == w0.shape
    assert_fp32_close_to_fp64(got, ref)
    # And the formula itself, spelled out independently in fp64.
    names = method.tensor_names(kind)
    delta = settings.scale * (factors[names[1]].double() @ factors[names[0]].double())
    expected = w0.double() + (delta if orientation == "linear" else delta.T)
    assert torch.allclose(ref, expected, rtol=0, atol=1e-12)
    expected_scale = settings.alpha / (math.sqrt(settings.r) if fields.get("use_rslora") else settings.r)
    assert settings.scale == pytest.approx(expected_scale)


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "fan_in_fan_out"])
def test_dora_fp32_matches_fp64_with_perturbed_magnitudes(fan_in_fan_out: bool) -> None:
    method, settings = make_settings("dora", fan_in_fan_out=fan_in_fan_out)
    w0 = random_base((OUT, IN), seed=3)
    oriented = w0.T if fan_in_fan_out else w0
    factors = factors_for(method, settings, oriented, seed=4)
    base_norm = torch.linalg.vector_norm(oriented, dim=1)
    # Magnitudes must be away from their initial norms, or DoRA degenerates to a norm-preserving no-op.
    assert float((factors["lora_magnitude_vector"] / base_norm - 1).abs().max()) > 0.1
    got, ref = merge_both(method, settings, w0, factors)
    assert_fp32_close_to_fp64(got, ref)
    v = oriented.double() + settings.scale * factors["lora_B"].double() @ factors["lora_A"].double()
    expected = (factors["lora_magnitude_vector"].double() / torch.linalg.vector_norm(v, dim=1))[:, None] * v
    assert torch.allclose(ref, expected.T if fan_in_fan_out else expected, rtol=0, atol=1e-12)
    # The merged rows carry the stored magnitudes as their norms.
    merged_oriented = ref.T if fan_in_fan_out else ref
    assert torch.allclose(torch.linalg.vector_norm(merged_oriented, dim=1), factors["lora_magnitude_vector"].double())


def d2lora_reference(w0: torch.Tensor, f: dict[str, torch.Tensor], s: ModuleSettings) -> torch.Tensor:
    """The METHODS.md formula, written out independently in fp64."""
    w0, f = w0.double(), {k: v.double() for k, v in f.items()}
    o = s.options
    dw = s.scale * (f["lora_B_pos"] @ f["lora_A_pos"] - o["tau"] * f["lora_B_neg"] @ f["lora_A_neg"])
    v = w0 + dw
    dim = 1 if o["norm_axis"] == "out" else 0
    v_norm = torch.linalg.vector_norm(v, dim=dim, keepdim=True)
    ratio = torch.linalg.vector_norm(w0, dim=dim, keepdim=True) / torch.clamp(v_norm, min=o["eps"])
    w_star = ratio * v
    return w_star + dw if o["residual"] else w_star


@pytest.mark.parametrize("eps_mode", ["eps0", "eps-active"])
@pytest.mark.parametrize("fields", [p.values[0] for p in D2LORA_VARIANTS], ids=[p.id for p in D2LORA_VARIANTS])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "fan_in_fan_out"])
def test_d2lora_fp32_matches_fp64(fields: dict[str, Any], eps_mode: str, fan_in_fan_out: bool) -> None:
    method, settings = make_settings("d2lora", fan_in_fan_out=fan_in_fan_out, **fields)
    w0 = random_base((OUT, IN), seed=5)
    oriented = w0.T if fan_in_fan_out else w0
    factors = factors_for(method, settings, oriented, seed=6)
    if eps_mode == "eps-active":
        # eps at the median ||V||: half of the rows (or columns) are clamped, so eps really acts.
        dw = method.low_rank({k: v.double() for k, v in factors.items()}, settings)
        dim = 1 if fields["norm_axis"] == "out" else 0
        eps = float(torch.linalg.vector_norm(oriented.double() + dw, dim=dim).median())
        method, settings = make_settings("d2lora", fan_in_fan_out=fan_in_fan_out, eps=eps, **fields)
    got, ref = merge_both(method, settings, w0, factors)
    assert_fp32_close_to_fp64(got, ref)
    expected = d2lora_reference(oriented, factors, settings)
    assert torch.allclose(ref, expected.T if fan_in_fan_out else expected, rtol=0, atol=1e-12)


def dual_factors_with_exact_zeros(seed: int, magnitude: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Dual LoRA factors whose direction product has exact zeros, exact cancellations and near-zeros.

    Returns the factors and a mask of the entries where ``B_dir @ A_dir`` is exactly 0 (in every
    dtype and summation order).
    """
    g = torch.Generator().manual_seed(seed)
    r_mag, r_dir = 3, 4
    b_mag, a_mag = torch.randn(OUT, r_mag, generator=g), torch.randn(r_mag, IN, generator=g)
    b_dir, a_dir = torch.randn(OUT, r_dir, generator=g), torch.randn(r_dir, IN, generator=g)
    exact_zero = torch.zeros(OUT, IN, dtype=torch.bool)
    b_dir[0] = 0  # a whole row of zeros
    exact_zero[0] = True
    a_dir[:, 1] = 0  # a whole column of zeros
    exact_zero[:, 1] = True
    # Exact cancellation: rows 2..5 of B_dir are (1, 1, 0, 0) and column 3 of A_dir is (x, -x, 0, 0);
    # x*1 + (-x)*1 is exactly 0 in any precision.
    b_dir[2:6] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    a_dir[:, 3] = torch.tensor([0.7, -0.7, 0.0, 0.0])
    exact_zero[2:6, 3] = True
    # Near-zeros that rounding may push to either side: (1, 1, 1, 0) . (0.1, 0.2, -0.3, 0).
    b_dir[6:10] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    a_dir[:, 4] = torch.tensor([0.1, 0.2, -0.3, 0.0])
    # Make the magnitude large where the direction is exactly 0, so sign(0) matters.
    b_mag[0] = b_mag[2:6] = 1.0
    a_mag[:, 1] = a_mag[:, 3] = 1.0
    factors = {"lora_A_mag": magnitude * a_mag, "lora_B_mag": magnitude * b_mag, "lora_A_dir": a_dir,
               "lora_B_dir": b_dir}
    return factors, exact_zero


def test_dual_sign_is_minus_one_at_zero() -> None:
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert dual_sign(x).tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0]
    assert torch.sign(torch.tensor(0.0)) == 0  # the reason dual_sign exists


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "fan_in_fan_out"])
def test_dual_lora_fp32_matches_fp64_and_sign_decisions(fan_in_fan_out: bool) -> None:
    method, settings = make_settings("dual_lora", fan_in_fan_out=fan_in_fan_out, r_mag=3, r_dir=4, lora_alpha=6.0)
    assert settings.scale == pytest.approx(6.0 / math.sqrt(12))
    w0 = random_base((IN, OUT) if fan_in_fan_out else (OUT, IN), seed=7)  # as stored on disk
    oriented = w0.T if fan_in_fan_out else w0
    factors, exact_zero = dual_factors_with_exact_zeros(seed=8)
    got, ref = merge_both(method, settings, w0, factors)
    got_o, ref_o = (got.T, ref.T) if fan_in_fan_out else (got, ref)

    f64 = {k: v.double() for k, v in factors.items()}
    product64 = f64["lora_B_dir"] @ f64["lora_A_dir"]
    magnitude64 = torch.relu(f64["lora_B_mag"] @ f64["lora_A_mag"])
    # |error of an fp32 dot product of length r| <= r * eps32 * sum |b_i a_i| (inputs are exact in both).
    r_dir = factors["lora_A_dir"].shape[0]
    rounding = 2 * r_dir * EPS32 * (f64["lora_B_dir"].abs() @ f64["lora_A_dir"].abs())
    near_zero = product64.abs() <= rounding
    assert near_zero[6:10, 4].all(), "the constructed near-zero entries must be near zero"

    # Sign decisions, read back from the merged weights where the magnitude is not negligible.
    delta32 = got_o.double() - oriented.double()
    delta64 = ref_o - oriented.double()
    decided = magnitude64 * settings.scale > 1e-3
    flipped = decided & (torch.sign(delta32) != torch.sign(delta64))
    assert not (flipped & ~near_zero).any(), "fp32 and fp64 disagree on a sign far from zero"

    # sign(0) == -1: exact zeros of the direction product subtract the magnitude, in both precisions.
    expected_at_zero = oriented.double() - settings.scale * magnitude64
    assert torch.equal(ref_o[exact_zero], expected_at_zero[exact_zero])
    assert (delta64[exact_zero & decided] < 0).all() and (delta32[exact_zero & decided] < 0).all()
    assert (exact_zero & decided).sum() > 20

    # Everything else within the fp32 budget (entries whose sign legitimately flipped excluded).
    assert_fp32_close_to_fp64(got, ref, mask=~(flipped.T if fan_in_fan_out else flipped))
    expected = oriented.double() + settings.scale * magnitude64 * dual_sign(product64)
    assert torch.allclose(ref_o, expected, rtol=0, atol=1e-12)


# ---- runtime forward against the merged weight -----------------------------------------------


def make_layer(orientation: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if orientation == "linear":
        layer = nn.Linear(IN, OUT, bias=True)
    elif orientation == "fan_in_fan_out":
        layer = Conv1D(OUT, IN)  # GPT-2: weight stored (in, out)
    else:
        layer = nn.Embedding(50, OUT)
    with torch.no_grad():
        # Scaled as in real layers, so outputs are O(1) and an absolute tolerance means something.
        layer.weight.copy_(random_base(tuple(layer.weight.shape), seed) / math.sqrt(IN))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape))
    return layer.eval()


def runtime_setup(method_name: str, fields: dict[str, Any], orientation: str, seed: int = 11
                  ) -> tuple[nn.Module, Method, ModuleSettings, dict[str, torch.Tensor]]:
    kind = EMBEDDING if orientation == "embedding" else LINEAR
    method, settings = make_settings(method_name, kind=kind, fan_in_fan_out=orientation == "fan_in_fan_out", **fields)
    layer = make_layer(orientation, seed)
    out_f, in_f = layer_shape(layer, settings)
    weight = layer.weight.detach()
    oriented = weight.T if orientation != "linear" else weight
    assert oriented.shape == (out_f, in_f)
    factors = factors_for(method, settings, oriented, seed=seed + 1, magnitude=0.15)
    return layer, method, settings, factors


def merged_forward(layer: nn.Module, merged: torch.Tensor, x: torch.Tensor, orientation: str) -> torch.Tensor:
    """What the merged checkpoint computes: the same layer type with the merged weight."""
    if orientation == "linear":
        return F.linear(x, merged, layer.bias)
    if orientation == "fan_in_fan_out":
        return x @ merged + layer.bias  # Conv1D: x @ W + b with W stored (in, out)
    return F.embedding(x, merged)


def layer_input(orientation: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    if orientation == "embedding":
        return torch.randint(0, 50, (3, 9), generator=g)
    return torch.randn(3, 9, IN, generator=g)


@pytest.mark.parametrize("orientation", ["linear", "fan_in_fan_out"])
@pytest.mark.parametrize(("method_name", "fields"), VARIANTS)
def test_runtime_eval_forward_equals_merged_linear(method_name: str, fields: dict[str, Any], orientation: str) -> None:
    layer, method, settings, factors = runtime_setup(method_name, fields, orientation)
    merged = method.merged_weight(layer.weight.detach(), factors, settings)
    x = layer_input(orientation)
    module = method.runtime_module(layer, factors, settings).eval()
    with torch.no_grad():
        got = module(x)
        expected = merged_forward(layer, merged, x, orientation)
        base_out = layer(x)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= RUNTIME_ATOL
    assert float((got - base_out).abs().max()) > 100 * RUNTIME_ATOL, "the adapter must change the output"


@pytest.mark.parametrize("fields", [{}, dict(use_rslora=True)], ids=["plain", "rslora"])
def test_runtime_eval_forward_equals_merged_lora_embedding(fields: dict[str, Any]) -> None:
    layer, method, settings, factors = runtime_setup("lora", fields, "embedding")
    assert set(factors) == {"lora_embedding_A", "lora_embedding_B"}
    assert factors["lora_embedding_A"].shape == (settings.r, 50)
    merged = method.merged_weight(layer.weight.detach(), factors, settings)
    ids = layer_input("embedding")
    module = method.runtime_module(layer, factors, settings).eval()
    with torch.no_grad():
        got = module(ids)
        expected = F.embedding(ids, merged)
    assert float((got - expected).abs().max()) <= RUNTIME_ATOL
    assert float((got - layer(ids)).abs().max()) > 100 * RUNTIME_ATOL


def test_dual_lora_runtime_uses_minus_one_at_zero() -> None:
    layer = make_layer("linear", seed=21)
    method, settings = make_settings("dual_lora", r_mag=3, r_dir=4, lora_alpha=6.0)
    factors, exact_zero = dual_factors_with_exact_zeros(seed=22, magnitude=0.3)
    merged = method.merged_weight(layer.weight.detach(), factors, settings)
    module = method.runtime_module(layer, factors, settings).eval()
    x = layer_input("linear")
    with torch.no_grad():
        assert float((module(x) - F.linear(x, merged, layer.bias)).abs().max()) <= RUNTIME_ATOL
    assert exact_zero.any()


@pytest.mark.parametrize("orientation", ["linear", "fan_in_fan_out"])
@pytest.mark.parametrize(("method_name", "fields"), VARIANTS)
def test_train_mode_dropout_is_honoured_eval_is_not(method_name: str, fields: dict[str, Any], orientation: str) -> None:
    layer, method, settings, factors = runtime_setup(method_name, fields, orientation)
    merged = method.merged_weight(layer.weight.detach(), factors, settings)
    x = layer_input(orientation)
    module = method.runtime_module(layer, factors, settings, dropout=0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        module.train()
        train_a, train_b = module(x), module(x)
        module.eval()
        eval_a, eval_b = module(x), module(x)
        expected = merged_forward(layer, merged, x, orientation)
    assert float((train_a - eval_a).abs().max()) > 1e-3, "dropout=0.5 in train mode must change the output"
    assert not torch.equal(train_a, train_b), "two train-mode calls should draw different dropout masks"
    assert torch.equal(eval_a, eval_b)
    assert float((eval_a - expected).abs().max()) <= RUNTIME_ATOL


# ---- D2-LoRA edge cases ----------------------------------------------------------------------


@pytest.mark.parametrize("fields", [p.values[0] for p in D2LORA_VARIANTS] + [dict(eps=1e-6)],
                         ids=[p.id for p in D2LORA_VARIANTS] + ["eps1e-6"])
@pytest.mark.parametrize("orientation", ["linear", "fan_in_fan_out"])
def test_d2lora_with_zero_b_is_exactly_the_base(fields: dict[str, Any], orientation: str) -> None:
    method, settings = make_settings("d2lora", fan_in_fan_out=orientation == "fan_in_fan_out", **fields)
    w0 = random_base((OUT, IN), seed=31)
    oriented = w0.T if orientation == "fan_in_fan_out" else w0
    factors = factors_for(method, settings, oriented, seed=32)
    factors["lora_B_pos"] = torch.zeros_like(factors["lora_B_pos"])
    factors["lora_B_neg"] = torch.zeros_like(factors["lora_B_neg"])
    assert torch.equal(method.merged_weight(w0, factors, settings), w0)
    assert torch.equal(method.merged_weight(w0, factors, settings, compute_dtype=torch.float64), w0.double())


@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("norm_axis", ["out", "in"])
def test_d2lora_zero_norm_rows_give_zero_not_nan(norm_axis: str, residual: bool) -> None:
    method, settings = make_settings("d2lora", norm_axis=norm_axis, residual=residual, eps=0.0)
    layer = make_layer("linear", seed=41)
    factors = factors_for(method, settings, layer.weight.detach(), seed=42)
    with torch.no_grad():
        if norm_axis == "out":  # row 0 of W0 and of both B: V's row 0 is zero
            layer.weight[0] = 0
            factors["lora_B_pos"][0] = 0
            factors["lora_B_neg"][0] = 0
        else:  # column 0 of W0 and of both A: V's column 0 is zero
            layer.weight[:, 0] = 0
            factors["lora_A_pos"][:, 0] = 0
            factors["lora_A_neg"][:, 0] = 0
    for dtype in (torch.float32, torch.float64):
        merged = method.merged_weight(layer.weight.detach(), factors, settings, compute_dtype=dtype)
        assert torch.isfinite(merged).all()
        zero = merged[0] if norm_axis == "out" else merged[:, 0]
        assert torch.equal(zero, torch.zeros_like(zero))
    merged = method.merged_weight(layer.weight.detach(), factors, settings)
    module = method.runtime_module(layer, factors, settings).eval()
    x = layer_input("linear")
    with torch.no_grad():
        out = module(x)
    assert torch.isfinite(out).all()
    assert float((out - F.linear(x, merged, layer.bias)).abs().max()) <= RUNTIME_ATOL


# ---- the plan's one question per module ------------------------------------------------------


@pytest.mark.parametrize("method_name", ["lora", "dora", "d2lora", "dual_lora"])
@pytest.mark.parametrize("orientation", ["linear", "fan_in_fan_out", "embedding"])
def test_answer_reads_the_stored_base_shape_and_the_stored_rank(method_name: str, orientation: str) -> None:
    """``Method.answer`` on a base stored (out, in), or (in, out) for Conv1D and embeddings: the factor
    shapes in PEFT orientation, the rank the stored factors imply, and a rank off by one told apart."""
    kind = EMBEDDING if orientation == "embedding" else LINEAR
    fan_in_fan_out = orientation == "fan_in_fan_out"
    bias = {"lora_bias": True} if method_name == "lora" else {}
    config = parse_adapter_config(adapter_config(method_name, r=4, lora_alpha=8.0, **bias))
    method = get_method(config.method)
    if kind == EMBEDDING and not method.embedding_tensors:
        with pytest.raises(D2MergeError, match="does not support embedding layers"):
            method.tensor_names(kind)
        return
    stored_base = (OUT, IN) if orientation == "linear" else (IN, OUT)  # the formula's (out, in) is always (OUT, IN)
    settings = method.module_settings(config, MODULE, kind, fan_in_fan_out)
    stored = {n: tuple(t.shape) for n, t in factors_for(method, settings, torch.zeros(OUT, IN), seed=0).items()}
    answer = method.answer(config, MODULE, kind, fan_in_fan_out, stored_base, stored)
    assert answer.settings == settings
    assert answer.stored_rank == answer.configured_rank == method.configured_rank(settings)
    assert set(stored) == set(method.tensor_names(kind)) and set(stored) <= set(answer.shapes)
    assert all(answer.shapes[n] == shape for n, shape in stored.items())
    if method_name == "lora":  # independently: A is (r, in), B is (out, r), the optional lora_B.bias (out,)
        a, b = method.tensor_names(kind)
        assert answer.shapes == {a: (4, IN), b: (OUT, 4), LORA_BIAS: (OUT,)}
    first = method.tensor_names(kind)[0]  # an A factor: its first dimension is the rank
    wider = {**stored, first: (stored[first][0] + 1, *stored[first][1:])}
    assert method.answer(config, MODULE, kind, fan_in_fan_out, stored_base, wider).stored_rank != answer.configured_rank


# ---- config parsing --------------------------------------------------------------------------


BAD_CONFIGS = [
    pytest.param(adapter_config("lora", r=-1), "'r'", id="lora-negative-rank"),
    pytest.param(adapter_config("lora", r=0), "'r'", id="lora-zero-rank"),
    pytest.param(adapter_config("lora", r=2.5), "'r'", id="lora-fractional-rank"),
    pytest.param(adapter_config("dora", r=-4), "'r'", id="dora-negative-rank"),
    pytest.param(adapter_config("d2lora", r=-2), "'r'", id="d2lora-negative-rank"),
    pytest.param(adapter_config("dual_lora", r_mag=-1), "'r_mag'", id="dual-negative-r_mag"),
    pytest.param(adapter_config("dual_lora", r_dir=0), "'r_dir'", id="dual-zero-r_dir"),
    pytest.param(adapter_config("lora", rank_pattern={"q_proj": -3}), "'r'", id="negative-rank-pattern"),
    pytest.param(adapter_config("d2lora", tau=float("nan")), "'tau'", id="tau-nan"),
    pytest.param(adapter_config("d2lora", tau=float("inf")), "'tau'", id="tau-inf"),
    pytest.param(adapter_config("d2lora", tau=float("-inf")), "'tau'", id="tau-minus-inf"),
    pytest.param(adapter_config("d2lora", tau="0.5"), "'tau'", id="tau-string"),
    pytest.param(adapter_config("d2lora", norm_axis="rows"), "'norm_axis'", id="norm-axis-unknown"),
    pytest.param(adapter_config("d2lora", residual="yes"), "'residual'", id="residual-not-bool"),
    pytest.param(adapter_config("d2lora", eps=-1e-6), "'eps'", id="eps-negative"),
    pytest.param(adapter_config("lora", lora_alpha=float("nan")), "'lora_alpha'", id="alpha-nan"),
    pytest.param(adapter_config("lora", peft_type="IA3"), "IA3", id="peft-type-unknown"),
    pytest.param({**adapter_config("lora"), "peft_type": None}, "peft_type", id="peft-type-missing"),
    pytest.param(["not", "an", "object"], "JSON object", id="not-an-object"),
]


@pytest.mark.parametrize(("raw", "needle"), BAD_CONFIGS)
def test_bad_config_raises_d2merge_error(raw: Any, needle: str) -> None:
    with pytest.raises(D2MergeError) as info:
        parse_adapter_config(raw, "adapter_config.json")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["lora", "dora", "d2lora", "dual_lora"])
def test_good_configs_parse(method: str) -> None:
    config = parse_adapter_config(adapter_config(method, use_rslora=False))
    assert config.method == method
    if method == "d2lora":
        assert config.options == {"tau": 0.5, "norm_axis": "out", "residual": True, "eps": 0.0}


def test_non_finite_tau_in_a_real_file_is_refused(tmp_path: Any) -> None:
    folder = tmp_path / "adapter"
    key = f"base_model.model.{MODULE}.lora_A_pos.weight"
    write_adapter(folder, adapter_config("d2lora"), {key: torch.zeros(4, 8)})
    config_path = folder / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    raw["tau"] = float("nan")
    config_path.write_text(json.dumps(raw))  # Python writes the non-standard NaN literal
    assert "NaN" in config_path.read_text()
    with pytest.raises(D2MergeError, match="'tau'"):
        load_adapter(folder)
