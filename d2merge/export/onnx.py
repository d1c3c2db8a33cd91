"""Export a merged model folder to ONNX, and prove that ONNX Runtime computes what PyTorch computes.

A merged model is an ordinary Hugging Face folder (config.json + safetensors), so this module
needs nothing but its path. The exported graph takes `input_ids` and `attention_mask` (dynamic
batch and sequence) and returns `logits`. With `with_past=True` it also takes the key/value cache
as flat tensors `past_key_values.{i}.key/value` and returns the grown cache as
`present.{i}.key/value`, the layout ONNX Runtime generation loops use; `attention_mask` then
covers past + new tokens. Position ids are computed inside the graph from the attention mask,
the way transformers' `generate` computes them, so left-padded batches give the same tokens.

Every export is written to a temporary folder next to its destination, checked (the opset that
really landed in the graph, then ONNX Runtime vs PyTorch on seeded probes) and only then renamed
into place: a file at the destination has passed validation unless validation was switched off.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from d2merge.dtypes import FLOAT_DTYPES
from d2merge.errors import D2MergeError, escaped, option_error
from d2merge.logit_comparison import LogitComparison
from d2merge.options.onnx import DEFAULT_OPSET, OnnxExportOptions

# ONNX Runtime on CPU has no bf16 kernels: the two rows of d2merge.dtypes it can run.
DTYPES: dict[str, torch.dtype] = {n: FLOAT_DTYPES[n].torch_dtype for n in ("fp32", "fp16")}
# Exporter names, the default opset and why: d2merge.options (the CLI's flags come from there).
# Our wrapper passes per-row position ids, which avoids opset 23's RotaryEmbedding problem, but 18
# is what the test-suite covers.
# fp32: rounding differences between two correct fp32 implementations grow with the size of the
# logits (summation order over hidden sizes of 576+ and 30 layers). Measured: 1e-7..3e-7 on tiny
# models (largest logit ~0.6), 8e-5 (genai) to 4.9e-4 on SmolLM2-135M (largest logit ~37), i.e.
# up to 1.3e-5 relative. The bound is 1e-4 of the largest reference logit, never below 1e-4
# absolute: a broken export is off by the size of the logits themselves.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-4
# fp16 rounding error is relative (10-bit mantissa, eps ~ 1e-3) and grows with the size of the
# logits, so the fp16 bound scales with the largest reference logit. Measured on the tiny Llama
# and Qwen2 test models (largest logit ~0.4): 2.3e-4 to 2.8e-4, i.e. ~7e-4 relative. 1e-2
# relative leaves room for deeper models (error accumulates over layers) while still catching a
# broken export, which is off by the size of the logits themselves.
FP16_RTOL = 1e-2
FP16_ATOL_FLOOR = 1e-3

# Protobuf cannot serialize a message above 2 GiB; keep headroom for the graph itself.
_PROTOBUF_LIMIT_BYTES = 2**31 - 1
_GRAPH_HEADROOM_BYTES = 64 * 2**20

_PAST_PREFIX = "past_key_values."
_PRESENT_PREFIX = "present."
# Probe shapes: batch 2 with row 1 left-padded, because several export bugs (a RotaryEmbedding
# op that only handles batch 1, a mask ignored, positions ignoring padding) only show there.
_PROBE_BATCH = 2
_PROBE_LEFT_PAD = 2
_PROBES_NO_PAST = ((0, 5), (0, 9))  # (past length, new tokens)
_PROBES_WITH_PAST = ((0, 6), (5, 1), (4, 3))  # prefill, one decode step, a chunk after a cache

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


@dataclass(frozen=True)
class OnnxValidation:
    """ONNX Runtime (CPU) vs PyTorch on seeded probes, at real-token positions only.

    Rows of left-padded positions differ by design (each runtime fills fully masked rows its own
    way), so only positions with attention_mask == 1 are compared; with past, the present
    key/value tensors are compared at real positions too, since generation feeds them back.
    """

    onnx_path: Path
    dtype: str
    max_abs_diff: float
    tolerance: float
    passed: bool
    probes: tuple[tuple[int, int, int], ...]  # (batch, past length, new tokens)


@dataclass(frozen=True)
class OnnxExportResult:
    """What export_onnx wrote and what validation measured (None fields: validation was off)."""

    onnx_path: Path
    paths: tuple[Path, ...]  # every file written: the graph, plus its external data file if any
    dtype: str
    exporter: str
    opset: int  # read back from the saved graph, not the requested value
    with_past: bool
    external_data: bool
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    export_seconds: float
    max_abs_diff: float | None
    tolerance: float | None
    passed: bool | None

    def describe(self) -> str:
        """Two lines for humans: what was written, and how far ONNX Runtime is from PyTorch."""
        extra = f" + {self.paths[1].name}" if len(self.paths) > 1 else ""
        n_past = sum(name.startswith(_PAST_PREFIX) for name in self.input_names)
        inputs = "input_ids, attention_mask" + (f", {n_past} past key/value tensors" if n_past else "")
        lines = [f"exported {self.onnx_path}{extra} in {self.export_seconds:.1f}s ({self.exporter} exporter, "
                 f"opset {self.opset}, {self.dtype}): {inputs} -> logits" + (", presents" if n_past else "")]
        if self.passed is None:
            lines.append("validation skipped (--no-validate): the graph is unproven")
        else:
            lines.append(f"validation (ONNX Runtime CPU vs PyTorch fp32 at real tokens, batch 2 left-padded): "
                         f"max abs diff {self.max_abs_diff:.3g} vs tolerance {self.tolerance:.3g}: "
                         f"{'passed' if self.passed else 'FAILED'}")
        return "\n".join(lines)


class CausalLMOnnxWrapper(nn.Module):
    """The function that gets exported: flat tensors in, flat tensors out.

    ONNX graphs cannot take a transformers Cache object, so the cache travels as
    `past_key_values.{i}.key/value` tensors of shape (batch, kv_heads, past, head_dim), is
    rebuilt into a `DynamicCache` here, and comes back out flat as `present.{i}.key/value`.
    """

    def __init__(self, model: nn.Module, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {}
        if self.takes_position_ids:
            # generate()'s convention: a token's position counts the real tokens before it, so a
            # left-padded row gets the same positions (and logits) as the same row unpadded.
            positions = attention_mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(attention_mask == 0, 0)
            kwargs["position_ids"] = positions[:, attention_mask.shape[1] - input_ids.shape[1]:]
        if not self.with_past:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits

        from transformers import DynamicCache

        # No config passed: every layer is a plain DynamicLayer, so present = past + new for all
        # layers and the attention mask length always equals the cache length (sliding-window
        # models still mask correctly; the mask is built from the config, not the cache).
        cache = DynamicCache([(past[i], past[i + 1]) for i in range(0, len(past), 2)])
        # `cache`, transformers 5's name for the KV cache (`past_key_values` warns on every call).
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, **kwargs)
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_onnx(model_dir: str | os.PathLike, out_path_or_dir: str | os.PathLike, *, dtype: str = "fp32",
                with_past: bool = False, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                external_data: bool | None = None, validate: bool = True,
                atol: float | None = None, overwrite: bool = False) -> OnnxExportResult:
    """Export the causal LM in `model_dir` to ONNX, validate it, then move it into place.

    `out_path_or_dir` ending in `.onnx` is the graph file; anything else is a folder that
    receives `model.onnx`. Weights go to `<name>.onnx.data` when `external_data` is True, or,
    left as None, when they would not fit in one 2 GB protobuf. Raises D2MergeError for a
    request that cannot be honoured (bf16, an opset the exporter does not produce, a validation
    diff above tolerance) and leaves nothing at the destination in that case.
    """
    from d2merge.io.checkpoint import open_base
    from d2merge.io.output import AtomicFiles, check_output_location

    _check_request(dtype, exporter, opset)
    model_dir = Path(model_dir)
    onnx_path = _destination(out_path_or_dir)
    # Before any work: never into an input, never over an existing graph without --overwrite,
    # and the weights are whole (a truncated shard is one line here, not a SafetensorsError later).
    onnx_path = check_output_location(onnx_path, [model_dir], overwrite=overwrite, is_file=True,
                                      missing_parents=True)
    sidecar = onnx_path.with_name(onnx_path.name + ".data")
    if sidecar.exists() and not overwrite:
        raise option_error("output already exists", path=sidecar, hint="pass {overwrite=} or choose another path",
                           overwrite=True)
    open_base(model_dir)
    stages = _Stages(["loading the model", "exporting the graph", *(["validating with ONNX Runtime"] * validate),
                      "writing"])

    model = _load_model(model_dir, DTYPES[dtype])
    weight_bytes = _weight_bytes(model)
    use_external = _decide_external_data(external_data, weight_bytes, onnx_path)
    wrapper = CausalLMOnnxWrapper(model, with_past).eval()
    sample_args, input_names, output_names = _sample_inputs(model, with_past)

    new_folders = [f for f in (onnx_path.parent, *onnx_path.parent.parents) if not f.exists()]  # leaf first
    try:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from d2merge.io.output import disk_error

        raise disk_error(exc, onnx_path.parent) from None
    files = AtomicFiles(onnx_path, overwrite=overwrite, sidecars=(sidecar.name,))
    try:
        files.__enter__()
        # The external data location is stored relative to the graph file, so the staged file
        # already carries its final name and only the folder changes at the end.
        staged = files.staged
        started = time.perf_counter()
        stages.next()
        _export_graph(wrapper, sample_args, staged, opset=opset, exporter=exporter, external_data=use_external,
                      input_names=input_names, output_names=output_names, with_past=with_past,
                      display_path=onnx_path)
        export_seconds = time.perf_counter() - started
        del wrapper

        graph_opset = read_opset(staged)
        if graph_opset != opset:
            hint = ("the dynamo exporter produces opset 18 and newer; use {opset=18}, or {exporter=legacy} "
                    "for an older opset" if exporter == "dynamo" and opset < DEFAULT_OPSET
                    else "choose an opset this exporter supports")
            raise option_error(f"asked for ONNX opset {opset} but the {exporter} exporter wrote opset "
                               f"{graph_opset}; refusing to ship a different opset than requested",
                               path=onnx_path, hint=hint)

        validation = None
        if validate:
            stages.next()
            if dtype != "fp32":  # free the fp16 copy before loading the fp32 reference next to it
                del model
                model = _load_model(model_dir, torch.float32)
            validation = _validate_staged(staged, CausalLMOnnxWrapper(model, with_past).eval(),
                                          with_past=with_past, atol=atol, display_path=onnx_path)
        stages.next()
        paths = files.commit()
    except BaseException as exc:
        stages.close()
        try:
            files.__exit__(type(exc), exc, exc.__traceback__)  # a full disk becomes its one line there
        finally:
            for folder in new_folders:  # a failed export leaves no trace, not even the folders it created
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    stages.close()
    files.__exit__(None, None, None)

    return OnnxExportResult(
        onnx_path=onnx_path, paths=paths, dtype=dtype, exporter=exporter, opset=graph_opset, with_past=with_past,
        external_data=use_external, input_names=tuple(input_names), output_names=tuple(output_names),
        export_seconds=export_seconds,
        max_abs_diff=None if validation is None else validation.max_abs_diff,
        tolerance=None if validation is None else validation.tolerance,
        passed=None if validation is None else validation.passed,
    )


def validate_onnx(onnx_path: str | os.PathLike, model_dir: str | os.PathLike, *, atol: float | None = None,
                  seed: int = 0, raise_on_failure: bool = True) -> OnnxValidation:
    """Compare an exported graph with the PyTorch model it came from, on seeded random probes.

    Probes are batch 2 with row 1 left-padded, at a couple of lengths (and, for a graph with
    past, a prefill, a one-token decode step and a chunk after a cache). The PyTorch reference
    runs in fp32, so for an fp16 graph the diff includes fp16 rounding and the default bound is
    relative to the logits' size. Raises D2MergeError naming the file and the diff when it is
    above tolerance, unless raise_on_failure is False.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise D2MergeError("no such ONNX file", path=onnx_path)
    with_past = any(name.startswith(_PAST_PREFIX) for name in _graph_input_names(onnx_path))
    model = _load_model(Path(model_dir), torch.float32)
    return _validate_staged(onnx_path, CausalLMOnnxWrapper(model, with_past).eval(), with_past=with_past,
                            atol=atol, display_path=onnx_path, seed=seed, raise_on_failure=raise_on_failure)


