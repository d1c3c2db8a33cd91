"""``d2merge export-gguf``: a merged folder to one GGUF file."""

from __future__ import annotations

import click

from d2merge.console import QUIET_HELP, ConsoleCommand
from d2merge.options.merge import GGUF_TYPE_HELP, IMATRIX_HELP


@click.command("export-gguf", cls=ConsoleCommand)
@click.argument("merged", metavar="MERGED", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The .gguf file to write (atomically: nothing appears there until it is complete).")
@click.option("--gguf-type", default="f16", show_default=True, metavar="TYPE", help=GGUF_TYPE_HELP)
@click.option("--imatrix", "imatrix", type=click.Path(dir_okay=False), default=None, metavar="FILE", help=IMATRIX_HELP)
@click.option("--name", default=None, help="general.name in the GGUF. [default: the output file's stem]")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
def export_gguf_command(merged: str, out: str, gguf_type: str, imatrix: str | None, name: str | None,
                        modelfile: bool, overwrite: bool, quiet: bool) -> None:
    """Export a merged MERGED folder (Llama, Mistral, Qwen2, Qwen3) to GGUF for llama.cpp, Ollama, LM Studio.

    \b
    Examples:
      d2merge export-gguf ./merged -o model.gguf                   # f16
      d2merge export-gguf ./merged -o model-q8.gguf --gguf-type q8_0 --modelfile
      d2merge export-gguf ./merged -o model-q4km.gguf --gguf-type q4_k_m     # llama.cpp's quantizer
    """
    from d2merge.export.gguf.file_types import check_gguf_type
    from d2merge.export.gguf.folder import export_gguf

    result = export_gguf(merged, out, gguf_type=check_gguf_type(gguf_type), overwrite=overwrite, name=name,
                         modelfile=modelfile, progress=not quiet, imatrix=imatrix)
    click.echo(result.describe())
