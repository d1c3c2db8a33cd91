"""``d2merge extract BASE TUNED``: a LoRA adapter from a fine-tuned model, one module at a time.

For every weight that differs, dW = W_tuned - W_base is factored by a truncated SVD (at
``--rank``, or the least rank keeping ``--energy`` of ||dW||_F^2), so memory is two tensors
and one SVD, never the model (mergekit-extract-lora loads far more). Equal weights are
left out.

The rule for embeddings and ``lm_head``: an input embedding that changed becomes a LoRA on
the embedding (PEFT's ``lora_embedding_A/B``) and a changed ``lm_head`` a LoRA on that linear
layer, like any other module. When the base ties ``lm_head`` to the embedding, transformers
uses the one tensor for both, so a changed embedding is written as a LoRA on both (the same
update, each in its own layout): PEFT's embedding LoRA alone would not reach the head.
Changed tensors a LoRA cannot carry (norms, biases) are refused, or left out and listed
with ``--skip-other-changes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d2merge.adapter_ops.convert import factor_table
from d2merge.adapter_ops.factor import FactorReport, factor_update
from d2merge.options.adapter_ops import ExtractOptions
from d2merge.options.base import option_error
from d2merge.errors import D2MergeError
from d2merge.io.adapter_writer import LoraModule, check_adapter_output, lora_tensors, plain_lora_config, write_lora_adapter
from d2merge.io.checkpoint import BaseCheckpoint, open_base
from d2merge.io.model_structure import meta_model
from d2merge.methods.base import EMBEDDING, LINEAR
from d2merge.planning import INPUT_EMBEDDING_SUFFIXES, tied_pair


@dataclass(frozen=True)
class ExtractResult:
    out: Path
    modules: tuple[FactorReport, ...]
    unchanged: int  # 2-D weights equal in both models, left out
    left_out: tuple[str, ...] = field(default=())  # changed tensors a LoRA cannot carry (--skip-other-changes)

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "modules": [m.to_json() for m in self.modules], "unchanged": self.unchanged,
                "left_out": list(self.left_out),
                "min_retained_energy": min((m.energy for m in self.modules), default=1.0)}

    def describe(self) -> str:
        text = factor_table(f"extracted a LoRA into {self.out}", self.modules)
        text += f"\n{self.unchanged} weight(s) equal in both models, left out"
        if self.left_out:
            text += f"\nleft out (a LoRA cannot carry them): {', '.join(self.left_out)}"
        return text


def _layer_kinds(config: dict[str, Any]) -> dict[str, tuple[str, bool]] | None:
    """Module name -> (LINEAR or EMBEDDING, stored transposed (Conv1D)) from transformers' own model class."""
    model = meta_model(config)
    if model is None:
        return None
    kinds: dict[str, tuple[str, bool]] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Embedding):
            kinds[name] = (EMBEDDING, False)
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = (LINEAR, False)
        elif kind == "Conv1D":
            kinds[name] = (LINEAR, True)
    return kinds


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, whatever the two files' dtypes (a TUNED saved in fp32 over a bf16 base)."""
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return torch.equal(a.to(wide), b.to(wide))


def _difference(tuned: torch.Tensor, base: torch.Tensor, device: torch.device) -> torch.Tensor:
    """TUNED - BASE in fp32, rounded once.

    Inputs of fp32 or less precision are exact in fp32, and fp32 subtraction is correctly
    rounded, so subtracting in fp32 gives the fp64 difference rounded once, at a quarter of
    fp64's memory (a 32000x2048 embedding: 262 MB, not 1 GB); fp64 inputs go through fp64.
    """
    wide = torch.float64 if torch.float64 in (tuned.dtype, base.dtype) else torch.float32
    diff = tuned.to(device, wide).sub_(base.to(device, wide))
    return diff.to(torch.float32)


def _check_same_model(base: BaseCheckpoint, tuned: BaseCheckpoint, head: str | None) -> None:
    base_type = (base.config or {}).get("model_type")
    tuned_type = (tuned.config or {}).get("model_type")
    if base_type and tuned_type and base_type != tuned_type:
        raise D2MergeError(f"TUNED is a '{tuned_type}' model and BASE a '{base_type}' one", path=tuned.location,
                           hint="extract from a model fine-tuned from this very base")
    base_names, tuned_names = set(base.tensors.keys()), set(tuned.tensors.keys())
    extra = sorted(tuned_names - base_names - ({head} if head else set()))
    missing = sorted(base_names - tuned_names)
    if extra or missing:
        name = (extra or missing)[0]
        where = "has no counterpart in BASE" if extra else "is missing from TUNED"
        raise D2MergeError(f"tensor {where} ({len(extra)} extra, {len(missing)} missing): the models differ in "
                           "architecture", path=tuned.location if extra else base.location, tensor=name,
                           hint="extract from a model fine-tuned from this very base")
    for name in sorted(base_names):
        if tuple(base.tensors.info(name)[1]) != tuple(tuned.tensors.info(name)[1]):
            raise D2MergeError(f"shape {list(tuned.tensors.info(name)[1])} in TUNED, "
                               f"{list(base.tensors.info(name)[1])} in BASE", path=tuned.location, tensor=name,
                               hint="a resized vocabulary or another architecture; extract needs equal shapes")


