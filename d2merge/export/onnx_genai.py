"""Build an onnxruntime-genai model folder from a merged model, and prove it generates what PyTorch generates.

onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``) writes an optimised decoder
graph (fused GroupQueryAttention with a KV cache, int4 MatMulNBits weights on CPU) plus
``genai_config.json``; its ``Generator`` runs the generation loop. This module calls the builder on a
merged Hugging Face folder into a hidden temp folder (``d2merge.io.output.AtomicFolder``), checks the
result with ``og.Model`` / ``og.Generator`` against the merged model in transformers, and only then
renames it into place. The package is an optional extra (``pip install 'd2merge[genai]'``), imported
only when a genai build or check is asked for.

Checks (docs/onnx-genai.md has the measured figures):

- **logits**: seeded random probes; the first tokens go in as one chunk (prefill), the rest one at a
  time with the cache fed back (decode), and the Generator's logits at each of those positions are
  compared with transformers' fp32 logits over the whole sequence. fp32 and fp16 use the generic
  ONNX check's tolerances (``d2merge.export.onnx.default_tolerance``).
- **greedy generation** (fp32): the Generator with ``do_sample=False`` must emit the same tokens as
  ``generate(do_sample=False)``. A divergence is accepted only at a step where transformers' two best
  logits are within the logit tolerance of each other (a tie that rounding may break either way);
  nothing after it is compared.
- **int4**: weights are rounded to 4 bits, so tokens are not expected to match; top-1 agreement
  and the largest logit difference against fp32 are reported and gated by measured floors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2merge.errors import D2MergeError, escaped, option_error
from d2merge.logit_comparison import LogitComparison

PRECISIONS = ("fp32", "fp16", "int4")
GENAI_CONFIG = "genai_config.json"
# int4 gates: sanity floors, not a quality promise. Measured on correct builds with the builder's
# default int4 (RTN, block 32) on seeded random-token probes (docs/onnx-genai.md): top-1 agreement
# with fp32 71-76% on tiny random Llama/Qwen2, 33% on SmolLM2-135M; largest |logit diff| 13-15% of
# the largest logit on the tiny models, 42% (13.2 of 31.4) on SmolLM2-135M. A build with wrong
# weights agrees on ~1/vocab of the positions and differs by more than the logits' own size.
INT4_MIN_TOP1 = 0.2
INT4_MAX_REL_DIFF = 0.75
# verify's int4 gates on real text (the built-in sentences): measured with the builder's default
# int4 on SmolLM2-135M + a D2-LoRA merge, mean KL(fp32 || int4) 0.617, top-1 49.1%, perplexity
# ratio 1.373 (benchmarks/onnx_genai_int4.py); about 3x the KL and the ratio's excess.
INT4_MAX_KL = 2.0
INT4_MAX_PPL_RATIO = 2.2
INT4_ALGORITHMS = ("default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed")
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Int4Options:
    """The model builder's int4 (MatMulNBits) settings d2merge exposes (its ``--extra_options``).

    ``algorithm``: the builder's ``algo_config``: ``default``/``rtn`` round to nearest per block;
    ``k_quant`` searches each block's scale (llama.cpp's K-quant search); ``*_last`` keeps the last
    MatMul (lm_head) at int8; ``k_quant_mixed`` also keeps llama.cpp's sensitive layers (first and last
    eighth, every third qkv/v/down) at int8. ``accuracy_level``: the activations' type in the int4
    MatMul on CPU (4 int8, 3 bf16, 2 fp16, 1 fp32). ``symmetric``: int4 (True) or uint4 with a zero
    point per block. Defaults chosen by mean KL(fp32 || int4) on SmolLM2-135M's real text
    (benchmarks/onnx_genai_int4.py, docs/onnx-genai.md): k_quant_mixed 0.256 against the builder's
    default RTN 0.617 (top-1 71.8% vs 49.1%, perplexity ratio 1.135 vs 1.373) for 117 vs 90 MB;
    block 32 (64: 0.777).
    """

    block_size: int = 32
    accuracy_level: int = 4
    algorithm: str = "k_quant_mixed"
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in INT4_BLOCK_SIZES:
            raise D2MergeError(f"int4 block size {self.block_size} is not one the builder takes",
                               hint=f"choose one of {', '.join(map(str, INT4_BLOCK_SIZES))}")
        if self.accuracy_level not in (1, 2, 3, 4):
            raise D2MergeError(f"int4 accuracy level {self.accuracy_level} is not 1, 2, 3 or 4",
                               hint="4: int8 activations (the CPU default), 1: fp32")
        if self.algorithm not in INT4_ALGORITHMS:
            raise D2MergeError(f"unknown int4 algorithm {self.algorithm!r}", hint=f"choose one of {', '.join(INT4_ALGORITHMS)}")

    def extra_options(self) -> list[str]:
        return [f"block_size={self.block_size}", f"accuracy_level={self.accuracy_level}",
                f"algo_config={self.algorithm}", f"is_symmetric={str(self.symmetric).lower()}"]


_PROBES = 3
_PROBE_PREFILL = 6
_PROBE_DECODE = 6
_GREEDY_PROMPT_LENGTHS = (5, 8, 11)
_GREEDY_NEW_TOKENS = 12
_NOISY_LOGGERS = ("onnxruntime.quantization", "onnxruntime", "onnx_ir", "transformers", "neural_compressor")


@dataclass(frozen=True)
class GenaiValidation:
    """og.Generator against the merged model in transformers (fp32), on seeded probes."""

    precision: str
    positions: int  # logit positions compared (prefill and decode steps)
    max_abs_diff: float
    reference_max_abs: float  # the largest |logit| of the reference: what relative figures are relative to
    tolerance: float | None  # logit bound (fp32/fp16); None for int4, gated by top-1 and relative diff
    top1_agreement: float
    greedy_prompts: int
    greedy_tokens_compared: int
    greedy_tokens_equal: int
    greedy_ties: int  # prompts whose generations diverged at a near tie (accepted, see module docs)
    failures: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        bound = (f"tolerance {self.tolerance:.3g}" if self.tolerance is not None
                 else f"relative {self.max_abs_diff / max(self.reference_max_abs, 1e-30):.3g} of the largest logit")
        line = (f"validation (onnxruntime-genai Generator vs transformers fp32): max abs diff {self.max_abs_diff:.3g} "
                f"({bound}), top-1 agreement {100 * self.top1_agreement:.1f}% over {self.positions} positions; "
                f"greedy: {self.greedy_tokens_equal}/{self.greedy_tokens_compared} tokens equal on "
                f"{self.greedy_prompts} prompts")
        if self.greedy_ties:
            line += f" ({self.greedy_ties} diverged at a near tie)"
        return line + (": passed" if self.passed else ": FAILED: " + "; ".join(self.failures))


@dataclass(frozen=True)
class GenaiExportResult:
    output: Path
    precision: str
    files: tuple[str, ...]
    build_seconds: float
    validation: GenaiValidation | None

    def describe(self) -> str:
        lines = [f"built {self.output} with onnxruntime-genai's model builder in {self.build_seconds:.1f}s "
                 f"({self.precision}, CPU): {', '.join(self.files)}"]
        lines.append(self.validation.describe() if self.validation is not None
                     else "validation skipped (--no-validate): the build is unproven")
        return "\n".join(lines)


def import_genai() -> Any:
    """The onnxruntime_genai package, or one line saying how to get it."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise D2MergeError(f"onnxruntime-genai is not installed ({exc.msg})",
                           hint="pip install 'd2merge[genai]' (onnxruntime-genai 0.18+, onnxruntime 1.31+)") from None
    return onnxruntime_genai


