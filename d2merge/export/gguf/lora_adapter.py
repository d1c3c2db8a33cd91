"""llama.cpp's LoRA adapter GGUF (``--lora`` of llama-cli / llama-server, ``Llama(lora_path=...)``).

The layout llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama_adapter_lora_init``
checks: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; per
adapted weight two tensors named after the base GGUF's tensor, ``<name>.lora_a`` holding A
(r, in) and ``<name>.lora_b`` holding B (out, r) in PEFT's orientation (llama.cpp checks
``a.ne[0] == w.ne[0]``, ``b.ne[1] == w.ne[1]``, ``a.ne[1] == b.ne[0]``). llama.cpp scales
each by ``alpha / r`` with r read from the tensor, and there is one alpha per file, so B
carries ``r / alpha`` to keep every module's update exactly ``B @ A``. q/k rows are
permuted as the base export permutes them (llama's interleaved rope), so B's rows are. An
input-embedding LoRA is ``token_embd.weight.lora_a/.lora_b`` in llama.cpp's own layout for it
(:func:`_token_embedding`).

The factors are the plain LoRA ``convert --to lora`` computes (DoRA, D2-LoRA, Dual LoRA
through their full update); tensor names come from the HF->GGUF mapping the base export uses, so
the adapter fits the GGUF ``d2merge export-gguf`` / ``merge --format gguf`` writes of the base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d2merge.adapter_ops.convert import ConvertResult, factor_table, lora_modules
from d2merge.options.adapter_ops import ConvertOptions
from d2merge.options.base import option_error
from d2merge.errors import D2MergeError
from d2merge.export.gguf.architectures import check_config
from d2merge.export.gguf.library import gguf_py
from d2merge.export.gguf.tensors import permute_for_llama_cpp
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import open_base
from d2merge.io.output import AtomicFiles, check_output_location, disk_error, write_json
from d2merge.methods.base import EMBEDDING


@dataclass(frozen=True)
class GGUFLoraResult(ConvertResult):
    alpha: float = 1.0
    seconds: float = 0.0

    def describe(self) -> str:
        return factor_table(f"wrote llama.cpp's LoRA adapter GGUF {self.out} (alpha {self.alpha:g})", self.modules)


def _heads(module: str, config: dict[str, Any]) -> int | None:
    """How many heads llama.cpp's rope permutation groups a q/k weight's rows into (None: not permuted)."""
    if module.endswith("q_proj"):
        return int(config["num_attention_heads"])
    if module.endswith("k_proj"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def _token_embedding(name: str, module: str, a: Any, b: Any, config_updates: dict[str, Any],
                     weights_file: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """An embedding LoRA as llama.cpp's ``token_embd.weight.lora_a/.lora_b``, or a one-line refusal.

    llama.cpp adds ``B @ A[:, token]`` to each token's row (``llm_build_inp_embd``: rows of
    ``lora_a`` gathered by token id, then multiplied by ``lora_b``), so ``lora_a`` holds A
    transposed, (vocab, r), and ``lora_b`` holds B, (dim, r): the layout its loader checks for
    ``token_embd`` (``w.ne[0] == b.ne[1]``, ``w.ne[1] == a.ne[1]``) and the one
    ``convert_lora_to_gguf.py`` writes. Only the input embedding: llama.cpp applies an adapter by
    tensor name, and a base whose output layer is tied to ``token_embd.weight`` would run the
    embedding's factors as a matmul on the output too, where PEFT's embedding LoRA never reaches
    the head (the merge unties them instead).
    """
    if name != "token_embd.weight":
        raise option_error(f"module '{module}' is an embedding llama.cpp has no LoRA path for ({name})",
                           path=weights_file, hint="serve this adapter with {to=lora}, or merge it",
                           model=ConvertOptions)
    if config_updates.get("tie_word_embeddings") is False:
        raise option_error(f"module '{module}' is an embedding of a base whose lm_head is tied to it: llama.cpp "
                           "would apply its LoRA to the tied output layer too (it matches adapters by tensor name), "
                           "which PEFT's embedding LoRA never changes", path=weights_file, model=ConvertOptions,
                           hint="merge it (d2merge merge --format gguf unties them, exact), or serve it with "
                                "{to=lora}")
    return name, a.T.contiguous().numpy(), b.contiguous().numpy()


def check_gguf_lora_output(out: str | Path, inputs: Sequence[Path], *, overwrite: bool) -> Path:
    """Refuse a LoRA GGUF name without .gguf, or one that would clobber an input or an existing file."""
    out_path = Path(out)
    if out_path.suffix != ".gguf":
        raise D2MergeError("a GGUF output must end in .gguf", path=out_path, hint="name it like adapter.gguf")
    return check_output_location(out_path, list(inputs), overwrite=overwrite, is_file=True)


def convert_to_gguf_lora(adapter: str | Path, base: str | Path, out: str | Path, options: ConvertOptions | None = None,
                         *, allow_pickle: bool = False, report: str | Path | None = None) -> GGUFLoraResult:
    """Write ``adapter`` (on ``base``) as one llama.cpp LoRA GGUF file ``out``; nothing written on a refusal."""
    started = time.perf_counter()
    options = options or ConvertOptions(to="gguf-lora")
    options.require_target("gguf-lora")
    gguf = gguf_py("GGUF output")
    check_gguf_lora_output(out, [], overwrite=options.overwrite)  # the name, before the adapter is read
    loaded = load_adapter(adapter, allow_pickle=allow_pickle)
    out_path = check_gguf_lora_output(out, [loaded.path, Path(base)], overwrite=options.overwrite)
    checkpoint = open_base(base, allow_pickle=allow_pickle)
    config = checkpoint.config or {}
    # the architecture is refused before any SVD is computed
    arch, permute = check_config(config, (checkpoint.folder or Path(base)) / "config.json")
    plan, modules, rows = lora_modules(loaded, checkpoint, options)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    mapping = gguf.get_tensor_name_map(arch_id, int(config["num_hidden_layers"]))
    alpha = float(max(m.rank for m in modules))
    named: list[tuple[str, np.ndarray, np.ndarray]] = []
    for m in modules:
        name = mapping.get_name(f"{m.module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise D2MergeError(f"no GGUF name for module '{m.module}' in llama.cpp's {arch} layout",
                               path=loaded.weights_file, tensor=m.module)
        a, b = m.lora_a.float(), m.lora_b.float() * (m.rank / alpha)
        if m.layer_kind == EMBEDDING:
            named.append(_token_embedding(name, m.module, a, b, plan.config_updates, loaded.weights_file))
            continue
        heads = _heads(m.module, config) if permute else None
        if heads is not None:
            b = permute_for_llama_cpp(b, heads)
        named.append((name, a.numpy(), b.contiguous().numpy()))
    with AtomicFiles(out_path, overwrite=options.overwrite) as staging:
        try:
            writer = gguf.GGUFWriter(staging.staged, arch)
            try:
                writer.add_type(gguf.GGUFType.ADAPTER)
                writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
                writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
                writer.add_string("d2merge.source_method", loaded.method.name)
                for name, a_np, b_np in named:
                    writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a_np, dtype=np.float32))
                    writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b_np, dtype=np.float32))
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
        except OSError as exc:
            raise disk_error(exc, out_path) from None
        staging.commit()
    result = GGUFLoraResult(out_path, loaded.method.name, tuple(rows), alpha, time.perf_counter() - started)
    if report is not None:
        write_json(Path(report), result.to_json())
    return result


__all__ = ["check_gguf_lora_output", "convert_to_gguf_lora", "GGUFLoraResult"]
