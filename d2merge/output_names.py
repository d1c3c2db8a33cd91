"""What an output's name says: the format its suffix asks for, and the files written beside it.

A user who types ``-o model.gguf`` means a GGUF file; writing a folder named ``model.gguf``
because ``--format`` was left at its default is the wrong model written with exit 0. So the
suffix decides when ``--format`` is not given, and a suffix that contradicts ``--format`` is
refused in one line before any work. Torch-free: the CLI calls this before importing torch.
"""

from __future__ import annotations

from pathlib import Path

from d2merge.errors import D2MergeError, option_error

# The suffixes that name one output format. A folder (no suffix, or any other) is a Hugging Face folder.
SUFFIX_FORMATS = {".gguf": "gguf", ".safetensors": "safetensors", ".onnx": "onnx"}
# Formats whose output is a folder: a file suffix on their output contradicts them.
FOLDER_FORMATS = ("hf", "onnx-genai")
MODELFILE_SUFFIX = ".Modelfile"


def format_for_output(out: str | Path | None, given: str | None) -> str:
    """The output format: ``given`` (``--format``) if set, else the one ``out``'s suffix names, else ``hf``.

    Raises D2MergeError when ``out``'s suffix names another format than ``given``.
    """
    suffix = Path(str(out)).suffix.lower() if out is not None else ""
    implied = SUFFIX_FORMATS.get(suffix)
    if given is None:
        return implied or "hf"
    if implied is not None and implied != given:
        wanted = next((s for s, f in SUFFIX_FORMATS.items() if f == given), None)
        instead = (f"give {{out}} a folder name without {suffix}" if given in FOLDER_FORMATS or wanted is None
                   else f"name the output *{wanted}")
        raise option_error(f"the output name ends in {suffix}, which means {{format={implied}}}, but "
                           f"{{format={given}}} was given", path=out, flags={"out": "-o"},
                           hint=f"drop {{format}} and the suffix picks {implied}; for {{format={given}}}, {instead}")
    return given


def modelfile_for(gguf: str | Path) -> Path:
    """The Ollama Modelfile written beside a GGUF: ``<stem>.Modelfile``, so two GGUFs in one folder
    each keep their own (``ollama create NAME -f model.Modelfile``)."""
    gguf = Path(gguf)
    return gguf.with_name(gguf.stem + MODELFILE_SUFFIX)


def check_report_file(path: str | Path | None, option: str) -> None:
    """A report a command writes at the end (``--json``, ``--plot``, ``--report``), checked before the
    work: a missing or read-only folder found after minutes of measuring loses the measurement."""
    if path is None:
        return
    from d2merge.io.output import check_output_location

    try:
        check_output_location(Path(path), (), overwrite=True, is_file=True)
    except D2MergeError as exc:
        raise D2MergeError(f"{option}: {exc.reason}", path=exc.path, hint=exc.hint) from None
