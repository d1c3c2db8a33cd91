"""Tied embeddings: which stored input embedding a base's ``lm_head`` shares, and what a change to either becomes.

transformers loads a tied ``lm_head`` from the input embedding, whatever the checkpoint stores. An
adapter that changes one of the two therefore changes both unless the output unties them; the
``tied_embeddings`` option (untie, tie, error) decides, and :func:`settle_tie` applies it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from d2merge.errors import D2MergeError
from d2merge.io.model_structure import model_structure
from d2merge.methods import ModuleSettings
from d2merge.options.base import option_error

# Names transformers gives the input embedding that an ``lm_head`` is tied to.
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
OUTPUT_EMBEDDING = "lm_head.weight"


def tied_pair(infos: dict[str, tuple[torch.dtype, tuple[int, ...]]], config: dict[str, Any]) -> tuple[str, str] | None:
    """(input embedding, lm_head) when the base ties them, else None (the plan's rule; extract asks it too).

    transformers' own model class answers (the parameters it shares after tying, on the meta
    device); config.json's ``tie_word_embeddings`` decides only for a base it cannot build
    or whose output embedding is not an ``lm_head``.
    """
    sub_configs = [k for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    if config.get("tie_word_embeddings") is False and not sub_configs and OUTPUT_EMBEDDING in infos:
        # transformers ties only when the (text) config says so: an explicit false with no sub-config
        # and a stored lm_head needs no model build (importing its code is ~3 CPU-s of a 1.1B merge).
        return None
    structure = model_structure(config)
    if structure is not None and structure.output_embedding == OUTPUT_EMBEDDING:
        group = next((g for g in structure.tied if OUTPUT_EMBEDDING in g), None)
        if group is None:
            return None  # transformers keeps a separate lm_head
        inputs = group - {OUTPUT_EMBEDDING}
        candidates = [n for n in infos if n != OUTPUT_EMBEDDING
                      and any(n == g or g.endswith("." + n) or n.endswith("." + g) for g in inputs)]
        return _checked_pair(infos, candidates)
    tied = config.get("tie_word_embeddings")
    if tied is None:
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        tied = text_config.get("tie_word_embeddings", OUTPUT_EMBEDDING not in infos and bool(config))
    if not tied:
        return None
    return _checked_pair(infos, [n for n in infos if n.endswith(INPUT_EMBEDDING_SUFFIXES)])


def _checked_pair(infos: dict[str, tuple[torch.dtype, tuple[int, ...]]], candidates: list[str]
                  ) -> tuple[str, str] | None:
    """The one stored input embedding and ``lm_head``, if their shapes agree."""
    if len(candidates) != 1:
        return None
    emb, head = candidates[0], OUTPUT_EMBEDDING
    if head in infos and infos[head][1] != infos[emb][1]:
        return None
    return emb, head


def settle_tie(pair: tuple[str, str], policy: str, merges: dict[str, tuple[str, ModuleSettings]],
               replacements: dict[str, str], token_rows: set[str], adapter_file: Path) -> tuple[bool, list[str]]:
    """(untie the pair?, the plan's notes) for an adapter on a base whose ``pair`` (embedding, lm_head) is tied.

    ``merges`` and ``replacements`` are the adapter's changes by stored tensor name; with ``policy``
    "tie", a change to the lm_head moves onto the stored embedding (both dicts updated in place), so
    that one shared tensor carries it.
    """
    emb, head = pair
    changed = [n for n in (emb, head) if n in merges or n in replacements]
    if changed == [emb] and emb in token_rows and emb not in replacements:
        # PEFT ties the lm_head's token adapter to the embedding's: both change, and the tie is exact.
        return False, [f"trainable tokens on '{emb}', which is tied to '{head}': the tie is kept, as PEFT "
                       "applies the trained rows to both (exact)"]
    if emb in token_rows:
        raise D2MergeError(f"trainable tokens on the tied '{emb}' together with a change to '{head}' or a full "
                           "embedding tensor", path=adapter_file,
                           hint="d2merge cannot tell how PEFT combined them; merge with PEFT's merge_and_unload")
    if not changed:
        return False, []
    if policy == "error":
        raise option_error(f"the adapter changes '{changed[0]}', which is tied to "
                           f"'{head if changed[0] == emb else emb}' (tie_word_embeddings)",
                           path=adapter_file,
                           hint="choose {tied_embeddings=untie} (exact: writes both) or tie (shares the change)")
    if policy == "untie":
        return True, [f"tied embeddings untied: '{emb}' and '{head}' are written separately "
                      "and tie_word_embeddings is set to false (exact)"]
    if len(changed) == 2:
        raise option_error(f"the adapter changes both '{emb}' and '{head}', which are tied",
                           path=adapter_file, hint="use {tied_embeddings=untie}")
    if changed[0] == head:
        # keep one shared tensor: move lm_head's change onto the stored embedding
        if head in merges:
            merges[emb] = merges.pop(head)
        else:
            replacements[emb] = replacements.pop(head)
    return False, [f"tied embeddings kept tied: the change to '{changed[0]}' now applies to both "
                   f"'{emb}' and '{head}' (not exact for the untouched one)"]
