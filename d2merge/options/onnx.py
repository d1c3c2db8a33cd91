"""The options of ``d2merge export-onnx``: the generic graph (torch.onnx) and the onnxruntime-genai build.

Which settings go with which runtime is field metadata: ``dtype``, ``with_past``, ``opset``,
``exporter`` and ``external_data`` only with ``runtime='generic'``; ``precision`` only with
``runtime='genai'``; the ``int4_*`` settings only with ``precision='int4'`` on that runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from d2merge.options.base import OptionModel, option, when

ONNX_DTYPES = ("fp32", "fp16")  # ONNX Runtime's CPU provider has no bf16 kernels
EXPORTERS = ("dynamo", "legacy")
RUNTIMES = ("generic", "genai")
# d2merge.export.onnx_genai builds these (tests/unit/options/test_options.py keeps the lists equal).
GENAI_PRECISIONS = ("fp32", "fp16", "int4")
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
INT4_ALGORITHMS = ("default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed")
# 18 is the opset torch's dynamo exporter implements natively: asked for less, it silently keeps
# 18 (torch 2.13), so a lower opset with dynamo is refused before any work. 23 is not a safe
# default: it emits the fused RotaryEmbedding op, which ONNX Runtime 1.32 rejects for batch > 1
# when position ids are shared across the batch (transformers' default).
DEFAULT_OPSET = 18
DYNAMO_MIN_OPSET = 18

_GENERIC = when("runtime", "generic")
_GENERIC_HINT = "with {runtime=genai} choose {precision=fp32|fp16|int4}"
_INT4 = (when("runtime", "genai"), when("precision", "int4"))


@dataclass(frozen=True)
class OnnxExportOptions(OptionModel):
    """The settings of ``d2merge export-onnx``; its flags' names, defaults and help."""

    what: ClassVar[str] = "ONNX export option"

    # dtype has no `choices`: bf16 gets its own one-line reason in validate().
    dtype: str = option("fp32", metavar="|".join(ONNX_DTYPES), applies_with=_GENERIC, context_hint=_GENERIC_HINT,
                        help="Precision of the graph. fp32 matches PyTorch to ~1e-7; fp16 halves the file. bf16 is "
                             "refused: ONNX Runtime's CPU provider has no bf16 kernels.")
    with_past: bool = option(False, applies_with=_GENERIC, context_hint=_GENERIC_HINT,
                             help="Also take and return the key/value cache (past_key_values.{i}.key/value in, "
                                  "present.{i}.key/value out) for token-by-token generation; attention_mask then "
                                  "covers past + new tokens.")
    opset: int = option(DEFAULT_OPSET, min=1, applies_with=_GENERIC, context_hint=_GENERIC_HINT,
                        help=f"ONNX opset. The dynamo exporter writes {DYNAMO_MIN_OPSET} and newer (a lower one is "
                             "refused up front); an opset that does not take is an error, never a silent change.")
    exporter: str = option("dynamo", choices=EXPORTERS, applies_with=_GENERIC, context_hint=_GENERIC_HINT,
                           help="dynamo: torch.export-based, PyTorch's supported path. legacy: TorchScript tracing, "
                                f"much faster and able to write opsets below {DYNAMO_MIN_OPSET}, deprecated by PyTorch.")
    external_data: bool | None = option(None, applies_with=_GENERIC, context_hint=_GENERIC_HINT,
                                        help="Store the weights in a <graph>.onnx.data file next to the graph.",
                                        default_help="only when they exceed protobuf's 2 GB limit")
    validate_output: bool = option(True, flag="--no-validate",
                                   help="Skip the ONNX Runtime vs PyTorch comparison (faster; the file is then "
                                        "unproven).")
    overwrite: bool = option(False, help="Replace an existing graph (and its .data file), or with --runtime genai an "
                                         "output folder d2merge wrote, only once the new one is validated.")
    atol: float | None = option(None, min=0,
                                help="Bound on the max |logit difference| at real tokens.",
                                default_help="fp32 1e-4 of the largest logit, at least 1e-4; fp16 1% of the largest "
                                             "logit, at least 1e-3")
    runtime: str = option("generic", choices=RUNTIMES,
                          help="generic: torch.onnx graph for any ONNX Runtime loop. genai: onnxruntime-genai's model "
                               "builder (optimised decoder + genai_config.json, CPU), needs the 'genai' extra; OUT is "
                               "a folder.")
    precision: str = option("fp32", choices=GENAI_PRECISIONS, applies_with=when("runtime", "genai"),
                            context_hint="the generic export takes {dtype=fp32|fp16}",
                            help="With --runtime genai: fp32 (checked token for token against transformers), fp16, "
                                 "or int4 weights (top-1 agreement and logit diff vs fp32 reported and gated).")
    int4_block_size: int | None = option(None, choices=INT4_BLOCK_SIZES, applies_with=_INT4,
                                         help="With --precision int4: values per quantization block.",
                                         default_help="32")
    int4_accuracy_level: int | None = option(None, min=1, max=4, applies_with=_INT4,
                                             help="With --precision int4: activations in the int4 MatMul (4 int8, "
                                                  "3 bf16, 2 fp16, 1 fp32).", default_help="4")
    int4_algorithm: str | None = option(None, choices=INT4_ALGORITHMS, applies_with=_INT4,
                                        help="With --precision int4: the builder's algo_config (k_quant: per-block "
                                             "scale search; _last: lm_head at int8; _mixed: also llama.cpp's sensitive "
                                             "layers at int8).",
                                        default_help="k_quant_mixed, the lowest KL on SmolLM2; docs/onnx-genai.md")
    int4_asymmetric: bool = option(False, applies_with=_INT4,
                                   help="With --precision int4: uint4 with a zero point per block.")

    def validate(self) -> None:
        if self.dtype in ("bf16", "bfloat16"):
            raise self.error("bf16 ONNX graphs cannot be validated or run: ONNX Runtime's CPU provider has no "
                             "bfloat16 kernels", hint="use {dtype=fp32}, exact, or {dtype=fp16}, half the size")
        if self.dtype not in ONNX_DTYPES:
            raise self.error("unknown {dtype=}", hint=f"choose one of {', '.join(ONNX_DTYPES)}")
        if self.exporter == "dynamo" and self.opset < DYNAMO_MIN_OPSET:
            raise self.error(f"the dynamo exporter cannot write ONNX opset {self.opset}: it writes {DYNAMO_MIN_OPSET} "
                             f"and newer (asked for less, it keeps {DYNAMO_MIN_OPSET})",
                             hint=f"use {{opset={DYNAMO_MIN_OPSET}}}, or {{exporter=legacy}} for opset {self.opset}")

    @property
    def int4_given(self) -> bool:
        return any(v not in (None, False) for v in (self.int4_block_size, self.int4_accuracy_level,
                                                    self.int4_algorithm, self.int4_asymmetric))
