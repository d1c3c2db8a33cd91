"""Where a parameter transformers holds in memory is stored in the checkpoint, from transformers' own tables.

transformers 5 renames and fuses some checkpoints on load (``get_model_conversion_mapping``):
Mixtral's ``block_sparse_moe`` is ``mlp`` in memory, and its per-expert ``experts.N.w1`` /
``w3`` / ``w2`` tensors are stacked into ``mlp.experts.gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I); Qwen3-MoE stacks ``experts.N.gate_proj`` / ``up_proj`` the same way.
``save_pretrained`` writes the checkpoint's names back. PEFT names what it adapts by the
in-memory names, while the merge writes the checkpoint's tensors; this module maps one onto the
other by running transformers' own renaming on every stored key, and interprets exactly the
converter operations whose inverse is a plain slice: ``MergeModulelist(dim=0)`` (stack the
experts, indexed by the ``*`` of the source pattern) optionally followed by ``Concatenate(dim=d)``
(the sources side by side along ``d``, in pattern order). Any other operation (interleave,
transpose, chunk, a quantizer's) makes the parameter unmappable, and the planner refuses it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import nn

from d2merge.methods.target_parameters import Piece, Target


class CheckpointLayout:
    """The stored tensors of each in-memory parameter name, as transformers would load them."""

    def __init__(self, model: nn.Module | None, stored: Mapping[str, tuple[Any, tuple[int, ...]]]):
        self.stored = stored
        self.memory_shapes = {} if model is None else {n: tuple(p.shape) for n, p in model.state_dict().items()}
        # memory name -> [(stored key, expert or None, source pattern index, stored shape)]
        self.sources: dict[str, list[tuple[str, int | None, int, tuple[int, ...]]]] = {}
        self.concat_dims: dict[str, int | None] = {}  # memory name -> per-expert dim the sources are side by side on
        self.unmappable: dict[str, str] = {}  # memory name -> why
        if model is not None:
            self._index(model)

    def _index(self, model: nn.Module) -> None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter,
                                                         apply_renamings, rename_source_key)
        except ImportError:
            return
        conversions = get_model_conversion_mapping(model, add_legacy=False)
        renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None)
        for key, (_, shape) in self.stored.items():
            memory, pattern = rename_source_key(key, renamings, converters, prefix, self.memory_shapes)
            if pattern is None:
                if memory != key:
                    self.sources.setdefault(memory, []).append((key, None, 0, tuple(shape)))
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            ops = list(converter.operations)
            stacked = len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
            understood = stacked and (
                (len(ops) == 1 and len(converter.source_patterns) == 1)
                or (len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim >= 1))
            if not understood:
                self.unmappable[memory] = (f"transformers builds it from '{key}' with "
                                           f"{' then '.join(type(o).__name__ for o in ops)}, which d2merge does not invert")
                continue
            expert = _expert_index(apply_renamings(key, renamings), pattern)
            if expert is None:
                self.unmappable[memory] = f"no expert index in '{key}' for transformers' pattern '{pattern}'"
                continue
            self.sources.setdefault(memory, []).append(
                (key, expert, converter.source_patterns.index(pattern), tuple(shape)))
            self.concat_dims[memory] = ops[1].dim - 1 if len(ops) == 2 else None

    def stored_name(self, memory: str) -> str | None:
        """The stored name of a tensor transformers only renames on load (None: not a plain rename)."""
        found = self.sources.get(memory)
        if found and len(found) == 1 and found[0][1] is None:
            return found[0][0]
        return None

    def pieces(self, target: Target) -> list[tuple[str, Piece]] | str:
        """(stored tensor, its part of dW) for each stored tensor of a targeted parameter; or why there are none."""
        memory = target.key
        if memory in self.unmappable:
            return self.unmappable[memory]
        whole = memory if memory in self.stored else self.stored_name(memory)
        if whole is not None:
            shape = tuple(self.stored[whole][1])
            if shape != target.shape:
                return (f"the checkpoint stores it as '{whole}' with shape {list(shape)}, while transformers holds "
                        f"{list(target.shape)}")
            return [(whole, Piece(target))]
        found = self.sources.get(memory)
        if not found:
            return "the checkpoint holds no tensor transformers loads into it"
        if any(e is None for _, e, _, _ in found) or len(target.shape) != 3:
            return "transformers assembles it from several stored tensors in a way d2merge does not map"
        experts = sorted({e for _, e, _, _ in found if e is not None})
        if experts != list(range(target.num_experts)):
            return f"the checkpoint's expert indices {experts} are not 0..{target.num_experts - 1}"
        dim = self.concat_dims.get(memory)
        matrix = target.shape[1:]
        pieces: list[tuple[str, Piece]] = []
        for expert in experts:
            mine = sorted((s, key, shape) for key, e, s, shape in found if e == expert)
            if [s for s, _, _ in mine] != list(range(len(mine))):
                return f"expert {expert} has the stored parts {[k for _, k, _ in mine]}, not one of each"
            if dim is None:
                (_, key, shape), = mine
                if shape != matrix:
                    return f"'{key}' has shape {list(shape)}, one expert of the parameter is {list(matrix)}"
                pieces.append((key, Piece(target, expert)))
                continue
            offset = 0
            for _, key, shape in mine:
                if len(shape) != 2 or shape[1 - dim] != matrix[1 - dim]:
                    return f"'{key}' has shape {list(shape)}, which does not fit one expert's {list(matrix)}"
                pieces.append((key, Piece(target, expert, dim, offset, offset + shape[dim])))
                offset += shape[dim]
            if offset != matrix[dim]:
                return f"expert {expert}'s stored parts add up to {offset} along dim {dim}, not {matrix[dim]}"
        return pieces


def _expert_index(key: str, pattern: str) -> int | None:
    """The number the ``*`` of a converter's source pattern stands for in ``key``."""
    regex = re.escape(pattern.lstrip(".")).replace(r"\*", r"(\d+)")
    found = re.search(r"(?:^|\.)" + regex + r"$", key)
    return int(found.group(1)) if found and found.groups() else None
