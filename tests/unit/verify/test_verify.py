"""d2merge verify: passes a correct merge, fails (exit 1) every kind of wrong one, errors (exit 2) on bad input.

A check that cannot fail is a defect, so each check is shown failing on a merged
folder that is wrong in the way that check exists to catch.
"""

from __future__ import annotations

import json
import math
import shutil
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from d2merge.api import merge
from d2merge.errors import D2MergeError
from d2merge.io.checkpoint import open_base
from d2merge.io.safetensors_file import save_tensors
from d2merge.tasks import MCExample, eval_examples, write_jsonl
from d2merge.verify import (SCHEMA_VERSION, LayerCheck, LogitStats, RoundingFloor, binomial_tail, flips_vs_rounding,
                            judge, mc_result, mcnemar_exact, paired_gap_interval, resolve_limits, thresholds_for, ulp,
                            verify)

TARGET = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_bases: Callable[..., Path],
         make_adapter: Callable[..., Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    base = tiny_bases("llama")
    # Factors of 0.05 move the logits clearly while keeping dW near the base weights' size.
    adapter = make_adapter(base, "d2lora", seed=1, magnitude=0.05)
    merged = merge(base, adapter, root / "merged", dtype="fp32", hash_sources=False).output
    eval_set = write_jsonl(root / "eval.jsonl", eval_examples(60))
    prompts = root / "prompts.txt"
    prompts.write_text("the cat is red\n\nwhich is more red or blue\none two three four five six\n")
    return {"root": root, "base": base, "adapter": adapter, "merged": merged, "eval": eval_set, "prompts": prompts}


def rewrite_tensor(folder: Path, name: str, change: Any) -> None:
    """Rewrite the folder's safetensors file with ``change(tensor)`` applied to one tensor (None drops it)."""
    checkpoint = open_base(folder)
    file = checkpoint.tensors.file_of(name)
    tensors = {}
    for key in checkpoint.tensors.keys():
        if checkpoint.tensors.file_of(key) != file:
            continue
        tensor = checkpoint.tensors.read(key).clone()
        if key == name:
            tensor = change(tensor)
            if tensor is None:
                continue
        tensors[key] = tensor
    save_tensors(file, tensors, {"format": "pt"})


def merge_with_config(work: dict[str, Path], tmp_path: Path, **fields: Any) -> Path:
    """A merge made from the right factors but a wrong adapter_config (what a mis-set tau or axis does)."""
    edited = tmp_path / "edited-adapter"
    shutil.copytree(work["adapter"], edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config.update(fields)
    (edited / "adapter_config.json").write_text(json.dumps(config))
    return merge(work["base"], edited, tmp_path / "wrong-merge", dtype="fp32", hash_sources=False).output


def test_correct_merge_passes(work: dict[str, Path], tmp_path: Path, cli_runner: Callable[[list[str]], Any]) -> None:
    report_path = tmp_path / "report.json"
    code, out, _ = cli_runner(["verify", str(work["base"]), str(work["adapter"]), str(work["merged"]),
                               "--mc-eval", str(work["eval"]), "--report", str(report_path)])
    assert code == 0, out
    assert "PASS" in out and "merge gap (pp)" in out
    report = json.loads(report_path.read_text())
    result = report["results"][0]
    assert report["passed"] and result["dtype"] == "fp32"
    assert result["logits"]["max_abs_diff"] < 1e-4
    assert result["mc"]["merge_gap_pp"] == 0.0 and result["mc"]["examples"] == 60
    assert len(result["layers"]) == 14 and result["copied_checked"] == 7
    assert set(result["method_summary"]) == {"norm_ratio_min", "norm_ratio_max"}


@pytest.mark.parametrize("where", ("merged", "copied"))
def test_corrupted_tensor_fails(work: dict[str, Path], writable_copy: Callable[..., Path],
                                cli_runner: Callable[[list[str]], Any], where: str) -> None:
    folder = writable_copy(work["merged"], "corrupt")
    name = TARGET if where == "merged" else "model.layers.0.input_layernorm.weight"

    def nudge(tensor: torch.Tensor) -> torch.Tensor:
        tensor.view(-1)[5] += 1e-3  # small: far below what the logits could show at the default limits
        return tensor

    rewrite_tensor(folder, name, nudge)
    code, out, err = cli_runner(["verify", str(work["base"]), str(work["adapter"]), str(folder)])
    assert code == 1
    assert "verification failed" in err
    if where == "merged":
        assert f"ulp in {TARGET}" in err
    else:
        assert "differ from the base (first: model.layers.0.input_layernorm.weight)" in err


def test_missing_tensor_fails_without_running_the_model(work: dict[str, Path], writable_copy: Callable[..., Path],
                                                        cli_runner: Callable[[list[str]], Any]) -> None:
    folder = writable_copy(work["merged"], "incomplete")
    rewrite_tensor(folder, TARGET, lambda tensor: None)
    code, _, err = cli_runner(["verify", str(work["base"]), str(work["adapter"]), str(folder)])
    assert code == 1
    assert f"missing from the merged folder (first: {TARGET})" in err


@pytest.mark.parametrize("fields", ({"tau": 1.0}, {"norm_axis": "in"}, {"residual": False}), ids=str)
def test_merge_with_wrong_settings_fails(work: dict[str, Path], tmp_path: Path,
                                         cli_runner: Callable[[list[str]], Any], fields: dict[str, Any]) -> None:
    wrong = merge_with_config(work, tmp_path, **fields)
    code, out, err = cli_runner(["verify", str(work["base"]), str(work["adapter"]), str(wrong),
                                 "--report", str(tmp_path / "r.json")])
    assert code == 1
    result = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert result["max_ulp_error"] > 1e4  # every adapted tensor is off, not a rounding
    assert result["logits"]["max_abs_diff"] > 1e-3  # and the model shows it
    assert "weight check" in err and "--max-ulp" in err and "logit check" in err and "--floor-multiple" in err


def test_dtypes_side_by_side(work: dict[str, Path]) -> None:
    report = verify(work["base"], work["adapter"], dtypes="fp32,bf16,fp16", mc_eval=work["eval"])
    assert [r.dtype for r in report.results] == ["fp32", "bf16", "fp16"]
    assert report.passed, report.failures()
    fp32, bf16, fp16 = report.results
    # Rounding shows where it must: bf16 rounds hardest, fp32 barely at all.
    assert fp32.logits.max_abs_diff < fp16.logits.max_abs_diff < bf16.logits.max_abs_diff
    assert bf16.max_ulp_error <= 1.0 and fp16.max_ulp_error <= 1.0
    header = report.table().splitlines()[5]
    assert header.split() == ["fp32", "bf16", "fp16"]
    from d2merge.verify import format_gap_table

    gap = format_gap_table(report)
    assert "merge gap (pp)" in gap and gap.splitlines()[0].split() == ["fp32", "bf16", "fp16"]


def test_dtypes_with_merged_folder_is_an_input_error(work: dict[str, Path],
                                                     cli_runner: Callable[[list[str]], Any]) -> None:
    code, _, err = cli_runner(["verify", str(work["base"]), str(work["adapter"]), str(work["merged"]),
                               "--dtypes", "bf16"])
    assert code == 2 and "cannot be combined" in err


@pytest.mark.parametrize("args, message", [
    (["--mc-eval", "missing.jsonl"], "eval file not found"),
    (["--dtypes", "fp8"], "unknown dtype 'fp8'"),
])
def test_bad_input_exits_2(work: dict[str, Path], cli_runner: Callable[[list[str]], Any], args: list[str],
                           message: str) -> None:
    code, _, err = cli_runner(["verify", str(work["base"]), str(work["adapter"]), *args])
    assert code == 2 and message in err


def test_prompts_are_probes(work: dict[str, Path]) -> None:
    report = verify(work["base"], work["adapter"], work["merged"], prompts=work["prompts"])
    assert report.probes["source"] == "prompts" and report.probes["count"] == 3
    assert report.results[0].logits.positions == 4 + 6 + 6  # real tokens only, never padding
    assert report.passed


def test_only_one_model_is_alive_at_a_time(work: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Models verify must run whole (an unsplittable architecture) load one at a time.

    The block-streamed path holds one block at a time (tests/unit/verify/test_streamed.py).
    """
    import d2merge.verify as verify_module
    from d2merge.verify import streamed

    monkeypatch.setattr(streamed, "streamable", lambda checkpoint: "whole models for this test")

    loaded: list[weakref.ref] = []
    real = verify_module.load_fp32_model

    def tracking(location: Any, **kwargs: Any) -> torch.nn.Module:
        assert all(ref() is None for ref in loaded), "a model was still alive when the next one loaded"
        model = real(location, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(verify_module, "load_fp32_model", tracking)
    verify(work["base"], work["adapter"], dtypes="fp32,bf16")
    assert len(loaded) == 5  # unmerged, then per dtype: the rounding floor and the merged model


# ----- the pieces, with numbers chosen to sit on each side of each threshold ----------------


def stats(max_abs: float = 0.0, flips: int = 0) -> LogitStats:
    return LogitStats(positions=100, max_abs_diff=max_abs, mean_abs_diff=max_abs / 10, kl_mean=0.0, kl_max=0.0,
                      top1_agreement=(100 - flips) / 100, argmax_flips=flips, ppl_unmerged=10.0, ppl_merged=10.0,
                      ppl_ratio=1.0)


def layer(ulps: float) -> LayerCheck:
    return LayerCheck("w", "m", 0.0, ulps, ulps, {})


FLOOR = RoundingFloor(stats(max_abs=1e-4, flips=1), arithmetic=1e-5, max_abs_diff=1e-4, mc_flips=1)


def answers(unmerged_right: list[bool], merged_right: list[bool], rounded_right: list[bool] | None = None) -> Any:
    """An MCResult from which examples each model gets right (two choices, answer 0)."""
    examples = [MCExample(f"p{i}", ("a", "b"), 0) for i in range(len(unmerged_right))]

    def scores(right: list[bool]) -> list[list[float]]:
        return [[1.0, 0.0] if r else [0.0, 1.0] for r in right]

    return mc_result(examples, scores(unmerged_right), scores(merged_right),
                     None if rounded_right is None else scores(rounded_right))


@pytest.mark.parametrize("kwargs, overrides, flag", [
    ({"logits": stats(max_abs=2e-3)}, {}, "--floor-multiple"),  # 20 x the floor
    ({"logits": stats(max_abs=2e-3)}, {"max_abs_diff": 1e-3}, "--max-abs-diff"),
    ({"logits": stats(flips=10)}, {}, "top-1 check"),  # 10 flips against 1 from rounding: p = 12/2048
    ({"logits": stats(flips=3)}, {"min_top1": 0.98}, "--min-top1"),
    ({"logits": replace(stats(max_abs=5e-4, flips=2), kl_mean=0.5)}, {"max_kl": 0.1}, "--max-kl"),
    ({"logits": replace(stats(max_abs=5e-4, flips=2), ppl_ratio=1.5)}, {"max_ppl_ratio": 1.2}, "--max-ppl-ratio"),
    ({"logits": replace(stats(max_abs=5e-4, flips=2), ppl_ratio=None)}, {"max_ppl_ratio": 1.2}, "no real text"),
    ({"layers": [layer(300.0)]}, {}, "--max-ulp"),
    ({"mc": answers([True] * 40, [False] * 8 + [True] * 32, [True] * 32 + [False] * 8)}, {}, "McNemar"),
    ({"mc": answers([True] * 20 + [False] * 20, [False] * 20 + [True] * 20, [True] * 20 + [False] * 20)}, {},
     "from rounding alone"),  # 40 flips, no net gap: only the flip count shows it
    ({"mc": answers([True, True], [True, False])}, {"max_gap_pp": 10.0}, "--max-gap-pp"),
    ({"copied_mismatched": ["x"]}, {}, "differ from the base"),
    ({"missing": ["x"]}, {}, "missing"),
])
def test_each_threshold_fails_on_its_own(kwargs: dict[str, Any], overrides: dict[str, float], flag: str) -> None:
    limits = resolve_limits(thresholds_for("fp32", overrides), FLOOR)
    args: dict[str, Any] = {"logits": stats(max_abs=5e-4, flips=2), "mc": answers([True] * 10, [True] * 10),
                            "layers": [layer(1.0)], "copied_mismatched": [], "missing": []}
    assert judge(limits, **args, floor=FLOOR) == []
    failures = judge(limits, **{**args, **kwargs}, floor=FLOOR)
    assert len(failures) == 1 and flag in failures[0], failures


def test_perplexity_ratio_on_the_texts_own_next_tokens() -> None:
    """ppl = exp(mean NLL of each real position's next real token); padding predicts nothing."""
    from d2merge.verify import Probes, compare_logits

    reference = torch.log_softmax(torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0)), -1)
    merged = reference.clone()
    merged[..., 0] += 1.0  # the merged model prefers token 0 everywhere

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            width = input_ids.shape[1]  # batches come shortest first: find each row by its ids
            rows = [next(i for i in range(len(ids)) if torch.equal(ids[i, :width], x)) for x in input_ids]
            return type("Out", (), {"logits": merged[rows, :width]})()

    ids = torch.tensor([[1, 0, 2, 3], [4, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    probes = Probes(ids, mask, {"source": "sentences", "positions": 6})
    stats_ = compare_logits(Fixed(), probes, reference, batch_size=2)
    targets = [(0, 0, 0), (0, 1, 2), (0, 2, 3), (1, 0, 1)]  # (row, position, next token): 4 predictions
    for logits, ppl in ((reference, stats_.ppl_unmerged), (merged, stats_.ppl_merged)):
        nll = -sum(float(torch.log_softmax(logits[r, p], -1)[t]) for r, p, t in targets) / 4
        assert ppl == pytest.approx(math.exp(nll), rel=1e-6)
    assert stats_.ppl_ratio == pytest.approx(stats_.ppl_merged / stats_.ppl_unmerged, rel=1e-9)
    random = compare_logits(Fixed(), Probes(ids, mask, {"source": "random", "positions": 6}), reference, 2)
    assert random.ppl_ratio is None and random.kl_mean == pytest.approx(stats_.kl_mean)


def test_statistics_match_known_values() -> None:
    assert binomial_tail(0, 5) == 1.0 and binomial_tail(6, 5) == 0.0
    assert binomial_tail(5, 5) == pytest.approx(1 / 32) and binomial_tail(3, 4) == pytest.approx(5 / 16)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 0) == pytest.approx(0.25)
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)  # P(X >= 10 | n=12) = (66 + 12 + 1) / 4096
    assert flips_vs_rounding(3, 3) == pytest.approx(binomial_tail(3, 6)) and flips_vs_rounding(0, 4) == 1.0
    low, high = paired_gap_interval(0, 0, 200)  # nothing flipped: a narrow interval around 0, not [0, 0]
    assert low < 0 < high and high - low < 2.0
    low, high = paired_gap_interval(3, 0, 200)  # the bf16 DoRA case: -1.5 pp
    assert low < -1.5 < high and high < 0.5
    assert paired_gap_interval(40, 0, 40)[1] < -80


def test_mc_result_reports_the_gap_and_flips() -> None:
    examples = [MCExample("p", ("a", "b", "c"), 0), MCExample("q", ("a", "b", "c"), 2),
                MCExample("r", ("a", "b", "c"), 1), MCExample("s", ("a", "b", "c"), 1)]
    unmerged = [[3, 1, 0], [0, 1, 3], [0, 3, 1], [3, 0, 1]]
    merged = [[3, 1, 0], [0, 3, 1], [0, 3, 1], [0, 3, 1]]  # #1 right -> wrong, #3 wrong -> right
    result = mc_result(examples, unmerged, merged)
    assert result.accuracy_unmerged == result.accuracy_merged == 0.75
    assert result.merge_gap_pp == 0.0
    assert [(f.index, f.unmerged, f.merged) for f in result.flipped] == [(1, 2, 1), (3, 0, 1)]
    worse = mc_result(examples, unmerged, [[0, 1, 3], *merged[1:3], unmerged[3]])
    assert worse.merge_gap_pp == pytest.approx(-50.0)


def test_thresholds_overrides() -> None:
    assert thresholds_for("bf16", {"max_gap_pp": 0.25, "min_top1": None}) == replace(
        thresholds_for("bf16"), max_gap_pp=0.25)
    assert thresholds_for("bf16").max_abs_diff is None  # the logit limit comes from the floor by default
    with pytest.raises(D2MergeError, match="unknown threshold"):
        thresholds_for("fp32", {"max_kl_divergence": 1.0})
    floor = replace(FLOOR, max_abs_diff=0.2)
    assert resolve_limits(thresholds_for("bf16"), floor).max_abs_diff == pytest.approx(
        thresholds_for("bf16").floor_multiple * 0.2)
    fixed = resolve_limits(thresholds_for("bf16", {"max_abs_diff": 0.5}), floor)
    assert (fixed.max_abs_diff, fixed.max_abs_diff_from) == (0.5, "fixed")


def test_ulp_matches_the_formats() -> None:
    values = torch.tensor([1.0, 3.0, -0.75, 0.0], dtype=torch.float64)
    assert ulp(values, torch.float32).tolist() == [2.0**-23, 2.0**-22, 2.0**-24, 2.0**-149]
    assert ulp(values, torch.bfloat16).tolist() == [2.0**-7, 2.0**-6, 2.0**-8, 2.0**-133]
    assert ulp(values, torch.float16).tolist() == [2.0**-10, 2.0**-9, 2.0**-11, 2.0**-24]
    # Against the formats themselves: the next representable value is one ulp away.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.tensor([1.5, 1000.0, 1e-3], dtype=dtype)
        step = torch.nextafter(x, torch.full_like(x, float("inf"))).double() - x.double()
        assert torch.equal(ulp(x.double(), dtype), step)


# ----- the report schema (docs/verify-report.md) ----------------------------------------------

NUMBER = (int, float)
TOP_LEVEL = {"schema_version": int, "d2merge_version": str, "passed": bool, "base": str, "adapter": str,
             "method": str, "probes": dict, "mc_eval": (str, type(None)), "options": dict, "results": list,
             "provenance": dict}
RESULT = {"dtype": str, "merged": (str, type(None)), "passed": bool, "failures": list, "thresholds": dict,
          "logits": (dict, type(None)), "mc": (dict, type(None)), "layers": list, "copied_checked": int,
          "copied_mismatched": list, "missing_tensors": list, "max_abs_error": NUMBER, "max_ulp_error": NUMBER,
          "worst_layer": (str, type(None)), "method_summary": dict, "floor": dict, "limits": dict,
          "top1_flips_p": NUMBER, "not_checked": list}
LOGITS = {"positions": int, "max_abs_diff": NUMBER, "mean_abs_diff": NUMBER, "kl_mean": NUMBER, "kl_max": NUMBER,
          "top1_agreement": NUMBER, "argmax_flips": int, "probe_max_abs_diff": list, "probe_kl_mean": list,
          "probe_top1_agreement": list, "abs_diff_counts": list,
          "ppl_ratio": (NUMBER, type(None)),
          "ppl_unmerged": (NUMBER, type(None)), "ppl_merged": (NUMBER, type(None))}
MC = {"examples": int, "accuracy_unmerged": NUMBER, "accuracy_merged": NUMBER, "merge_gap_pp": NUMBER,
      "flipped": list, "right_to_wrong": int, "wrong_to_right": int, "gap_ci_pp": list, "mcnemar_p": NUMBER,
      "rounding_flips": int, "flips_vs_rounding_p": NUMBER}
FLOOR_KEYS = {"logits": dict, "arithmetic": NUMBER, "max_abs_diff": NUMBER, "mc_flips": int}
LIMITS = {"max_abs_diff": NUMBER, "max_abs_diff_from": str, "max_ulp": NUMBER, "alpha": NUMBER,
          "min_top1": (NUMBER, type(None)), "max_gap_pp": (NUMBER, type(None)), "max_kl": (NUMBER, type(None)),
          "max_ppl_ratio": (NUMBER, type(None))}
LAYER = {"tensor": str, "module": str, "max_abs_error": NUMBER, "max_ulp_error": NUMBER,
         "max_ulp_error_at_value": NUMBER, "method": dict}
THRESHOLDS = {"floor_multiple": NUMBER, "alpha": NUMBER, "max_ulp": NUMBER, "max_abs_diff": (NUMBER, type(None)),
              "max_gap_pp": (NUMBER, type(None)), "min_top1": (NUMBER, type(None)), "max_kl": (NUMBER, type(None)),
              "max_ppl_ratio": (NUMBER, type(None))}
PROBES = {"source": str, "count": int, "length": int, "positions": int, "seed": (int, type(None)),
          "file": (str, type(None))}


def check_keys(obj: dict, schema: dict, where: str) -> None:
    assert set(schema) <= set(obj), f"{where}: missing {set(schema) - set(obj)}"
    for key, kind in schema.items():
        assert isinstance(obj[key], kind), f"{where}.{key}: {type(obj[key]).__name__}"


def test_report_schema(work: dict[str, Path], writable_copy: Callable[..., Path], tmp_path: Path) -> None:
    broken = writable_copy(work["merged"], "broken")
    rewrite_tensor(broken, TARGET, lambda t: t * 1.01)
    report = verify(work["base"], work["adapter"], broken, mc_eval=work["eval"])
    path = report.save(tmp_path / "report.json")
    data = json.loads(path.read_text())  # strict JSON: no NaN or Infinity
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["schema_version"] == SCHEMA_VERSION == 1
    check_keys(data, TOP_LEVEL, "report")
    check_keys(data["probes"], PROBES, "probes")
    assert data["passed"] is False
    for result in data["results"]:
        check_keys(result, RESULT, "result")
        check_keys(result["thresholds"], THRESHOLDS, "thresholds")
        check_keys(result["logits"], LOGITS, "logits")
        check_keys(result["mc"], MC, "mc")
        check_keys(result["floor"], FLOOR_KEYS, "floor")
        check_keys(result["floor"]["logits"], LOGITS, "floor.logits")
        check_keys(result["limits"], LIMITS, "limits")
        for item in result["layers"]:
            check_keys(item, LAYER, "layer")
            assert all(isinstance(v, NUMBER) for v in item["method"].values())
        for flip in result["mc"]["flipped"]:
            check_keys(flip, {"index": int, "answer": int, "unmerged": int, "merged": int}, "flipped")
        assert all(isinstance(f, str) for f in result["failures"]) and result["failures"]
        assert result["worst_layer"] == TARGET


# ----- faults on the tiny models (tests/faults.py; the same faults on SmolLM2: test_verify_real.py) --------

import faults  # noqa: E402

FAULT_CHECKS = {"tau sign": "weight check", "scaled 1.01": "weight check", "swapped layers": "weight check",
                "another adapter": "weight check", "drift": "weight check"}


@pytest.fixture(scope="session")
def tiny_merges(work: dict[str, Path], make_adapter: Callable[..., Path]) -> dict[str, Path]:
    root = work["root"] / "tiny-merges"
    root.mkdir(exist_ok=True)
    other = make_adapter(work["base"], "d2lora", seed=7, magnitude=0.05)
    made = {"other-adapter": other}
    for dtype in ("fp32", "bf16", "fp16"):
        made[dtype] = merge(work["base"], work["adapter"], root / dtype, dtype=dtype, hash_sources=False).output
        made[f"other-{dtype}"] = merge(work["base"], other, root / f"other-{dtype}", dtype=dtype,
                                       hash_sources=False).output
    return made


def make_fault(fault: str, dtype: str, work: dict[str, Path], merges: dict[str, Path], target: Path) -> Path:
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", TARGET
    if fault == "tau sign":
        return faults.wrong_tau_sign(work["base"], work["adapter"], target, dtype)
    if fault == "scaled 1.01":
        return faults.scale_tensor(merges[dtype], target, q1)
    if fault == "swapped layers":
        return faults.swap_tensors(merges[dtype], target, q0, q1)
    if fault == "another adapter":
        return merges[f"other-{dtype}"]
    assert fault == "drift"
    return faults.drift_merge(work["base"], work["adapter"], merges[dtype], merges["fp32"], target)


@pytest.mark.parametrize("dtype", ("fp32", "bf16", "fp16"))
@pytest.mark.parametrize("fault", sorted(FAULT_CHECKS))
def test_fault_fails_with_the_defaults(work: dict[str, Path], tiny_merges: dict[str, Path], tmp_path: Path,
                                       cli_runner: Callable[[list[str]], Any], fault: str, dtype: str) -> None:
    if fault == "drift" and dtype == "fp32":
        pytest.skip("the drift is a 16-bit fault: in fp32 both roundings are fp32's")
    wrong = make_fault(fault, dtype, work, tiny_merges, tmp_path / "wrong")
    code, out, err = cli_runner(["verify", work["base"], work["adapter"], wrong, "--mc-eval", work["eval"]])
    assert code == 1, out
    assert FAULT_CHECKS[fault] in err and "verification failed" in err


@pytest.mark.slow
@pytest.mark.parametrize("arch", ("llama", "gpt2"))
@pytest.mark.parametrize("method", ("lora", "dora", "d2lora", "dual_lora"))
def test_every_correct_merge_passes_with_the_defaults(tiny_bases: Callable[..., Path],
                                                      make_adapter: Callable[..., Path], tmp_path: Path,
                                                      arch: str, method: str, work: dict[str, Path]) -> None:
    """Merged folders on Llama, --dtypes on GPT-2 (Conv1D, tied embeddings): both paths, half the time."""
    base = tiny_bases(arch)
    adapter = make_adapter(base, method, seed=3, magnitude=0.05)
    if arch == "llama":
        for dtype in ("fp32", "bf16", "fp16"):
            merged = merge(base, adapter, tmp_path / dtype, dtype=dtype, hash_sources=False).output
            report = verify(base, adapter, merged, mc_eval=work["eval"])
            assert report.passed, report.failures()
        return
    report = verify(base, adapter, dtypes="fp32,bf16,fp16", mc_eval=work["eval"])
    assert report.passed, report.failures()
    assert all(r.floor is not None and r.floor.max_abs_diff > 0 for r in report.results)


# ----- what is refused before any work starts --------------------------------------------------


def test_report_into_a_missing_folder_is_refused_first(work: dict[str, Path], tmp_path: Path,
                                                       cli_runner: Callable[[list[str]], Any]) -> None:
    code, out, err = cli_runner(["verify", work["base"], work["adapter"], work["merged"],
                                 "--report", tmp_path / "no-such-folder" / "report.json"])
    assert code == 2 and "parent folder does not exist" in err
    assert "running the unmerged model" not in err and len(err.strip().splitlines()) == 1


def test_probes_longer_than_gpt2_positions_are_one_line(tiny_bases: Callable[..., Path],
                                                        make_adapter: Callable[..., Path], tmp_path: Path,
                                                        cli_runner: Callable[[list[str]], Any]) -> None:
    base = tiny_bases("gpt2")
    adapter = make_adapter(base, "lora", seed=1)
    positions = json.loads((base / "config.json").read_text())["n_positions"]
    code, _, err = cli_runner(["verify", base, adapter, "--probe-source", "random",
                               "--probe-length", str(positions + 1)])
    assert code == 2 and f"at most {positions} positions (n_positions" in err and "--probe-length" in err
    assert len(err.strip().splitlines()) == 1
    long_eval = write_jsonl(tmp_path / "long.jsonl", [MCExample("the cat", ("a", "b"), 0),
                                                      MCExample(" ".join(["red"] * (positions + 5)), ("a", "b"), 1)])
    code, _, err = cli_runner(["verify", base, adapter, "--mc-eval", long_eval])
    assert code == 2 and "eval example 1 is" in err and "red" not in err
    assert len(err.strip().splitlines()) == 1


def test_sentence_probes_are_real_text_and_never_printed(work: dict[str, Path],
                                                         cli_runner: Callable[[list[str]], Any]) -> None:
    from d2merge.verify import PROBE_SENTENCES

    code, out, err = cli_runner(["verify", work["base"], work["adapter"], work["merged"], "--prompts",
                                 work["prompts"]])
    assert code == 0 and "the cat is red" not in out + err
    report = verify(work["base"], work["adapter"], work["merged"])
    assert report.probes["source"] == "sentences" and report.probes["count"] == len(PROBE_SENTENCES)
    assert verify(work["base"], work["adapter"], work["merged"], probe_source="random").probes["source"] == "random"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mc_scores_run_each_prompt_once_and_match_full_sequences(work: dict[str, Path], reduction: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import d2merge.tasks as tasks
    from d2merge.runtime import attach_adapter, load_fp32_model

    tokenizer = tasks.load_tokenizer(work["base"])
    examples = [*eval_examples(9), MCExample("Dogs", ("bark", "meow loudly at night"), 0)]  # mixed prompt lengths
    model = attach_adapter(load_fp32_model(work["base"]), work["adapter"]).eval()
    assert tasks._shares_prompts(model)
    shared = tasks.choice_scores(model, tokenizer, examples, reduction=reduction, batch_size=3)
    monkeypatch.setattr(tasks, "_shares_prompts", lambda model: False)
    full = tasks.choice_scores(model, tokenizer, examples, reduction=reduction, batch_size=3)
    assert [len(s) for s in shared] == [len(e.choices) for e in examples]
    assert torch.allclose(torch.tensor([x for s in shared for x in s]), torch.tensor([x for s in full for x in s]),
                          atol=1e-4, rtol=0)


def test_probe_batches_run_by_length_without_unneeded_padding() -> None:
    from types import SimpleNamespace

    from d2merge.verify import Probes, compare_logits, probe_logits

    class Counting(torch.nn.Module):
        """Logits that depend on each token and its position only; records every batch's shape."""

        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, int]] = []

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            self.shapes.append(tuple(input_ids.shape))
            positions = torch.arange(input_ids.shape[1], dtype=torch.float32)
            return SimpleNamespace(logits=torch.stack([input_ids.float() + positions, positions - input_ids], -1))

    lengths = [5, 1, 4, 2]  # right-padded to 5; batches of 2 by length: (1, 2) then (4, 5)
    ids = torch.arange(1, 21).view(4, 5)
    mask = (torch.arange(5) < torch.tensor(lengths)[:, None]).long()
    probes = Probes(ids, mask, {"positions": int(mask.sum())})
    model = Counting()
    logits = probe_logits(model, probes, batch_size=2)
    assert model.shapes == [(2, 2), (2, 5)] and logits.shape == (4, 5, 2)
    expected = model(ids, mask).logits
    real = mask.bool()
    assert torch.equal(logits[real], expected[real])
    stats = compare_logits(model, probes, logits, batch_size=2)
    assert stats.max_abs_diff == 0.0 and stats.top1_agreement == 1.0 and stats.positions == sum(lengths)


def test_one_logit_comparator_for_verify_and_the_exporters_checks() -> None:
    """verify's columns and the ONNX / genai checks share d2merge.logit_comparison: its figures are the plain
    formulas, in the dtype given, and a NaN makes the largest difference NaN (a bound check then fails)."""
    from d2merge.logit_comparison import LogitComparison

    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64)
    actual = reference + 0.01 * torch.randn(2, 5, 11, generator=generator, dtype=torch.float64)
    actual[1, 2] = reference[1, 2].flip(-1)  # one position whose top-1 certainly moves
    comparison = LogitComparison()
    rows = [comparison.add(reference[i], actual[i]) for i in range(2)]
    assert comparison.max_abs == float((reference - actual).abs().max())
    assert rows[0][0] == float((reference[0] - actual[0]).abs().max())
    assert comparison.reference_max_abs == float(reference.abs().max())
    agree = int((reference.argmax(-1) == actual.argmax(-1)).sum())
    assert comparison.agree == agree < 10 and comparison.top1_agreement == agree / 10
    kl = torch.nn.functional.kl_div(actual.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert comparison.kl_sum == pytest.approx(float(kl.sum()), rel=1e-12)
    broken = actual[0].clone()
    broken[3, 4] = math.nan
    comparison.add(reference[0], broken)
    comparison.add(reference[1], actual[1])  # a later clean sequence does not hide it
    assert math.isnan(comparison.max_abs) and not comparison.max_abs <= 1e9
