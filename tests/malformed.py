"""A corpus of malformed inputs for `d2merge merge`, built on demand (no stored binaries).

Each :class:`Case` builds one broken input into a fresh folder (a copy of a small valid base
and adapter, then one thing broken) and says which one-line error it must produce: a regex
for the message, the file the message must name and, where relevant, the tensor.

The templates are tiny (a two-layer Llama-shaped model with hidden size 16, written directly
with d2merge's own writer, no transformers import), so building a case is a file copy plus a
few bytes changed. `tests/system/test_malformed_corpus.py` runs every case; `tests/system/test_fuzz.py` and
`tests/system/test_security.py` reuse the builders.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from d2merge.io.safetensors_file import save_tensors

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 32, 16, 32, 2
RANK = 2
TARGETS = ("q_proj", "v_proj")
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
LAST_BASE_TENSOR = "lm_head.weight"  # the last tensor in the data section of model.safetensors
MARKER = "PWNED"  # a pickle payload that runs would create this file in the case folder


# -- templates ------------------------------------------------------------------------------------


def base_tensors(seed: int = 0, *, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict in a fixed order (embeddings first, lm_head last)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, hidden, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden // 2, hidden)),
                            ("self_attn.v_proj", (hidden // 2, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (INTERMEDIATE, hidden)), ("mlp.up_proj", (INTERMEDIATE, hidden)),
                            ("mlp.down_proj", (hidden, INTERMEDIATE))):
            tensors[f"{p}{name}.weight"] = 0.2 * torch.randn(*shape, generator=g)
        tensors[f"{p}input_layernorm.weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
        tensors[f"{p}post_attention_layernorm.weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
    tensors["model.norm.weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
    tensors[LAST_BASE_TENSOR] = torch.randn(VOCAB, hidden, generator=g)
    return tensors


def base_config(hidden: int = HIDDEN) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "float32"}


def write_base(folder: Path, *, shards: int = 1, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """A base model folder: config.json, a tokenizer file, one safetensors file or `shards` plus an index."""
    folder.mkdir(parents=True)
    tensors = base_tensors(seed, hidden=hidden)
    (folder / "config.json").write_text(json.dumps(base_config(hidden), indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    if shards == 1:
        save_tensors(folder / "model.safetensors", tensors, {"format": "pt"})
        return folder
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_tensors(folder / shard, {n: tensors[n] for n in part}, {"format": "pt"})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def adapter_tensors(seed: int = 1, *, hidden: int = HIDDEN, rank: int = RANK) -> dict[str, torch.Tensor]:
    """D2-LoRA factors for q_proj and v_proj of every layer (non-zero B, so a merge changes weights)."""
    g = torch.Generator().manual_seed(seed)
    out = {"q_proj": hidden, "v_proj": hidden // 2}
    tensors = {}
    for i in range(LAYERS):
        for target in TARGETS:
            module = f"{PREFIX}model.layers.{i}.self_attn.{target}"
            for sign in ("pos", "neg"):
                tensors[f"{module}.lora_A_{sign}.weight"] = 0.2 * torch.randn(rank, hidden, generator=g)
                tensors[f"{module}.lora_B_{sign}.weight"] = 0.2 * torch.randn(out[target], rank, generator=g)
    return tensors


def adapter_config_dict(**fields: Any) -> dict[str, Any]:
    config = {"peft_type": "D2LORA", "base_model_name_or_path": None, "r": RANK, "lora_alpha": 4.0, "tau": 0.5,
              "norm_axis": "out", "residual": True, "eps": 0.0, "target_modules": list(TARGETS),
              "format_version": "1"}
    config.update(fields)
    return config


def write_adapter(folder: Path, *, tensors: dict[str, torch.Tensor] | None = None,
                  config: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config or adapter_config_dict(), indent=2))
    save_tensors(folder / "adapter_model.safetensors", adapter_tensors() if tensors is None else tensors,
                 {"format": "pt"})
    return folder


def write_templates(root: Path) -> Path:
    """The valid inputs every case starts from; build once per test session and copy per case."""
    write_base(root / "base")
    write_base(root / "sharded", shards=3)
    write_adapter(root / "adapter")
    return root


# -- safetensors byte surgery ---------------------------------------------------------------------


def split_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict, data bytes) of a valid safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header: dict[str, Any] | bytes, data: bytes, *, header_len: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body) if header_len is None else header_len) + body + data


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, data = split_safetensors(path)
    edit(header)
    path.write_bytes(join_safetensors(header, data))


def first_tensor_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file in data order."""
    header, _ = split_safetensors(path)
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


# -- cases ----------------------------------------------------------------------------------------


@dataclass
class Workspace:
    """One case's folder: copies of the templates, the marker a payload would create, the output path."""

    root: Path
    templates: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def copy(self, template: str, name: str | None = None) -> Path:
        return Path(shutil.copytree(self.templates / template, self.root / (name or template), symlinks=True))

    def merge_args(self, *extra: str, base: Path | str | None = None, adapter: Path | str | None = None,
                   out: Path | str | None = None) -> list[str]:
        return ["merge", str(base or self.base), str(adapter or self.adapter), "-o", str(out or self.out), "-q",
                *extra]


@dataclass(frozen=True)
class Case:
    """A malformed input and the one-line error it must give.

    ``runner`` is "inprocess" (d2merge.cli.main), "subprocess" (main in a fresh interpreter), or a
    special environment the test sets up: "readonly" (output parent not writable) and
    "fsize" (RLIMIT_FSIZE: writes fail with EFBIG, like a full disk).
    """

    id: str
    build: Callable[[Workspace], list[str]]
    expect: str  # regex searched in the error line
    file: str  # a path fragment the line must name
    tensor: str | None = None
    runner: str = "inprocess"


CASES: list[Case] = []


def case(id: str, expect: str, file: str, tensor: str | None = None, *, runner: str = "inprocess"
         ) -> Callable[[Callable[[Workspace], list[str] | None]], Callable[[Workspace], list[str] | None]]:
    def register(fn: Callable[[Workspace], list[str] | None]) -> Callable[[Workspace], list[str] | None]:
        own = getattr(fn, "builds_own", False)

        def build(ws: Workspace) -> list[str]:
            if not own:
                ws.copy("base")
                ws.copy("adapter")
            argv = fn(ws)
            for template in ("base", "adapter"):  # whatever a builder with its own inputs left out
                if not (ws.root / template).exists():
                    ws.copy(template)
            return argv or ws.merge_args()

        CASES.append(Case(id, build, expect, file, tensor, runner))
        return fn

    return register


def own_inputs(fn: Callable[[Workspace], list[str] | None]) -> Callable[[Workspace], list[str] | None]:
    """Mark a builder that creates base/adapter itself (the templates fill in whatever it did not)."""
    fn.builds_own = True  # type: ignore[attr-defined]
    return fn


def _base_st(ws: Workspace) -> Path:
    return ws.base / "model.safetensors"


def _adapter_st(ws: Workspace) -> Path:
    return ws.adapter / "adapter_model.safetensors"


def _config(ws: Workspace) -> Path:
    return ws.adapter / "adapter_config.json"


def _set_config(ws: Workspace, text: str | None = None, **fields: Any) -> None:
    _config(ws).write_text(text if text is not None else json.dumps(adapter_config_dict(**fields)))


def _rewrite_adapter(ws: Workspace, tensors: dict[str, torch.Tensor]) -> None:
    _adapter_st(ws).unlink()
    save_tensors(_adapter_st(ws), tensors, {"format": "pt"})


def _drop_config_field(ws: Workspace, name: str) -> None:
    config = adapter_config_dict()
    del config[name]
    _set_config(ws, json.dumps(config))


Q0_A_POS = f"{PREFIX}{Q0}.lora_A_pos.weight"
Q0_B_NEG = f"{PREFIX}{Q0}.lora_B_neg.weight"
FIRST_BASE_TENSOR = "model.embed_tokens.weight"


# ---- safetensors files, for the base (model.safetensors) and the adapter --------------------------

