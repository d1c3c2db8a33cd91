"""``d2merge bench``: throughput and latency of base, unmerged, merged and ONNX Runtime, in one run.

Each variant is loaded, measured and freed before the next (never two models in
memory). Every cell of the grid gets warm-up runs, then repeated timed runs;
the report gives medians, p50/p95 latency and the min-max spread, because
timings on shared machines move by 10-15% from run to run. Ratios are only
computed between figures measured in the same run.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from d2merge.errors import D2MergeError, option_error
from d2merge.options.bench import ALL_VARIANTS, EXTRA_VARIANTS, BenchOptions
from d2merge.options.bench import CORE_VARIANTS as VARIANTS

if TYPE_CHECKING:  # imported where used: the CLI reads VARIANTS without loading torch
    import torch

SCHEMA_VERSION = 1
# VARIANTS, EXTRA_VARIANTS, ALL_VARIANTS: d2merge.options.bench's (the CLI lists them without this module).
# llama_cpp is measured by default when llama-cpp-python is installed; it and genai run one sequence
# at a time here, so they get the batch-1 cells of the grid only.
# Throughput ratios reported per grid cell: name -> (numerator variant, denominator variant).
RATIOS = {"merged_over_unmerged": ("merged", "unmerged"), "merged_over_base": ("merged", "base"),
          "onnx_over_pytorch": ("onnx", "merged"), "llama_cpp_over_pytorch": ("llama_cpp", "merged"),
          "genai_over_pytorch": ("genai", "merged")}


def default_variants() -> tuple[str, ...]:
    """The four core variants, plus llama_cpp when llama-cpp-python is installed."""
    import importlib.util

    return VARIANTS + (("llama_cpp",) if importlib.util.find_spec("llama_cpp") is not None else ())


@dataclass(frozen=True)
class BenchSettings:
    """The measurement grid; defaults suit a small model on a laptop CPU."""

    # the command line's defaults (BenchOptions), declared once
    batch_sizes: tuple[int, ...] = tuple(int(n) for n in BenchOptions.default_of("batch_sizes").split(","))
    seq_lens: tuple[int, ...] = tuple(int(n) for n in BenchOptions.default_of("seq_lens").split(","))
    decode_batch_sizes: tuple[int, ...] = (1,)
    decode_prompt_len: int = BenchOptions.default_of("decode_prompt_len")
    decode_tokens: int = BenchOptions.default_of("decode_tokens")
    warmup: int = BenchOptions.default_of("warmup")
    repeats: int = BenchOptions.default_of("repeats")
    seed: int = 0


# A cell whose timed runs spread wider than this (max - min, % of the median) cannot carry a ratio:
# on a loaded machine one run waits for a core and the "ratio" is the scheduler's, not the model's.
NOISY_SPREAD_PCT = 50.0


@dataclass(frozen=True)
class Comparison:
    """A throughput ratio and whether the runs say anything: ``clear`` (the ranges of runs do not
    overlap, however noisy), ``same`` (they overlap, each cell steady: no measurable difference) or
    ``noisy`` (they overlap and a cell spread too wide to tell)."""

    ratio: float
    verdict: str
    spread_pct: float

    def short(self) -> str:
        return {"clear": f"{self.ratio:.2f}x", "same": f"~{self.ratio:.2f}x"}.get(self.verdict, "too noisy")

    def sentence(self) -> str:
        """For a reader who has not read the bench docs (the demo's summary)."""
        if self.verdict == "clear":
            return f"{self.ratio:.2f}x the throughput"
        if self.verdict == "same":
            return f"no measurable difference ({self.ratio:.2f}x, within the spread of the runs)"
        return (f"too noisy to compare on this machine (its runs varied by up to {self.spread_pct:.0f}% of the "
                "median; rerun when it is idle)")


@dataclass(frozen=True)
class BenchRow:
    variant: str
    mode: str  # "prefill": one forward over batch x seq; "decode": one new token per step with a KV cache
    batch: int
    seq: int
    runs: int
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_min: float
    latency_ms_max: float
    tokens_per_s: float  # median
    spread_pct: float  # (max - min) / median latency, in percent: how noisy this cell was


@dataclass
class BenchReport:
    settings: BenchSettings
    rows: list[BenchRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def find(self, variant: str, mode: str, batch: int, seq: int) -> BenchRow | None:
        for row in self.rows:
            if (row.variant, row.mode, row.batch, row.seq) == (variant, mode, batch, seq):
                return row
        return None

    def ratios(self) -> list[dict[str, Any]]:
        """Throughput ratios per grid cell: merged/unmerged, merged/base, onnx/merged (PyTorch)."""
        out = []
        cells = sorted({(r.mode, r.batch, r.seq) for r in self.rows})
        for mode, batch, seq in cells:
            entry: dict[str, Any] = {"mode": mode, "batch": batch, "seq": seq}
            for name, (top, bottom) in RATIOS.items():
                a, b = self.find(top, mode, batch, seq), self.find(bottom, mode, batch, seq)
                if a and b:
                    entry[name] = a.tokens_per_s / b.tokens_per_s
            out.append(entry)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "settings": asdict(self.settings), "meta": self.meta,
                "results": [asdict(r) for r in self.rows], "ratios": self.ratios()}

    def compare(self, name: str, mode: str, batch: int, seq: int) -> Comparison | None:
        """What one ratio of :data:`RATIOS` says in this cell, judged against the runs' spread."""
        top, bottom = RATIOS[name]
        a, b = self.find(top, mode, batch, seq), self.find(bottom, mode, batch, seq)
        if a is None or b is None:
            return None
        ratio = a.tokens_per_s / b.tokens_per_s
        spread = max(a.spread_pct, b.spread_pct)
        # every run of one faster than every run of the other: a difference larger than the noise
        if a.latency_ms_max < b.latency_ms_min or b.latency_ms_max < a.latency_ms_min:
            return Comparison(ratio, "clear", spread)
        return Comparison(ratio, "noisy" if spread > NOISY_SPREAD_PCT else "same", spread)

    def table(self) -> str:
        lines = [f"{'variant':<9} {'mode':<8} {'batch':>5} {'seq':>5} {'tok/s':>11} {'p50 ms':>9} {'p95 ms':>9} "
                 f"{'spread':>7}"]
        for r in self.rows:
            lines.append(f"{r.variant:<9} {r.mode:<8} {r.batch:>5} {r.seq:>5} {r.tokens_per_s:>11.1f} "
                         f"{r.latency_ms_p50:>9.2f} {r.latency_ms_p95:>9.2f} {r.spread_pct:>6.1f}%")
        ratio_lines = []
        for entry in self.ratios():
            parts = []
            for name in RATIOS:
                verdict = self.compare(name, entry["mode"], entry["batch"], entry["seq"])
                if verdict is not None:
                    parts.append(f"{name.replace('_over_', '/')} {verdict.short()}")
            if parts:
                ratio_lines.append(f"{entry['mode']:<8} batch {entry['batch']:>3} seq {entry['seq']:>4}: " + ", ".join(parts))
        if ratio_lines:
            lines += ["", "throughput ratios (same run; a ratio is shown only where the runs were steady enough):"]
            lines += ["  " + line for line in ratio_lines]
            lines.append(f"  (a plain ratio: every run of one was faster than every run of the other; ~ : the ranges "
                         f"overlap; too noisy: they overlap and a cell's runs varied by more than "
                         f"{NOISY_SPREAD_PCT:.0f}% of its median, as on a busy machine)")
        return "\n".join(lines)


def _summarise(variant: str, mode: str, batch: int, seq: int, latencies: list[float], tokens: int) -> BenchRow:
    import statistics  # here, not at the top: it costs every CLI command 0.1 s of import (fractions)

    ordered = sorted(latencies)
    median = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return BenchRow(variant, mode, batch, seq, len(ordered), median * 1e3, p95 * 1e3, ordered[0] * 1e3,
                    ordered[-1] * 1e3, tokens / median, 100.0 * (ordered[-1] - ordered[0]) / median)


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - started)
    return timings


