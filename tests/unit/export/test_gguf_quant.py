"""llama.cpp's file types: each d2merge GGUF is the file llama.cpp's own quantizer writes, tensor for tensor.

The oracle is ``llama_model_quantize`` (llama-cpp-python) run on d2merge's ``--gguf-type f32``
export of the same merge, as a user would run ``llama-quantize model-f32.gguf out.gguf Q4_K_M``:
same tensor names, shapes, GGML types and data bytes. Two models: a tiny Llama whose rows are
whole 256-value blocks (K-quants everywhere, GQA 4 so Q2_K's attn_v rule applies) and SmolLM2-135M
(576-wide rows: llama.cpp's fallbacks). Then llama.cpp loads and generates; the importance matrix
is checked in both of llama.cpp's layouts; bad input is one line, exit 2, nothing left behind.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2merge.export.gguf import GGUF_TYPES, LLAMA_CPP_TYPES, LLAMA_FILE_TYPES, export_gguf, gguf_for_verify, read_gguf
from d2merge.io.gguf_file import read_gguf_header
from d2merge.synthetic import save_random_adapter, save_tiny_base
from helpers import TESTS_DIR, assert_one_line_error, checkout_env
from malformed import write_gguf_imatrix  # the hostile corpus's writer of llama-imatrix's GGUF layout

SMOL_VOCAB = 49152
has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
llama_cpp_only = pytest.mark.skipif(not has_llama_cpp, reason="llama-cpp-python is not installed (extra gguf-llama)")
K_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")


def tensors_of(path: Path) -> dict[str, tuple[tuple[int, ...], str, bytes]]:
    """{name: (ggml shape, GGML type, data bytes)} of a GGUF file."""
    header = read_gguf_header(path)
    out = {}
    with open(path, "rb") as fh:
        for info in header.tensors.values():
            fh.seek(info.offset)
            out[info.name] = (info.shape, info.type_name, fh.read(info.nbytes))
    return out


def llama_cpp_quantize(f32: Path, out: Path, ftype: int, *, pure: bool = False) -> Path:
    """What ``llama-quantize [--pure] F32 OUT TYPE`` writes: llama.cpp's quantizer with its defaults."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = pure
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def assert_same_tensors(ours: Path, theirs: Path) -> dict[str, int]:
    a, b = tensors_of(ours), tensors_of(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][:2] == b[name][:2], (name, a[name][:2], b[name][:2])
        assert a[name][2] == b[name][2], f"{name}: data bytes differ"
    kinds: dict[str, int] = {}
    for shape, kind, _ in a.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _with_smol_tokenizer(folder: Path, smollm2: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, folder / name)
    return folder


class Model:
    """A merged fp32 folder, its d2merge f32 GGUF (the oracle's input) and its exports by type (made once)."""

    def __init__(self, root: Path, merged: Path, base: Path, adapter: Path):
        self.root, self.merged, self.base, self.adapter = root, merged, base, adapter
        self._made: dict[str, Path] = {}

    def gguf(self, gguf_type: str) -> Path:
        if gguf_type not in self._made:
            self._made[gguf_type] = export_gguf(self.merged, self.root / f"{gguf_type}.gguf",
                                                gguf_type=gguf_type).output
        return self._made[gguf_type]


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory, smollm2) -> Model:
    """A Llama whose every row is whole 256-blocks: hidden 256, 4 heads over 1 kv head (GQA 4), 4 layers."""
    from d2merge.api import merge

    root = tmp_path_factory.mktemp("kquant-tiny")
    base = save_tiny_base(root / "base", "llama", vocab_size=SMOL_VOCAB, tokenizer=False, hidden_size=256,
                          intermediate_size=512, num_heads=4, num_kv_heads=1, num_layers=4)
    _with_smol_tokenizer(base, smollm2)
    adapter = save_random_adapter(base, root / "adapter", "d2lora", r=4)
    return Model(root, merge(base, adapter, root / "merged", dtype="fp32", hash_sources=False).output, base,
                 adapter)


@pytest.fixture(scope="module")
def smol(smollm2_merged):
    """SmolLM2 + a D2-LoRA merged in fp32 and its exports (conftest's, shared with tests/unit/export/test_gguf.py): read-only."""
    return smollm2_merged


# ----- byte equality with llama.cpp's quantizer --------------------------------------------------