def _st_cases(kind: str, path_of: Callable[[Workspace], Path], file: str, last: str, first: str) -> None:
    """The same byte-level breakage for a base shard and an adapter file."""

    @case(f"{kind}-st-empty", r"file is 0 bytes, too short for a safetensors header", file)
    def _(ws: Workspace) -> None:
        path_of(ws).write_bytes(b"")

    @case(f"{kind}-st-shorter-than-prefix", r"file is 5 bytes, too short", file)
    def _(ws: Workspace) -> None:
        path_of(ws).write_bytes(path_of(ws).read_bytes()[:5])

    @case(f"{kind}-st-truncated-in-header", r"header length \d+ is larger than the file", file)
    def _(ws: Workspace) -> None:
        raw = path_of(ws).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        path_of(ws).write_bytes(raw[:8 + n // 2])

    @case(f"{kind}-st-truncated-in-data", r"data is truncated: tensors need \d+ bytes, the file has \d+", file, last)
    def _(ws: Workspace) -> None:
        raw = path_of(ws).read_bytes()
        path_of(ws).write_bytes(raw[:-12])

    @case(f"{kind}-st-header-length-past-eof", r"header length \d+ is larger than the file", file)
    def _(ws: Workspace) -> None:
        raw = path_of(ws).read_bytes()
        path_of(ws).write_bytes(struct.pack("<Q", len(raw) + 100) + raw[8:])

    @case(f"{kind}-st-header-length-2**60", r"header length 1152921504606846976 exceeds the \d+-byte limit", file)
    def _(ws: Workspace) -> None:
        raw = path_of(ws).read_bytes()
        path_of(ws).write_bytes(struct.pack("<Q", 2**60) + raw[8:])

    @case(f"{kind}-st-invalid-json", r"header is not valid JSON", file)
    def _(ws: Workspace) -> None:
        header, data = split_safetensors(path_of(ws))
        body = json.dumps(header).encode()
        path_of(ws).write_bytes(join_safetensors(body[:-1] + b",}", data))  # a trailing comma

    @case(f"{kind}-st-header-not-utf8", r"header is not valid JSON \(UnicodeDecodeError\)", file)
    def _(ws: Workspace) -> None:
        header, data = split_safetensors(path_of(ws))
        body = json.dumps(header).encode()
        path_of(ws).write_bytes(join_safetensors(body[:10] + b"\xff\xfe" + body[12:], data))

    @case(f"{kind}-st-overlapping-offsets", r"data offsets \[0, \d+\) overlaps the previous tensor", file)
    def _(ws: Workspace) -> None:
        def edit(header: dict[str, Any]) -> None:
            # the second tensor points at the first one's bytes (same size: both are shape-compatible)
            second = [k for k in first_tensor_keys(path_of(ws))][1]
            shape = header[first]["shape"]
            header[second].update(shape=shape, data_offsets=list(header[first]["data_offsets"]))
        edit_header(path_of(ws), edit)

    @case(f"{kind}-st-offsets-out-of-range", r"data_offsets \[\d+, \d+\) point past the end of the data", file, last)
    def _(ws: Workspace) -> None:
        def edit(header: dict[str, Any]) -> None:
            begin, end = header[last]["data_offsets"]
            header[last]["data_offsets"] = [begin + 2**40, end + 2**40]
        edit_header(path_of(ws), edit)

    @case(f"{kind}-st-shape-does-not-match-bytes", r"F32 \[\d+, 99\] needs \d+ bytes but data_offsets span \d+",
          file, first)
    def _(ws: Workspace) -> None:
        edit_header(path_of(ws), lambda h: h[first].update(shape=[h[first]["shape"][0], 99]))

    @case(f"{kind}-st-dtype-does-not-match-bytes", r"F64 \[\d+, \d+\] needs \d+ bytes but data_offsets span \d+",
          file, first)
    def _(ws: Workspace) -> None:
        edit_header(path_of(ws), lambda h: h[first].update(dtype="F64"))

    @case(f"{kind}-st-unknown-dtype", r"unsupported dtype 'F128'", file, first)
    def _(ws: Workspace) -> None:
        edit_header(path_of(ws), lambda h: h[first].update(dtype="F128"))

    @case(f"{kind}-st-negative-dim", r"invalid shape \[-\d+, \d+\]", file, first)
    def _(ws: Workspace) -> None:
        edit_header(path_of(ws), lambda h: h[first].update(shape=[-h[first]["shape"][0], h[first]["shape"][1]]))

    @case(f"{kind}-st-reversed-offsets", r"invalid data_offsets \[\d+, 0\]", file, first)
    def _(ws: Workspace) -> None:
        edit_header(path_of(ws), lambda h: h[first].update(data_offsets=[h[first]["data_offsets"][1], 0]))

    @case(f"{kind}-st-trailing-bytes", r"16 unexpected bytes after the last tensor", file)
    def _(ws: Workspace) -> None:
        with open(path_of(ws), "ab") as fh:
            fh.write(b"\0" * 16)


_st_cases("base", _base_st, "base/model.safetensors", LAST_BASE_TENSOR, FIRST_BASE_TENSOR)
_st_cases("adapter", _adapter_st, "adapter/adapter_model.safetensors",
          f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B_neg.weight",
          f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A_pos.weight")


@case("base-st-header-not-an-object", r"header is not a JSON object", "base/model.safetensors")
def _(ws: Workspace) -> None:
    _, data = split_safetensors(_base_st(ws))
    _base_st(ws).write_bytes(join_safetensors(b"[1, 2, 3]", data))


@case("base-st-dtype-not-a-string", r"unsupported dtype \[\]", "base/model.safetensors", FIRST_BASE_TENSOR)
def _(ws: Workspace) -> None:  # found by tests/system/test_fuzz.py: once a TypeError (unhashable list)
    edit_header(_base_st(ws), lambda h: h[FIRST_BASE_TENSOR].update(dtype=[]))


@case("base-st-metadata-not-strings", r"__metadata__ must map strings to strings", "base/model.safetensors")
def _(ws: Workspace) -> None:
    edit_header(_base_st(ws), lambda h: h.update(__metadata__={"format": 1}))


# ---- base folders -------------------------------------------------------------------------------

@case("base-index-missing-shard", r"index references missing shard model-00002-of-00003.safetensors",
      "base/model.safetensors.index.json")
@own_inputs
def _(ws: Workspace) -> None:
    ws.copy("sharded", "base")
    (ws.base / "model-00002-of-00003.safetensors").unlink()


@case("base-index-not-json", r"index is not valid JSON", "base/model.safetensors.index.json")
@own_inputs
def _(ws: Workspace) -> None:
    ws.copy("sharded", "base")
    (ws.base / "model.safetensors.index.json").write_text('{"weight_map": {')


@case("base-index-without-weight-map", r"index has no valid 'weight_map'", "base/model.safetensors.index.json")
@own_inputs
def _(ws: Workspace) -> None:
    ws.copy("sharded", "base")
    (ws.base / "model.safetensors.index.json").write_text('{"metadata": {}}')


@case("base-index-shard-outside-folder", r"index names a shard outside the folder: '../model.safetensors'",
      "base/model.safetensors.index.json")
@own_inputs
def _(ws: Workspace) -> None:
    ws.copy("sharded", "base")
    index = ws.base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][FIRST_BASE_TENSOR] = "../model.safetensors"
    shutil.copy(ws.base / "model-00001-of-00003.safetensors", ws.root / "model.safetensors")
    index.write_text(json.dumps(data))


@case("base-index-disagrees-with-shards", r"the index says this tensor is in model-00003-of-00003.safetensors",
      "base/model.safetensors.index.json", FIRST_BASE_TENSOR)
@own_inputs
def _(ws: Workspace) -> None:
    ws.copy("sharded", "base")
    index = ws.base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][FIRST_BASE_TENSOR] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps(data))


@case("base-tensor-in-two-shards",
      r"tensor appears in two files \(model-00002-of-00003.safetensors and model-00003-of-00003.safetensors\)",
      "base/model-00003-of-00003.safetensors", "model.norm.weight")
@own_inputs
def _(ws: Workspace) -> None:
    ws.copy("sharded", "base")
    from d2merge.io.safetensors_file import SafetensorsFile

    shard = ws.base / "model-00002-of-00003.safetensors"
    source = SafetensorsFile(shard)
    tensors = {k: source.read(k).clone() for k in source.keys()}
    tensors["model.norm.weight"] = torch.ones(HIDDEN)  # also in shard 3
    shard.unlink()
    save_tensors(shard, tensors)
    # the index lists the tensor once, under shard 3; shard 1 is read first, shard 2 is where it repeats
    index = ws.base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps(data))


@case("base-config-not-json", r"config.json is not valid JSON \(line 1", "base/config.json")
def _(ws: Workspace) -> None:
    (ws.base / "config.json").write_text("{'model_type': 'llama'}")


@case("base-config-not-an-object", r"config.json is not a JSON object", "base/config.json")
def _(ws: Workspace) -> None:
    (ws.base / "config.json").write_text("[]")


@case("base-missing", r"path not found", "no-such-base")
def _(ws: Workspace) -> list[str]:
    return ws.merge_args(base=ws.root / "no-such-base")


@case("base-folder-without-weights", r"no model weights found", "empty-base")
def _(ws: Workspace) -> list[str]:
    (ws.root / "empty-base").mkdir()
    return ws.merge_args(base=ws.root / "empty-base")


@case("base-and-adapter-swapped", r"this folder is an adapter, not a base model", "adapter")
def _(ws: Workspace) -> list[str]:
    return ws.merge_args(base=ws.adapter, adapter=ws.base)


