"""Prove a merge faithful: the merged model against the unmerged one (base + adapter at runtime).

Three checks per output dtype, each able to fail on its own:

- **logits** on probe inputs (seeded random tokens, built-in sentences or the user's prompts):
  max/mean |logit difference|, KL(unmerged || merged), top-1 agreement (``compare``);
- **merge gap** on a multiple-choice eval set: accuracy merged minus unmerged, in
  percentage points (the metric the D2-LoRA paper reports), and the flipped answers (``compare``);
- **weights**, tensor by tensor: each merged tensor on disk against an fp64
  recomputation from base + adapter (max abs and ulp error), copied tensors
  bit for bit, plus the method's own figures (``Method.report``) (``weights``).

Each is judged against what one rounding to the output dtype costs with no merge at all
(``limits``). Both models run in fp32 (the merged weights are upcast exactly from their
stored dtype), so a column measures what storing the merge in that dtype costs, not the
noise of low-precision arithmetic. :func:`verify` wires the pieces: probes (``probes``), the
unmerged run once, then one column per MERGED through one code path (``columns``), and the
report (``report``). The option model lives in the torch-free ``d2merge.options.verify``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from d2merge.adapter_ops.combine import combine
from d2merge.adapter_ops.mix import AdapterMix
from d2merge.errors import D2MergeError
from d2merge.io.adapter import Adapter, load_adapter
from d2merge.io.checkpoint import open_base
from d2merge.planning import build_plan
from d2merge.options import MergeOptions
from d2merge.runtime.attaching import WeightedAdapters
from d2merge.runtime.loading import collecting_new_objects_only, load_fp32_model
from d2merge.tasks import encode_choices, load_tokenizer, read_jsonl
from d2merge.verify.columns import ExportedModel, MergedFolder, Unmerged, judge_column, open_exported, shown_column
from d2merge.verify.compare import compare_logits, mc_result, probe_logits
from d2merge.verify.limits import (ARITHMETIC_FLOOR_ABS, ARITHMETIC_FLOOR_REL, DTYPE_LABELS, VERIFY_DTYPES,
                                   apply_rounding, judge, parse_dtypes, resolve_limits, rounding_floor,
                                   thresholds_for, top1_flips_p, ulp)
from d2merge.verify.probes import (PROBE_SENTENCES, Probes, check_eval_positions, check_probe_positions,
                                   load_base_tokenizer, prompt_probes, random_probes, read_prompts, sentence_probes)
from d2merge.verify.report import SCHEMA_VERSION, VerifyReport, collect_provenance, format_gap_table, format_report
from d2merge.verify.results import (DtypeResult, FlippedAnswer, LayerCheck, Limits, LogitStats, MCResult,
                                    RoundingFloor, WeightCheck, method_summary)
from d2merge.verify.stats import binomial_tail, flips_vs_rounding, mcnemar_exact, paired_gap_interval
from d2merge.verify.weights import check_weights, reference_merge, stored_dtype, weight_error
# The option model and thresholds live in a torch-free module (the CLI's flags come from there).
from d2merge.options.base import option_error
from d2merge.options.verify import DEFAULT_THRESHOLDS, Thresholds, VerifyOptions, threshold_defaults

__all__ = [
    "ARITHMETIC_FLOOR_ABS", "ARITHMETIC_FLOOR_REL", "DEFAULT_THRESHOLDS", "DTYPE_LABELS", "PROBE_SENTENCES",
    "SCHEMA_VERSION", "VERIFY_DTYPES", "DtypeResult", "FlippedAnswer", "LayerCheck", "Limits", "LogitStats",
    "MCResult", "Probes", "RoundingFloor", "Thresholds", "VerifyOptions", "VerifyReport", "WeightCheck",
    "apply_rounding", "binomial_tail", "check_eval_positions", "check_probe_positions", "check_weights",
    "compare_logits", "flips_vs_rounding", "format_gap_table", "format_report", "judge", "load_base_tokenizer",
    "load_fp32_model", "mc_result", "mcnemar_exact", "method_summary", "open_exported",
    "paired_gap_interval", "parse_dtypes", "probe_logits", "prompt_probes", "random_probes", "read_prompts",
    "reference_merge", "resolve_limits", "rounding_floor", "sentence_probes", "stored_dtype", "threshold_defaults",
    "thresholds_for", "top1_flips_p", "ulp", "verify", "weight_error",
]


def _original_base_column(base_ckpt: Any, adapter_obj: Adapter, options: VerifyOptions, results: list[Any],
                          unmerged: Unmerged, folder_column: Callable[..., Any], say: Callable[[str], None]) -> Any:
    """The common QLoRA recipe's cost: the adapter merged into the 16-bit original, against the trained model."""
    from d2merge.api import merge

    if base_ckpt.quantization is None:
        raise options.error("{original_base} needs a quantized BASE (the model the adapter was trained on)",
                            path=base_ckpt.location, hint="pass the bitsandbytes/FP8 base as BASE and its 16-bit "
                                                          "original as {original_base}")
    original = open_base(options.original_base, allow_pickle=options.allow_pickle)
    dtype = next((r.dtype for r in results if r.dtype in VERIFY_DTYPES), "bf16")
    temp_root = Path(tempfile.mkdtemp(prefix="d2merge-verify-original-"))
    try:
        say(f"merging into the 16-bit original {original.location} ({dtype})")
        folder = merge(original, adapter_obj, temp_root / dtype, dtype=dtype, hash_sources=False,
                       tied_embeddings=options.tied_embeddings).output
        column = folder_column(f"original {dtype}", folder, str(original.location))
        return shown_column(column, dtype, unmerged)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)


