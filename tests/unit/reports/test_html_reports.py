"""The HTML pages of verify, bench and merge-many: made from real runs, loaded in a real headless Chromium.

Each page must render with no console error, no exception and no network request, and show its
verdict; a failing verify's page says FAIL and names the check. The browser's detectors are
first shown to fire on pages built to trip them (tests/browser.py says what each one watches).
Browser tests skip, with the reason, only where Chromium is not installed (`make test` installs it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from browser import INSTALL_HINT, Browser, find_chromium
from d2merge.reports.html import BarChart, render_table_page
from d2merge.reports.verify_page import verify_page, write_verify_page
from d2merge.verify.report import VerifyReport
from d2merge.verify.results import (ABS_DIFF_EDGES, DtypeResult, FlippedAnswer, LayerCheck, Limits, LogitStats,
                                    MCResult, RoundingFloor)
from d2merge.options.verify import DEFAULT_THRESHOLDS, VerifyOptions

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        pytest.skip(INSTALL_HINT)
    opened = Browser(executable)
    try:
        yield opened
    finally:
        opened.close()


def assert_clean(load: Any) -> None:
    assert load.problems() == [], load.problems()
    colour, background = load.banner_style.split("|")
    assert colour != background, f"the verdict banner is unreadable: {load.banner_style}"


# ----- a synthetic report the size of a 7B verify ---------------------------------------------


def logit_stats(scale: float, probes: int = 16) -> LogitStats:
    counts = [0] * (len(ABS_DIFF_EDGES) + 1)
    counts[4], counts[5], counts[6] = 40_000_000, 20_000_000, 1_000
    return LogitStats(positions=probes * 32, max_abs_diff=3 * scale, mean_abs_diff=scale / 10, kl_mean=1e-6,
                      kl_max=1e-4, top1_agreement=0.99, argmax_flips=5,
                      probe_max_abs_diff=[scale * (1 + i / probes) for i in range(probes)],
                      probe_kl_mean=[1e-6 * (1 + i) for i in range(probes)],
                      probe_top1_agreement=[1.0 - (i % 3) / 32 for i in range(probes)], abs_diff_counts=counts)


def column(dtype: str, failures: Sequence[str] = (), layers: int = 32, ulp: float = 0.5) -> DtypeResult:
    def module(i: int, name: str) -> str:
        return f"model.layers.{i}.{'self_attn' if name in MODULES[:4] else 'mlp'}.{name}"

    checks = [LayerCheck(f"{module(i, m)}.weight", module(i, m), 1e-3, ulp * (0.9 + i / 320), ulp,
                         {"norm_ratio_min": 0.7, "norm_ratio_max": 1.1}) for i in range(layers) for m in MODULES]
    flipped = [FlippedAnswer(i, 0, 0 if i % 2 else 1, 1 if i % 2 else 0) for i in range(12)]
    mc = MCResult(200, 0.61, 0.605, -0.5, flipped, 6, 5, (-1.9, 0.9), 1.0, 10, 0.4)
    return DtypeResult(dtype=dtype, merged=None, thresholds=DEFAULT_THRESHOLDS[dtype], logits=logit_stats(0.02),
                       mc=mc, floor=RoundingFloor(logit_stats(0.015), 1e-5, 0.05, 10),
                       limits=Limits(0.25, "floor", DEFAULT_THRESHOLDS[dtype].max_ulp, 0.01, None, None),
                       top1_flips_p=0.4, layers=checks, copied_checked=67, copied_mismatched=[], missing_tensors=[],
                       failures=list(failures))


def seven_b_report(failures: dict[str, list[str]] | None = None) -> VerifyReport:
    failures = failures or {}
    return VerifyReport(base="/models/llama-7b", adapter="/adapters/<b>bold</b>", method="d2lora",
                        probes={"source": "sentences", "count": 16, "positions": 512},
                        mc_eval="eval.jsonl", options=VerifyOptions(),
                        results=[column(d, failures.get(d, [])) for d in ("fp32", "bf16", "fp16")],
                        provenance={"versions": {"d2merge": "0.1.0"},
                                    "sha256": {"adapter_model.safetensors": "ab" * 32}})


def test_a_7b_verify_page_stays_under_2_mb_and_escapes_user_text(tmp_path: Path) -> None:
    text = verify_page(seven_b_report())
    size = len(text.encode())
    assert size < 2_000_000, size
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text  # a path is text, never markup
    assert "<script" not in text.lower()
    assert "model.layers.31.mlp.down_proj.weight" in text  # every tensor is listed (in the full table)
    assert "default-src &#x27;none&#x27;" in text or "default-src 'none'" in text


def test_a_failing_verify_page_says_fail_and_names_the_check() -> None:
    failure = "logit check: max |logit diff| 0.9 > 0.25 = 5 x rounding floor 0.05 (--floor-multiple)"
    text = verify_page(seven_b_report({"bf16": [failure]}))
    banner = text.split('<div class="banner', 1)[1].split("</div>", 1)[0]
    assert "FAIL" in banner and "bf16 logit check" in banner and "--floor-multiple" in banner
    assert "PASS" not in banner


def test_render_table_page_writes_a_page_from_rows(tmp_path: Path) -> None:
    out = tmp_path / "table.html"
    chart = BarChart("tok/s", ["a", "b"], {"merged": [1.0, 2.0]})
    text = render_table_page("paper table", ["method", "gap (pp)"], [["lora", "+0.10"], ["d2lora", "-0.05"]],
                             path=out, notes=["measured on 2 cores"], chart=chart)
    assert out.read_text() == text and "d2lora" in text and "<svg" in text
    assert not list(tmp_path.glob(".*d2merge-tmp*"))  # written through a temp name, renamed into place


# ----- the browser ----------------------------------------------------------------------------


@pytest.mark.parametrize("body, expected", [
    ('<img src="http://127.0.0.1:9/pixel.png">', "network request: http://127.0.0.1:9/pixel.png"),
    ("<script>throw new Error('boom')</script>", "exception: Error: boom"),
    ("<script>console.error('bad')</script>", "console error: bad"),
])
def test_the_browser_detectors_fire(browser: Browser, tmp_path: Path, body: str, expected: str) -> None:
    page = tmp_path / "bad.html"
    page.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body><p>shown</p>{body}</body></html>")
    load = browser.load(page)
    assert any(p.startswith(expected) for p in load.problems()), load.problems()
    assert "shown" in load.text


def test_our_policy_blocks_a_fetch_and_the_browser_reports_it(browser: Browser, tmp_path: Path) -> None:
    """A page of ours that tried to load something: blocked by its CSP, and reported as a console error."""
    text = render_table_page("t", ["a"], [["1"]]).replace("</main>", '<img src="http://127.0.0.1:9/x.png"></main>')
    page = tmp_path / "leaky.html"
    page.write_text(text)
    load = browser.load(page)
    assert any("Content Security Policy" in e for e in load.console_errors), load.problems()


def test_a_7b_verify_page_renders_clean(browser: Browser, tmp_path: Path) -> None:
    page = tmp_path / "verify.html"
    write_verify_page(seven_b_report(), page)
    load = browser.load(page)
    assert_clean(load)
    assert "PASS" in load.text and "layer 31" in load.text


@pytest.fixture(scope="module")
def tiny(tiny_bases: Any, make_adapter: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Path]:
    from d2merge.tasks import eval_examples, write_jsonl

    root = tmp_path_factory.mktemp("html")
    base = tiny_bases("llama")
    return {"base": base, "a": make_adapter(base, "d2lora", seed=1, magnitude=0.05),
            "b": make_adapter(base, "lora", seed=2, magnitude=0.05),
            "eval": write_jsonl(root / "eval.jsonl", eval_examples(40))}


@pytest.mark.slow
def test_verify_html_from_a_real_run_renders_clean(browser: Browser, tiny: dict[str, Path], tmp_path: Path,
                                                   cli_runner: Callable[[list[str]], Any]) -> None:
    page, report = tmp_path / "verify.html", tmp_path / "verify.json"
    code, out, _ = cli_runner(["verify", tiny["base"], tiny["a"], "--dtypes", "fp32,bf16", "--mc-eval", tiny["eval"],
                               "--html", page, "--report", report])
    assert code == 0, out
    load = browser.load(page)
    assert_clean(load)
    assert load.text.startswith("PASS") and "bf16: worst weight error per layer and module" in load.text
    data = json.loads(report.read_text())
    assert data["provenance"]["sha256"] and data["results"][0]["logits"]["probe_kl_mean"]
    # The page carries the JSON report itself: the same content, readable in place.
    assert data["results"][1]["worst_layer"] in page.read_text()


def test_a_failing_verify_html_says_fail_and_names_the_check(browser: Browser, tiny: dict[str, Path], tmp_path: Path,
                                                            cli_runner: Callable[[list[str]], Any]) -> None:
    page = tmp_path / "verify.html"
    # A correct fp32 merge measures a few ulps of fp32 arithmetic: a limit of 0.01 ulp fails its weight check.
    code, out, err = cli_runner(["verify", tiny["base"], tiny["a"], "--max-ulp", "0.01", "--html", page])
    assert code == 1, out + err
    load = browser.load(page)
    assert_clean(load)
    assert load.text.startswith("FAIL") and "fp32 weight check" in load.text.split("\n")[0]


def test_html_location_is_checked_before_any_work(tiny: dict[str, Path], tmp_path: Path,
                                                  cli_runner: Callable[[list[str]], Any]) -> None:
    missing = tmp_path / "no-such-folder" / "page.html"
    for argv in (["verify", tiny["base"], tiny["a"], "--html", missing],
                 ["bench", tiny["base"], tiny["a"], "--html", missing],
                 ["merge-many", tiny["base"], tmp_path / "m.json", "-o", tmp_path / "out", "--html", missing]):
        (tmp_path / "m.json").write_text(json.dumps([str(tiny["a"])]))
        code, out, err = cli_runner(argv)
        assert code == 2 and "parent folder does not exist" in err and err.count("\n") == 1, (argv, err)
        assert not (tmp_path / "out").exists()


def test_bench_html_from_a_real_run_renders_clean(browser: Browser, tiny: dict[str, Path], tmp_path: Path,
                                                  cli_runner: Callable[[list[str]], Any]) -> None:
    page = tmp_path / "bench.html"
    code, out, _ = cli_runner(["bench", tiny["base"], tiny["a"], "--variants", "base,unmerged,merged",
                               "--batch-sizes", "1,2", "--seq-lens", "8", "--decode-tokens", "2", "--warmup", "0",
                               "--repeats", "2", "--html", page])
    assert code == 0, out
    load = browser.load(page)
    assert_clean(load)
    assert "the unmerged model's throughput" in load.text and "prefill: tokens/s" in page.read_text()


@pytest.mark.slow
def test_merge_many_html_links_each_jobs_verify_page(browser: Browser, tiny: dict[str, Path], tmp_path: Path,
                                                     cli_runner: Callable[[list[str]], Any]) -> None:
    manifest = tmp_path / "jobs.json"
    manifest.write_text(json.dumps({"jobs": [{"adapter": str(tiny["a"]), "name": "one", "verify": True},
                                             {"adapter": str(tiny["b"]), "name": "two", "verify": True}]}))
    page = tmp_path / "pages" / "run.html"
    page.parent.mkdir()
    code, out, _ = cli_runner(["merge-many", tiny["base"], manifest, "-o", tmp_path / "out", "--html", page])
    assert code == 0, out
    load = browser.load(page)
    assert_clean(load)
    assert load.text.startswith("PASS") and "2 merged of 2 jobs" in load.text
    text = page.read_text()
    for name in ("one", "two"):
        assert f'href="run-verify/{name}.html"' in text  # relative: the folder can be moved or uploaded whole
        job = browser.load(page.parent / "run-verify" / f"{name}.html")
        assert_clean(job)
        assert job.text.startswith("PASS")
        # The merged folder's card recorded the adapter's sha256; verify checked it against the adapter it ran.
        assert "adapter verified = adapter merged\tyes (same sha256)" in job.text


def test_a_merge_many_page_with_failures_names_the_jobs_and_why(tmp_path: Path) -> None:
    from d2merge.many.report import JobOutcome, ManyReport
    from d2merge.reports.many_page import many_page

    outcomes = [JobOutcome("good", "/a/good", "/out/good", "merged", 1.5, verify={"passed": True, "failures": []}),
                JobOutcome("drifted", "/a/drifted", "/out/drifted", "verify_failed", 2.0,
                           verify={"passed": False, "failures": ["bf16: weight check: error 3 ulp > 0.75"],
                                   "html": str(tmp_path / "run-verify" / "drifted.html")}),
                JobOutcome("broken", "/a/broken", "/out/broken", "failed",
                           error="job 'broken': no adapter_config.json")]
    text = many_page(ManyReport("/base", "/out", outcomes, 4.0), tmp_path / "run.html")
    banner = text.split('<div class="banner', 1)[1].split("</div>", 1)[0]
    assert "FAIL" in banner and "drifted" in banner and "broken" in banner and "no adapter_config.json" in banner
    assert "weight check: error 3 ulp" in banner
    assert 'href="run-verify/drifted.html"' in text


def test_a_huge_run_stays_small_and_says_what_it_left_out() -> None:
    """A MoE base checks tens of thousands of tensors, --prompts may hold thousands of lines."""
    report = seven_b_report()
    many_probes = logit_stats(0.02, probes=3000)
    # A Qwen3-MoE-like base: 48 layers, LoRA on the attention and on 64 experts' three projections each.
    experts = [LayerCheck(f"model.layers.{i}.mlp.experts.{e}.{m}.weight", f"model.layers.{i}.mlp.experts.{e}.{m}",
                          1e-3, 0.5, 0.5, {}) for i in range(48) for e in range(64) for m in MODULES[4:]]
    results = []
    for dtype in ("fp32", "bf16", "fp16"):
        dense = column(dtype, layers=48)
        results.append(dataclasses.replace(dense, logits=many_probes, layers=dense.layers + experts))
    text = verify_page(dataclasses.replace(report, results=results))
    assert len(text.encode()) < 2_000_000, len(text.encode())
    assert "the 500 largest errors of 9552 merged tensors" in text and "too large to carry in this page" in text
    assert "on the 64 of 3000 probes that moved most" in text


def test_a_column_that_was_not_run_still_renders_and_says_why() -> None:
    """Tensors missing from MERGED: no logits, no floor, no limits; the page names the weight check."""
    missing = dataclasses.replace(column("bf16", ["2 tensor(s) of the merge plan are missing from the merged folder "
                                                  "(first: model.layers.0.mlp.up_proj.weight)"]),
                                  logits=None, floor=None, limits=None, mc=None, top1_flips_p=None,
                                  missing_tensors=["model.layers.0.mlp.up_proj.weight", "lm_head.weight"])
    text = verify_page(dataclasses.replace(seven_b_report(), results=[missing], mc_eval=None))
    banner = text.split('<div class="banner', 1)[1].split("</div>", 1)[0]
    assert "FAIL" in banner and "bf16 weight check" in banner
    assert "the merged model was not run" in text and "missing: lm_head.weight" in text


def test_provenance_says_when_the_adapter_verified_is_not_the_one_merged(tmp_path: Path) -> None:
    from d2merge.verify.report import collect_provenance

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    merged = tmp_path / "merged"
    merged.mkdir()
    card = "# card\n\n## Sources (sha256)\n\n| file | sha256 |\n| --- | --- |\n| `adapter/adapter_config.json` | `{}` |\n"
    same = hashlib.sha256(b"{}").hexdigest()
    for recorded, expected in ((same, True), ("0" * 64, False)):
        (merged / "README.md").write_text(card.format(recorded))
        found = collect_provenance([tmp_path / "base.safetensors"], [adapter / "adapter_config.json"], merged)
        assert found["adapter_matches_merge"] is expected
        assert found["recorded_by_merge"] == {"adapter/adapter_config.json": recorded}
        assert found["sha256"][str(tmp_path / "base.safetensors")] == "not hashed (a local file)"
        page = verify_page(dataclasses.replace(seven_b_report(), provenance=found))
        assert ("yes (same sha256)" in page) is expected and ("NO: the adapter" in page) is not expected