@case("base-not-a-model-file", r"not a model: expected a folder or a .safetensors file", "weights.npz")
def _(ws: Workspace) -> list[str]:
    (ws.root / "weights.npz").write_bytes(b"PK\x03\x04")
    return ws.merge_args(base=ws.root / "weights.npz")


# ---- adapter configs ----------------------------------------------------------------------------

@case("config-missing", r"adapter_config.json not found", "adapter")
def _(ws: Workspace) -> None:
    _config(ws).unlink()


@case("config-not-json", r"adapter_config.json is not valid JSON", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, '{"peft_type": "D2LORA", "r": 2,')


@case("config-not-utf8", r"adapter_config.json is not UTF-8 text", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _config(ws).write_bytes(b'{"peft_type": "D2LORA\xff"}')


@case("config-not-an-object", r"adapter config must be a JSON object", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, "[1, 2]")


@case("config-unknown-peft-type", r"unsupported peft_type 'IA3'", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, peft_type="IA3")


@case("config-missing-peft-type", r"missing required field 'peft_type'", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _drop_config_field(ws, "peft_type")


@case("config-missing-r", r"missing required field 'r'", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _drop_config_field(ws, "r")


@case("config-dual-lora-missing-r-dir", r"missing required field 'r_dir'", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    config = adapter_config_dict(peft_type="DUAL_LORA", r_mag=RANK)
    for name in ("r", "tau", "norm_axis", "residual", "eps"):
        del config[name]
    _set_config(ws, json.dumps(config))


@case("config-rank-zero", r"field 'r' must be positive, got 0", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, r=0)


@case("config-rank-negative", r"field 'r' must be positive, got -2", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, r=-2)


@case("config-rank-fractional", r"field 'r' must be an integer, got 2.5", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, r=2.5)


@case("config-rank-a-string", r"field 'r' must be a number, got '2'", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, r="2")


@case("config-rank-huge", r"field 'r' is too large", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, '{"peft_type": "D2LORA", "r": 1' + "0" * 400 + ', "lora_alpha": 4}')


@case("config-tau-nan", r"field 'tau' must be finite, got nan", "adapter/adapter_config.json", runner="subprocess")
def _(ws: Workspace) -> None:
    _set_config(ws, json.dumps(adapter_config_dict()).replace('"tau": 0.5', '"tau": NaN'))


@case("config-alpha-infinity", r"field 'lora_alpha' must be finite, got inf", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, json.dumps(adapter_config_dict()).replace('"lora_alpha": 4.0', '"lora_alpha": Infinity'))


@case("config-alpha-zero", r"field 'lora_alpha' must be non-zero", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, lora_alpha=0)


@case("config-eps-negative", r"field 'eps' must be >= 0", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, eps=-1e-6)


@case("config-eps-overflows-float32", r"field 'eps' must fit in float32", "adapter/adapter_config.json")
def _(ws: Workspace) -> None:  # found by tests/system/test_fuzz.py: once a RuntimeError from torch's clamp
    _set_config(ws, eps=3.5e38)


@case("config-norm-axis-unknown", r"field 'norm_axis' must be \"out\" or \"in\", got 'rows'",
      "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, norm_axis="rows")


@case("config-residual-not-a-bool", r"field 'residual' must be true or false, got 'yes'",
      "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, residual="yes")


@case("config-rank-pattern-bad-regex", r"rank_pattern key '\(q_proj' is not a valid pattern",
      "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, rank_pattern={"(q_proj": 4})


@case("config-modules-to-save-a-number", r"field 'modules_to_save' must be a list of module names",
      "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, modules_to_save=7)


@case("config-base-model-a-number", r"field 'base_model_name_or_path' must be a string",
      "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, base_model_name_or_path=12)


# ---- adapter tensors ----------------------------------------------------------------------------

@case("adapter-weights-missing", r"no adapter weights \(adapter_model.safetensors\) in the folder", "adapter")
def _(ws: Workspace) -> None:
    _adapter_st(ws).unlink()


@case("adapter-holds-no-tensors", r"the adapter holds no tensors d2merge recognises",
      "adapter/adapter_model.safetensors")
def _(ws: Workspace) -> None:
    _rewrite_adapter(ws, {})


@case("adapter-tensor-missing", r"module 'model.layers.0.self_attn.q_proj' lacks the d2lora tensor 'lora_B_neg'",
      "adapter/adapter_model.safetensors", Q0_A_POS)
def _(ws: Workspace) -> None:
    tensors = adapter_tensors()
    del tensors[Q0_B_NEG]
    _rewrite_adapter(ws, tensors)


@case("adapter-tensor-extra", r"adapter tensor is not a d2lora factor, modules_to_save or base_layer tensor",
      "adapter/adapter_model.safetensors", f"{PREFIX}{Q0}.lora_C.weight")
def _(ws: Workspace) -> None:
    _rewrite_adapter(ws, {**adapter_tensors(), f"{PREFIX}{Q0}.lora_C.weight": torch.zeros(2, 2)})


@case("adapter-tensor-without-prefix", r"adapter tensor is not a d2lora factor", "adapter/adapter_model.safetensors",
      f"{Q0}.lora_A_pos.weight")
def _(ws: Workspace) -> None:
    _rewrite_adapter(ws, {**adapter_tensors(), f"{Q0}.lora_A_pos.weight": torch.zeros(RANK, HIDDEN)})


@case("adapter-tensor-wrong-shape", r"shape \[16, 3\] does not fit base 'model.layers.0.self_attn.q_proj.weight' "
      r"\[16, 16\]: expected \[16, 2\]", "adapter/adapter_model.safetensors", Q0_B_NEG)
def _(ws: Workspace) -> None:
    _rewrite_adapter(ws, {**adapter_tensors(), Q0_B_NEG: torch.zeros(HIDDEN, 3)})


@case("adapter-rank-differs-from-config", r"factor rank 2 does not match the config's rank 4",
      "adapter/adapter_model.safetensors", Q0_A_POS)
def _(ws: Workspace) -> None:
    _set_config(ws, r=4)


@case("adapter-tensor-nan", r"adapter tensor has 1 NaN/Inf value\(s\)", "adapter/adapter_model.safetensors",
      Q0_B_NEG)
def _(ws: Workspace) -> None:
    tensors = adapter_tensors()
    tensors[Q0_B_NEG][3, 1] = float("nan")
    _rewrite_adapter(ws, tensors)


@case("adapter-tensor-inf", r"adapter tensor has 2 NaN/Inf value\(s\)", "adapter/adapter_model.safetensors",
      f"{PREFIX}model.layers.1.self_attn.v_proj.lora_A_pos.weight")
def _(ws: Workspace) -> None:
    tensors = adapter_tensors()
    key = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_A_pos.weight"
    tensors[key][0, 0] = float("inf")
    tensors[key][1, 5] = float("-inf")
    _rewrite_adapter(ws, tensors)


@case("adapter-tensor-integer-dtype", r"adapter tensor has non-float dtype torch.int32",
      "adapter/adapter_model.safetensors", Q0_A_POS)
def _(ws: Workspace) -> None:
    tensors = adapter_tensors()
    tensors[Q0_A_POS] = torch.ones(RANK, HIDDEN, dtype=torch.int32)
    _rewrite_adapter(ws, tensors)


@case("adapter-for-another-base-module", r"adapted module 'model.layers.0.attention.wq' is not in the base model",
      "adapter/adapter_model.safetensors", f"{PREFIX}model.layers.0.attention.wq.lora_A_pos.weight")
def _(ws: Workspace) -> None:
    tensors = {k.replace("self_attn.q_proj", "attention.wq"): v for k, v in adapter_tensors().items()}
    _rewrite_adapter(ws, tensors)


@case("adapter-for-another-hidden-size", r"shape \[2, 32\] does not fit base 'model.layers.0.self_attn.q_proj.weight'",
      "adapter/adapter_model.safetensors", Q0_A_POS)
def _(ws: Workspace) -> None:
    _rewrite_adapter(ws, adapter_tensors(hidden=32))


@case("adapter-modules-to-save-wrong-shape", r"replacement shape \[32, 8\] does not match the base's \[32, 16\]",
      "adapter/adapter_model.safetensors", f"{PREFIX}lm_head.weight")
def _(ws: Workspace) -> None:
    _set_config(ws, modules_to_save=["lm_head"])
    _rewrite_adapter(ws, {**adapter_tensors(), f"{PREFIX}lm_head.weight": torch.zeros(VOCAB, 8)})


@case("adapter-modules-to-save-nan", r"adapter tensor has 1 NaN/Inf value\(s\)",
      "adapter/adapter_model.safetensors", f"{PREFIX}lm_head.weight")
def _(ws: Workspace) -> None:
    _set_config(ws, modules_to_save=["lm_head"])
    head = torch.zeros(VOCAB, HIDDEN)
    head[0, 0] = float("nan")
    _rewrite_adapter(ws, {**adapter_tensors(), f"{PREFIX}lm_head.weight": head})


# ---- pickle -------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


# torch names the global it refused (os.system is posix.system on Linux and macOS, nt.system on Windows)
PAYLOAD_REFUSED = r"refused to load pickle: .*unsupported GLOBAL (posix|nt)\.system"


def write_pickle_payload(path: Path, marker: Path, *, zip_format: bool) -> None:
    """A .bin whose unpickling would create ``marker``: raw pickle, or torch.save's zip layout."""
    if zip_format:
        torch.save({"model.norm.weight": torch.ones(2), "evil": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"evil": Payload(marker)}, protocol=2))


def _base_as_pickle(ws: Workspace) -> None:
    from d2merge.io.safetensors_file import SafetensorsFile

    source = SafetensorsFile(_base_st(ws))
    torch.save({k: source.read(k).clone() for k in source.keys()}, ws.base / "pytorch_model.bin")
    _base_st(ws).unlink()


def _adapter_as_pickle(ws: Workspace) -> None:
    torch.save(adapter_tensors(), ws.adapter / "adapter_model.bin")
    _adapter_st(ws).unlink()


@case("base-pickle-without-opt-in", r"base weights are pickle files \(pytorch_model.bin\).*--allow-pickle",
      "base/pytorch_model.bin")
def _(ws: Workspace) -> None:
    _base_as_pickle(ws)


@case("base-pickle-file-without-opt-in", r"base weights are a pickle file.*--allow-pickle", "base/pytorch_model.bin")
def _(ws: Workspace) -> list[str]:
    _base_as_pickle(ws)
    return ws.merge_args(base=ws.base / "pytorch_model.bin")


@case("adapter-pickle-without-opt-in", r"adapter weights are a pickle file.*--allow-pickle",
      "adapter/adapter_model.bin")
def _(ws: Workspace) -> None:
    _adapter_as_pickle(ws)


@case("adapter-pickle-payload-allowed-raw", PAYLOAD_REFUSED, "adapter/adapter_model.bin", runner="subprocess")
def _(ws: Workspace) -> list[str]:
    _adapter_st(ws).unlink()
    write_pickle_payload(ws.adapter / "adapter_model.bin", ws.marker, zip_format=False)
    return ws.merge_args("--allow-pickle")


@case("adapter-pickle-payload-allowed-zip", PAYLOAD_REFUSED, "adapter/adapter_model.bin")
def _(ws: Workspace) -> list[str]:
    _adapter_st(ws).unlink()
    write_pickle_payload(ws.adapter / "adapter_model.bin", ws.marker, zip_format=True)
    return ws.merge_args("--allow-pickle")


@case("base-pickle-payload-allowed-zip", PAYLOAD_REFUSED, "base/pytorch_model.bin")
def _(ws: Workspace) -> list[str]:
    _base_st(ws).unlink()
    write_pickle_payload(ws.base / "pytorch_model.bin", ws.marker, zip_format=True)
    return ws.merge_args("--allow-pickle")


@case("base-pickle-not-a-state-dict", r"pickle file does not hold a flat dict of tensors", "base/pytorch_model.bin")
def _(ws: Workspace) -> list[str]:
    _base_st(ws).unlink()
    torch.save([torch.ones(2)], ws.base / "pytorch_model.bin")
    return ws.merge_args("--allow-pickle")


# ---- output locations ---------------------------------------------------------------------------

@case("out-equals-base", r"output path overlaps an input", "base")
def _(ws: Workspace) -> list[str]:
    return ws.merge_args(out=ws.base)


@case("out-inside-adapter", r"output path overlaps an input", "adapter/merged")
def _(ws: Workspace) -> list[str]:
    return ws.merge_args("--overwrite", out=ws.adapter / "merged")


@case("out-contains-base", r"output path overlaps an input", "models")
@own_inputs
def _(ws: Workspace) -> list[str]:
    shutil.copytree(ws.templates / "base", ws.root / "models" / "base")
    return ws.merge_args("--overwrite", base=ws.root / "models" / "base", out=ws.root / "models")


@case("out-inside-base-through-symlink", r"output path overlaps an input", "link-to-base/merged")
def _(ws: Workspace) -> list[str]:
    (ws.root / "link-to-base").symlink_to(ws.base, target_is_directory=True)
    return ws.merge_args(out=ws.root / "link-to-base" / "merged")


@case("out-exists", r"output already exists.*--overwrite", "out")
def _(ws: Workspace) -> None:
    ws.out.mkdir()
    (ws.out / "keep.txt").write_text("not ours")


@case("out-exists-as-file", r"output exists and is not a folder", "out")
def _(ws: Workspace) -> list[str]:
    ws.out.write_text("a file")
    return ws.merge_args("--overwrite")


@case("out-parent-missing", r"the output's parent folder does not exist", "missing-parent")
def _(ws: Workspace) -> list[str]:
    return ws.merge_args(out=ws.root / "missing-parent" / "out")


@case("out-parent-is-a-file", r"the output's parent is not a folder", "parent-file")
def _(ws: Workspace) -> list[str]:
    (ws.root / "parent-file").write_text("")
    return ws.merge_args(out=ws.root / "parent-file" / "out")


@case("out-parent-read-only", r"the output's parent folder is not writable", "read-only", runner="readonly")
def _(ws: Workspace) -> list[str]:
    (ws.root / "read-only").mkdir()
    os.chmod(ws.root / "read-only", 0o555)
    return ws.merge_args(out=ws.root / "read-only" / "out")


@case("out-disk-full", r"no space left \(or file size limit reached\) while writing", "model.safetensors",
      runner="fsize")
def _(ws: Workspace) -> None:
    return None


@case("format-safetensors-disk-full", r"no space left \(or file size limit reached\) while writing",
      ".out.safetensors", runner="fsize")
def _(ws: Workspace) -> list[str]:
    return ws.merge_args("--format", "safetensors", out=ws.root / "out.safetensors")


@case("format-safetensors-adapter-nan", r"adapter tensor has 1 NaN/Inf value\(s\)", "adapter/adapter_model.safetensors",
      Q0_B_NEG)
def _(ws: Workspace) -> list[str]:
    tensors = adapter_tensors()
    tensors[Q0_B_NEG][0, 0] = float("nan")
    _rewrite_adapter(ws, tensors)
    return ws.merge_args("--format", "safetensors", out=ws.root / "out.safetensors")


# ---- options ------------------------------------------------------------------------------------

@case("option-bad-shard-size", r"invalid size '5 parsecs'", "")
def _(ws: Workspace) -> list[str]:
    return ws.merge_args("--max-shard-size", "5 parsecs")


# ---- hostile folders (issue 10) -----------------------------------------------------------------


def add_custom_code(folder: Path, marker: Path, where: str = "config.json") -> None:
    """An auto_map pointing at Python in the folder that, if transformers imported it, creates ``marker``.

    The model_type is one transformers does not know, so only the folder's own code could load it:
    that is the case where transformers asks "Do you wish to run the custom code? [y/N]".
    """
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code from the model folder ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil-net'\n")
    (folder / "tokenization_evil.py").write_text((folder / "configuration_evil.py").read_text())
    path = folder / where
    data = json.loads(path.read_text())
    if where == "config.json":
        data.update(model_type="evil-net", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                     "AutoModelForCausalLM": "configuration_evil.EvilConfig"})
    else:
        data.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    path.write_text(json.dumps(data))


CODE_REFUSED = r"has an auto_map: the folder ships its own code"


@case("custom-code-base-verify", CODE_REFUSED, "base/config.json")
def _(ws: Workspace) -> list[str]:
    add_custom_code(ws.base, ws.marker)
    return ["verify", str(ws.base), str(ws.adapter), "--num-probes", "1", "--probe-length", "4"]


@case("custom-code-base-bench", CODE_REFUSED, "base/config.json")
def _(ws: Workspace) -> list[str]:
    add_custom_code(ws.base, ws.marker)
    return ["bench", str(ws.base), str(ws.adapter), "--variants", "base", "--batch-sizes", "1", "--seq-lens", "4",
            "--decode-tokens", "0", "--warmup", "0", "--repeats", "1"]


@case("custom-code-merged-export-onnx", CODE_REFUSED, "base/config.json")
def _(ws: Workspace) -> list[str]:
    add_custom_code(ws.base, ws.marker)
    return ["export-onnx", str(ws.base), "-o", str(ws.root / "model.onnx")]


@case("custom-code-tokenizer-verify-prompts", CODE_REFUSED, "base/tokenizer_config.json")
def _(ws: Workspace) -> list[str]:
    add_custom_code(ws.base, ws.marker, "tokenizer_config.json")
    (ws.root / "prompts.txt").write_text("hello\n")
    return ["verify", str(ws.base), str(ws.adapter), "--prompts", str(ws.root / "prompts.txt"),
            "--num-probes", "1", "--probe-length", "4"]


# ---- quantized bases (issue 10, finding 5) ------------------------------------------------------

QUANTIZED = r"the base is quantized \(.*\).*merge into the original 16-bit"
Q0_WEIGHT = f"{Q0}.weight"


def _rewrite_base(ws: Workspace, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = base_tensors()
    edit(tensors)
    _base_st(ws).unlink()
    save_tensors(_base_st(ws), tensors, {"format": "pt"})


def _int8_with_scb(tensors: dict[str, torch.Tensor]) -> None:
    """bitsandbytes LLM.int8: int8 codes per row and a float scale per row (SCB)."""
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        w = tensors[name]
        scale = w.abs().amax(dim=1)
        tensors[name] = torch.round(w / scale[:, None] * 127).to(torch.int8)
        tensors[name.replace(".weight", ".SCB")] = scale


@case("base-bnb-8bit-config-over-4bit-claim", r"int8 tensor without the quantization state of a 4-bit weight",
      "base/model.safetensors", Q0_WEIGHT)
def _(ws: Workspace) -> None:
    """int8 codes and SCB scales, but config.json claims 4-bit: the config lies about the tensors."""
    _rewrite_base(ws, _int8_with_scb)
    _set_quantization(ws, {"quant_method": "bitsandbytes", "load_in_4bit": True})


@case("base-bnb-int8-without-config", r"the base is quantized \(int8 weights\)", "base/model.safetensors", Q0_WEIGHT)
def _(ws: Workspace) -> None:
    _rewrite_base(ws, _int8_with_scb)


@case("base-int8-weights-only", r"the base is quantized \(int8 weights\)", "base/model.safetensors", Q0_WEIGHT)
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: t.update({Q0_WEIGHT: torch.zeros(HIDDEN, HIDDEN, dtype=torch.int8)}))


def _fp8(tensors: dict[str, torch.Tensor]) -> None:
    tensors[Q0_WEIGHT] = tensors[Q0_WEIGHT].to(torch.float8_e4m3fn)


@case("base-fp8-weights-dtype-bf16", r"the base is quantized \(float8_e4m3fn weights\)", "base/model.safetensors",
      Q0_WEIGHT)
def _(ws: Workspace) -> list[str]:
    _rewrite_base(ws, _fp8)
    return ws.merge_args("--dtype", "bf16")


@case("base-fp8-weights-default-dtype", r"the base is quantized \(float8_e4m3fn weights\)", "base/model.safetensors",
      Q0_WEIGHT)
def _(ws: Workspace) -> None:
    _rewrite_base(ws, _fp8)


@case("base-fp8-with-block-scales", QUANTIZED, "base/model.safetensors", f"{Q0}.weight_scale_inv")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: t.update({f"{Q0}.weight_scale_inv": torch.ones(1, 1)}))


@case("base-gptq-qweight", QUANTIZED, "base/model.safetensors", f"{Q0}.qweight")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: t.update({f"{Q0}.qweight": torch.zeros(2, HIDDEN, dtype=torch.int32)}))


@case("base-bnb-4bit-absmax", QUANTIZED, "base/model.safetensors", f"{Q0}.weight.absmax")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: t.update({f"{Q0}.weight.absmax": torch.ones(4)}))


@case("base-quantized-verify", r"config.json says the base is quantized \(FP8 .*\) but no weight is stored quantized",
      "base/config.json")
def _(ws: Workspace) -> list[str]:
    config = base_config()
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (ws.base / "config.json").write_text(json.dumps(config))
    return ["verify", str(ws.base), str(ws.adapter), "--num-probes", "1", "--probe-length", "4"]


# ---- quantized bases whose quantization state lies (issue 31) ------------------------------------
# A base saved by transformers with a quantization_config is dequantized (io/quantized.py); every
# state that does not describe its weight is refused in one line naming the tensor, nothing written.

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
LIES = r"\(the quantization state does not describe this weight"
BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "float32"}


def _set_quantization(ws: Workspace, qc: dict[str, Any]) -> None:
    config = base_config()
    config["quantization_config"] = qc
    (ws.base / "config.json").write_text(json.dumps(config))


def _nf4(tensors: dict[str, torch.Tensor], blocksize: int = 64) -> None:
    """bitsandbytes' nf4 layout as transformers saves it (no double quant), quantized by nearest code."""
    code = torch.tensor(NF4_CODE)
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        w = tensors.pop(name)
        flat = w.reshape(-1).float()
        absmax = flat.view(-1, blocksize).abs().amax(1)
        scaled = (flat.view(-1, blocksize) / absmax[:, None]).reshape(-1)
        nib = (scaled[:, None] - code).abs().argmin(1).to(torch.uint8)
        tensors[name] = ((nib[0::2] << 4) | nib[1::2]).reshape(-1, 1)
        tensors[name + ".absmax"] = absmax
        tensors[name + ".quant_map"] = code.clone()
        state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32", "shape": list(w.shape)}
        tensors[name + ".quant_state.bitsandbytes__nf4"] = _blob(state)


def write_nf4_base(folder: Path) -> Path:
    """The template base quantized to nf4 in bitsandbytes' saved layout, with its quantization_config."""
    write_base(folder)
    tensors = base_tensors()
    _nf4(tensors)
    (folder / "model.safetensors").unlink()
    save_tensors(folder / "model.safetensors", tensors, {"format": "pt"})
    config = base_config()
    config["quantization_config"] = BNB_4BIT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _blob(state: dict[str, Any] | bytes) -> torch.Tensor:
    raw = state if isinstance(state, bytes) else json.dumps(state).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


def _nf4_base(ws: Workspace, edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
              qc: dict[str, Any] | None = None) -> None:
    def build(tensors: dict[str, torch.Tensor]) -> None:
        _nf4(tensors)
        if edit is not None:
            edit(tensors)
    _rewrite_base(ws, build)
    _set_quantization(ws, qc or BNB_4BIT)


Q0_STATE = f"{Q0_WEIGHT}.quant_state.bitsandbytes__nf4"


def _state_of(tensors: dict[str, torch.Tensor], **changes: Any) -> None:
    state = json.loads(bytes(tensors[Q0_STATE].tolist()))
    state.update(changes)
    tensors[Q0_STATE] = _blob({k: v for k, v in state.items() if v is not None})


@case("base-nf4-absmax-count", r"absmax has 3 float32 values; shape \[16, 16\] in blocks of 64 needs 4 float32 " + LIES,
      "base/model.safetensors", f"{Q0_WEIGHT}.absmax")
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: t.update({f"{Q0_WEIGHT}.absmax": t[f"{Q0_WEIGHT}.absmax"][:3].clone()}))


@case("base-nf4-blocksize-not-bitsandbytes", r"quant state has blocksize 48", "base/model.safetensors", Q0_STATE)
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: _state_of(t, blocksize=48))


@case("base-nf4-blocksize-disagrees-with-absmax", r"absmax has 4 float32 values; shape \[16, 16\] in blocks of 128 "
      r"needs 2", "base/model.safetensors", f"{Q0_WEIGHT}.absmax")
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: _state_of(t, blocksize=128))


@case("base-nf4-state-not-json", r"quant state does not parse as JSON " + LIES, "base/model.safetensors", Q0_STATE)
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: t.update({Q0_STATE: _blob(b'{"quant_type": "nf4", "blocksize": 6')}))