@collecting_new_objects_only()  # each model freed by verify's gc.collect() costs ms, not 0.2 s
def verify(base: str | Path, adapter: str | Path | AdapterMix, merged: str | Path | None = None, *,
           dtypes: str | Sequence[str] | None = None, mc_eval: str | Path | None = None,
           prompts: str | Path | None = None, thresholds: Mapping[str, float | None] | None = None,
           options: VerifyOptions | None = None, echo: Callable[[str], None] | None = None,
           report: str | Path | None = None, html: str | Path | None = None, **overrides: Any) -> VerifyReport:
    """Compare base + adapter (unmerged) with ``merged``, or with fresh merges in each of ``dtypes``.

    ``adapter`` may be several adapters (``AdapterMix``): the reference is then every adapter
    attached at once, each one's change weighted (``runtime.WeightedAdapters``), or, for a
    ``--combination`` merge, combine's adapter attached (combined into a temp folder first).

    Without ``merged``, each dtype (default fp32) is merged into a temp folder, checked and
    deleted. ``thresholds`` overrides the per-dtype defaults (keys: Thresholds fields) for every
    column. Keyword ``overrides`` are VerifyOptions fields: ``verify(base, adapter, num_probes=16)``.
    ``echo`` receives one line per stage (the CLI sends them to stderr). ``report``: also write the
    JSON report there; ``html``: also write the HTML page there (d2merge/reports/verify_page.py). Both
    locations are checked before any work starts, so a verdict is never lost.
    """
    from d2merge.io.output import check_output_location
    from d2merge.io.transformers_folder import refuse_custom_code

    options = replace(options or VerifyOptions(), **overrides) if overrides else (options or VerifyOptions())
    say = echo or (lambda message: None)
    if merged is not None and dtypes is not None:
        raise option_error("{dtypes} merges on the fly; it cannot be combined with a MERGED folder",
                           hint="drop MERGED to compare fresh merges per dtype, or drop {dtypes}")
    report_path = check_output_location(Path(report), (), overwrite=True, is_file=True) if report else None
    html_path = check_output_location(Path(html), (), overwrite=True, is_file=True) if html else None
    base_ckpt = open_base(base, allow_pickle=options.allow_pickle)
    exported = open_exported(merged) if merged is not None else None  # a GGUF or genai build: no HF folder
    merged_ckpt = open_base(merged, allow_pickle=options.allow_pickle) if merged is not None and not exported else None
    for folder in (base_ckpt.folder, merged_ckpt.folder if merged_ckpt is not None else None):
        if folder is not None:  # before any work: transformers loads both folders later
            refuse_custom_code(folder)
    several = adapter if isinstance(adapter, AdapterMix) else None
    temp_adapter, combined_from = None, None
    if several is not None and several.combination is not None:
        # The reference of a --combination merge is combine's adapter attached at runtime: combined
        # into a temp folder by the same per-module code the merge ran, then verified as one adapter.
        temp_adapter = Path(tempfile.mkdtemp(prefix="d2merge-verify-combined-"))
        say(f"combining {len(several.adapters)} adapters ({several.combination.combination}) into a temp adapter")
        combined_from = several.load(allow_pickle=options.allow_pickle)
        combine([a.path for a in combined_from], temp_adapter / "combined", several.weights, several.combination,
                base=base_ckpt.location, allow_pickle=options.allow_pickle)
        adapter, several = temp_adapter / "combined", None
    try:
        return _verify(base_ckpt, adapter, several, merged, merged_ckpt, exported, dtypes, mc_eval, prompts,
                       thresholds, options, say, report_path, html_path, combined_from)
    finally:
        if temp_adapter is not None:
            shutil.rmtree(temp_adapter, ignore_errors=True)


