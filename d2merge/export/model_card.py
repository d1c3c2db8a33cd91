"""The model card (README.md) written next to a merged model.

Its YAML front matter is what the Hub reads: ``base_model`` plus
``base_model_relation: finetune`` puts the merged model in the base's model
tree (an adapter merged into its base is a fine-tune of that base; the Hub's
"merge" relation means several models combined). The body records how the
weights were made, so a reader can reproduce and audit them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Mapping

from d2merge.version import __version__

METHOD_TITLES = {"d2lora": "D2-LoRA", "dual_lora": "Dual LoRA", "lora": "LoRA", "dora": "DoRA"}


@dataclass(frozen=True)
class CardInfo:
    """What the card says; collected from the merge plan by ``d2merge.export.hf_folder.card_info`` (and verify, when it ran)."""

    base_model: str | None
    method: str
    settings: Mapping[str, Any]
    source_hashes: Mapping[str, str] = field(default_factory=dict)
    out_dtype: str = "auto"
    notes: tuple[str, ...] = ()
    verify_table: str | None = None
    model_name: str | None = None


# An absolute path: POSIX (/tmp/x, ~/x) or Windows (C:\x), up to whitespace, a quote or a bracket.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(?:~?/|[A-Za-z]:\\)[^\s`'\"()\[\]]+")


def without_local_paths(text: str) -> str:
    """``base /tmp/run-7/base`` -> ``base base``: the card is published, the machine's paths are not.

    Each absolute path keeps only its last component (the folder or file name a
    reader recognises), as the sources table's ``base/...`` labels do; a Hub
    cache path keeps the repo id.
    """
    def anonymise(match: re.Match[str]) -> str:
        path = match.group(0)
        pure = PureWindowsPath(path) if re.match(r"[A-Za-z]:\\", path) else PurePosixPath(path)
        for part in pure.parts:
            if part.startswith("models--"):
                return part[len("models--"):].replace("--", "/", 1)
        return pure.name or path
    return _ABSOLUTE_PATH.sub(anonymise, text)


def _yaml_scalar(value: str) -> str:
    # JSON strings are valid YAML scalars and need no further escaping rules.
    return json.dumps(value)


def render_model_card(info: CardInfo) -> str:
    title = METHOD_TITLES.get(info.method, info.method)
    front = ["---", "library_name: transformers"]
    if info.base_model:
        front += ["base_model:", f"- {_yaml_scalar(info.base_model)}", "base_model_relation: finetune"]
    front += ["tags:", "- d2merge", f"- {info.method.replace('_', '-')}", "- merged-adapter", "---", ""]
    name = info.model_name or "Merged model"
    body = [
        f"# {name}",
        "",
        f"This model is {('`' + info.base_model + '`') if info.base_model else 'a base model'} with a {title} adapter "
        f"merged into its weights by d2merge {__version__}. It loads with "
        "`transformers` alone and runs at the base model's speed: the adapter adds no layers.",
        "",
        "## How it was made",
        "",
        f"- method: {title}",
    ]
    for key, value in info.settings.items():
        body.append(f"- {key}: {value}")
    body += [f"- output dtype: {info.out_dtype}",
             "- merge arithmetic: fp32, one round-to-nearest-even cast to the output dtype at the end"]
    for note in info.notes:
        body.append(f"- note: {without_local_paths(note)}")
    if info.source_hashes:
        body += ["", "## Sources (sha256)", "", "| file | sha256 |", "| --- | --- |"]
        body += [f"| `{name}` | `{digest}` |" for name, digest in info.source_hashes.items()]
    if info.verify_table:
        body += ["", "## Verification (merged vs unmerged)", "", "```", without_local_paths(info.verify_table.rstrip()),
                 "```"]
    body += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = AutoModelForCausalLM.from_pretrained("<this folder or repo id>")',
             'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo id>")', "```", ""]
    return "\n".join(front + body)


_SOURCE_ROW = re.compile(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$")


def recorded_source_hashes(card: str) -> dict[str, str]:
    """The "Sources (sha256)" table :func:`render_model_card` wrote, read back: {``base/...`` or
    ``adapter/...`` label: sha256}; empty when the card has none (a merge run with --no-hash-sources)."""
    found: dict[str, str] = {}
    lines = card.splitlines()
    if "## Sources (sha256)" not in lines:
        return found
    for line in lines[lines.index("## Sources (sha256)") + 1:]:
        if line.startswith("## "):
            break
        match = _SOURCE_ROW.match(line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found