@case("base-nf4-state-names-another-shape", r"packed weight holds 128 bytes; the quant state's shape \[16, 32\] "
      r"needs 256", "base/model.safetensors", Q0_WEIGHT)
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: _state_of(t, shape=[16, 32]))


@case("base-nf4-state-transposed-shape", r"quantization state says shape \[8, 32\]; config.json's model has \[16, 16\]",
      "base/model.safetensors", Q0_STATE)
def _(ws: Workspace) -> None:
    """Same element count, other shape ([8, 32] for a [16, 16] weight): the base no longer fits its config."""
    _nf4_base(ws, lambda t: _state_of(t, shape=[8, 32]))


@case("base-nf4-absmax-nan", r"absmax holds NaN or Inf scales " + LIES, "base/model.safetensors",
      f"{Q0_WEIGHT}.absmax")
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: t[f"{Q0_WEIGHT}.absmax"].__setitem__(1, float("nan")))


@case("base-nf4-absmax-negative", r"absmax holds negative scales " + LIES, "base/model.safetensors",
      f"{Q0_WEIGHT}.absmax")
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: t[f"{Q0_WEIGHT}.absmax"].__setitem__(0, -1.0))


@case("base-nf4-quant-map-not-nf4", r"quant_map is not bitsandbytes' nf4 code table " + LIES,
      "base/model.safetensors", f"{Q0_WEIGHT}.quant_map")
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: t[f"{Q0_WEIGHT}.quant_map"].mul_(2))


