"""``d2merge bench``: throughput and latency of base, unmerged, merged and the exported runtimes."""

from __future__ import annotations

from pathlib import Path

import click

from d2merge.bench import ALL_VARIANTS as BENCH_VARIANTS
from d2merge.bench import BenchSettings
from d2merge.cli.flags import int_list
from d2merge.console import ConsoleCommand, say


@click.command("bench", cls=ConsoleCommand)
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--merged", type=click.Path(exists=True, file_okay=False), default=None,
              help="A merged folder to measure (default: merge into a temp folder, fp32).")
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An ONNX graph without past (default: export the merged model to a temp folder).")
@click.option("--variants", default=None,
              help=f"Which of {', '.join(BENCH_VARIANTS)} to measure. [default: base,unmerged,merged,onnx, "
                   "plus llama_cpp when llama-cpp-python is installed]")
@click.option("--gguf", "gguf_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A GGUF for the llama_cpp variant (default: export the merged model, see --gguf-type).")
@click.option("--gguf-type", default="f16", show_default=True, help="Type of that temp GGUF export.")
@click.option("--genai", "genai_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="An onnxruntime-genai folder for the genai variant (default: build one, see --genai-precision).")
@click.option("--genai-precision", type=click.Choice(["fp32", "fp16", "int4"]), default="int4", show_default=True,
              help="Precision of that temp genai build.")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Prefill batch sizes.")
@click.option("--seq-lens", default="32,128", show_default=True, help="Prefill sequence lengths.")
@click.option("--decode-tokens", default=BenchSettings.decode_tokens, show_default=True, type=click.IntRange(0),
              help="Decode steps (batch 1, KV cache) measured per run; 0 skips decode.")
@click.option("--decode-prompt-len", default=BenchSettings.decode_prompt_len, show_default=True,
              type=click.IntRange(1), help="Prompt tokens prefilled before the measured decode steps.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0), help="Untimed runs per cell.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="Timed runs per cell.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the throughput chart to a PNG (needs the 'plot' extra: matplotlib).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as one self-contained HTML page (charts, spread, ratios).")
def bench_command(base: str, adapter: str, merged: str | None, onnx_path: str | None, variants: str | None,
                  gguf_path: str | None, gguf_type: str, genai_path: str | None, genai_precision: str,
                  batch_sizes: str, seq_lens: str, decode_tokens: int, decode_prompt_len: int, warmup: int,
                  repeats: int,
                  json_path: str | None, plot_path: str | None, html_path: str | None) -> None:
    """Measure throughput and latency: base vs unmerged vs merged vs ONNX Runtime (and llama.cpp, onnxruntime-genai).

    Each variant is loaded, measured and freed in turn. Every cell gets warm-up
    runs and repeated timed runs; the table shows medians, p50/p95 latency and
    the min-max spread, so you can tell a real difference from noise.

    \b
    Examples:
      d2merge bench ./base ./adapter                         # everything, small grid
      d2merge bench ./base ./adapter --merged ./merged --variants merged,unmerged
      d2merge bench ./base ./adapter --batch-sizes 8 --seq-lens 128 --json bench.json --html bench.html
      d2merge bench ./base ./adapter --variants merged,onnx,llama_cpp,genai --genai-precision int4
    """
    from d2merge.output_names import check_report_file

    for option, path in (("--json", json_path), ("--plot", plot_path)):
        check_report_file(path, option)  # before minutes of measuring, not after
    from d2merge.bench import bench as run_bench
    from d2merge.bench import plot_report as plot_bench_report
    from d2merge.bench import save_report as save_bench_report
    from d2merge.io.output import check_output_location

    if html_path:  # before the measurements: a page is never lost to a bad path at the end
        html_path = str(check_output_location(Path(html_path), (), overwrite=True, is_file=True))
    settings = BenchSettings(batch_sizes=int_list(batch_sizes), seq_lens=int_list(seq_lens),
                             decode_batch_sizes=(1,) if decode_tokens else (), decode_tokens=decode_tokens,
                             decode_prompt_len=decode_prompt_len, warmup=warmup, repeats=repeats)
    chosen = None if variants is None else tuple(v.strip() for v in variants.split(",") if v.strip())
    report = run_bench(base, adapter, merged=merged, onnx=onnx_path, variants=chosen, settings=settings,
                       echo=say, gguf=gguf_path, gguf_type=gguf_type,
                       genai=genai_path, genai_precision=genai_precision)
    click.echo(report.table())
    if json_path:
        save_bench_report(report, json_path)
    if plot_path:
        plot_bench_report(report, plot_path)
    if html_path:
        from d2merge.reports.bench_page import write_bench_page

        write_bench_page(report, html_path)
