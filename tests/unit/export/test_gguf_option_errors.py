"""The GGUF modules' refusals of an option name the option for a Python caller and the flag on the command line.

``OptionError`` renders ``{name}`` placeholders both ways (``options/base.py``); ``cli/app.py`` prints
``for_cli()``. The command line's text is the one the CLI tests pin (test_gguf.py, test_gguf_quant.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d2merge.export.gguf.file_types import by_llama_cpp, check_gguf_type
from d2merge.export.gguf.lora_adapter import _token_embedding
from d2merge.export.gguf.quant import check_imatrix, llama_cpp_module
from d2merge.options.base import OptionError


def _both(excinfo: pytest.ExceptionInfo[OptionError]) -> tuple[str, str]:
    return str(excinfo.value), excinfo.value.for_cli()


def test_an_unknown_type_names_gguf_type_or_the_flag() -> None:
    with pytest.raises(OptionError) as refused:
        check_gguf_type("q3_k")
    python, cli = _both(refused)
    assert python.startswith("unknown gguf_type 'q3_k'; choose one of f32, f16,") and "--" not in python
    assert cli.startswith("unknown --gguf-type 'q3_k'; choose one of f32, f16,")


def test_a_type_holding_braces_is_shown_as_typed() -> None:
    with pytest.raises(OptionError) as refused:
        check_gguf_type("{format}")
    python, cli = _both(refused)
    assert python.startswith("unknown gguf_type='{format}'; choose one of")
    assert cli.startswith("unknown --gguf-type {format}; choose one of")


def test_an_imatrix_for_a_gguf_py_type_names_gguf_imatrix_or_the_flag() -> None:
    with pytest.raises(OptionError) as refused:
        by_llama_cpp("f16", "m.imatrix")
    python, cli = _both(refused)
    assert python.startswith("gguf_imatrix applies to the types llama.cpp's quantizer writes, not f16")
    assert python.endswith("or drop gguf_imatrix)") and "--" not in python
    assert cli.startswith("--imatrix applies to the types llama.cpp's quantizer writes, not f16")
    assert cli.endswith("or drop --imatrix)")
    assert by_llama_cpp("q4_k_m", "m.imatrix") and not by_llama_cpp("q8_0", None)


def test_another_models_imatrix_names_the_option_in_its_hint() -> None:
    with pytest.raises(OptionError) as refused:
        check_imatrix({"blk.0.attn_q.weight": np.ones(8, dtype=np.float32)}, {}, Path("m.imatrix"))
    python, cli = _both(refused)
    assert "(gguf_imatrix takes the file llama-imatrix wrote for this model)" in python
    assert "(--imatrix takes the file llama-imatrix wrote for this model)" in cli
    assert "blk.0.attn_q.weight" in python and "m.imatrix" in python


def test_a_missing_llama_cpp_names_the_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(OptionError) as refused:
        llama_cpp_module("q4_k_m")
    python, cli = _both(refused)
    assert python.startswith("gguf_type='q4_k_m' is written by llama.cpp's own quantizer")
    assert cli.startswith("--gguf-type q4_k_m is written by llama.cpp's own quantizer")
    assert "pip install 'd2merge[gguf-llama]'" in cli


def test_an_embedding_llama_cpp_cannot_adapt_names_convert_to() -> None:
    a, b = torch.zeros(2, 8), torch.zeros(4, 2)
    with pytest.raises(OptionError) as refused:
        _token_embedding("output.weight", "lm_head", a, b, {}, Path("adapter_model.safetensors"))
    python, cli = _both(refused)
    assert "(serve this adapter with to='lora', or merge it)" in python
    assert "(serve this adapter with --to lora, or merge it)" in cli