@case("base-nf4-state-unknown-field", r"quant state has fields d2merge does not know: \['rotation'\]",
      "base/model.safetensors", Q0_STATE)
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: _state_of(t, rotation="hadamard"))


@case("base-nf4-state-says-fp4", r"quant state names quant_type 'fp4' under the key for 'nf4'",
      "base/model.safetensors", Q0_STATE)
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: _state_of(t, quant_type="fp4"))


@case("base-nf4-state-dtype-float64", r"quant state has dtype 'float64'", "base/model.safetensors", Q0_STATE)
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: _state_of(t, dtype="float64"))


@case("base-nf4-nested-offset-nan", r"quant state has nested_offset nan", "base/model.safetensors", Q0_STATE)
def _(ws: Workspace) -> None:
    def nested(t: dict[str, torch.Tensor]) -> None:
        absmax = t[f"{Q0_WEIGHT}.absmax"]
        t[f"{Q0_WEIGHT}.absmax"] = torch.zeros(absmax.numel(), dtype=torch.uint8)
        t[f"{Q0_WEIGHT}.nested_absmax"] = torch.ones(1)
        t[f"{Q0_WEIGHT}.nested_quant_map"] = torch.linspace(-1, 1, 256)
        t[Q0_STATE] = _blob(b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [16, 16], '
                            b'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": NaN}')
    _nf4_base(ws, nested)


