"""The options of ``d2merge merge``: the merge itself (:class:`MergeOptions`) and what the command does
around it (:class:`MergeRunOptions`: the output format and its settings, a dry run, verify, push).

``MergeOptions`` is what the plan, the engine and every writer take; ``MergeRunOptions`` holds the
rules that refuse a setting out of context (``gguf_type`` only with ``format='gguf'``, the push
settings only with ``push_to``), so ``merge_as``, ``merge_verify_push`` and the CLI share them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from d2merge.dtypes import FLOAT_DTYPES
from d2merge.options.base import OptionModel, option, option_like, when
from d2merge.options.onnx import GENAI_PRECISIONS, OnnxExportOptions

# "auto" keeps each base tensor's dtype; the others are d2merge.dtypes' rows.
OUT_DTYPE_NAMES: tuple[str, ...] = ("auto", *FLOAT_DTYPES)
TIED_POLICIES = ("untie", "tie", "error")
DEVICES = ("cpu", "cuda")
# The formats `merge --format` writes (d2merge.export.formats writes them; a test keeps the two equal).
OUTPUT_FORMATS = ("hf", "safetensors", "onnx", "onnx-genai", "gguf")
# A Hub repo id as the Hub accepts it: ORG/NAME, letters, digits, "-", "_", "." (no "--" or ".." runs).
HUB_REPO_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")

GGUF_TYPE_HELP = ("f32, f16, bf16, q8_0, q4_0_pure, q4_1_pure, q5_0_pure, q5_1_pure (gguf-py); with the gguf-llama "
                  "extra, llama.cpp's own quantizer: q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, "
                  "iq4_nl, iq4_xs, q4_0, q4_1, q5_0, q5_1 (llama.cpp's per-tensor mix; an f32 temp beside the output). "
                  "Norms stay f32.")
IMATRIX_HELP = ("llama.cpp's importance matrix (llama-imatrix's GGUF or legacy .dat) for the types llama.cpp's "
                "quantizer writes; checked against the model.")


@dataclass(frozen=True)
class MergeOptions(OptionModel):
    """Every merge setting in one place; the CLI's flags and help are derived from these fields."""

    what: ClassVar[str] = "merge option"

    dtype: str = option("auto", choices=OUT_DTYPE_NAMES,
                        help="Output dtype of floating tensors: auto keeps each base tensor's dtype.")
    max_shard_size: str = option("5GB", help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
    tied_embeddings: str = option("untie", choices=TIED_POLICIES,
                                  help="When the adapter changes a tied embedding/lm_head: untie (exact, writes both), "
                                       "tie (the change applies to both), error (refuse).")
    device: str = option("cpu", choices=DEVICES,
                         help="Where the fp32 math runs (cpu or cuda); files are always read and written on the CPU.")
    overwrite: bool = option(False, help="Replace an existing output folder (only once the new one is complete).")
    allow_pickle: bool = option(False, help="Allow .bin (pickle) weights; loaded with weights_only=True. Only for "
                                            "files you trust.")
    hash_sources: bool = option(True, help="Record the sha256 of the base and adapter files in the model card (hashed "
                                           "from the bytes the merge reads, in a background thread; a Hub-cache file's "
                                           "name is its sha256).")
    base_model_id: str | None = option(None, metavar="ORG/NAME",
                                       help="The base's Hub id for the model card's base_model, which puts the merge "
                                            "in the base's model tree on the Hub.",
                                       default_help="the Hub id when BASE comes from the Hub cache; a local folder "
                                                    "has none")

    def validate(self) -> None:
        if self.base_model_id is not None and not HUB_REPO_ID.fullmatch(self.base_model_id):
            raise self.error("{base_model_id=} is not a Hub model id",
                             hint="give it as ORG/NAME, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")


_GENAI_INT4 = (when("format", "onnx-genai"), when("genai_precision", "int4"))


@dataclass(frozen=True)
class MergeRunOptions(OptionModel):
    """What ``d2merge merge`` does around the merge: the format and its settings, a dry run, verify, push.

    Each format's settings say which format they apply to; verify and the push work on a Hugging
    Face folder. A setting given where it does nothing is refused here, before any work.
    """

    what: ClassVar[str] = "merge run option"

    format: str | None = option(None, choices=OUTPUT_FORMATS,
                                help="hf: Hugging Face folder; safetensors: one file with provenance metadata; "
                                     "onnx: exported and validated with ONNX Runtime (fp32, or fp16 with --dtype fp16); "
                                     "onnx-genai: onnxruntime-genai build, validated with its Generator (see "
                                     "--precision); gguf: one .gguf file for llama.cpp, Ollama, LM Studio (see "
                                     "--gguf-type).",
                                default_help="from OUT's suffix (.gguf, .safetensors, .onnx), else hf")
    genai_precision: str = option("fp32", flag="--precision", choices=GENAI_PRECISIONS,
                                  applies_with=when("format", "onnx-genai"),
                                  context_hint="use {dtype} for the other formats",
                                  help="With --format onnx-genai: precision of the onnxruntime-genai build.")
    # the genai builder's int4 settings: export-onnx's own fields, here with merge's condition
    int4_block_size: int | None = option_like(OnnxExportOptions, "int4_block_size", applies_with=_GENAI_INT4)
    int4_accuracy_level: int | None = option_like(OnnxExportOptions, "int4_accuracy_level", applies_with=_GENAI_INT4)
    int4_algorithm: str | None = option_like(OnnxExportOptions, "int4_algorithm", applies_with=_GENAI_INT4)
    int4_asymmetric: bool = option_like(OnnxExportOptions, "int4_asymmetric", applies_with=_GENAI_INT4)
    gguf_type: str = option("f16", metavar="TYPE", applies_with=when("format", "gguf"),
                            help="With --format gguf: " + GGUF_TYPE_HELP)
    gguf_imatrix: str | None = option(None, flag="--imatrix", metavar="FILE", applies_with=when("format", "gguf"),
                                      help="With --format gguf: " + IMATRIX_HELP)
    gguf_modelfile: bool = option(False, flag="--modelfile", applies_with=when("format", "gguf"),
                                  help="With --format gguf: also write an Ollama Modelfile beside it, named "
                                       "<stem>.Modelfile.")
    verify: bool = option(False, applies_with=when("format", "hf"),
                          context_hint="verify any output with `d2merge verify BASE ADAPTER OUT`",
                          help="After merging, run `d2merge verify` (default thresholds) and put its table in the "
                               "model card; exit 1 if a threshold is exceeded.")
    push_to: str | None = option(None, metavar="REPO_ID", applies_with=when("format", "hf"),
                                 help="After a successful merge, push the folder to the Hub as REPO_ID (see "
                                      "`d2merge push`).")
    require_verify: bool = option(False, applies_with=when("push_to"), context_hint="or use {verify}",
                                  help="With --push-to: verify first and push only if verification passes.")
    dry_run: bool = option(False, help="Print the plan (every changed tensor, rank, scale, shard) and write nothing.")
    as_json: bool = option(False, flag="--json", applies_with=when("dry_run"),
                           help="With --dry-run: print the plan as JSON.")

    @property
    def int4_given(self) -> bool:
        """Any of the --int4-* settings given (the builder's defaults are taken for the others)."""
        return any(v not in (None, False) for v in (self.int4_block_size, self.int4_accuracy_level,
                                                    self.int4_algorithm, self.int4_asymmetric))