def _import_builder() -> Any:
    import_genai()
    try:
        from onnxruntime_genai.models import builder
    except ImportError as exc:
        raise D2MergeError(f"onnxruntime-genai's model builder cannot be imported ({exc})",
                           hint="pip install 'd2merge[genai]' (onnxruntime-genai 0.18+)") from None
    return builder


def check_merged_folder(model_dir: Path) -> dict[str, Any]:
    """What the builder needs from a merged folder: config.json with an architecture, weights, a tokenizer."""
    from d2merge.io.checkpoint import read_json

    if not model_dir.is_dir():
        raise D2MergeError("not a folder", path=model_dir, hint="pass a merged model folder (d2merge merge writes one)")
    if not (model_dir / "config.json").is_file():
        raise D2MergeError("not a Hugging Face model folder (config.json missing)", path=model_dir,
                           hint="pass a merged model folder (d2merge merge writes one)")
    config = read_json(model_dir / "config.json", "config.json")
    from d2merge.io.transformers_folder import refuse_custom_code

    refuse_custom_code(model_dir)  # the builder hands the folder to transformers
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not (isinstance(architectures, list) and architectures and isinstance(architectures[0], str)):
        raise D2MergeError("config.json names no architecture", path=model_dir / "config.json",
                           hint="a merged folder keeps the base's config.json, which has 'architectures'")
    if not any(model_dir.glob("*.safetensors")):
        raise D2MergeError("no .safetensors weights in the folder", path=model_dir,
                           hint="pass a merged model folder (d2merge merge writes one)")
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise D2MergeError("the folder has no tokenizer, which onnxruntime-genai's builder needs", path=model_dir,
                           hint="merge from a base folder that has its tokenizer files")
    return config