@case("base-nf4-missing-absmax", r"quantized weight lacks its absmax " + LIES, "base/model.safetensors", Q0_WEIGHT)
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: t.pop(f"{Q0_WEIGHT}.absmax"))


@case("base-nf4-stray-absmax", r"quantization tensor that belongs to no 4-bit weight", "base/model.safetensors",
      "model.norm.weight.absmax")
def _(ws: Workspace) -> None:
    _nf4_base(ws, lambda t: t.update({"model.norm.weight.absmax": torch.ones(1)}))


@case("base-int8-scb-count", r"has 8 float32 values; expected 16 float32", "base/model.safetensors",
      f"{Q0}.SCB")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: (_int8_with_scb(t), t.update({f"{Q0}.SCB": t[f"{Q0}.SCB"][:8].clone()})))
    _set_quantization(ws, {"quant_method": "bitsandbytes", "load_in_8bit": True})


@case("base-int8-scb-inf", r"SCB holds NaN or Inf scales " + LIES, "base/model.safetensors", f"{Q0}.SCB")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: (_int8_with_scb(t), t[f"{Q0}.SCB"].__setitem__(3, float("inf"))))
    _set_quantization(ws, {"quant_method": "bitsandbytes", "load_in_8bit": True})


@case("base-int8-weight-format-col", r"weight_format is not 0 \(row-major\)", "base/model.safetensors",
      f"{Q0}.weight_format")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: (_int8_with_scb(t), t.update({f"{Q0}.weight_format": torch.tensor(1, dtype=torch.uint8)})))
    _set_quantization(ws, {"quant_method": "bitsandbytes", "load_in_8bit": True})


FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _fp8_blocks(tensors: dict[str, torch.Tensor]) -> None:
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        w = tensors[name]
        scale = w.abs().amax().reshape(1, 1) / 448
        tensors[name] = (w / scale).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale


@case("base-fp8-scale-wrong-shape", r"weight_scale_inv is float32 \[1, 2\]; weight \[16, 16\] in blocks of "
      r"\[128, 128\] needs shape \[1, 1\]", "base/model.safetensors", f"{Q0}.weight_scale_inv")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: (_fp8_blocks(t), t.update({f"{Q0}.weight_scale_inv": torch.ones(1, 2)})))
    _set_quantization(ws, FP8_CONFIG)


@case("base-fp8-scale-nan", r"weight_scale_inv holds NaN or Inf scales " + LIES, "base/model.safetensors",
      f"{Q0}.weight_scale_inv")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: (_fp8_blocks(t), t[f"{Q0}.weight_scale_inv"].fill_(float("nan"))))
    _set_quantization(ws, FP8_CONFIG)


@case("base-fp8-static-activations", r"FP8 activation_scheme 'static'", "base/config.json")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, _fp8_blocks)
    _set_quantization(ws, {**FP8_CONFIG, "activation_scheme": "static"})


@case("base-fp8-weight-without-scale", r"float8_e4m3fn tensor without the quantization state of a FP8 weight",
      "base/model.safetensors", f"{Q0}.weight")
def _(ws: Workspace) -> None:
    _rewrite_base(ws, lambda t: (_fp8_blocks(t), t.pop(f"{Q0}.weight_scale_inv")))
    _set_quantization(ws, FP8_CONFIG)


for _method, _shown in (("gptq", "GPTQ"), ("awq", "AWQ"), ("hqq", "HQQ"), ("compressed-tensors", "compressed-tensors"),
                        ("mxfp4", "MXFP4")):
    def _build(ws: Workspace, method: str = _method) -> None:
        _set_quantization(ws, {"quant_method": method, "bits": 4})
    case(f"base-{_method}-refused", rf"the base is quantized with {_shown}, which d2merge cannot dequantize exactly",
         "base/config.json")(_build)


# ---- --overwrite replaces only what d2merge wrote (issue 10, finding 6) ---------------------------

NOT_OURS = r"--overwrite replaces only a folder that d2merge wrote"


@case("overwrite-a-project-folder", r"the output folder was not written by d2merge \(it holds NOTES.md\).*" + NOT_OURS,
      "project")
def _(ws: Workspace) -> list[str]:
    project = ws.root / "project"  # cd my-project && d2merge merge ... -o . --overwrite
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('my work')\n")
    (project / "NOTES.md").write_text("notes\n")
    return ws.merge_args("--overwrite", out=project)


@case("overwrite-a-merge-with-a-file-added", r"holds a file d2merge did not write: my-eval.jsonl.*" + NOT_OURS, "out")
def _(ws: Workspace) -> list[str]:
    from d2merge.api import merge

    merge(ws.base, ws.adapter, ws.out)
    (ws.out / "my-eval.jsonl").write_text("{}\n")
    return ws.merge_args("--overwrite")


@case("overwrite-with-a-forged-marker", r"the output folder was not written by d2merge", "out")
def _(ws: Workspace) -> list[str]:
    ws.out.mkdir()
    (ws.out / "thesis.tex").write_text("years of work")
    (ws.out / ".d2merge-output.json").write_text('{"files": "everything"}')
    return ws.merge_args("--overwrite")


# ---- JSON that Python's parser cannot take (issue 10, finding 10) ---------------------------------

BIG_INT = "1" + "0" * 4999  # 5000 digits: int() refuses more than 4300
DEEP = "[" * 100000 + "]" * 100000  # RecursionError in the parser
TOO_MANY_DIGITS = r"is not usable JSON: an integer with 5000 digits"
TOO_DEEP = r"is not usable JSON: nested too deeply"


@case("config-5000-digit-integer", TOO_MANY_DIGITS, "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, json.dumps(adapter_config_dict()).replace('"r": 2', f'"r": {BIG_INT}'))


@case("config-nested-100000-deep", TOO_DEEP, "adapter/adapter_config.json")
def _(ws: Workspace) -> None:
    _set_config(ws, json.dumps(adapter_config_dict())[:-1] + f', "extra": {DEEP}}}')


@case("base-config-nested-100000-deep", TOO_DEEP, "base/config.json")
def _(ws: Workspace) -> None:
    (ws.base / "config.json").write_text(json.dumps(base_config())[:-1] + f', "extra": {DEEP}}}')


@case("base-config-5000-digit-integer", TOO_MANY_DIGITS, "base/config.json")
def _(ws: Workspace) -> None:
    (ws.base / "config.json").write_text(json.dumps(base_config())[:-1] + f', "extra": {BIG_INT}}}')


@case("base-index-5000-digit-integer", TOO_MANY_DIGITS, "base/model.safetensors.index.json")
@own_inputs
def _(ws: Workspace) -> None:
    ws.copy("sharded", "base")
    index = ws.base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps(data).replace(f'"total_size": {data["metadata"]["total_size"]}',
                                              f'"total_size": {BIG_INT}'))


def _st_json_cases(kind: str, path_of: Callable[[Workspace], Path], file: str) -> None:
    @case(f"{kind}-st-header-5000-digit-integer", TOO_MANY_DIGITS, file)
    def _(ws: Workspace) -> None:
        header, data = split_safetensors(path_of(ws))
        raw = json.dumps(header)[:-1] + f', "extra": {BIG_INT}}}'
        path_of(ws).write_bytes(join_safetensors(raw.encode(), data))

    @case(f"{kind}-st-header-nested-100000-deep", TOO_DEEP, file)
    def _(ws: Workspace) -> None:
        header, data = split_safetensors(path_of(ws))
        raw = json.dumps(header)[:-1] + f', "extra": {DEEP}}}'
        path_of(ws).write_bytes(join_safetensors(raw.encode(), data))