def extract(base: str | Path, tuned: str | Path, out: str | Path, options: ExtractOptions, *,
            allow_pickle: bool = False, report: str | Path | None = None) -> ExtractResult:
    """Write a plain LoRA folder ``out`` whose update approximates TUNED - BASE; nothing written on a refusal.

    Other outputs (``to="gguf-lora"``): ``d2merge.extract`` (``export.adapter_outputs``).
    """
    options.require_target("lora")
    base_ckpt = open_base(base, allow_pickle=allow_pickle)
    tuned_ckpt = open_base(tuned, allow_pickle=allow_pickle)
    out_path = check_adapter_output(out, [base_ckpt.location, tuned_ckpt.location], overwrite=options.overwrite)
    config = base_ckpt.config or {}
    infos = {n: base_ckpt.tensors.info(n) for n in base_ckpt.tensors.keys()}
    pair = tied_pair(infos, config)
    head = pair[1] if pair and pair[1] not in infos else None
    _check_same_model(base_ckpt, tuned_ckpt, head)
    kinds = _layer_kinds(config)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise option_error("{device=cuda} was asked for but no CUDA device is available", hint="use {device=cpu}")

    def kind_of(name: str) -> tuple[str, bool] | None:
        module = name[: -len(".weight")]
        if kinds is not None:
            return kinds.get(module)
        return (EMBEDDING, False) if name.endswith(INPUT_EMBEDDING_SUFFIXES) else (LINEAR, False)

    # Checked first, so a --rank no module can take is refused before any SVD.
    jobs: list[tuple[str, str, str, bool]] = []  # (tensor, module, kind, transposed)
    for name in base_ckpt.tensors.keys():
        dtype, shape = infos[name]
        if not dtype.is_floating_point or not name.endswith(".weight") or len(shape) != 2:
            continue
        kind = kind_of(name)
        if kind is not None:
            jobs.append((name, name[: -len(".weight")], *kind))
    if options.rank is not None:
        for name, _, _, _ in jobs:
            if options.rank > min(infos[name][1]):
                raise options.error(f"{{rank=}} is above the size of {list(infos[name][1])}",
                                    path=base_ckpt.location, tensor=name,
                                    hint=f"choose {{rank={min(infos[name][1])}}} or less, or use {{energy}}")
    job_names = {j[0] for j in jobs}
    left_out = []
    for name in base_ckpt.tensors.keys():
        if name in job_names or not infos[name][0].is_floating_point:
            continue
        if not _same(base_ckpt.tensors.read(name), tuned_ckpt.tensors.read(name)):
            if not options.skip_other_changes:
                raise options.error("the tensor differs between BASE and TUNED and is not a linear or embedding "
                                    "weight, so a LoRA cannot carry the change", path=tuned_ckpt.location, tensor=name,
                                    hint="{skip_other_changes} leaves such tensors out (and lists them)")
            left_out.append(name)

    modules: list[LoraModule] = []
    rows: list[FactorReport] = []
    unchanged = 0
    any_conv1d = False
    tuned_names = set(tuned_ckpt.tensors.keys())
    for name, module, kind, transposed in jobs:
        w_base = base_ckpt.tensors.read(name)
        w_tuned = tuned_ckpt.tensors.read(name)
        diff = None if _same(w_base, w_tuned) else _difference(w_tuned, w_base, device)
        updates = [(module, kind, transposed, diff)] if diff is not None else []
        del w_tuned
        if head and pair and name == pair[0]:
            # transformers reads the tied lm_head from this tensor: the same update as a linear layer,
            # or TUNED's own untied head against it
            head_diff = diff
            if head in tuned_names:
                w_head = tuned_ckpt.tensors.read(head)
                head_diff = None if _same(w_base, w_head) else _difference(w_head, w_base, device)
            if head_diff is not None:
                updates.append((head[: -len(".weight")], LINEAR, False, head_diff))
        del w_base
        if not updates:
            unchanged += 1
            continue
        for mod, k, t, d in updates:
            # formulas work on (out, in): Conv1D and embeddings are stored the other way round
            update = d.T if (t or k == EMBEDDING) else d
            any_conv1d = any_conv1d or t
            a, b, row = factor_update(update, mod, rank=options.rank, energy=options.energy,
                                       randomized=options.svd == "randomized")
            modules.append(LoraModule(mod, k, a.cpu(), b.cpu()))
            rows.append(row)
    if not modules:
        raise D2MergeError("BASE and TUNED have the same weights: there is nothing to extract",
                           path=tuned_ckpt.location, hint="is TUNED the fine-tuned model?")
    adapter_config = plain_lora_config(modules, base_model_name_or_path=str(base), fan_in_fan_out=any_conv1d)
    result = ExtractResult(out_path, tuple(rows), unchanged, tuple(left_out))
    write_lora_adapter(out_path, adapter_config, lora_tensors(modules), overwrite=options.overwrite)
    if report is not None:
        from d2merge.io.output import write_json

        write_json(Path(report), result.to_json())
    return result


__all__ = ["extract", "ExtractResult"]