@contextlib.contextmanager
def _quiet() -> Any:
    """The builder prints every step and tensor to stdout and stderr; keep it for errors only."""
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    log = io.StringIO()
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield log
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def build_genai(model_dir: Path, out_dir: Path, precision: str, cache_dir: Path, int4: Int4Options | None = None
                ) -> None:
    """Run the model builder (CPU execution provider) from ``model_dir`` into ``out_dir``."""
    builder = _import_builder()
    architecture = check_merged_folder(model_dir)["architectures"][0]
    # hf_token=false: a local folder needs no Hub token; trust_remote_code stays off (the default).
    options = ["hf_token=false"]
    if precision == "int4":
        options += (int4 or Int4Options()).extra_options()
    try:
        with _quiet():
            extra = builder.parse_extra_options(None, str(model_dir), str(out_dir), precision, "cpu", str(cache_dir),
                                                options)
            builder.create_model(None, str(model_dir), str(out_dir), precision, "cpu", str(cache_dir), **extra)
    except NotImplementedError:
        raise D2MergeError(f"onnxruntime-genai's model builder does not support architecture {architecture}",
                           path=model_dir / "config.json",
                           hint="use the generic export (d2merge export-onnx without --runtime genai)") from None
    except Exception as exc:  # the builder raises bare Exceptions, ValueErrors, KeyErrors ...
        raise D2MergeError(f"onnxruntime-genai's model builder failed: {type(exc).__name__}: {_first_line(exc)}",
                           path=model_dir, hint="rerun with --debug for the traceback") from exc


def validation_hint(precision: str) -> str:
    """The options that change a failed validation's outcome, for this precision: an :class:`OptionError`
    hint, its ``{validate=}`` given as False (``--no-validate`` on the command line)."""
    if precision == "int4":
        return ("int4's gate is top-1 agreement with fp32 on seeded random-token probes: {precision=fp16} keeps "
                "the logits close, or {validate=} writes the build unproven; then measure it on your prompts with "
                "`d2merge verify BASE ADAPTER OUT --prompts FILE`")
    return f"{{atol}} sets the {precision} logit bound explicitly; {{validate=}} writes the build unproven"