def _verify(base_ckpt: Any, adapter: Any, several: AdapterMix | None, merged: Any, merged_ckpt: Any, exported: Any,
            dtypes: Any, mc_eval: Any, prompts: Any, thresholds: Any, options: VerifyOptions,
            say: Callable[[str], None], report_path: Path | None, html_path: Path | None,
            combined_from: Sequence[Adapter] | None = None) -> VerifyReport:
    """verify() once its inputs are open: the unmerged run, the columns, the report.

    ``combined_from``: the adapters a temp ``adapter`` was combined from; the report names them
    (and hashes their files), not the temp folder.
    """
    from d2merge.api import merge

    if several is not None:
        if options.original_base is not None:
            raise option_error("{original_base} compares one adapter's merges; it does not take several adapters",
                               hint="verify each adapter alone with {original_base}")
        adapters = several.load(allow_pickle=options.allow_pickle)
        adapter_obj: Adapter = adapters[0]
        reference: Any = WeightedAdapters(adapters, several.weights)
    else:
        adapter_obj = load_adapter(adapter, allow_pickle=options.allow_pickle)
        adapters, reference = (adapter_obj,), adapter_obj
    examples = read_jsonl(mc_eval) if mc_eval is not None else None
    column_names = parse_dtypes(dtypes or ("fp32",)) if merged is None else ()
    for dtype in column_names or ("fp32",):
        thresholds_for(dtype, thresholds)  # an unknown threshold name is refused before any work
    tokenizer = None
    source = options.probe_source
    if examples is not None or prompts is not None or source == "sentences":
        why = "{mc_eval}" if examples is not None else "{prompts}" if prompts is not None else "sentence probes"
        tokenizer = load_base_tokenizer(base_ckpt, why)
    elif source == "auto" and base_ckpt.folder is not None:
        tokenizer = load_tokenizer(base_ckpt.folder)
    vocab_size = int((base_ckpt.config or {}).get("vocab_size") or 0)
    if prompts is not None:
        probes = prompt_probes(tokenizer, read_prompts(prompts), max_length=options.probe_length, source=str(prompts))
    elif source != "random" and tokenizer is not None:
        probes = sentence_probes(tokenizer, max_length=options.probe_length)
    else:
        if vocab_size < 1:
            raise option_error("the base's config.json has no vocab_size for random probes", path=base_ckpt.location,
                               hint="pass {prompts=FILE}")
        probes = random_probes(vocab_size, count=options.num_probes, length=options.probe_length, seed=options.seed)
    check_probe_positions(base_ckpt.config, probes, location=base_ckpt.location)
    if exported is not None and exported.floor_dtype is None and probes.description["source"] == "random":
        # On random tokens a model's predictions are flat and near-tied: what a quantized file does to
        # them says little about what users see, so its gates are set and judged on real text.
        raise options.error(f"{exported.label} is quantized and judged on real text, not random tokens",
                            path=merged, hint="pass {prompts=FILE}, or use a base with a tokenizer and "
                                              "{probe_source=auto|sentences}")
    encoded = None
    if examples is not None:
        encoded = encode_choices(tokenizer, examples)
        check_eval_positions(base_ckpt.config, encoded, path=mc_eval)  # type: ignore[arg-type]

    # One plan: which tensors the adapter changes does not depend on the output dtype, and the
    # weight check recomputes merged tensors in fp64 and casts copies to the dtype stored.
    merge_plan = (build_plan(base_ckpt, adapter_obj, dtype="fp32", tied_embeddings=options.tied_embeddings)
                  if several is None else
                  several.plan_on(base_ckpt, MergeOptions(dtype="fp32", tied_embeddings=options.tied_embeddings,
                                                          allow_pickle=options.allow_pickle)))
    if merged_ckpt is not None:
        column_names = (stored_dtype(merge_plan, merged_ckpt),)
    from d2merge.device import ComputeDevice
    from d2merge.verify import streamed

    device = ComputeDevice(options.device)
    load = load_fp32_model  # looked up here, at call time: tests count the models verify loads whole

    def open_model(checkpoint: Any, adapter: Adapter | None = None, rounding: Any = None, checker: Any = None) -> Any:
        return streamed.open_forward(checkpoint, adapter=adapter, rounding=rounding, device=device,
                                     budget=options.max_activation_memory << 20, say=say, load=load,
                                     allow_pickle=options.allow_pickle, checker=checker)

    unmerged = Unmerged(base_ckpt, reference, probes, options, open_model, say, examples, tokenizer, encoded).run()

    def folder_column(dtype: str, folder: Path, shown: str | None) -> MergedFolder:
        checkpoint = open_base(folder, allow_pickle=options.allow_pickle)
        return MergedFolder(checkpoint, dtype, shown, open_model, say)

    results = []
    if exported is not None:
        # fp32 plan: each expected tensor is then cast once to the dtype the file stores it in (norms
        # stay f32 in an f16 GGUF), as the exporter did. Limits: the exporter's, then the user's.
        chosen = exported.thresholds(unmerged.max_abs_logit)
        if thresholds:
            thresholds_for("fp32", thresholds)  # the same refusal of unknown names
            chosen = replace(chosen, **{k: float(v) for k, v in thresholds.items() if v is not None})
        results.append(judge_column(ExportedModel(exported, say), merge_plan, chosen, unmerged))
    elif merged_ckpt is not None:
        dtype = column_names[0]
        results.append(judge_column(folder_column(dtype, merged_ckpt.location, str(merged_ckpt.location)), merge_plan,
                                    thresholds_for(dtype, thresholds), unmerged))
    else:
        temp_root = Path(tempfile.mkdtemp(prefix="d2merge-verify-"))
        try:
            for dtype in column_names:
                say(f"merging into a temp folder ({dtype})")
                folder = merge(base_ckpt, several or adapter_obj, temp_root / dtype, dtype=dtype, hash_sources=False,
                               tied_embeddings=options.tied_embeddings).output
                results.append(judge_column(folder_column(dtype, folder, None), merge_plan,
                                            thresholds_for(dtype, thresholds), unmerged))
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            shutil.rmtree(temp_root, ignore_errors=True)
    if options.original_base is not None:
        results.append(_original_base_column(base_ckpt, adapter_obj, options, results, unmerged, folder_column, say))
    if combined_from is not None:
        adapters = tuple(combined_from)
    result = VerifyReport(base=str(base_ckpt.location), adapter=" + ".join(str(a.path) for a in adapters),
                          method=" + ".join(a.method.name for a in adapters),
                          probes=probes.description, mc_eval=None if mc_eval is None else str(mc_eval),
                          options=options, results=results,
                          provenance=collect_provenance(base_ckpt.weight_files,
                                                        [f for a in adapters
                                                         for f in (a.path / "adapter_config.json", a.weights_file)],
                                                        merged_ckpt.folder if merged_ckpt is not None else None))
    if report_path is not None:
        result.save(report_path)
    if html_path is not None:
        from d2merge.reports.verify_page import write_verify_page

        write_verify_page(result, html_path)
    return result