def greedy_generate_onnx(onnx_path_with_past: str | os.PathLike, input_ids: Any, max_new_tokens: int, *,
                         attention_mask: Any = None, eos_token_id: int | Sequence[int] | None = None,
                         pad_token_id: int | None = None, session: Any = None) -> np.ndarray:
    """Greedy decoding in ONNX Runtime: a prefill, then one token at a time with the cache fed back.

    Mirrors `model.generate(do_sample=False)`: rows that emitted `eos_token_id` continue with
    `pad_token_id` (or the first eos id), and decoding stops early once every row is finished.
    Returns int64 ids of shape (batch, prompt + new tokens), prompt included. ``session``: an
    ``onnxruntime.InferenceSession`` already open on that graph, for several calls in a row
    (opening one costs seconds on a real model); by default one is opened for this call.
    """
    path = Path(onnx_path_with_past)
    session = session if session is not None else _open_session(path)
    past_inputs = [arg for arg in session.get_inputs() if arg.name.startswith(_PAST_PREFIX)]
    if not past_inputs:
        raise option_error("this graph has no past_key_values inputs, so it cannot generate incrementally",
                           path=path, hint="export it with {with_past}")
    ids = _as_int64(input_ids)
    if ids.ndim != 2:
        raise D2MergeError(f"input_ids must be (batch, sequence), got shape {ids.shape}", path=path)
    mask = np.ones_like(ids) if attention_mask is None else _as_int64(attention_mask)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    batch = ids.shape[0]
    past: dict[str, np.ndarray] = {}
    for arg in past_inputs:
        heads, head_dim = arg.shape[1], arg.shape[3]
        if not (isinstance(heads, int) and isinstance(head_dim, int)):
            raise D2MergeError(f"input '{arg.name}' has no fixed head count/size {arg.shape}", path=path)
        past[arg.name] = np.zeros((batch, heads, 0, head_dim), dtype=_numpy_dtype(arg.type, path))
    present_names = [out.name for out in session.get_outputs()][1:]

    sequences, step_ids = ids, ids
    finished = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        outputs = _run(session, {"input_ids": step_ids, "attention_mask": mask, **past}, path)
        next_tokens = outputs[0][:, -1, :].astype(np.float32).argmax(-1).astype(np.int64)
        if eos:
            next_tokens = np.where(finished, pad, next_tokens)
            finished |= np.isin(next_tokens, eos)
        sequences = np.concatenate([sequences, next_tokens[:, None]], axis=1)
        if eos and finished.all():
            break
        past = {name.replace(_PRESENT_PREFIX, _PAST_PREFIX, 1): value
                for name, value in zip(present_names, outputs[1:])}
        step_ids = next_tokens[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return sequences


def read_opset(onnx_path: str | os.PathLike) -> int:
    """The default-domain opset recorded in a saved graph (what runtimes will actually see)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise D2MergeError("the graph declares no default-domain opset", path=onnx_path)


def default_tolerance(dtype: str, reference_max_abs: float) -> float:
    """The validation bound, relative to the largest reference logit (fp32: 1e-4, at least 1e-4; fp16: 1%)."""
    if dtype == "fp32":
        return max(FP32_ATOL, FP32_RTOL * reference_max_abs)
    return max(FP16_ATOL_FLOOR, FP16_RTOL * reference_max_abs)


# --- checks and loading ------------------------------------------------------------------------


class _Stages:
    """The export's stages, each shown with its elapsed time while it runs (``console.still_working``,
    on a terminal or, every D2MERGE_PROGRESS_EVERY seconds, in a log): the export itself is one long
    call with no finer progress to count."""

    def __init__(self, names: list[str]) -> None:
        self._names = names
        self._index = 0
        self._current: Any = None
        self._start()

    def _start(self) -> None:
        from d2merge.console import still_working

        if self._index < len(self._names):
            stage = f"export-onnx: {self._names[self._index]} (stage {self._index + 1}/{len(self._names)})"
            self._current = still_working(stage)
            self._current.__enter__()

    def next(self) -> None:
        self.close()
        self._index += 1
        self._start()

    def close(self) -> None:
        if self._current is not None:
            self._current.__exit__(None, None, None)
            self._current = None


def _check_request(dtype: str, exporter: str, opset: int) -> None:
    """Every rule known up front (bf16, exporter, dynamo's lowest opset), before a minute of export."""
    OnnxExportOptions(dtype=dtype, opset=opset, exporter=exporter)
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not 7 <= opset <= newest:
        raise option_error(f"opset {opset} is outside what the installed onnx knows (7..{newest})",
                           hint="use {opset=}", opset=DEFAULT_OPSET)


def _destination(out_path_or_dir: str | os.PathLike) -> Path:
    out = Path(out_path_or_dir)
    onnx_path = out if out.suffix == ".onnx" and not out.is_dir() else out / "model.onnx"
    if onnx_path.is_dir():
        raise D2MergeError("destination is a folder, not a file", path=onnx_path)
    return onnx_path


def _load_model(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    from d2merge.runtime.loading import load_base_model

    if not (model_dir / "config.json").is_file():
        raise D2MergeError("not a Hugging Face model folder (config.json missing)", path=model_dir,
                           hint="export a merged folder (d2merge merge writes one)")
    model = load_base_model(model_dir, dtype=dtype)
    if dtype == torch.float16:
        for name, param in model.named_parameters():
            if not torch.isfinite(param).all():
                raise option_error("weights overflow fp16 (largest finite value 65504)", path=model_dir,
                                   tensor=name, hint="export with {dtype=fp32}")
    return model.eval()


def _weight_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights count once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _decide_external_data(requested: bool | None, weight_bytes: int, onnx_path: Path) -> bool:
    too_big = weight_bytes > _PROTOBUF_LIMIT_BYTES - _GRAPH_HEADROOM_BYTES
    if requested is None:
        return too_big
    if not requested and too_big:
        raise option_error(f"{weight_bytes / 2**30:.1f} GiB of weights cannot be stored inside one .onnx file "
                           "(protobuf's limit is 2 GiB)", path=onnx_path, hint="allow {external_data}")
    return requested


def _cache_layout(model: nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) per cache tensor, read from a real forward pass, not from config names."""
    with torch.no_grad():
        probe = torch.ones(1, 2, dtype=torch.long)
        out = model(input_ids=probe, attention_mask=probe, use_cache=True)
    layout: list[tuple[int, int]] = []
    for layer in out.cache.layers:
        layout += [(layer.keys.shape[1], layer.keys.shape[3]), (layer.values.shape[1], layer.values.shape[3])]
    return layout


def _sample_inputs(model: nn.Module, with_past: bool) -> tuple[tuple[torch.Tensor, ...], list[str], list[str]]:
    # Distinct sizes of at least 2: torch.export specializes dimensions of size 0 or 1, and equal
    # sample sizes can make it tie dimensions that must stay independent.
    batch, new, past_len = 2, 3, 4
    dtype = next(model.parameters()).dtype
    total = new + past_len if with_past else new
    input_ids = torch.randint(4, model.config.vocab_size, (batch, new), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(batch, total, dtype=torch.long)
    attention_mask[1, 0] = 0
    layout = _cache_layout(model) if with_past else []
    past = [torch.zeros(batch, heads, past_len, head_dim, dtype=dtype) for heads, head_dim in layout]
    names = _cache_names(len(layout))
    input_names = ["input_ids", "attention_mask", *[_PAST_PREFIX + name for name in names]]
    output_names = ["logits", *[_PRESENT_PREFIX + name for name in names]]
    return (input_ids, attention_mask, *past), input_names, output_names


def _cache_names(count: int) -> list[str]:
    """`{layer}.key` / `{layer}.value` for a flat cache of `count` tensors (keys and values alternate)."""
    return [f"{index // 2}.{'key' if index % 2 == 0 else 'value'}" for index in range(count)]


# --- export ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence exporter chatter (missing torchvision ops, tracer and rename warnings).

    The validation that follows is the real signal; these messages are about internals the user
    cannot act on. Errors still propagate.
    """
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _export_graph(wrapper: CausalLMOnnxWrapper, sample_args: tuple[torch.Tensor, ...], staged: Path, *, opset: int,
                  exporter: str, external_data: bool, input_names: list[str], output_names: list[str],
                  with_past: bool, display_path: Path) -> None:
    """Run torch's exporter into `staged`.

    fp16 is exported straight from the fp16 model: torch's CPU fp16 kernels cover every op these
    decoders use and the exporter only traces shapes and dtypes, so no graph-level fp32->fp16
    conversion (which would also have to keep the fp32-upcast RMSNorm and softmax) is needed.
    """
    n_past = len(sample_args) - 2
    with _quiet_export(), torch.no_grad():
        try:
            if exporter == "dynamo":
                from torch.export import Dim

                batch, sequence = Dim("batch"), Dim("sequence")
                total = Dim("total_sequence") if with_past else sequence
                past_sequence = Dim("past_sequence")
                # Mirrors forward(input_ids, attention_mask, *past): *past is one tuple entry, and is
                # left out entirely when there is no past (torch.export counts entries).
                dynamic_shapes: tuple[Any, ...] = ({0: batch, 1: sequence}, {0: batch, 1: total})
                if n_past:
                    dynamic_shapes += (tuple({0: batch, 2: past_sequence} for _ in range(n_past)),)
                program = torch.onnx.export(wrapper, sample_args, dynamo=True, opset_version=opset,
                                            dynamic_shapes=dynamic_shapes, input_names=input_names,
                                            output_names=output_names, verbose=False)
                program.save(staged, external_data=external_data)
                return
            axes: dict[str, dict[int, str]] = {
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "total_sequence" if with_past else "sequence"},
                "logits": {0: "batch", 1: "sequence"},
            }
            axes.update({name: {0: "batch", 2: "past_sequence"} for name in input_names[2:]})
            axes.update({name: {0: "batch", 2: "total_sequence"} for name in output_names[1:]})
            raw = staged.with_name(staged.name + ".raw")  # the legacy exporter picks its own data layout
            torch.onnx.export(wrapper, sample_args, str(raw), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes)
        except Exception as exc:  # the exporters raise many types; all mean "this model/opset does not export"
            cause = exc.__cause__ or exc  # torch.onnx wraps the torch.export error that says what failed
            raise option_error(f"the {exporter} exporter failed: {type(cause).__name__}: {escaped(_first_line(cause))}",
                               path=display_path,
                               hint="rerun with --debug for the traceback; try the other {exporter}") from exc
    _normalize_legacy_file(raw, staged, external_data)


def _normalize_legacy_file(raw: Path, staged: Path, external_data: bool) -> None:
    """Re-save the legacy exporter's output in the dynamo layout: one graph, at most one data file."""
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    if external_data:
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=staged.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(staged))
    raw.unlink()