def export_genai(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, precision: str = "fp32",
                 validate: bool = True, atol: float | None = None,
                 greedy_prompts: Sequence[Sequence[int]] | None = None, overwrite: bool = False,
                 int4: Int4Options | None = None) -> GenaiExportResult:
    """Build an onnxruntime-genai folder at ``out_dir`` from a merged folder, validated before it appears.

    Raises D2MergeError (and leaves nothing at ``out_dir``) when the extra is missing, the folder is
    not a merged model, the builder refuses the architecture, or validation fails. ``overwrite``
    follows merge's rule: an existing output is replaced only if d2merge wrote it (or it is empty),
    and only once the new build has passed validation. ``int4``: the builder's int4 settings
    (precision int4 only).
    """
    from d2merge.io.output import AtomicFolder, check_output_location

    if precision not in PRECISIONS:
        raise D2MergeError(f"unknown genai precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    if precision == "int4" and atol is not None:  # before any work: it would change nothing
        raise option_error("{atol} bounds the fp32/fp16 logit difference; an int4 build is gated by its top-1 "
                           "agreement with fp32, which {atol} does not change", hint=validation_hint("int4"),
                           validate=False)
    if int4 is not None and precision != "int4":
        raise option_error(f"int4 settings apply to precision int4, not {precision}", hint="add {precision=int4}")
    model_dir = Path(model_dir)
    import_genai()
    check_merged_folder(model_dir)
    final = check_output_location(Path(out_dir), [model_dir], overwrite=overwrite)
    if final.suffix == ".onnx":
        raise D2MergeError("a genai build is a folder (model.onnx, its data and genai_config.json), not one file",
                           path=final, hint="pass a folder name to -o")
    with AtomicFolder(final, overwrite=overwrite) as staging:
        started = time.perf_counter()
        from d2merge.console import still_working

        with still_working(f"onnxruntime-genai build ({precision})"):
            build_genai(model_dir, staging.temp, precision, staging.temp / ".builder-cache", int4)
        with contextlib.suppress(OSError):
            import shutil

            shutil.rmtree(staging.temp / ".builder-cache")
        build_seconds = time.perf_counter() - started
        validation = None
        if validate:
            with still_working(f"validating the genai build ({precision}) against transformers"):
                validation = validate_genai(staging.temp, model_dir, precision=precision, atol=atol,
                                            greedy_prompts=greedy_prompts)
            if not validation.passed:
                raise option_error(f"onnxruntime-genai build ({precision}) fails validation: "
                                   + escaped("; ".join(validation.failures)), path=final,
                                   hint=validation_hint(precision), validate=False)
        files = tuple(sorted(p.name for p in staging.temp.iterdir()))
        staging.commit()
    return GenaiExportResult(output=final, precision=precision, files=files, build_seconds=build_seconds,
                             validation=validation)


class GenaiCausalLM:
    """An onnxruntime-genai folder behind a transformers-like ``model(input_ids, attention_mask).logits``.

    For ``verify``: each row's real tokens (attention_mask == 1, one contiguous run) go through a fresh
    Generator one token at a time, so every position gets its logits from the cache path that
    generation uses; padded positions are left at zero (verify compares real tokens only).
    """

    def __init__(self, folder: str | os.PathLike):
        og = import_genai()
        self.folder = Path(folder)
        if not (self.folder / GENAI_CONFIG).is_file():
            raise D2MergeError(f"not an onnxruntime-genai folder ({GENAI_CONFIG} missing)", path=self.folder)
        self._og = og
        try:
            self.model = og.Model(str(self.folder))
        except Exception as exc:
            raise D2MergeError(f"onnxruntime-genai cannot load this folder: {_first_line(exc)}",
                               path=self.folder) from exc
        from d2merge.io.checkpoint import read_json

        self.genai_config = read_json(self.folder / GENAI_CONFIG, GENAI_CONFIG)
        self.vocab_size = int(self.genai_config["model"]["vocab_size"])

    def eval(self) -> "GenaiCausalLM":
        return self

    def parameters(self) -> Iterator[torch.Tensor]:
        """One empty CPU tensor: callers written for torch models ask it for the device (CPU here)."""
        yield torch.zeros(0)

    def generator(self, max_length: int) -> Any:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False, min_length=0, repetition_penalty=1.0)
        return self._og.Generator(self.model, params)

    def step_logits(self, tokens: Sequence[int], prefill: int = 1) -> np.ndarray:
        """fp32 logits at positions prefill-1 .. len-1: one chunk of ``prefill`` tokens, then one at a time."""
        generator = self.generator(len(tokens) + 1)
        rows = []
        try:
            generator.append_tokens(np.asarray([tokens[:prefill]], dtype=np.int32))
            rows.append(np.asarray(generator.get_logits(), dtype=np.float32)[0, -1])
            for token in tokens[prefill:]:
                generator.append_tokens(np.asarray([[token]], dtype=np.int32))
                rows.append(np.asarray(generator.get_logits(), dtype=np.float32)[0, -1])
        except RuntimeError as exc:
            raise _runtime_error(exc, self.folder) from exc
        return np.stack(rows)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        generator = self.generator(len(prompt) + max_new_tokens)
        try:
            generator.append_tokens(np.asarray([prompt], dtype=np.int32))
            for _ in range(max_new_tokens):
                if generator.is_done():
                    break
                generator.generate_next_token()
        except RuntimeError as exc:
            raise _runtime_error(exc, self.folder) from exc
        return [int(t) for t in generator.get_sequence(0)]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        from types import SimpleNamespace

        ids = torch.as_tensor(input_ids)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        logits = torch.zeros(*ids.shape, self.vocab_size)
        for row in range(ids.shape[0]):
            real = torch.nonzero(mask[row]).flatten()
            if real.numel() == 0:
                continue
            start, stop = int(real[0]), int(real[-1]) + 1
            if real.numel() != stop - start:
                raise D2MergeError("attention_mask rows must be one run of real tokens (left or right padding)",
                                   path=self.folder)
            logits[row, start:stop] = torch.from_numpy(self.step_logits(ids[row, start:stop].tolist()))
        return SimpleNamespace(logits=logits)