def _inputs(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(seed + 1000 * batch + seq)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def bench_torch(model: torch.nn.Module, variant: str, settings: BenchSettings) -> list[BenchRow]:
    """Prefill grid and KV-cache decode for a PyTorch causal LM."""
    import torch

    from d2merge.console import Progress

    vocab = model.config.vocab_size
    rows = []
    cells = len(settings.batch_sizes) * len(settings.seq_lens) + len(settings.decode_batch_sizes)
    bar = Progress(f"bench {variant}", cells, "cell")  # elapsed and time left, on a terminal or in a log
    with bar, torch.inference_mode():
        for batch in settings.batch_sizes:
            for seq in settings.seq_lens:
                ids = _inputs(vocab, batch, seq, settings.seed)
                mask = torch.ones_like(ids)
                timings = _time(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False),
                                settings.warmup, settings.repeats)
                rows.append(_summarise(variant, "prefill", batch, seq, timings, batch * seq))
                bar.advance()
        for batch in settings.decode_batch_sizes:
            ids = _inputs(vocab, batch, settings.decode_prompt_len, settings.seed)
            step_timings: list[float] = []
            for run in range(settings.warmup + settings.repeats):
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
                # transformers 5 names the KV cache `cache` (argument and output); `past_key_values`
                # still works but warns on every call.
                past, token = out.cache, out.logits[:, -1:].argmax(-1)
                length = ids.shape[1]
                for _ in range(settings.decode_tokens):
                    length += 1
                    mask = torch.ones((batch, length), dtype=torch.long)
                    started = time.perf_counter()
                    out = model(input_ids=token, attention_mask=mask, cache=past, use_cache=True)
                    past, token = out.cache, out.logits[:, -1:].argmax(-1)
                    if run >= settings.warmup:
                        step_timings.append(time.perf_counter() - started)
            rows.append(_summarise(variant, "decode", batch, settings.decode_prompt_len, step_timings, batch))
            bar.advance()
    return rows