# --- validation --------------------------------------------------------------------------------


def _validate_staged(onnx_path: Path, reference: CausalLMOnnxWrapper, *, with_past: bool, atol: float | None,
                     display_path: Path, seed: int = 0, raise_on_failure: bool = True) -> OnnxValidation:
    session = _open_session(onnx_path, display_path)
    logits_type = session.get_outputs()[0].type
    dtype = {"tensor(float)": "fp32", "tensor(float16)": "fp16"}.get(logits_type)
    if dtype is None:
        raise D2MergeError(f"logits are {logits_type}; only fp32 and fp16 graphs can be validated on CPU",
                           path=display_path)
    numpy_dtype = np.float32 if dtype == "fp32" else np.float16
    config = reference.model.config
    vocab = config.vocab_size
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    layout = _cache_layout(reference.model) if with_past else []
    generator = torch.Generator().manual_seed(seed)

    diffs: list[float] = []  # the caches'; np.max over the list, not Python's max(), so a NaN is not skipped
    logits = LogitComparison()  # the logits', as verify compares them (a NaN kept too)
    probes = _PROBES_WITH_PAST if with_past else _PROBES_NO_PAST
    for past_len, new in probes:
        total = past_len + new
        attention_mask = torch.ones(_PROBE_BATCH, total, dtype=torch.long)
        attention_mask[1, :_PROBE_LEFT_PAD] = 0
        input_ids = torch.randint(0, vocab, (_PROBE_BATCH, new), generator=generator)
        input_ids = input_ids.masked_fill(attention_mask[:, past_len:] == 0, pad_id)
        # Past values rounded through the graph's dtype so that both sides see identical inputs.
        past = [torch.randn(_PROBE_BATCH, heads, past_len, head_dim, generator=generator).to(DTYPES[dtype]).float()
                for heads, head_dim in layout]
        with torch.no_grad():
            expected = reference(input_ids, attention_mask, *past)
        expected = (expected,) if isinstance(expected, torch.Tensor) else expected
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        feed.update({_PAST_PREFIX + name: tensor.numpy().astype(numpy_dtype)
                     for name, tensor in zip(_cache_names(len(past)), past)})
        actual = _run(session, feed, display_path)

        real_new = attention_mask[:, past_len:].numpy().astype(bool)  # (batch, new)
        real_all = attention_mask.numpy().astype(bool)  # (batch, total)
        logits.add(torch.from_numpy(expected[0].double().numpy()[real_new]),
                   torch.from_numpy(actual[0].astype(np.float64)[real_new]))
        for ort_kv, ref_kv in zip(actual[1:], expected[1:]):
            # (batch, heads, seq, dim) -> (batch, seq, heads, dim) so the boolean mask selects positions
            diff = np.abs(ort_kv.astype(np.float64) - ref_kv.double().numpy()).transpose(0, 2, 1, 3)[real_all]
            diffs.append(float(diff.max()))

    max_diff = float(np.max([logits.max_abs, *diffs]))
    tolerance = atol if atol is not None else default_tolerance(dtype, logits.reference_max_abs)
    passed = bool(max_diff <= tolerance)  # a NaN diff fails too
    result = OnnxValidation(onnx_path=display_path, dtype=dtype, max_abs_diff=max_diff, tolerance=tolerance,
                            passed=passed, probes=tuple((_PROBE_BATCH, p, n) for p, n in probes))
    if raise_on_failure and not passed:
        raise option_error(f"ONNX Runtime output differs from PyTorch by {max_diff:.3g} at real tokens, above the "
                           f"{dtype} tolerance {tolerance:.3g}", path=display_path,
                           hint="try the other {exporter} or another {opset}; {atol} sets the bound explicitly")
    return result


