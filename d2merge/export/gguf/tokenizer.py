"""A GGUF's tokenizer keys from the model's tokenizer.json, as llama.cpp's converter writes them.

- Byte-level BPE tokenizers (tokenizer.json): tokens, token types, merges, special ids,
  add_bos/add_eos and the chat template, plus the pre-tokenizer name llama.cpp selects by the
  sha256 of the tokenization of a fixed probe text (as its converter does). A tokenizer whose
  pre-tokenizer is not one we have checked is refused, never approximated.
- Sentencepiece BPE tokenizers (Llama 2, Mistral v0.1, Gemma, Phi-3) from tokenizer.json, with
  the piece scores rebuilt from the merge order (checked to be llama.cpp's order, else refused).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

from d2merge.errors import D2MergeError
from d2merge.export.gguf.library import gguf_py

# The probe text llama.cpp's converter tokenizes; the sha256 of the resulting id list names the
# pre-tokenizer (llama.cpp's convert_hf_to_gguf_update.py keeps the table). Only pre-tokenizers
# whose tokenizer families we support are listed; anything else is refused.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
}
# gguf token types (gguf.TokenType): written as ints so the table reads without the enum.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """Byte-level BPE from tokenizer.json, or a one-line refusal (never an approximation)."""
    gguf = gguf_py()
    path = folder / "tokenizer.json"
    if not path.is_file():
        only_model = (folder / "tokenizer.model").is_file()
        raise D2MergeError("GGUF export needs a tokenizer.json" + (
            " (d2merge reads sentencepiece vocabularies from it, not from tokenizer.model)" if only_model else ""),
            path=folder, hint="AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes one"
            if only_model else "copy the base's tokenizer files into the merged folder")
    from d2merge.io.json_file import read_json

    spec = read_json(path, "tokenizer.json")
    if not isinstance(spec, dict):
        raise D2MergeError("tokenizer.json is not a JSON object", path=path)
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and "ByteLevel" not in json.dumps(spec):
        _add_sentencepiece_tokenizer(writer, folder, spec, vocab_size)
        return
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise D2MergeError(f"tokenizer model {model.get('type')!r} without a byte-level pre-tokenizer cannot be "
                           "converted to GGUF faithfully", path=path,
                           hint="supported: byte-level BPE (Llama 3, Qwen2/Qwen3, SmolLM2) and sentencepiece "
                                "BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3)")
    from transformers import PreTrainedTokenizerFast

    from d2merge.io.transformers_folder import quiet_transformers

    with quiet_transformers():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    pre = KNOWN_PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise D2MergeError(f"unknown BPE pre-tokenizer (probe hash {digest[:16]}...): llama.cpp would split text "
                           "differently than this tokenizer", path=path,
                           hint="supported: Llama 3, Qwen2/Qwen3 and SmolLM2 tokenizers")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise D2MergeError(f"tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}",
                           path=path)
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        if i in added:
            # llama.cpp matches added tokens before pre-tokenization: special (or <|...|>) ones are
            # control tokens, the others user-defined.
            types.append(CONTROL if added[i].special or _looks_special(token) else USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise D2MergeError("tokenizer.json has no BPE merges", path=path)
    _add_special_tokens(special, folder)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(bool(_byte_level_option(spec.get("pre_tokenizer"), "add_prefix_space")))


# gguf token types (gguf.TokenType) only sentencepiece vocabularies use
UNKNOWN, BYTE = 2, 6
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
SPIECE_SPACE = "\u2581"  # sentencepiece's visible space


def _sentencepiece_prefix(spec: Mapping[str, Any], path: Path) -> bool:
    """Whether the tokenizer puts a space before the text (llama.cpp's ``add_space_prefix``), from the
    normalizer / pre-tokenizer forms llama.cpp's sentencepiece tokenizer reproduces; others refused.

    llama.cpp always writes spaces as U+2581 and, with the prefix, puts one before the text and after
    every special token: what the legacy normalizer (Prepend + Replace, Llama 2 / Mistral v0.1) and
    a Metaspace that prepends always do; Gemma replaces spaces and prepends nothing.
    """
    def step(node: Any) -> list[dict[str, Any]]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [n for child in node.get("normalizers") or node.get("pretokenizers") or [] for n in step(child)]
        return [node]

    normalizer, pre = step(spec.get("normalizer")), step(spec.get("pre_tokenizer"))
    kinds = [n.get("type") for n in normalizer], [n.get("type") for n in pre]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE}
    if not pre and normalizer and normalizer[-1] == replace:
        if kinds[0] == ["Replace"]:
            return False  # Gemma
        if kinds[0] == ["Prepend", "Replace"] and normalizer[0].get("prepend") == SPIECE_SPACE:
            return True  # Llama 2, Mistral v0.1
    if not normalizer and kinds[1] == ["Metaspace"] and pre[0].get("replacement") == SPIECE_SPACE \
            and not pre[0].get("split", True) and pre[0].get("prepend_scheme") in ("always", "never"):
        return pre[0]["prepend_scheme"] == "always"
    raise D2MergeError(f"sentencepiece tokenizer with normalizer {kinds[0]} and pre-tokenizer {kinds[1]}: llama.cpp "
                       "would split or prefix text differently", path=path,
                       hint="supported: the Llama 2 / Mistral v0.1 normalizer (Prepend + Replace), Gemma's (Replace)")


def _merge_pairs(model: Mapping[str, Any], path: Path) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2:
            raise D2MergeError(f"tokenizer.json has a malformed merge {merge!r}", path=path)
        pairs.append((pair[0], pair[1]))
    return pairs


def sentencepiece_scores(vocab: Mapping[str, int], merges: list[tuple[str, str]], path: Path,
                         whole: frozenset[str] = frozenset()) -> dict[str, float]:
    """The score of each merged token for llama.cpp's sentencepiece tokenizer, from the BPE merges.

    llama.cpp merges, again and again, the adjacent pair whose concatenation is the vocabulary token
    of highest score; HF's BPE merges the pair of lowest rank. They agree when the merges are the
    ones HF writes for a sentencepiece model (its converter lists every split of every token, best
    token first): every pair whose concatenation is a token is a merge, and the merges that make one
    token are consecutive. Scores are then minus the order of first appearance. A tokenizer.json
    whose merges are otherwise (trained by ``tokenizers``, edited) is refused: llama.cpp would
    tokenize it differently.
    """
    order: dict[str, int] = {}
    pairs = set()
    previous = None
    for left, right in merges:
        token = left + right
        if token not in vocab or left not in vocab or right not in vocab:
            raise D2MergeError(f"merge {left!r} + {right!r} names a token missing from the vocabulary", path=path)
        if token != previous and token in order:
            raise D2MergeError(f"the merges that make {token!r} are not consecutive: not a sentencepiece BPE's "
                               "merge list, llama.cpp would tokenize differently", path=path)
        order.setdefault(token, len(order))
        pairs.add((left, right))
        previous = token
    for token in order:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab and (left, right) not in pairs:
                raise D2MergeError(f"no merge {left!r} + {right!r} although both and {token!r} are tokens: not a "
                                   "sentencepiece BPE's merge list, llama.cpp would tokenize differently", path=path)
    for token in vocab:  # a token no merge makes must not be reachable by llama.cpp's pairing either
        if token in order or token in whole or BYTE_TOKEN.match(token):
            continue
        for cut in range(1, len(token)):
            if token[:cut] in vocab and token[cut:] in vocab:
                raise D2MergeError(f"no merge {token[:cut]!r} + {token[cut:]!r} although both and {token!r} are "
                                   "tokens: not a sentencepiece BPE's merge list, llama.cpp would tokenize "
                                   "differently", path=path)
    return {token: -float(rank) for token, rank in order.items()}


def _add_sentencepiece_tokenizer(writer: Any, folder: Path, spec: Mapping[str, Any], vocab_size: int) -> None:
    """A sentencepiece BPE with byte fallback (Llama 2, Mistral v0.1, Gemma, Phi-3), from tokenizer.json.

    llama.cpp's converter reads tokenizer.model with the sentencepiece library; the same vocabulary's
    tokenizer.json holds everything it takes from there except the scores, which are rebuilt from the
    merge order (:func:`sentencepiece_scores`). Token types as sentencepiece's: control for special
    tokens, byte for ``<0xXX>``, unknown for the unk token, user-defined for other added tokens.
    """
    gguf = gguf_py()
    path = folder / "tokenizer.json"
    add_prefix = _sentencepiece_prefix(spec, path)
    model = spec["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise D2MergeError("tokenizer.json's BPE has no vocabulary", path=path)
    added = {int(t["id"]): t for t in spec.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
    by_id = {int(i): t for t, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise D2MergeError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}", path=path)
    scores_of = sentencepiece_scores(vocab, _merge_pairs(model, path), path,
                                     whole=frozenset(t["content"] for t in added.values()))
    if not any(BYTE_TOKEN.match(t) for t in vocab):
        raise D2MergeError("byte_fallback without <0xXX> byte tokens", path=path)
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)  # llama.cpp's converter's padding score
            types.append(UNUSED)
            continue
        tokens.append(token)
        scores.append(scores_of.get(token, 0.0))
        if i in added and (added[i].get("special") or token == unk):
            types.append(UNKNOWN if token == unk else CONTROL)
        elif i in added:
            types.append(USER_DEFINED)
        elif BYTE_TOKEN.match(token):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    _add_special_tokens(special, folder)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(add_prefix)


def _add_special_tokens(special: Any, folder: Path) -> None:
    """add_bos/add_eos as the tokenizer really adds them (not what a config claims): llama.cpp's
    defaults for these differ by tokenizer, so both are always written."""
    from d2merge.io.transformers_folder import load_tokenizer

    configured = load_tokenizer(folder)
    ids = configured("a")["input_ids"]
    special.add_special_token = {"bos": configured.bos_token_id is not None and ids[:1] == [configured.bos_token_id],
                                 "eos": configured.eos_token_id is not None and ids[-1:] == [configured.eos_token_id]}


def _byte_level_option(node: Any, key: str) -> Any:
    """An option of the ByteLevel step of a (possibly nested Sequence) pre-tokenizer."""
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return node.get(key)
        for child in node.get("pretokenizers") or []:
            found = _byte_level_option(child, key)
            if found is not None:
                return found
    return None