_st_json_cases("base", _base_st, "base/model.safetensors")
_st_json_cases("adapter", _adapter_st, "adapter/adapter_model.safetensors")


# ---- bench and export-onnx on broken inputs (issue 10, findings 8, 13, 16) -----------------------

BENCH_FAST = ["--batch-sizes", "1", "--seq-lens", "4", "--decode-tokens", "0", "--warmup", "0", "--repeats", "1"]


def _bench(ws: Workspace, *extra: str) -> list[str]:
    return ["bench", str(ws.base), str(ws.adapter), *extra, *BENCH_FAST]


def _truncated_copy(ws: Workspace, name: str = "merged") -> Path:
    folder = ws.copy("base", name)
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[:-12])
    return folder


@case("export-onnx-truncated-shard", r"data is truncated", "merged/model.safetensors")
def _(ws: Workspace) -> list[str]:
    return ["export-onnx", str(_truncated_copy(ws)), "-o", str(ws.root / "model.onnx")]


@case("bench-truncated-merged-shard", r"data is truncated", "merged/model.safetensors")
def _(ws: Workspace) -> list[str]:
    return _bench(ws, "--merged", str(_truncated_copy(ws)), "--variants", "merged")


@case("bench-adapter-for-another-base", r"shape \[2, 32\] does not fit base", "adapter/adapter_model.safetensors",
      Q0_A_POS)
def _(ws: Workspace) -> list[str]:
    _rewrite_adapter(ws, adapter_tensors(hidden=32))
    return _bench(ws, "--variants", "unmerged")


@case("bench-onnx-not-an-onnx-file", r"ONNX Runtime cannot load this file as an ONNX model", "model.onnx")
def _(ws: Workspace) -> list[str]:
    (ws.root / "model.onnx").write_bytes(b"this is not protobuf \xff\xfe" * 10)
    return _bench(ws, "--onnx", str(ws.root / "model.onnx"), "--variants", "onnx")


@case("bench-merged-of-an-unrelated-base", r"MERGED is not a merge of this base", "unrelated/model.safetensors")
def _(ws: Workspace) -> list[str]:
    from d2merge.api import merge

    write_base(ws.root / "other-base", seed=7)
    merge(ws.root / "other-base", ws.adapter, ws.root / "unrelated")
    shutil.rmtree(ws.root / "other-base")
    return _bench(ws, "--merged", str(ws.root / "unrelated"), "--variants", "merged")


@case("export-onnx-parent-is-a-file", r"the output's parent is not a folder", "parent-file")
def _(ws: Workspace) -> list[str]:
    (ws.root / "parent-file").write_text("")
    return ["export-onnx", str(ws.base), "-o", str(ws.root / "parent-file" / "model.onnx")]


@case("export-onnx-existing-graph", r"output already exists.*--overwrite", "model.onnx")
def _(ws: Workspace) -> list[str]:
    (ws.root / "model.onnx").write_bytes(b"an earlier export")
    return ["export-onnx", str(ws.base), "-o", str(ws.root / "model.onnx")]


@case("export-onnx-into-its-input", r"output path overlaps an input", "base/model.onnx")
def _(ws: Workspace) -> list[str]:
    return ["export-onnx", str(ws.base), "-o", str(ws.base)]


@case("export-onnx-read-only-parent", r"the output's parent folder is not writable", "read-only", runner="readonly")
def _(ws: Workspace) -> list[str]:
    (ws.root / "read-only").mkdir()
    os.chmod(ws.root / "read-only", 0o555)
    return ["export-onnx", str(ws.base), "-o", str(ws.root / "read-only" / "new-folder")]


@case("merge-format-onnx-existing-graph", r"output already exists.*--overwrite", "onnx-out/model.onnx")
def _(ws: Workspace) -> list[str]:
    (ws.root / "onnx-out").mkdir()
    (ws.root / "onnx-out" / "model.onnx").write_bytes(b"an earlier export")
    return ws.merge_args("--format", "onnx", out=ws.root / "onnx-out")


# ---- GGUF export: types and llama.cpp's importance matrix (issue 32) -----------------------------
# Refused before llama.cpp is needed (or imported), before any byte is written.

IMATRIX_Q0 = "blk.0.attn_q.weight"


def _export_gguf(ws: Workspace, *extra: str) -> list[str]:
    return ["export-gguf", str(ws.base), "-o", str(ws.root / "model.gguf"), *extra]


