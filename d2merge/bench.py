"""``d2merge bench``: throughput and latency of base, unmerged, merged and ONNX Runtime, in one run.

Each variant is loaded, measured and freed before the next (never two models in
memory). Every cell of the grid gets warm-up runs, then repeated timed runs;
the report gives medians, p50/p95 latency and the min-max spread, because
timings on shared machines move by 10-15% from run to run. Ratios are only
computed between figures measured in the same run.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from d2merge.errors import D2MergeError

SCHEMA_VERSION = 1
VARIANTS = ("base", "unmerged", "merged", "onnx")
# Throughput ratios reported per grid cell: name -> (numerator variant, denominator variant).
RATIOS = {"merged_over_unmerged": ("merged", "unmerged"), "merged_over_base": ("merged", "base"),
          "onnx_over_pytorch": ("onnx", "merged")}


@dataclass(frozen=True)
class BenchSettings:
    """The measurement grid; defaults suit a small model on a laptop CPU."""

    batch_sizes: tuple[int, ...] = (1, 8)
    seq_lens: tuple[int, ...] = (32, 128)
    decode_batch_sizes: tuple[int, ...] = (1,)
    decode_prompt_len: int = 32
    decode_tokens: int = 16
    warmup: int = 2
    repeats: int = 5
    seed: int = 0


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

    def table(self) -> str:
        lines = [f"{'variant':<9} {'mode':<8} {'batch':>5} {'seq':>5} {'tok/s':>11} {'p50 ms':>9} {'p95 ms':>9} "
                 f"{'spread':>7}"]
        for r in self.rows:
            lines.append(f"{r.variant:<9} {r.mode:<8} {r.batch:>5} {r.seq:>5} {r.tokens_per_s:>11.1f} "
                         f"{r.latency_ms_p50:>9.2f} {r.latency_ms_p95:>9.2f} {r.spread_pct:>6.1f}%")
        ratio_lines = []
        for entry in self.ratios():
            parts = [f"{k.replace('_over_', '/')} {entry[k]:.3f}x" for k in RATIOS if k in entry]
            if parts:
                ratio_lines.append(f"{entry['mode']:<8} batch {entry['batch']:>3} seq {entry['seq']:>4}: " + ", ".join(parts))
        if ratio_lines:
            lines += ["", "throughput ratios (same run):"] + ["  " + line for line in ratio_lines]
        spread = max((r.spread_pct for r in self.rows), default=0.0)
        lines.append(f"\nnoise: the widest min-max spread of a cell was {spread:.1f}% of its median; "
                     "ratios closer to 1 than that are within noise")
        return "\n".join(lines)


def _summarise(variant: str, mode: str, batch: int, seq: int, latencies: list[float], tokens: int) -> BenchRow:
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
    generator = torch.Generator().manual_seed(seed + 1000 * batch + seq)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def bench_torch(model: torch.nn.Module, variant: str, settings: BenchSettings) -> list[BenchRow]:
    """Prefill grid and KV-cache decode for a PyTorch causal LM."""
    vocab = model.config.vocab_size
    rows = []
    with torch.inference_mode():
        for batch in settings.batch_sizes:
            for seq in settings.seq_lens:
                ids = _inputs(vocab, batch, seq, settings.seed)
                mask = torch.ones_like(ids)
                timings = _time(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False),
                                settings.warmup, settings.repeats)
                rows.append(_summarise(variant, "prefill", batch, seq, timings, batch * seq))
        for batch in settings.decode_batch_sizes:
            ids = _inputs(vocab, batch, settings.decode_prompt_len, settings.seed)
            step_timings: list[float] = []
            for run in range(settings.warmup + settings.repeats):
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                length = ids.shape[1]
                for _ in range(settings.decode_tokens):
                    length += 1
                    mask = torch.ones((batch, length), dtype=torch.long)
                    started = time.perf_counter()
                    out = model(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    if run >= settings.warmup:
                        step_timings.append(time.perf_counter() - started)
            rows.append(_summarise(variant, "decode", batch, settings.decode_prompt_len, step_timings, batch))
    return rows


def bench_onnx(onnx_path: Path, vocab: int, settings: BenchSettings) -> list[BenchRow]:
    """Prefill grid for an ONNX graph without past (input_ids, attention_mask -> logits) on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    if any(n.startswith("past_key_values") for n in names):
        raise D2MergeError("bench needs an ONNX graph without past for the prefill grid", path=onnx_path,
                           hint="export one with `d2merge export-onnx` (no --with-past)")
    rows = []
    for batch in settings.batch_sizes:
        for seq in settings.seq_lens:
            ids = _inputs(vocab, batch, seq, settings.seed).numpy().astype(np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            timings = _time(lambda: session.run(["logits"], feed), settings.warmup, settings.repeats)
            rows.append(_summarise("onnx", "prefill", batch, seq, timings, batch * seq))
    return rows


def bench(base: str | Path, adapter: str | Path, *, merged: str | Path | None = None,
          onnx: str | Path | None = None, variants: Iterable[str] = VARIANTS,
          settings: BenchSettings | None = None, echo: Callable[[str], None] | None = None) -> BenchReport:
    """Measure every requested variant; merges (and exports ONNX) into a temp folder when not given."""
    from d2merge.merge import merge
    from d2merge.runtime import load_base_model, load_unmerged

    settings = settings or BenchSettings()
    variants = tuple(variants)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise D2MergeError(f"unknown bench variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    say = echo or (lambda _msg: None)
    from d2merge.io.checkpoint import resolve_location
    from d2merge.io.transformers_folder import refuse_custom_code

    for folder in (base, merged):  # before any work: every variant is loaded by transformers
        if folder is not None and resolve_location(folder).is_dir():
            refuse_custom_code(resolve_location(folder))
    report = BenchReport(settings, meta={"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                                         "base": str(base), "adapter": str(adapter)})
    with tempfile.TemporaryDirectory(prefix="d2merge-bench-") as scratch:
        if merged is None and ("merged" in variants or "onnx" in variants):
            say("merging into a temp folder ...")
            merged = merge(base, adapter, Path(scratch) / "merged", dtype="fp32", hash_sources=False).output
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
            model = loaders[variant]()
            vocab = model.config.vocab_size
            report.meta.setdefault("parameters", sum(p.numel() for p in model.parameters()))
            report.rows += bench_torch(model, variant, settings)
            del model
            gc.collect()
        if "onnx" in variants:
            if onnx is None:
                from d2merge.export.onnx import export_onnx

                say("exporting ONNX (fp32, no past) into a temp folder ...")
                onnx = export_onnx(merged, Path(scratch) / "onnx", dtype="fp32").onnx_path  # type: ignore[arg-type]
            if vocab is None:
                from d2merge.io.transformers_folder import load_config

                vocab = load_config(merged).vocab_size
            say("measuring onnx ...")
            report.rows += bench_onnx(Path(onnx), vocab, settings)
    return report


def save_report(report: BenchReport, path: str | Path) -> None:
    from d2merge.io.output import write_json

    write_json(Path(path), report.to_json())


def plot_report(report: BenchReport, path: str | Path) -> None:
    """Throughput per variant for each prefill cell (needs the optional matplotlib extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise D2MergeError("--plot needs matplotlib", hint="pip install 'd2merge[plot]'") from None
    cells = sorted({(r.mode, r.batch, r.seq) for r in report.rows})
    variants = [v for v in VARIANTS if any(r.variant == v for r in report.rows)]
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

