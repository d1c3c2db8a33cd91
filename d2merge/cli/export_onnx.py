"""``d2merge export-onnx``: a merged folder to ONNX (generic graph or onnxruntime-genai build).

Every flag is a field of :class:`~d2merge.options.onnx.OnnxExportOptions`; which runtime takes
which flag is that model's metadata, checked before torch loads.
"""

from __future__ import annotations

from typing import Any

import click

from d2merge.cli.flags import options_from, refuse_flags_out_of_context
from d2merge.console import ConsoleCommand
from d2merge.options.onnx import OnnxExportOptions


@click.command("export-onnx", cls=ConsoleCommand)
@click.argument("model_dir", metavar="MODEL_DIR", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="A .onnx file, or a folder that receives model.onnx. Written atomically, after validation.")
@options_from(OnnxExportOptions)
@click.pass_context
def export_onnx_command(ctx: click.Context, model_dir: str, out: str, **values: Any) -> None:
    """Export a merged MODEL_DIR (config.json + safetensors) to ONNX, proven against PyTorch.

    The graph takes input_ids and attention_mask (int64, dynamic batch and
    sequence; left padding is fine) and returns logits. Before the file is
    moved to OUT, ONNX Runtime (CPU) and PyTorch run the same seeded probes
    (batch 2, one row left-padded) and their logits are compared at real
    tokens; above the tolerance nothing is written and the exit code is 2.

    \b
    Examples:
      d2merge export-onnx ./merged -o ./merged-onnx                  # ./merged-onnx/model.onnx
      d2merge export-onnx ./merged -o model.onnx --with-past         # for generation loops
      d2merge export-onnx ./merged -o model-fp16.onnx --dtype fp16   # half the size
      d2merge export-onnx ./merged -o model.onnx --exporter legacy --opset 17
      d2merge export-onnx ./merged -o ./merged-genai --runtime genai --precision int4
    """
    # Every rule known up front is checked here, before torch loads and the export runs.
    refuse_flags_out_of_context(ctx, (OnnxExportOptions,), values)
    settings = OnnxExportOptions(**values)
    if settings.runtime == "genai":
        from d2merge.export.onnx_genai import Int4Options, export_genai

        int4 = None
        if settings.int4_given:
            defaults = Int4Options()
            int4 = Int4Options(settings.int4_block_size or defaults.block_size,
                               settings.int4_accuracy_level or defaults.accuracy_level,
                               settings.int4_algorithm or defaults.algorithm, not settings.int4_asymmetric)
        click.echo(export_genai(model_dir, out, precision=settings.precision, validate=settings.validate_output,
                                atol=settings.atol, overwrite=settings.overwrite, int4=int4).describe())
        return
    from d2merge.export.onnx import export_onnx

    result = export_onnx(model_dir, out, dtype=settings.dtype, with_past=settings.with_past, opset=settings.opset,
                         exporter=settings.exporter, external_data=settings.external_data,
                         validate=settings.validate_output, atol=settings.atol, overwrite=settings.overwrite)
    click.echo(result.describe())