def _open_session(onnx_path: Path, display_path: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about fused nodes are not actionable
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise D2MergeError(f"ONNX Runtime cannot load this graph: {_first_line(exc)}",
                           path=display_path or onnx_path) from exc


def _run(session: Any, feed: dict[str, np.ndarray], path: Path) -> list[np.ndarray]:
    try:
        return session.run(None, feed)
    except Exception as exc:
        hint = None
        if "RotaryEmbedding" in str(exc):
            hint = ("opset 23+ emits RotaryEmbedding, which this ONNX Runtime rejects for batch > 1; "
                    "use {opset=}")
        raise option_error(f"ONNX Runtime failed to run the graph: {escaped(_first_line(exc))}", path=path, hint=hint,
                           opset=DEFAULT_OPSET) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _graph_input_names(onnx_path: Path) -> list[str]:
    import onnx

    return [arg.name for arg in onnx.load(str(onnx_path), load_external_data=False).graph.input]


def _numpy_dtype(onnx_type: str, path: Path) -> type:
    known = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    if onnx_type not in known:
        raise D2MergeError(f"cache inputs are {onnx_type}; only fp32 and fp16 graphs run on ONNX Runtime's CPU "
                           "provider", path=path)
    return known[onnx_type]


def _as_int64(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64)
