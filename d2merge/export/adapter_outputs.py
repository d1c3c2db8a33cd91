"""The registry of the adapter outputs: one line per ``--to`` target, and the calls that dispatch on it.

``--to lora`` writes a plain PEFT LoRA folder (``adapter_ops.convert.convert_to_lora``);
``--to gguf-lora`` writes llama.cpp's LoRA adapter GGUF (``export.gguf.lora_adapter``). ``convert``,
``combine`` and ``extract`` (the CLI's commands and ``d2merge.convert`` / ``d2merge.combine`` /
``d2merge.extract``) all go through this module, so ``to=`` picks the output wherever it is given,
and a new target is one writer plus one line in :func:`_targets`. combine and extract compute a
plain LoRA; for another target it is written to a temp folder and converted from there, as
``convert --to`` would, after the target has checked ``out`` (nothing computed for a refused name).

Why a module of its own: the PEFT writer lives with the adapter operations (``adapter_ops``,
below ``export``) and the GGUF writer with the GGUF exporter (``export.gguf``); only a module
above both can name them, and it imports each when it runs (this one is torch-free at import).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from d2merge.options.adapter_ops import CONVERT_TARGETS, CombineOptions, ConvertOptions, ExtractOptions

if TYPE_CHECKING:
    from d2merge.adapter_ops.combine import CombineResult
    from d2merge.adapter_ops.convert import ConvertResult
    from d2merge.adapter_ops.extract import ExtractResult


@dataclass(frozen=True)
class AdapterOutput:
    """One ``--to`` target: its name, its writer, and the check of ``out`` it makes before any work.

    ``write(adapter, base, out, options, allow_pickle=, report=)`` writes ``out`` atomically
    and returns the conversion's per-module report; nothing is written on a refusal.
    ``check_out(out, inputs, overwrite=)`` refuses a name or location the writer would refuse.
    """

    name: str
    write: Callable[..., ConvertResult]
    check_out: Callable[..., Path]


def _lora(*args: Any, **kwargs: Any) -> ConvertResult:
    from d2merge.adapter_ops.convert import convert_to_lora

    return convert_to_lora(*args, **kwargs)


def _gguf_lora(*args: Any, **kwargs: Any) -> ConvertResult:
    from d2merge.export.gguf.lora_adapter import convert_to_gguf_lora

    return convert_to_gguf_lora(*args, **kwargs)


def _lora_out(out: str | Path, inputs: Sequence[Path], *, overwrite: bool) -> Path:
    from d2merge.io.adapter_writer import check_adapter_output

    return check_adapter_output(out, inputs, overwrite=overwrite)


def _gguf_lora_out(out: str | Path, inputs: Sequence[Path], *, overwrite: bool) -> Path:
    from d2merge.export.gguf.lora_adapter import check_gguf_lora_output

    return check_gguf_lora_output(out, inputs, overwrite=overwrite)


def _targets() -> tuple[AdapterOutput, ...]:
    return (  # one line per target, in the order --to lists them (options.adapter_ops.CONVERT_TARGETS)
        AdapterOutput("lora", _lora, _lora_out),
        AdapterOutput("gguf-lora", _gguf_lora, _gguf_lora_out),
    )


REGISTRY: dict[str, AdapterOutput] = {target.name: target for target in _targets()}
assert tuple(REGISTRY) == CONVERT_TARGETS, "ConvertOptions.to's choices and the registry must agree"


def convert(adapter: Any, base: str | Path, out: str | Path, options: ConvertOptions | None = None, *,
            allow_pickle: bool = False, report: str | Path | None = None, **overrides: Any) -> ConvertResult:
    """``adapter`` (on ``base``) written as ``options.to`` says: a plain LoRA folder or a LoRA GGUF.

    Keyword overrides are ConvertOptions fields: ``convert(adapter, base, "a.gguf", to="gguf-lora")``.
    """
    options = (options or ConvertOptions()).with_overrides(**overrides)
    return REGISTRY[options.to].write(adapter, base, out, options, allow_pickle=allow_pickle, report=report)


def combine(adapters: Sequence[str | Path], out: str | Path, weights: Sequence[float],
            options: CombineOptions | None = None, *, base: str | Path | None = None, allow_pickle: bool = False,
            **overrides: Any) -> CombineResult:
    """``adapters`` combined with ``weights`` (``adapter_ops.combine``), written as ``options.to`` says.

    Keyword overrides are CombineOptions fields: ``combine(["./a", "./b"], "ab.gguf", [1, 1], base="./base",
    to="gguf-lora", combination="cat")``. A GGUF needs ``base`` (its architecture and tensor names).
    """
    from d2merge.adapter_ops.combine import combine as combine_lora

    options = (options or CombineOptions()).with_overrides(**overrides)
    if options.to == "lora":
        return combine_lora(adapters, out, weights, options, base=base, allow_pickle=allow_pickle)
    if base is None:
        raise options.error("{to=} writes a file for one base model, and combine was given none",
                            hint="name the base model the adapters were trained on")
    inputs = [Path(a) for a in adapters] + [Path(base)]
    return _through_lora(options.to, out, base, inputs, options.overwrite, allow_pickle,
                         lambda folder: combine_lora(adapters, folder, weights, dataclasses.replace(
                             options, to="lora", overwrite=False), base=base, allow_pickle=allow_pickle))


def extract(base: str | Path, tuned: str | Path, out: str | Path, options: ExtractOptions, *,
            allow_pickle: bool = False, report: str | Path | None = None) -> ExtractResult:
    """TUNED - BASE as a LoRA (``adapter_ops.extract``), written as ``options.to`` says."""
    from d2merge.adapter_ops.extract import extract as extract_lora

    if options.to == "lora":
        return extract_lora(base, tuned, out, options, allow_pickle=allow_pickle, report=report)
    result = _through_lora(options.to, out, base, [Path(base), Path(tuned)], options.overwrite, allow_pickle,
                           lambda folder: extract_lora(base, tuned, folder, dataclasses.replace(
                               options, to="lora", overwrite=False), allow_pickle=allow_pickle))
    if report is not None:  # written here: it names the GGUF, not the temp folder
        from d2merge.io.output import write_json

        write_json(Path(report), result.to_json())
    return result


def _through_lora(to: str, out: str | Path, base: str | Path, inputs: list[Path], overwrite: bool, allow_pickle: bool,
                  write_lora: Callable[[Path], Any]) -> Any:
    """``write_lora`` into a temp folder, that folder converted to ``to`` at ``out``; the result names ``out``.

    ``out`` is checked first, so a wrong name or an existing output is refused before the work.
    The conversion re-factors each module's update to its numerical rank, exactly as
    ``convert --to`` does with the folder (the same bytes).
    """
    target = REGISTRY[to]
    target.check_out(out, inputs, overwrite=overwrite)
    temp = Path(tempfile.mkdtemp(prefix="d2merge-adapter-"))
    try:
        result = write_lora(temp / "adapter")
        converted = target.write(temp / "adapter", base, out, ConvertOptions(to=to, overwrite=overwrite),
                                 allow_pickle=allow_pickle)  # for the base: the temp adapter is safetensors
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return dataclasses.replace(result, out=converted.out)