def build_precision(folder: Path) -> str:
    """fp32, fp16 or int4, read from the built graph (genai_config.json does not say)."""
    import onnx

    path = folder / "model.onnx"
    if not path.is_file():
        raise D2MergeError("the onnxruntime-genai folder has no model.onnx", path=folder)
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends
        raise D2MergeError(f"unreadable model.onnx: {_first_line(exc)}", path=path) from None
    if any(node.op_type == "MatMulNBits" for node in graph.node):
        return "int4"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    return "fp32"


@dataclass(frozen=True)
class GenaiForVerify:
    """What ``d2merge verify`` needs to judge an onnxruntime-genai folder given as MERGED.

    Logits only: the graph's weights are fused and (int4) re-blocked, so there is nothing to
    compare tensor by tensor; the gates are those the export itself applies.
    """

    path: Path  # the folder
    precision: str

    @property
    def label(self) -> str:
        return f"genai-{self.precision}"

    def load_model(self) -> GenaiCausalLM:
        return GenaiCausalLM(self.path)

    def weights(self, model: Any) -> None:
        return None

    @property
    def floor_dtype(self) -> str | None:
        """The dtype whose rounding floor verify judges this build by (fp32: fp32 arithmetic's); None for int4."""
        return None if self.precision == "int4" else self.precision

    def thresholds(self, reference_max_abs: float) -> Any:
        """verify's limits (``reference_max_abs``: the largest |logit| of the unmerged model)."""
        from d2merge.options.verify import DEFAULT_THRESHOLDS, Thresholds

        if self.precision != "int4":
            return DEFAULT_THRESHOLDS[self.precision]
        fp16 = DEFAULT_THRESHOLDS["fp16"]  # no rounding floor for int4 blocks: the export's own gates
        return Thresholds(floor_multiple=fp16.floor_multiple, alpha=fp16.alpha, max_ulp=fp16.max_ulp,
                          max_abs_diff=INT4_MAX_REL_DIFF * reference_max_abs, min_top1=INT4_MIN_TOP1,
                          max_kl=INT4_MAX_KL, max_ppl_ratio=INT4_MAX_PPL_RATIO)


def genai_for_verify(folder: str | os.PathLike) -> GenaiForVerify:
    folder = Path(folder)
    import_genai()
    return GenaiForVerify(folder, build_precision(folder))


