"""The settings of ``d2merge bench``: one frozen model, the source of its flags, defaults and help.

Torch-free, like every option model: the command line builds its flags and refuses a bad value
(``warmup=-1``) before the benchmark loads a model. The grid's defaults here are also
``d2merge.bench.BenchSettings``' (it reads them from this model), so they are declared once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from d2merge.options.base import OptionModel, option
from d2merge.options.onnx import GENAI_PRECISIONS

# The runtimes bench measures: the four core ones, then those of optional extras (llama_cpp: a GGUF in
# llama.cpp, extra gguf-llama; genai: an onnxruntime-genai build, extra genai).
CORE_VARIANTS = ("base", "unmerged", "merged", "onnx")
EXTRA_VARIANTS = ("llama_cpp", "genai")
ALL_VARIANTS = CORE_VARIANTS + EXTRA_VARIANTS
# Inputs measured as given instead of made in a temp folder: paths the CLI checks exist (by hand, with
# click's path types), so they are not among the flags generated from this model.
INPUT_PATHS = ("merged", "onnx", "gguf", "genai")


@dataclass(frozen=True)
class BenchOptions(OptionModel):
    """What bench measures and how: the variants, their inputs and the grid of each run."""

    what: ClassVar[str] = "bench option"

    merged: str | None = option(None, metavar="DIRECTORY",
                                help="A merged folder to measure (default: merge into a temp folder, fp32).")
    onnx: str | None = option(None, metavar="FILE",
                              help="An ONNX graph without past (default: export the merged model to a temp folder).")
    variants: str | None = option(None, help=f"Which of {', '.join(ALL_VARIANTS)} to measure.",
                                  default_help=f"{','.join(CORE_VARIANTS)}, plus llama_cpp when llama-cpp-python "
                                               "is installed")
    gguf: str | None = option(None, metavar="FILE",
                              help="A GGUF for the llama_cpp variant (default: export the merged model, see "
                                   "--gguf-type).")
    gguf_type: str = option("f16", help="Type of that temp GGUF export.")
    genai: str | None = option(None, metavar="DIRECTORY",
                               help="An onnxruntime-genai folder for the genai variant (default: build one, see "
                                    "--genai-precision).")
    genai_precision: str = option("int4", choices=GENAI_PRECISIONS, help="Precision of that temp genai build.")
    batch_sizes: str = option("1,8", help="Prefill batch sizes.")
    seq_lens: str = option("32,128", help="Prefill sequence lengths.")
    decode_tokens: int = option(16, min=0, help="Decode steps (batch 1, KV cache) measured per run; 0 skips decode.")
    decode_prompt_len: int = option(32, min=1, help="Prompt tokens prefilled before the measured decode steps.")
    warmup: int = option(2, min=0, help="Untimed runs per cell.")
    repeats: int = option(5, min=1, help="Timed runs per cell.")
