"""Property tests: mutated safetensors files and adapter configs are read, or refused with D2MergeError.

Nothing else may escape the loaders (`SafetensorsFile`, `load_adapter`, `build_plan`, the
per-tensor reads of a merge): any other exception would reach users as "internal error".
Mutations start from the valid files of tests/malformed.py: bit flips, truncations, spliced
bytes, rewritten header lengths, and JSON edits of the header or of adapter_config.json.
Example counts are modest so that the file runs in seconds.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2merge.api import card_info, compute_tensor
from d2merge.errors import D2MergeError
from d2merge.export.model_card import render_model_card
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import open_base
from d2merge.io.safetensors_file import SafetensorsFile
from d2merge.planning import build_plan
from malformed import adapter_config_dict, split_safetensors, write_templates

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELD_NAMES = ("peft_type", "r", "lora_alpha", "tau", "norm_axis", "residual", "eps", "target_modules",
               "fan_in_fan_out", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "format_version",
               "base_model_name_or_path", "use_dora", "r_mag", "r_dir")

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
# Values near the valid ones reach deeper checks than arbitrary JSON does.
near_numbers = st.sampled_from([0, 1, 2, 3, 4, -1, 2**31, 2**63, 10**400, 0.5, 2.0, -0.0, 1e-300, 1e308,
                                math.inf, -math.inf, math.nan, True, "2"])
pattern_keys = st.sampled_from(["q_proj", "v_proj", "layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                ".*", "(", "[", "a{2,1}", "q_proj|v_proj", "*", "\\", ""])
patterns = st.dictionaries(pattern_keys, near_numbers | json_values, max_size=3)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_templates(root / "templates")
    return root


# -- safetensors bytes ----------------------------------------------------------------------------


def json_edit(header: dict[str, Any], draw: st.DrawFn) -> bytes:
    """One random edit of a parsed header, encoded back to bytes (NaN/Infinity allowed)."""
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(["field", "delete-field", "add-tensor", "rename", "metadata", "whole", "shift"]))
    if kind == "field" and names:
        entry = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[field] = draw(json_values | near_numbers | st.lists(near_numbers, max_size=3)
                            | st.sampled_from(["F16", "BF16", "F64", "I8", "BOOL", "U8", "F8_E4M3", "C64", "f32"]))
    elif kind == "delete-field" and names:
        entry = header[draw(st.sampled_from(names))]
        entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    elif kind == "add-tensor":
        header[draw(st.text(max_size=10))] = draw(json_values)
    elif kind == "rename" and names:
        header[draw(st.text(max_size=10))] = header.pop(draw(st.sampled_from(names)))
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "whole":
        return json.dumps(draw(json_values)).encode()
    elif kind == "shift" and names:
        entry = header[draw(st.sampled_from(names))]
        delta = draw(st.integers(min_value=-64, max_value=64) | st.sampled_from([2**40, -2**40, 2**63]))
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2:
            entry["data_offsets"] = [offsets[0] + delta, offsets[1] + draw(st.sampled_from([0, delta]))]
    return json.dumps(header).encode()


@st.composite
def mutated_safetensors(draw: st.DrawFn, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["bitflip", "truncate", "splice", "header-length", "json"]))
    data = bytearray(valid)
    if kind == "bitflip":
        for position, bit in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)),
                                           min_size=1, max_size=8)):
            data[position] ^= 1 << bit
        return bytes(data)
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=16)) + bytes(data[at:])
    (header_len,) = struct.unpack("<Q", valid[:8])
    if kind == "header-length":
        new_len = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, header_len - 64), header_len + 64))
        return struct.pack("<Q", new_len) + valid[8:]
    header = json.loads(valid[8:8 + header_len])
    body = json_edit(header, draw)
    if draw(st.booleans()):
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + valid[8 + header_len:]


def check_safetensors(path: Path) -> None:
    """Open and read every tensor; a file that opens must read back exactly what its header says."""
    try:
        sf = SafetensorsFile(path)
        for name in sf.keys():
            info = sf.tensors[name]
            tensor = sf.read(name)
            assert tuple(tensor.shape) == info.shape and tensor.dtype == info.dtype
            assert tensor.numel() * tensor.element_size() == info.nbytes
    except D2MergeError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("which", ["base/model.safetensors", "adapter/adapter_model.safetensors"])
def test_mutated_safetensors_is_read_or_refused(which: str, work: Path) -> None:
    valid = (work / "templates" / which).read_bytes()
    path = work / f"mutated-{which.replace('/', '-')}"

    @FUZZ
    @given(mutated_safetensors(valid))
    def run(data: bytes) -> None:
        path.write_bytes(data)
        check_safetensors(path)

    run()


# -- adapters: config fields and tensor headers, through the plan and the per-tensor reads ---------


@st.composite
def mutated_config(draw: st.DrawFn) -> str:
    # (sampled_from favours its first element, so most examples stay D2-LoRA and reach the plan)
    config: dict[str, Any] = adapter_config_dict(
        peft_type=draw(st.sampled_from(["D2LORA", "D2LORA", "DUAL_LORA", "LORA"])), r_mag=2, r_dir=2)
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=6))
        op = draw(st.sampled_from(["set", "near", "delete", "pattern"]))
        if op == "delete":
            config.pop(name, None)
        elif op == "near":
            config[name] = draw(near_numbers)
        elif op == "pattern":
            config[draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))] = draw(patterns)
        else:
            config[name] = draw(json_values)
    return json.dumps(config)


def check_adapter(folder: Path, base: Any) -> None:
    """Load, plan and compute every merged or replaced tensor; only D2MergeError may stop it."""
    try:
        adapter = load_adapter(folder)
        plan = build_plan(base, adapter)
        render_model_card(card_info(plan, {}))
        plan.describe()
        for item in plan.tensors:
            if item.action != "copy":
                compute_tensor(plan, item)
    except D2MergeError as exc:
        assert "\n" not in str(exc)


def test_mutated_adapter_config_is_accepted_or_refused(work: Path) -> None:
    folder = work / "config-adapter"
    shutil.copytree(work / "templates" / "adapter", folder)
    base = open_base(work / "templates" / "base")

    @FUZZ
    @given(mutated_config())
    def run(text: str) -> None:
        (folder / "adapter_config.json").write_text(text, encoding="utf-8")
        check_adapter(folder, base)

    run()


def test_adapter_config_of_any_text_is_refused_cleanly(work: Path) -> None:
    folder = work / "text-adapter"
    shutil.copytree(work / "templates" / "adapter", folder)
    base = open_base(work / "templates" / "base")

    @settings(FUZZ, max_examples=50)
    @given(st.text(max_size=40) | json_values.map(json.dumps))
    def run(text: str) -> None:
        (folder / "adapter_config.json").write_text(text, encoding="utf-8")
        check_adapter(folder, base)

    run()


def test_mutated_adapter_tensors_are_planned_or_refused(work: Path) -> None:
    folder = work / "tensor-adapter"
    shutil.copytree(work / "templates" / "adapter", folder)
    weights = folder / "adapter_model.safetensors"
    valid = weights.read_bytes()
    base = open_base(work / "templates" / "base")
    header, _ = split_safetensors(weights)
    assert len(header) > 8

    @FUZZ
    @given(mutated_safetensors(valid))
    def run(data: bytes) -> None:
        weights.write_bytes(data)
        check_adapter(folder, base)

    run()
