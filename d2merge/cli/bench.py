"""``d2merge bench``: throughput and latency of base, unmerged, merged and the exported runtimes.

Its flags come from BenchOptions (options/bench.py); the inputs to measure as given and the report
paths are declared here (click checks the paths).
"""

from __future__ import annotations

from pathlib import Path

import click

from d2merge.bench import BenchSettings
from d2merge.cli.flags import int_list, options_from, values_of
from d2merge.console import ConsoleCommand, say
from d2merge.options.bench import INPUT_PATHS, BenchOptions


@click.command("bench", cls=ConsoleCommand)
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
# The inputs to measure as given: declared by hand for click's path checks, with the model's help.
@click.option("--merged", type=click.Path(exists=True, file_okay=False), default=None,
              help=BenchOptions.help_of("merged"))
@click.option("--onnx", type=click.Path(exists=True, dir_okay=False), default=None, help=BenchOptions.help_of("onnx"))
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False), default=None, help=BenchOptions.help_of("gguf"))
@click.option("--genai", type=click.Path(exists=True, file_okay=False), default=None,
              help=BenchOptions.help_of("genai"))
@options_from(BenchOptions, exclude=INPUT_PATHS)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the throughput chart to a PNG (needs the 'plot' extra: matplotlib).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as one self-contained HTML page (charts, spread, ratios).")
def bench_command(base: str, adapter: str, json_path: str | None, plot_path: str | None, html_path: str | None,
                  **values: object) -> None:
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
    options = BenchOptions(**values_of(BenchOptions, values))  # a value out of range: one line, before any work
    from d2merge.output_names import check_report_file

    for option, path in (("--json", json_path), ("--plot", plot_path)):
        check_report_file(path, option)  # before minutes of measuring, not after
    from d2merge.bench import bench as run_bench
    from d2merge.bench import plot_report as plot_bench_report
    from d2merge.bench import save_report as save_bench_report
    from d2merge.io.output import check_output_location

    if html_path:  # before the measurements: a page is never lost to a bad path at the end
        html_path = str(check_output_location(Path(html_path), (), overwrite=True, is_file=True))
    settings = BenchSettings(batch_sizes=int_list(options.batch_sizes), seq_lens=int_list(options.seq_lens),
                             decode_batch_sizes=(1,) if options.decode_tokens else (),
                             decode_tokens=options.decode_tokens, decode_prompt_len=options.decode_prompt_len,
                             warmup=options.warmup, repeats=options.repeats)
    variants = options.variants
    chosen = None if variants is None else tuple(v.strip() for v in variants.split(",") if v.strip())
    report = run_bench(base, adapter, merged=options.merged, onnx=options.onnx, variants=chosen, settings=settings,
                       echo=say, gguf=options.gguf, gguf_type=options.gguf_type,
                       genai=options.genai, genai_precision=options.genai_precision)
    click.echo(report.table())
    if json_path:
        save_bench_report(report, json_path)
    if plot_path:
        plot_bench_report(report, plot_path)
    if html_path:
        from d2merge.reports.bench_page import write_bench_page

        write_bench_page(report, html_path)