def validate_genai(folder: str | os.PathLike, model_dir: str | os.PathLike, *, precision: str,
                   atol: float | None = None, greedy_prompts: Sequence[Sequence[int]] | None = None,
                   seed: int = 0) -> GenaiValidation:
    """Compare a genai build with the merged model in transformers (fp32); see the module docs."""
    from transformers import GenerationConfig

    from d2merge.export.onnx import default_tolerance
    from d2merge.runtime.loading import load_base_model

    folder = Path(folder)
    genai = GenaiCausalLM(folder)
    reference = load_base_model(Path(model_dir), dtype=torch.float32).eval()
    vocab = int(reference.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    total = _PROBE_PREFILL + _PROBE_DECODE

    logits = LogitComparison()  # verify's comparator: a NaN fails instead of being skipped
    for _ in range(_PROBES):
        tokens = torch.randint(0, vocab, (total,), generator=generator).tolist()
        with torch.no_grad():
            expected = reference(torch.tensor([tokens])).logits[0, _PROBE_PREFILL - 1:].double()
        actual = genai.step_logits(tokens, prefill=_PROBE_PREFILL).astype(np.float64)
        logits.add(expected, torch.from_numpy(actual))
    max_diff, ref_max, positions, top1 = logits.max_abs, logits.reference_max_abs, logits.positions, logits.top1_agreement
    failures: list[str] = []
    tolerance = None
    if precision in ("fp32", "fp16"):
        tolerance = atol if atol is not None else default_tolerance(precision, ref_max)
        if not max_diff <= tolerance:
            failures.append(f"logits differ from transformers by {max_diff:.3g}, above the {precision} tolerance "
                            f"{tolerance:.3g}")
    else:
        if not top1 >= INT4_MIN_TOP1:
            failures.append(f"top-1 agreement with fp32 is {100 * top1:.1f}%, below {100 * INT4_MIN_TOP1:.0f}%")
        if not max_diff <= INT4_MAX_REL_DIFF * ref_max:
            failures.append(f"logits differ from fp32 by {max_diff:.3g}, above {INT4_MAX_REL_DIFF:g} x the largest "
                            f"logit {ref_max:.3g}")

    prompts = list(greedy_prompts) if greedy_prompts is not None else [
        torch.randint(0, vocab, (length,), generator=generator).tolist() for length in _GREEDY_PROMPT_LENGTHS]
    eos = reference.generation_config.eos_token_id
    pad = reference.generation_config.pad_token_id
    settings = GenerationConfig(do_sample=False, max_new_tokens=_GREEDY_NEW_TOKENS, eos_token_id=eos,
                                pad_token_id=pad if pad is not None else (eos if isinstance(eos, int) else None),
                                output_scores=True, return_dict_in_generate=True)
    compared = equal = ties = 0
    tie_bound = tolerance if tolerance is not None else 0.0
    for prompt in prompts:
        if not prompt:
            raise D2MergeError("a greedy validation prompt has no tokens", path=folder)
        with torch.no_grad():
            output = reference.generate(torch.tensor([list(prompt)], dtype=torch.long), generation_config=settings)
        expected_tokens = output.sequences[0, len(prompt):].tolist()
        actual_tokens = genai.greedy(list(prompt), _GREEDY_NEW_TOKENS)[len(prompt):]
        for step, want in enumerate(expected_tokens):
            compared += 1
            got = actual_tokens[step] if step < len(actual_tokens) else None
            if got == want:
                equal += 1
                continue
            scores = output.scores[step][0].double()
            near_tie = got is not None and float(scores.max() - scores[got]) <= tie_bound
            if near_tie:
                ties += 1
            elif precision == "fp32":
                failures.append(f"greedy generation differs from transformers at new token {step} of a "
                                f"{len(prompt)}-token prompt (not a near tie)")
            break  # after a divergence the two continuations are different texts
    return GenaiValidation(precision=precision, positions=positions, max_abs_diff=max_diff,
                           reference_max_abs=ref_max, tolerance=tolerance, top1_agreement=top1,
                           greedy_prompts=len(prompts), greedy_tokens_compared=compared, greedy_tokens_equal=equal,
                           greedy_ties=ties, failures=tuple(failures))


def _runtime_error(exc: Exception, folder: Path) -> D2MergeError:
    text = _first_line(exc)
    hint = None
    if "head_size shall be a multiple of 16" in text:
        hint = ("onnxruntime's CPU GroupQueryAttention needs a head size that is a multiple of 16; "
                "use the generic export for this model")
    return D2MergeError(f"onnxruntime-genai failed to run the model: {text}", path=folder, hint=hint)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
