"""The option models (d2merge/options/) and the flags the CLI generates from them.

What the metadata promises: a value outside its choices or range, a rule between fields and a
setting given out of its context are refused in one place, naming the option for a Python caller
and the flag on the command line (one line, exit 2, before any work: the inputs below do not exist).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_one_line_error

from d2merge.options import (BenchOptions, CombineOptions, ConvertOptions, ExtractOptions, ManyOptions,
                             MergeOptions, MergeRunOptions, OnnxExportOptions, OptionError, PushOptions,
                             ThresholdOptions, VerifyOptions)
from d2merge.options.base import OptionModel, option, refuse_out_of_context, when

MODELS = (BenchOptions, CombineOptions, ConvertOptions, ExtractOptions, ManyOptions, MergeOptions, MergeRunOptions,
          OnnxExportOptions, PushOptions, ThresholdOptions, VerifyOptions)


@dataclasses.dataclass(frozen=True)
class Example(OptionModel):
    kind: str = option("a", choices=("a", "b"), help="the kind")
    count: int = option(1, min=1, max=4, help="how many")
    scale: float | None = option(None, min=0, min_open=True, flag="--size", help="how large")
    extra: bool = option(False, applies_with=when("kind", "b"), context_hint="use {count} instead", help="b only")


def test_a_model_names_options_and_the_cli_names_flags() -> None:
    with pytest.raises(OptionError) as refused:
        Example(scale=-1.0)
    assert str(refused.value) == "scale must be above 0, got -1"
    assert refused.value.for_cli() == "--size must be above 0, got -1"
    with pytest.raises(OptionError) as refused:
        Example(count=5)
    assert (str(refused.value), refused.value.for_cli()) == ("count=5 is outside [1, 4]", "--count 5 is outside [1, 4]")
    with pytest.raises(OptionError) as refused:
        Example(kind="c")
    assert refused.value.for_cli() == "invalid --kind c (choose one of a, b)"
    with pytest.raises(OptionError) as refused:
        Example(extra=True)
    assert str(refused.value) == "extra does nothing here: it applies only with kind='b' (use count instead)"
    assert refused.value.for_cli() == "--extra does nothing here: it applies only with --kind b (use --count instead)"
    assert Example(kind="b", extra=True).extra


def test_with_overrides_checks_again_and_refuses_unknown_names() -> None:
    options = MergeOptions()
    assert options.with_overrides(dtype="bf16").dtype == "bf16" and options.with_overrides() is options
    with pytest.raises(TypeError, match="unknown merge option"):
        options.with_overrides(dtpye="bf16")
    with pytest.raises(OptionError, match="invalid dtype='int8'"):
        options.with_overrides(dtype="int8")


def test_given_counts_on_the_command_line_whatever_the_value() -> None:
    """The library refuses a value other than the default; the CLI any flag given (even at its default)."""
    values = MergeRunOptions(format="hf").values()
    refuse_out_of_context([MergeRunOptions], values, given=())
    with pytest.raises(OptionError, match="gguf_type does nothing here: it applies only with format='gguf'"):
        refuse_out_of_context([MergeRunOptions], values, given={"gguf_type"})


def test_every_field_has_help_and_a_flag_once() -> None:
    for model in MODELS:
        flags = model.flags()
        assert len(set(flags.values())) == len(flags), model
        for f in dataclasses.fields(model):
            assert f.metadata.get("help"), f"{model.__name__}.{f.name} has no help"
            for condition in f.metadata.get("applies_with", ()):
                assert condition.name in flags or condition.name == "push_to", (model, f.name, condition)


def test_the_option_lists_match_what_the_library_writes() -> None:
    """Choices live torch-free in d2merge.options; the modules that write the outputs keep theirs equal."""
    from d2merge.export import onnx_genai
    from d2merge.export.formats import FORMATS
    from d2merge.options.merge import OUTPUT_FORMATS
    from d2merge.options.onnx import GENAI_PRECISIONS, INT4_ALGORITHMS, INT4_BLOCK_SIZES

    assert OUTPUT_FORMATS == tuple(FORMATS)
    assert (GENAI_PRECISIONS, INT4_ALGORITHMS, INT4_BLOCK_SIZES) == (
        onnx_genai.PRECISIONS, onnx_genai.INT4_ALGORITHMS, onnx_genai.INT4_BLOCK_SIZES)


MERGE = ["merge", "missing-base", "missing-adapter"]


@pytest.mark.parametrize(("argv", "needles"), [
    ([*MERGE, "-o", "m", "--precision", "fp32"], ("--precision does nothing here: it applies only with --format "
                                                  "onnx-genai", "--dtype")),
    ([*MERGE, "-o", "m.gguf", "--precision", "int4"], ("--precision does nothing here",)),
    ([*MERGE, "-o", "m", "--modelfile"], ("--modelfile does nothing here: it applies only with --format gguf",)),
    ([*MERGE, "-o", "m", "--imatrix", "x.dat"], ("--imatrix does nothing here",)),
    ([*MERGE, "-o", "m", "--json"], ("--json does nothing here: it applies only with --dry-run",)),
    ([*MERGE, "-o", "m", "--token", "t"], ("--token does nothing here: it applies only with --push-to",)),
    ([*MERGE, "-o", "m", "--require-verify"], ("--require-verify does nothing here", "--push-to", "--verify")),
    ([*MERGE, "-o", "m.gguf", "--verify"], ("--verify does nothing here: it applies only with --format hf",)),
    ([*MERGE, "-o", "m.safetensors", "--push-to", "me/m"], ("--push-to does nothing here",)),
    ([*MERGE, "-o", "m", "--base-model-id", "not an id"], ("--base-model-id not an id is not a Hub model id",)),
    (["export-onnx", ".", "-o", "g", "--runtime", "genai", "--opset", "18"],
     ("--opset does nothing here: it applies only with --runtime generic", "--precision fp32|fp16|int4")),
    (["export-onnx", ".", "-o", "g", "--precision", "fp16"],
     ("--precision does nothing here: it applies only with --runtime genai", "--dtype fp32|fp16")),
    (["export-onnx", ".", "-o", "g", "--runtime", "genai", "--int4-asymmetric"],
     ("--int4-asymmetric does nothing here: it applies only with --runtime genai and --precision int4",)),
    (["export-onnx", ".", "-o", "g", "--runtime", "genai", "--precision", "int4", "--int4-accuracy-level", "5"],
     ("--int4-accuracy-level 5 is outside [1, 4]",)),
    (["combine", "a", "b", "--weights", "1,1", "-o", "c", "--combination", "linear", "--seed", "0"],
     ("--seed does nothing here: it applies only with --combination dare_ties|",)),
    (["combine", "a", "b", "--weights", "1,1", "-o", "c", "--combination", "ties"],
     ("--combination ties needs --density",)),
    (["convert", "a", "--base", "b", "-o", "c", "--energy", "0"], ("--energy 0 is outside (0, 1]",)),
    (["verify", "b", "a", "--alpha", "2"], ("--alpha 2 is outside [0, 1]",)),
    (["merge-many", "b", "m.json", "--workers", "0"], ("--workers must be at least 1, got 0",)),
    ([*MERGE, "--dtype", "int8"], ("Invalid value for '--dtype'", "'d2merge merge --help'")),  # click's own, one line
])
def test_refusals_name_the_flag_in_one_line_before_any_work(argv: list[str], needles: tuple[str, ...], cli_runner: Any,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli_runner(argv)
    assert_one_line_error(result.code, result.out, result.err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_help_shows_what_the_metadata_says(cli_runner: Any) -> None:
    text = " ".join(cli_runner(["export-onnx", "--help"]).out.split())
    assert "--int4-accuracy-level INTEGER With --precision int4:" in text and "[default: 4] [1<=x<=4]" in text
    assert "--no-validate Skip the ONNX Runtime vs PyTorch comparison" in text
    merge_help = " ".join(cli_runner(["merge", "--help"]).out.split())
    assert "--base-model-id ORG/NAME" in merge_help and "--hash-sources / --no-hash-sources" in merge_help


def test_an_option_error_crosses_a_process_boundary() -> None:
    """merge-many's process workers and Ray send errors back pickled: the flags must survive the trip."""
    import pickle

    with pytest.raises(OptionError) as refused:
        MergeRunOptions(format="hf", genai_precision="int4")
    again = pickle.loads(pickle.dumps(refused.value))
    assert (str(again), again.for_cli()) == (str(refused.value), refused.value.for_cli())
    assert again.for_cli().startswith("--precision does nothing here")


def test_merge_many_and_verify_take_merges_choices_not_copies() -> None:
    def meta(model: type[OptionModel], name: str) -> Any:
        f = next(f for f in dataclasses.fields(model) if f.name == name)
        return f.default, f.metadata["choices"]

    for name in ("dtype", "tied_embeddings", "device"):
        assert meta(ManyOptions, name) == meta(MergeOptions, name)
    assert meta(VerifyOptions, "device") == meta(ExtractOptions, "device") == meta(MergeOptions, "device")
    with pytest.raises(OptionError, match="invalid dtype='int8'"):
        ManyOptions(dtype="int8")


def test_every_flag_of_every_command_has_help() -> None:
    from d2merge.cli import cli

    for name, command in cli.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert getattr(param, "help", None), f"d2merge {name} {param.opts[0]} has no help"