# Each type is an export (a 105 MB f32 temp and llama.cpp's quantizer on it): q4_k_m in the quick run,
# the rest slow. d2merge has no code of its own per llama.cpp type: it hands LLAMA_CPP_TYPES[type] to
# llama_model_quantize with the default parameters, so the bytes against llama.cpp's own run on the same
# f32 file (a second quantizer run) are compared for one type of each of llama.cpp's families (legacy,
# K-quant with its GQA attn_v rule, IQ); every type checks what is its own from d2merge's file alone:
# llama.cpp's file type in it, that type's blocks, verify's reading of it. D2MERGE_GGUF_FULL=1 compares
# every type's bytes.
ORACLE_TYPES = ("q4_k_m", "q5_1", "q2_k", "iq4_xs")
if os.environ.get("D2MERGE_GGUF_FULL", "") not in ("", "0"):
    ORACLE_TYPES = tuple(LLAMA_CPP_TYPES)


@pytest.mark.llama_cpp
@llama_cpp_only
@pytest.mark.parametrize("gguf_type", [t if t == "q4_k_m" else pytest.param(t, marks=pytest.mark.slow)
                                       for t in LLAMA_CPP_TYPES])
def test_llama_cpp_types_are_llama_cpps_files(gguf_type, tiny256, tmp_path):
    ours = tiny256.gguf(gguf_type)
    meta, table = read_gguf(ours)
    assert meta["general.file_type"] == LLAMA_FILE_TYPES[gguf_type][0] and meta["d2merge.gguf_type"] == gguf_type
    kinds: dict[str, int] = {}
    for _, kind in table.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"tiny256 {gguf_type}: {kinds}")
    assert LLAMA_FILE_TYPES[gguf_type][1] in kinds  # the type's own blocks, not only fallbacks
    assert gguf_for_verify(ours).label == f"gguf-{gguf_type}" and gguf_for_verify(ours).floor_dtype is None
    if gguf_type in ORACLE_TYPES:
        theirs = llama_cpp_quantize(tiny256.gguf("f32"), tmp_path / f"llama-{gguf_type}.gguf",
                                    LLAMA_CPP_TYPES[gguf_type])
        assert assert_same_tensors(ours, theirs) == kinds
        # llama.cpp's file of our f32 export still says d2merge.gguf_type=f32: verify goes by the tensors
        assert read_gguf(theirs)[0]["d2merge.gguf_type"] == "f32"
        assert gguf_for_verify(theirs).label == f"gguf-{gguf_type}"


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0_pure", "q4_1_pure", "q5_0_pure", "q5_1_pure"])
def test_gguf_py_types_are_llama_cpps_files(gguf_type, tiny256):
    """q8_0 is llama.cpp's Q8_0 (its mix is Q8_0 everywhere); the _pure types are ``llama-quantize --pure``."""
    ours = tiny256.gguf(gguf_type)
    theirs = llama_cpp_quantize(tiny256.gguf("f32"), ours.with_name(f"llama-{gguf_type}.gguf"),
                                GGUF_TYPES[gguf_type][1], pure=gguf_type.endswith("_pure"))
    assert assert_same_tensors(ours, theirs).keys() == {"F32", GGUF_TYPES[gguf_type][0]}
    theirs.unlink()


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
def test_merge_format_gguf_streams_into_llama_cpps_quantizer(tiny256, cli_runner, tmp_path):
    """merge --format gguf --gguf-type q5_k_m: the merge streamed into the f32 temp, the tensors of the export's."""
    out = tmp_path / "m.gguf"
    res = cli_runner(["merge", tiny256.base, tiny256.adapter, "-o", out, "--format", "gguf", "--gguf-type", "q5_k_m"])
    assert res.code == 0, res.err
    assert "by llama.cpp's quantizer from a" in res.out
    assert tensors_of(out) == tensors_of(tiny256.gguf("q5_k_m"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the temp and its folder are gone
    assert "adapter/adapter_model.safetensors" in read_gguf(out)[0]["d2merge.sources"]  # hashes written in the temp


# SmolLM2's rows are 576 values (1536 for ffn_down): not whole 256-blocks, so llama.cpp falls back
# (Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, Q5_K -> Q5_1) for all but ffn_down, and its tied
# embedding goes to Q8_0. Each conversion writes a 540 MB f32 temp: a few types, each a distinct rule;
# the bytes against llama.cpp's own run for the ORACLE_TYPES among them (q4_k_m and q2_k).
@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
@pytest.mark.parametrize("gguf_type", ["q4_k_m", "q2_k", "q6_k"])
def test_smollm2_k_types_are_llama_cpps_files_with_its_fallbacks(gguf_type, smol, tmp_path):
    ours = smol.gguf(gguf_type)
    kinds: dict[str, int] = {}
    for _, kind in read_gguf(ours)[1].values():
        kinds[kind] = kinds.get(kind, 0) + 1
    if gguf_type in ORACLE_TYPES:  # the bytes, as for tiny256 (a second quantizer run, of a 540 MB f32 file)
        theirs = llama_cpp_quantize(smol.gguf("f32"), tmp_path / f"llama-{gguf_type}.gguf", LLAMA_CPP_TYPES[gguf_type])
        assert assert_same_tensors(ours, theirs) == kinds
    print(f"smollm2 {gguf_type}: {kinds}")
    fallback = {"q4_k_m": "Q5_0", "q2_k": "Q4_0", "q6_k": "Q8_0"}[gguf_type]
    assert fallback in kinds and tensors_of(ours)["token_embd.weight"][1] in ("Q8_0", "F16")


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
def test_llama_cpp_loads_and_generates_a_k_quant(smol):
    """SmolLM2 q4_k_m in llama.cpp: greedy answers to real prompts, and its first token is the fp32 model's."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smol.folder)
    model = AutoModelForCausalLM.from_pretrained(smol.folder, dtype=torch.float32).eval()
    # One thread, as every test here (conftest.py): llama.cpp's threads meet at a spinning barrier after
    # each op, and two of them on a 2-core box that two xdist workers already fill wait for each other's
    # time slices: at load 15-20 this test ran into the 900 s limit (30 s at load 5).
    llm = llama_cpp.Llama(str(smol.gguf("q4_k_m")), n_ctx=128, n_threads=1, verbose=False)
    agree = 0
    prompts = ("The capital of France is", "Water freezes at zero degrees", "One, two, three, four,")
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(token)
            if len(tokens) == 8:
                break
        assert len(tokens) == 8 and all(0 <= t < SMOL_VOCAB for t in tokens)
        with torch.no_grad():
            agree += int(model(torch.tensor([ids])).logits[0, -1].argmax()) == tokens[0]
    llm.close()
    assert agree >= 2, agree  # 4-bit: most first tokens are the fp32 model's


# ----- without llama.cpp, bad input ----------------------------------------------------------------


def _nothing_written(folder: Path) -> bool:
    return not any(p.suffix == ".gguf" or ".d2merge-" in p.name for p in folder.iterdir())


def test_k_type_without_llama_cpp_names_the_package(tiny_bases, cli_runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    res = cli_runner(["export-gguf", tiny_bases("llama"), "-o", tmp_path / "m.gguf", "--gguf-type", "q4_k_m"])
    assert_one_line_error(res.code, res.out, res.err, "pip install 'd2merge[gguf-llama]'")
    assert _nothing_written(tmp_path)


def test_imatrix_refused_for_a_type_llama_cpp_does_not_write(tiny256, cli_runner, tmp_path):
    imatrix = tmp_path / "m.imatrix"
    imatrix.write_bytes(b"anything")
    res = cli_runner(["export-gguf", tiny256.merged, "-o", tmp_path / "m.gguf", "--imatrix", imatrix])
    assert_one_line_error(res.code, res.out, res.err, "--imatrix applies to the types llama.cpp's quantizer writes, "
                          "not f16")
    assert _nothing_written(tmp_path)


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    """The checks before any work run without llama-cpp-python (the quantizer itself is never reached)."""
    import d2merge.export.gguf.quant as gguf_quant

    monkeypatch.setattr(gguf_quant, "llama_cpp_module", lambda gguf_type: object())


def test_too_little_disk_for_the_f32_temp_is_refused_first(tiny256, cli_runner, tmp_path, monkeypatch,
                                                            fake_llama_cpp):
    import d2merge.export.gguf.quant as gguf_quant

    from types import SimpleNamespace

    monkeypatch.setattr(gguf_quant.shutil, "disk_usage", lambda path: SimpleNamespace(free=5 << 20))
    res = cli_runner(["export-gguf", tiny256.merged, "-o", tmp_path / "m.gguf", "--gguf-type", "q4_k_m"])
    assert_one_line_error(res.code, res.out, res.err, "free beside the output (an f32 GGUF temp of")
    assert _nothing_written(tmp_path)


# ----- the importance matrix -------------------------------------------------------------------------


def write_legacy_imatrix(path: Path, values: dict[str, np.ndarray], calls: int = 8) -> Path:
    """llama-imatrix's legacy .dat: entry count, then (name, calls, values, sums x calls) each, then the trailer."""
    out = [struct.pack("<i", len(values))]
    for name, v in sorted(values.items()):
        out += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", calls, v.size),
                (v * calls).astype("<f4").tobytes()]
    out += [struct.pack("<ii", 1, 4), b"test"]
    path.write_bytes(b"".join(out))
    return path


def importance(model: Model) -> dict[str, np.ndarray]:
    """Positive per-column values for every 2-D weight but the embedding (as llama-imatrix collects them)."""
    rng = np.random.default_rng(0)
    _, table = read_gguf(model.gguf("f32"))
    return {name: rng.uniform(0.25, 4.0, shape[0]).astype(np.float32) for name, (shape, _) in table.items()
            if len(shape) == 2 and name != "token_embd.weight"}


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
def test_imatrix_in_both_layouts_steers_the_quantizer(tiny256, tmp_path):
    """Both of llama.cpp's layouts give the same importance values, hence the same bytes; and they change them.

    The quantizer is handed what read_imatrix returns (export_gguf reads the file with it and nothing
    else): equal arrays from the two layouts are equal bytes, so one export shows the effect.
    """
    from d2merge.io.imatrix_file import read_imatrix

    values = importance(tiny256)
    from_gguf_layout = read_imatrix(write_gguf_imatrix(tmp_path / "m.gguf.imatrix", values))
    from_dat_layout = read_imatrix(write_legacy_imatrix(tmp_path / "m.dat", values))
    assert sorted(from_gguf_layout) == sorted(from_dat_layout) == sorted(values)
    for name, expected in values.items():
        assert np.array_equal(from_gguf_layout[name], from_dat_layout[name]), name
        np.testing.assert_allclose(from_gguf_layout[name], expected, rtol=1e-6)
    with_imatrix = tensors_of(export_gguf(tiny256.merged, tmp_path / "a.gguf", gguf_type="q4_k_m",
                                          imatrix=tmp_path / "m.dat").output)
    plain = tensors_of(tiny256.gguf("q4_k_m"))
    changed = [n for n in with_imatrix if with_imatrix[n][2] != plain[n][2]]
    assert "blk.0.attn_q.weight" in changed and "token_embd.weight" not in changed  # no entry for it


@pytest.mark.parametrize("case", ["not-an-imatrix", "truncated-gguf", "truncated-dat", "other-model"])
def test_bad_imatrix_is_one_line_and_nothing_is_written(case, tiny256, cli_runner, tmp_path, fake_llama_cpp):
    values = importance(tiny256)
    if case == "not-an-imatrix":
        path = tmp_path / "m.imatrix"
        path.write_bytes(b"\x00\x01\x02\x03" * 100)
        expected = "not an importance matrix in llama.cpp's format"
    elif case == "truncated-gguf":
        full = write_gguf_imatrix(tmp_path / "full.imatrix", values).read_bytes()
        path = tmp_path / "m.imatrix"
        path.write_bytes(full[: len(full) // 2])
        expected = "runs past the end of the file"
    elif case == "truncated-dat":
        full = write_legacy_imatrix(tmp_path / "full.dat", values).read_bytes()
        path = tmp_path / "m.dat"
        path.write_bytes(full[: len(full) // 2])
        expected = "the file ends inside"
    else:
        path = write_gguf_imatrix(tmp_path / "m.imatrix", {"blk.0.attn_q.weight": np.ones(576, np.float32)})
        expected = "the importance matrix has 576 values for a tensor with rows of 256"
    out = tmp_path / "out"
    out.mkdir()
    res = cli_runner(["export-gguf", tiny256.merged, "-o", out / "m.gguf", "--gguf-type", "q4_k_m", "--imatrix", path])
    assert_one_line_error(res.code, res.out, res.err, expected)
    assert _nothing_written(out)


# ----- kill -9 ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.llama_cpp
@llama_cpp_only
def test_kill9_during_the_quantizer_leaves_no_temp_after_the_next_run(tiny256, tmp_path):
    """Killed when llama.cpp's quantizer starts (the f32 temp complete beside the output): the next run
    removes it and writes the file an uninterrupted run writes."""
    from d2merge.io.output import WORK_MARKERS

    out = tmp_path / "m.gguf"
    argv = ["export-gguf", str(tiny256.merged), "-o", str(out), "--gguf-type", "q4_k_m", "-q"]
    env = checkout_env(PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(TESTS_DIR / "kill_driver.py"),
                           "call:d2merge.export.gguf.quant:quantize", "--", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p for p in tmp_path.rglob("*") if any(m in p.name for m in WORK_MARKERS)]
    f32_temps = [p for p in leftovers if p.name.endswith("-f32")]
    assert f32_temps and (f32_temps[0] / "m.gguf").stat().st_size > 0, leftovers  # the complete f32 temp
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "d2merge", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert [p for p in tmp_path.rglob("*") if any(m in p.name for m in WORK_MARKERS)] == []
    assert tensors_of(out) == tensors_of(tiny256.gguf("q4_k_m"))
