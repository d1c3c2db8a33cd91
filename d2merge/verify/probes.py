"""Verify's probe inputs: seeded random tokens, the built-in English sentences or the user's prompts.

Also the checks that every probe and eval example fits the base's positions, made before any
model runs (a sequence too long would crash the model mid-run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from d2merge.errors import D2MergeError, escaped, option_error
from d2merge.io.checkpoint import BaseCheckpoint
from d2merge.tasks import load_tokenizer


@dataclass(frozen=True)
class Probes:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: dict[str, Any]


def random_probes(vocab_size: int, *, count: int, length: int, seed: int) -> Probes:
    """Seeded uniform random token ids: reproducible and independent of any tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (count, length), generator=generator)
    return Probes(ids, torch.ones_like(ids), {"source": "random", "file": None, "count": count, "length": length,
                                              "seed": seed, "positions": count * length})


def prompt_probes(tokenizer: Any, prompts: Sequence[str], *, max_length: int, source: str) -> Probes:
    """The user's prompts, tokenised by the base's tokenizer, right-padded with an attention mask."""
    encoded = [list(tokenizer(p)["input_ids"])[:max_length] for p in prompts]
    encoded = [ids for ids in encoded if ids]
    if not encoded:
        raise D2MergeError("the prompts tokenise to nothing", path=source)
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return Probes(ids, mask, {"source": "prompts", "file": source, "count": len(encoded), "length": width,
                              "seed": None, "positions": int(mask.sum())})


# Real English for the probes when the base has a tokenizer: random token ids are far from what
# users send (a model's logits on them are flat and near-tied, so rounding flips their argmax far
# more often than on text). Plain, varied, everyday sentences; written here, no download.
PROBE_SENTENCES: tuple[str, ...] = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "She opened the window because the room was too warm.",
    "To make a cup of tea, boil the water and let the leaves steep for three minutes.",
    "The train to London leaves at half past seven every morning.",
    "Water freezes at zero degrees Celsius and boils at one hundred.",
    "My brother plays the guitar, and my sister sings in a choir.",
    "If you mix blue and yellow paint, you get green.",
    "The meeting was moved to Thursday because the manager was ill.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "He forgot his umbrella, so he was soaked by the time he got home.",
    "A week has seven days, and a year has twelve months.",
    "Please send me the report before the end of the day.",
    "The museum is closed on Mondays but open late on Fridays.",
    "Dogs are loyal animals, and many people keep them as pets.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "After the storm, the children went outside to look for rainbows.",
)


def sentence_probes(tokenizer: Any, *, max_length: int) -> Probes:
    """The built-in English sentences, tokenised by the base's tokenizer."""
    probes = prompt_probes(tokenizer, PROBE_SENTENCES, max_length=max_length, source="built-in sentences")
    description = {**probes.description, "source": "sentences", "file": None}
    return Probes(probes.input_ids, probes.attention_mask, description)


def base_positions(config: Mapping[str, Any] | None) -> tuple[int, str] | None:
    """The most positions the base takes (n_positions for GPT-2, max_position_embeddings elsewhere)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def check_probe_positions(config: Mapping[str, Any] | None, probes: Probes, *, location: Path) -> None:
    """A sequence longer than the base's positions would crash the model mid-run (IndexError on GPT-2)."""
    limit = base_positions(config)
    width = int(probes.attention_mask.sum(-1).max()) if probes.attention_mask.numel() else 0
    if limit is not None and width > limit[0]:
        what = ("{probe_length}" if probes.description["source"] == "random"
                else f"the longest probe ({escaped(probes.description['source'])})")
        raise option_error(f"{what} is {width} tokens; the base takes at most {limit[0]} positions "
                           f"({limit[1]} in config.json)", path=location / "config.json",
                           hint="use {probe_length=} or less", probe_length=limit[0])


def check_eval_positions(config: Mapping[str, Any] | None, encoded: Any, *, path: str | Path) -> None:
    """The longest prompt + choice of --mc-eval must fit the base's positions (named by example number)."""
    limit = base_positions(config)
    lengths = encoded.attention_mask.sum(-1)
    if limit is None or not lengths.numel() or int(lengths.max()) <= limit[0]:
        return
    row = int(lengths.argmax())
    raise D2MergeError(f"eval example {int(encoded.example_index[row])} is {int(lengths[row])} tokens with its "
                       f"longest choice; the base takes at most {limit[0]} positions ({limit[1]} in config.json)",
                       path=path, hint="shorten or drop that example")


def read_prompts(path: str | Path) -> list[str]:
    from d2merge.io.checkpoint import read_text

    path = Path(path)
    lines = read_text(path, "prompts file").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise D2MergeError("prompts file has no non-empty line", path=path)
    return prompts


def load_base_tokenizer(base: BaseCheckpoint, why: str) -> Any:
    tokenizer = load_tokenizer(base.folder) if base.folder is not None else None
    if tokenizer is None:
        raise option_error(f"{why} needs the base's tokenizer, and the base has none", path=base.location,
                           hint="use a base folder with tokenizer files")
    return tokenizer