def open_onnx_session(onnx_path: Path) -> Any:
    """An ONNX Runtime CPU session, or one line when the file is not an ONNX model it can run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...), all Exception
        detail = " ".join(str(exc).split())[:200]
        raise D2MergeError(f"ONNX Runtime cannot load this file as an ONNX model ({type(exc).__name__}: {detail})",
                           path=onnx_path, hint="pass a graph written by `d2merge export-onnx`") from None


def check_merged_pairing(base: Any, adapter: Any, merged: str | Path) -> None:
    """Refuse a MERGED folder that is not a merge of this base and adapter, as verify would.

    Benchmarking an unrelated model against the unmerged one would print a table that means
    nothing; verify's weight check (copied tensors bit for bit, merged ones against fp64) tells.
    """
    from d2merge.io.checkpoint import open_base
    from d2merge.planning import build_plan
    from d2merge.verify import check_weights, stored_dtype, thresholds_for

    merged_ckpt = open_base(merged)
    dtype = stored_dtype(build_plan(base, adapter), merged_ckpt)
    layers, _, mismatched, missing = check_weights(build_plan(base, adapter, dtype=dtype), merged_ckpt)
    hint = "pass the folder `d2merge merge BASE ADAPTER` wrote, or leave out {merged}"
    if missing:
        raise option_error(f"MERGED lacks {len(missing)} tensor(s) of this base (first: {missing[0]})",
                           path=merged_ckpt.location, hint=hint)
    if mismatched:
        raise option_error("MERGED is not a merge of this base: a tensor the adapter does not touch differs",
                           path=merged_ckpt.tensors.file_of(mismatched[0]), tensor=mismatched[0], hint=hint)
    limit = thresholds_for(dtype).max_ulp
    worst = max(layers, key=lambda layer: layer.max_ulp_error, default=None)
    if worst is not None and not worst.max_ulp_error <= limit:
        raise option_error(f"MERGED is not a merge of this adapter: weight error {worst.max_ulp_error:.3g} ulp "
                           f"> {limit:g}", path=merged_ckpt.tensors.file_of(worst.tensor), tensor=worst.tensor,
                           hint=hint)


def bench_onnx(onnx_path: Path, vocab: int, settings: BenchSettings) -> list[BenchRow]:
    """Prefill grid for an ONNX graph without past (input_ids, attention_mask -> logits) on the CPU."""
    import numpy as np

    session = open_onnx_session(onnx_path)
    names = {i.name for i in session.get_inputs()}
    if any(n.startswith("past_key_values") for n in names):
        raise D2MergeError("bench needs an ONNX graph without past for the prefill grid", path=onnx_path,
                           hint="export one with `d2merge export-onnx` (no --with-past)")
    from d2merge.console import Progress

    rows = []
    with Progress("bench onnx", len(settings.batch_sizes) * len(settings.seq_lens), "cell") as bar:
        for batch in settings.batch_sizes:
            for seq in settings.seq_lens:
                ids = _inputs(vocab, batch, seq, settings.seed).numpy().astype(np.int64)
                feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                timings = _time(lambda: session.run(["logits"], feed), settings.warmup, settings.repeats)
                rows.append(_summarise("onnx", "prefill", batch, seq, timings, batch * seq))
                bar.advance()
    return rows


def bench_llama_cpp(gguf_path: Path, vocab: int, settings: BenchSettings) -> list[BenchRow]:
    """Batch-1 prefill cells and decode of a GGUF in llama.cpp (llama-cpp-python), as many threads as torch."""
    import numpy as np
    import torch

    try:
        import llama_cpp
    except ImportError:
        raise D2MergeError("the llama_cpp variant needs llama-cpp-python",
                           hint="pip install 'd2merge[gguf-llama]' (builds llama.cpp from source)") from None
    longest = max([*settings.seq_lens, settings.decode_prompt_len + settings.decode_tokens]) + 8
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=longest, n_batch=longest, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    rows = []
    for seq in settings.seq_lens if 1 in settings.batch_sizes else ():
        ids = _inputs(vocab, 1, seq, settings.seed)[0].tolist()

        def prefill() -> None:
            llm.reset()
            llm.eval(ids)

        rows.append(_summarise("llama_cpp", "prefill", 1, seq, _time(prefill, settings.warmup, settings.repeats), seq))
    if 1 in settings.decode_batch_sizes and settings.decode_tokens:
        prompt = _inputs(vocab, 1, settings.decode_prompt_len, settings.seed)[0].tolist()
        step_timings: list[float] = []
        for run in range(settings.warmup + settings.repeats):
            llm.reset()
            llm.eval(prompt)
            for _ in range(settings.decode_tokens):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # greedy, as the PyTorch loop
                started = time.perf_counter()
                llm.eval([token])
                if run >= settings.warmup:
                    step_timings.append(time.perf_counter() - started)
        rows.append(_summarise("llama_cpp", "decode", 1, settings.decode_prompt_len, step_timings, 1))
    llm.close()
    return rows


def bench_genai(folder: Path, vocab: int, settings: BenchSettings) -> list[BenchRow]:
    """Batch-1 prefill cells (append_tokens) and decode (generate_next_token) of an onnxruntime-genai build."""
    import numpy as np

    from d2merge.export.onnx_genai import GenaiCausalLM

    model = GenaiCausalLM(folder)
    rows = []
    for seq in settings.seq_lens if 1 in settings.batch_sizes else ():
        ids = _inputs(vocab, 1, seq, settings.seed).numpy().astype(np.int32)

        def prefill() -> None:
            model.generator(seq + 1).append_tokens(ids)

        rows.append(_summarise("genai", "prefill", 1, seq, _time(prefill, settings.warmup, settings.repeats), seq))
    if 1 in settings.decode_batch_sizes and settings.decode_tokens:
        prompt = _inputs(vocab, 1, settings.decode_prompt_len, settings.seed).numpy().astype(np.int32)
        step_timings: list[float] = []
        for run in range(settings.warmup + settings.repeats):
            generator = model.generator(settings.decode_prompt_len + settings.decode_tokens + 1)
            generator.append_tokens(prompt)
            for _ in range(settings.decode_tokens):
                started = time.perf_counter()
                generator.generate_next_token()
                if run >= settings.warmup:
                    step_timings.append(time.perf_counter() - started)
        rows.append(_summarise("genai", "decode", 1, settings.decode_prompt_len, step_timings, 1))
    return rows


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can take without swapping (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_memory(base: Any, adapter: Any) -> None:
    """Refuse, before loading anything, a model whose fp32 weights will not fit the memory available.

    bench keeps whole models (it measures their throughput): one fp32 model plus the adapter's
    factors at a time; a model that does not fit would be killed mid-run or swap for hours.
    """
    count = 0
    for name in base.tensors.keys():
        dtype, shape = base.tensors.info(name)
        if dtype.is_floating_point:
            count += math.prod(shape)
    needed = 4 * (count + adapter.num_parameters())
    available = available_memory()
    if available is not None and needed > available:
        raise D2MergeError(f"bench loads whole fp32 models: this one needs about {needed / 2**30:.1f} GiB and "
                           f"{available / 2**30:.1f} GiB is available", path=base.location,
                           hint="bench a smaller model or on a larger machine; `d2merge verify` runs block by block")


def bench(base: str | Path, adapter: str | Path, *, merged: str | Path | None = None,
          onnx: str | Path | None = None, variants: Iterable[str] | None = None,
          settings: BenchSettings | None = None, echo: Callable[[str], None] | None = None,
          gguf: str | Path | None = None, gguf_type: str = "f16", genai: str | Path | None = None,
          genai_precision: str = "int4") -> BenchReport:
    """Measure every requested variant; merges (and exports ONNX, GGUF, genai) into a temp folder when not given.

    ``variants`` defaults to :func:`default_variants`. llama_cpp measures ``gguf`` or a fresh
    ``gguf_type`` export; genai measures ``genai`` or a fresh ``genai_precision`` build. When
    llama_cpp is only there by default and the model cannot be exported to GGUF, it is skipped
    with a note (``meta["skipped"]``); asked for by name, that is an error.
    """
    import torch

    from d2merge.export.registry import bench_format
    from d2merge.api import merge
    from d2merge.runtime.loading import collecting_new_objects_only, load_base_model
    from d2merge.runtime.attaching import load_unmerged

    settings = settings or BenchSettings()
    by_default = variants is None
    variants = default_variants() if variants is None else tuple(variants)
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        raise D2MergeError(f"unknown bench variant(s) {', '.join(sorted(unknown))}; "
                           f"choose from {', '.join(ALL_VARIANTS)}")
    say = echo or (lambda _msg: None)
    from d2merge.io.checkpoint import resolve_location
    from d2merge.io.transformers_folder import refuse_custom_code

    for folder in (base, merged):  # before any work: every variant is loaded by transformers
        if folder is not None and resolve_location(folder).is_dir():
            refuse_custom_code(resolve_location(folder))
    # Also before any work: the inputs must fit together, or a variant fails halfway with a shape error.
    from d2merge.io.adapter import load_adapter
    from d2merge.io.checkpoint import open_base
    from d2merge.planning import build_plan

    base_ckpt, adapter_obj = open_base(base), load_adapter(adapter)
    build_plan(base_ckpt, adapter_obj)
    check_fits_memory(base_ckpt, adapter_obj)
    if merged is not None:
        check_merged_pairing(base_ckpt, adapter_obj, merged)
    if onnx is not None:
        open_onnx_session(Path(onnx))
    report = BenchReport(settings, meta={"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                                         "base": str(base), "adapter": str(adapter)})
    with tempfile.TemporaryDirectory(prefix="d2merge-bench-") as scratch:
        needs_merge = {"merged", "onnx"} | ({"llama_cpp"} if gguf is None else set()) | (
            {"genai"} if genai is None else set())
        if merged is None and needs_merge & set(variants):
            say("merging into a temp folder ...")
            merged = merge(base, adapter, Path(scratch) / "merged", dtype="fp32", hash_sources=False).output

        def exported(variant: str, choice: str | None = None) -> Path:
            """The format ``variant`` measures, made from the fp32 merge by its plug-in (export.registry)."""
            plugin = bench_format(variant)
            assert plugin is not None, variant
            return plugin.export_for_bench(Path(merged), Path(scratch), say=say, choice=choice)  # type: ignore[arg-type]

        loaders: dict[str, Callable[[], torch.nn.Module]] = {
            "base": lambda: load_base_model(base),
            "unmerged": lambda: load_unmerged(base, adapter),
            "merged": lambda: load_base_model(merged),  # type: ignore[arg-type]
        }
        vocab = None
        for variant in ("base", "unmerged", "merged"):
            if variant not in variants:
                continue
            say(f"measuring {variant} ...")
            with collecting_new_objects_only():  # the collection below walks this model's objects only
                model = loaders[variant]()
                vocab = model.config.vocab_size
                report.meta.setdefault("parameters", sum(p.numel() for p in model.parameters()))
                report.rows += bench_torch(model, variant, settings)
                del model
                gc.collect()
        if "onnx" in variants:
            if onnx is None:
                onnx = exported("onnx")
            if vocab is None:
                from d2merge.io.transformers_folder import load_config

                vocab = load_config(merged).vocab_size
            say("measuring onnx ...")
            report.rows += bench_onnx(Path(onnx), vocab, settings)
        if vocab is None and ("llama_cpp" in variants or "genai" in variants):
            from d2merge.io.checkpoint import open_base

            vocab = int((open_base(merged or base).config or {}).get("vocab_size") or 0)
        if "llama_cpp" in variants:
            if gguf is None:
                try:
                    gguf = exported("llama_cpp", gguf_type)
                except D2MergeError as exc:
                    if not by_default:
                        raise
                    report.meta.setdefault("skipped", {})["llama_cpp"] = str(exc)
                    say(f"llama_cpp skipped: {exc}")
            if gguf is not None:
                say("measuring llama_cpp ...")
                report.meta["gguf"] = str(gguf)
                report.rows += bench_llama_cpp(Path(gguf), vocab, settings)
        if "genai" in variants:
            if genai is None:
                genai = exported("genai", genai_precision)
                report.meta["genai_precision"] = genai_precision
            say("measuring genai ...")
            report.rows += bench_genai(Path(genai), vocab, settings)
    return report


def save_report(report: BenchReport, path: str | Path) -> None:
    from d2merge.io.output import save_json

    save_json(Path(path), report.to_json())


def plot_report(report: BenchReport, path: str | Path) -> None:
    """Throughput per variant for each prefill cell (needs the optional matplotlib extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise option_error("{plot_report} needs matplotlib", hint="pip install 'd2merge[plot]'",
                           flags={"plot_report": "--plot"}) from None
    cells = sorted({(r.mode, r.batch, r.seq) for r in report.rows})
    variants = [v for v in ALL_VARIANTS if any(r.variant == v for r in report.rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cells)), 4))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        values = [(report.find(variant, *cell).tokens_per_s if report.find(variant, *cell) else 0) for cell in cells]
        ax.bar([c + i * width for c in range(len(cells))], values, width, label=variant)
    ax.set_xticks([c + width * (len(variants) - 1) / 2 for c in range(len(cells))])
    ax.set_xticklabels([f"{m}\nb{b} s{s}" for m, b, s in cells])
    ax.set_ylabel("tokens / s (median)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("d2merge bench")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