def write_gguf_imatrix(path: Path, values: dict[str, Any], count: int = 4) -> Path:
    """llama-imatrix's GGUF layout: NAME.in_sum2 (sums) and NAME.counts, with its three keys."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch="")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["test"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, v in sorted(values.items()):
        writer.add_tensor(name + ".in_sum2", (np.asarray(v) * count).astype(np.float32).reshape(1, -1))
        writer.add_tensor(name + ".counts", np.array([[count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@case("export-gguf-unknown-type", r"unknown --gguf-type 'q3_k'; choose one of", "'q3_k'")
def _(ws: Workspace) -> list[str]:
    return _export_gguf(ws, "--gguf-type", "q3_k")


@case("export-gguf-imatrix-not-llama-cpp-format", r"not an importance matrix in llama.cpp's format", "m.imatrix")
def _(ws: Workspace) -> list[str]:
    (ws.root / "m.imatrix").write_bytes(b"\x00\x01\x02\x03" * 64)
    return _export_gguf(ws, "--gguf-type", "q4_k_m", "--imatrix", str(ws.root / "m.imatrix"))


@case("export-gguf-imatrix-legacy-truncated", r"the file ends inside entry 1 of 1 \(truncated\?\)", "m.dat")
def _(ws: Workspace) -> list[str]:
    name = IMATRIX_Q0.encode()
    full = struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 1, HIDDEN) + b"\x00\x00\x80\x3f" * HIDDEN
    (ws.root / "m.dat").write_bytes(full[:-10])
    return _export_gguf(ws, "--gguf-type", "q4_k_m", "--imatrix", str(ws.root / "m.dat"))


@case("export-gguf-imatrix-gguf-truncated", r"runs past the end of the file", "m.imatrix")
def _(ws: Workspace) -> list[str]:
    full = write_gguf_imatrix(ws.root / "full.imatrix", {IMATRIX_Q0: [1.0] * HIDDEN}).read_bytes()
    (ws.root / "full.imatrix").unlink()
    (ws.root / "m.imatrix").write_bytes(full[:-40])
    return _export_gguf(ws, "--gguf-type", "q4_k_m", "--imatrix", str(ws.root / "m.imatrix"))


@case("export-gguf-imatrix-of-another-model", rf"has 576 values for a tensor with rows of {HIDDEN}", "m.imatrix",
      IMATRIX_Q0)
def _(ws: Workspace) -> list[str]:
    write_gguf_imatrix(ws.root / "m.imatrix", {IMATRIX_Q0: [1.0] * 576})  # SmolLM2's 576-wide rows
    return _export_gguf(ws, "--gguf-type", "q4_k_m", "--imatrix", str(ws.root / "m.imatrix"))


# -- paths that must work -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkingPaths:
    """A way of naming valid inputs and outputs that must merge successfully."""

    id: str
    build: Callable[[Workspace], tuple[list[str], Path, Path | None]]  # argv, output folder, cwd (None: keep)


WORKING: list[WorkingPaths] = []


def working(id: str) -> Callable[[Callable[[Workspace], tuple[list[str], Path, Path | None]]], None]:
    def register(fn: Callable[[Workspace], tuple[list[str], Path, Path | None]]) -> None:
        def build(ws: Workspace) -> tuple[list[str], Path, Path | None]:
            ws.copy("base")
            ws.copy("adapter")
            return fn(ws)

        WORKING.append(WorkingPaths(id, build))

    return register


@working("symlinked-base-folder")
def _(ws: Workspace) -> tuple[list[str], Path, Path | None]:
    (ws.root / "base-link").symlink_to(ws.base, target_is_directory=True)
    return ws.merge_args(base=ws.root / "base-link"), ws.out, None


@working("symlinked-adapter-folder")
def _(ws: Workspace) -> tuple[list[str], Path, Path | None]:
    (ws.root / "adapter-link").symlink_to(ws.adapter, target_is_directory=True)
    return ws.merge_args(adapter=ws.root / "adapter-link"), ws.out, None


@working("symlinked-files-like-the-hub-cache")
def _(ws: Workspace) -> tuple[list[str], Path, Path | None]:
    blobs = ws.root / "blobs"
    snapshot = ws.root / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for i, f in enumerate(sorted(ws.base.iterdir())):
        shutil.move(str(f), blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..") / "blobs" / f"blob{i}")
    return ws.merge_args(base=snapshot), ws.out, None


@working("relative-paths")
def _(ws: Workspace) -> tuple[list[str], Path, Path | None]:
    return ["merge", "base", "./adapter", "-o", "out", "-q"], ws.out, ws.root


@working("relative-paths-with-dotdot")
def _(ws: Workspace) -> tuple[list[str], Path, Path | None]:
    (ws.root / "work").mkdir()
    return ["merge", "../base", "../adapter/", "-o", "../work/../out", "-q"], ws.out, ws.root / "work"


@working("output-under-a-symlinked-folder")
def _(ws: Workspace) -> tuple[list[str], Path, Path | None]:
    (ws.root / "real-results").mkdir()
    (ws.root / "results").symlink_to(ws.root / "real-results", target_is_directory=True)
    return ws.merge_args(out=ws.root / "results" / "merged"), ws.root / "real-results" / "merged", None


@working("base-as-a-single-file")
def _(ws: Workspace) -> tuple[list[str], Path, Path | None]:
    return ws.merge_args(base=ws.base / "model.safetensors"), ws.out, None


@working("adapter-as-its-weights-file")
def _(ws: Workspace) -> tuple[list[str], Path, Path | None]:
    return ws.merge_args(adapter=ws.adapter / "adapter_model.safetensors"), ws.out, None


def build_case(c: Case, root: Path, templates: Path) -> tuple[Workspace, list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root, templates)
    return ws, c.build(ws)


@dataclass
class Snapshot:
    """Every path under a folder with its size and bytes (files) or kind (folders, links)."""

    entries: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, root: Path) -> "Snapshot":
        entries: dict[str, Any] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                rel = str(path.relative_to(root))
                if path.is_symlink():
                    entries[rel] = ("link", os.readlink(path))
                elif path.is_dir():
                    entries[rel] = ("dir", oct(path.stat().st_mode & 0o777))
                else:
                    entries[rel] = ("file", path.read_bytes())
        return cls(entries)

    def diff(self, other: "Snapshot") -> list[str]:
        added = sorted(set(other.entries) - set(self.entries))
        removed = sorted(set(self.entries) - set(other.entries))
        changed = sorted(k for k in set(self.entries) & set(other.entries) if self.entries[k] != other.entries[k])
        return [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in changed]


# -- adapter operations: combine, convert, extract (issue 26) ------------------------------------


def lora_adapter(folder: Path, *, seed: int = 5, hidden: int = HIDDEN, rank: int = RANK,
                 **fields: Any) -> Path:
    """A plain LoRA on q_proj/v_proj of every layer of the template base (or of a ``hidden``-wide one)."""
    g = torch.Generator().manual_seed(seed)
    out = {"q_proj": hidden, "v_proj": hidden // 2}
    tensors = {}
    for i in range(LAYERS):
        for target in TARGETS:
            module = f"{PREFIX}model.layers.{i}.self_attn.{target}"
            tensors[f"{module}.lora_A.weight"] = 0.2 * torch.randn(rank, hidden, generator=g)
            tensors[f"{module}.lora_B.weight"] = 0.2 * torch.randn(out[target], rank, generator=g)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2.0 * rank, "target_modules": list(TARGETS),
              "base_model_name_or_path": None, **fields}
    return write_adapter(folder, tensors=tensors, config=config)


def _two_loras(ws: Workspace, **second: Any) -> tuple[Path, Path]:
    return lora_adapter(ws.root / "lora-a"), lora_adapter(ws.root / "lora-b", seed=6, **second)


def _combine(ws: Workspace, *adapters: Path, weights: str = "0.5,0.5", extra: tuple[str, ...] = ()) -> list[str]:
    return ["combine", *map(str, adapters), "--weights", weights, "-o", str(ws.out), *extra]


@case("combine-adapters-over-different-bases", r"trained on different bases", "lora-b/adapter_config.json")
def _(ws: Workspace) -> list[str]:
    a = lora_adapter(ws.root / "lora-a", base_model_name_or_path="org/llama-a")
    b = lora_adapter(ws.root / "lora-b", seed=6, base_model_name_or_path="org/llama-b")
    return _combine(ws, a, b)


@case("combine-shapes-do-not-combine", r"the shapes do not combine", "lora-b/adapter_model.safetensors",
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
def _(ws: Workspace) -> list[str]:
    return _combine(ws, *_two_loras(ws, hidden=24))


@case("combine-weight-count-mismatch", r"3 weight\(s\) for 2 adapter\(s\)", "lora-b")
def _(ws: Workspace) -> list[str]:
    return _combine(ws, *_two_loras(ws), weights="1,1,1")


@case("combine-density-outside-0-1", r"--density 1\.5 is outside \[0, 1\]", "--density")
def _(ws: Workspace) -> list[str]:
    return _combine(ws, *_two_loras(ws), extra=("--combination", "ties", "--density", "1.5"))


@case("combine-linear-unequal-ranks", r"needs equal ranks \(PEFT's rule\)", "lora-b/adapter_config.json")
def _(ws: Workspace) -> list[str]:
    return _combine(ws, *_two_loras(ws, rank=4), extra=("--combination", "linear"))


@case("combine-svd-rank-above-module", r"--svd-rank 40 is above module", "lora-a/adapter_model.safetensors",
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
def _(ws: Workspace) -> list[str]:
    return _combine(ws, *_two_loras(ws), extra=("--combination", "svd", "--svd-rank", "40"))


@case("combine-d2lora-without-base", r"d2lora adapter's update depends on the base model", "adapter")
def _(ws: Workspace) -> list[str]:
    return _combine(ws, lora_adapter(ws.root / "lora-a"), ws.adapter)


@case("combine-d2lora-factorwise-type", r"--combination ties combines LoRA factors", "adapter")
def _(ws: Workspace) -> list[str]:
    return _combine(ws, lora_adapter(ws.root / "lora-a"), ws.adapter,
                    extra=("--base", str(ws.base), "--combination", "ties", "--density", "0.5"))


@case("convert-rank-above-module", r"--rank 17 is above the size of module", "adapter/adapter_model.safetensors",
      "model.layers.0.self_attn.q_proj.weight")
def _(ws: Workspace) -> list[str]:
    return ["convert", str(ws.adapter), "--base", str(ws.base), "--rank", "17", "-o", str(ws.out)]


@case("convert-modules-to-save", r"a plain LoRA cannot hold", "adapter_model.safetensors",
      "base_model.model.lm_head.modules_to_save.default.weight")
@own_inputs
def _(ws: Workspace) -> list[str]:
    ws.copy("base")
    tensors = adapter_tensors()
    tensors[f"{PREFIX}lm_head.modules_to_save.default.weight"] = torch.zeros(VOCAB, HIDDEN)
    write_adapter(ws.adapter, tensors=tensors, config=adapter_config_dict(modules_to_save=["lm_head"]))
    return ["convert", str(ws.adapter), "--base", str(ws.base), "-o", str(ws.out)]


@case("convert-gguf-lora-adapter-for-another-base", r"does not fit base", "lora-a/adapter_model.safetensors",
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
def _(ws: Workspace) -> list[str]:
    adapter = lora_adapter(ws.root / "lora-a", hidden=24)
    return ["convert", str(adapter), "--base", str(ws.base), "--to", "gguf-lora", "-o", str(ws.root / "a.gguf")]


@case("extract-tuned-of-another-architecture", r"the models differ in architecture", "other",
      "model.layers.0.mlp.experts.weight")
def _(ws: Workspace) -> list[str]:
    tensors = base_tensors()
    tensors["model.layers.0.mlp.experts.weight"] = torch.zeros(2, 2)
    (ws.root / "other").mkdir()
    (ws.root / "other" / "config.json").write_text(json.dumps(base_config()))
    save_tensors(ws.root / "other" / "model.safetensors", tensors, {"format": "pt"})
    return ["extract", str(ws.base), str(ws.root / "other"), "--rank", "2", "-o", str(ws.out)]


@case("extract-tuned-with-resized-vocabulary", r"shape \[40, 16\] in TUNED", "resized",
      "model.embed_tokens.weight")
def _(ws: Workspace) -> list[str]:
    tensors = base_tensors()
    tensors["model.embed_tokens.weight"] = torch.zeros(40, HIDDEN)
    (ws.root / "resized").mkdir()
    (ws.root / "resized" / "config.json").write_text(json.dumps(base_config()))
    save_tensors(ws.root / "resized" / "model.safetensors", tensors, {"format": "pt"})
    return ["extract", str(ws.base), str(ws.root / "resized"), "--rank", "2", "-o", str(ws.out)]


@case("extract-rank-above-module", r"--rank 17 is above the size", "base", "model.embed_tokens.weight")
def _(ws: Workspace) -> list[str]:
    return ["extract", str(ws.base), str(ws.base), "--rank", "17", "-o", str(ws.out)]
