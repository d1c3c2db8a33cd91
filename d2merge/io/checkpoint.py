"""Base checkpoints: a Hugging Face folder (sharded or not), one safetensors file, or a cached Hub repo.

Every source offers the same verbs: ``keys()``, ``info(name)`` (dtype, shape)
and ``read(name)`` (one tensor). Pickle files are refused unless the caller
opts in, and even then are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from d2merge.errors import D2MergeError, option_error
from d2merge.io.json_file import JSON_HINT, MAX_JSON_BYTES, read_json, read_text  # noqa: F401 (re-exported)
from d2merge.io.quantized import DequantizedTensors, Quantization, open_quantized, quantization_config, \
    without_quantization
from d2merge.io.safetensors_file import SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_HINT = ("pickle can run code when loaded; convert the file to safetensors, "  # an OptionError's hint
               "or pass {allow_pickle=} if you trust its origin")
_NOT_FOUND_HINT = "check the path; a Hub repo id (owner/name) must already be in the local Hugging Face cache"


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]: ...
    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor: ...
    def file_of(self, name: str) -> Path: ...


class SafetensorsFiles:
    """One or more safetensors files seen as one set of tensors (names must be unique)."""

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None = None, index_path: Path | None = None):
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for sf in self.files:
            for name in sf.keys():
                if name in self._where:
                    raise D2MergeError(f"tensor appears in two files ({self._where[name].path.name} and {sf.path.name})",
                                       path=sf.path, tensor=name,
                                       hint="the shards overlap; download or save the model again")
                self._where[name] = sf
        if weight_map is not None:
            for name, shard in weight_map.items():
                actual = self._where.get(name)
                if actual is None or actual.path.name != shard:
                    raise D2MergeError(f"the index says this tensor is in {shard} but it is not there",
                                       path=index_path, tensor=name, hint="the index and shards do not match")

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._where[name].tensors[name]
        return t.dtype, t.shape

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._where[name].read(name, buffer)

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute offset, byte count) of a tensor's raw data, for copies without decoding."""
        info = self._where[name].tensors[name]
        return self._where[name].path, info.start, info.nbytes


class PickleFiles:
    """Pickled state dicts, loaded only on explicit opt-in and always with ``weights_only=True``."""

    def __init__(self, files: list[Path]):
        self._tensors: dict[str, torch.Tensor] = {}
        self._file: dict[str, Path] = {}
        for path in files:
            for name, tensor in load_pickle_state_dict(path).items():
                self._tensors[name] = tensor
                self._file[name] = path

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._tensors[name]
        return t.dtype, tuple(t.shape)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[name]  # already in memory: a buffer would only add a copy

    def file_of(self, name: str) -> Path:
        return self._file[name]


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a payload that would run code is refused, not executed."""
    import warnings

    try:
        # torch warns (two lines on stderr) about legacy pickle layouts; d2merge reports in one line
        # or not at all, and weights_only=True already refuses anything that is not plain tensors.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise D2MergeError("file not found", path=path) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as exc:
        raise D2MergeError(f"refused to load pickle: {_pickle_failure(exc)}", path=path,
                           hint="d2merge loads only plain tensors from pickle files, never code; "
                                "get or make a safetensors copy from a source you trust") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise D2MergeError("pickle file does not hold a flat dict of tensors", path=path,
                           hint="expected a state dict saved with torch.save(model.state_dict()); "
                                "convert the weights to safetensors")
    return data


def _pickle_failure(exc: BaseException) -> str:
    """What was wrong, without torch's boilerplate, which suggests loading with weights_only=False."""
    paragraphs = [p for p in str(exc).split("\n\n") if p.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation")
    specific = [p for p in paragraphs if not p.lstrip().startswith(boilerplate)]
    return " ".join(" ".join(specific or paragraphs[:1]).split())[:200]


@dataclass(frozen=True)
class BaseCheckpoint:
    """A base model's tensors plus the folder files (config, tokenizer) that travel with them."""

    location: Path  # the folder, or the single file
    folder: Path | None  # None for a bare safetensors file
    tensors: TensorSource
    config: dict[str, Any] | None  # a quantized base's without its quantization_config
    weight_files: tuple[Path, ...]
    quantization: Quantization | None = None  # what a quantized base was; its tensors come dequantized

    @property
    def index_path(self) -> Path | None:
        if self.folder is not None and (self.folder / SAFETENSORS_INDEX).exists():
            return self.folder / SAFETENSORS_INDEX
        return None


def resolve_location(spec: str | Path) -> Path:
    """A local path as given, or a Hub repo id resolved through the local cache only (no download)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            raise D2MergeError("path not found", path=spec, hint=_NOT_FOUND_HINT) from None
        try:
            return Path(snapshot_download(text, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
            raise D2MergeError("not a local path, and not in the Hugging Face cache", path=spec,
                               hint=f"download it first with `hf download {text}`, or pass a local folder") from None
    raise D2MergeError("path not found", path=spec, hint=_NOT_FOUND_HINT)


# Tensors that only quantized checkpoints hold: bitsandbytes (SCB, absmax, quant_map, quant_state),
# FP8 block scales (weight_scale_inv), compressed-tensors (weight_scale, input_scale), GPTQ/AWQ.
QUANTIZATION_TENSORS = ("SCB", "weight_scale_inv", "weight_scale", "input_scale", "absmax", "nested_absmax",
                        "quant_map", "nested_quant_map", "qweight", "qzeros", "g_idx", "weight_packed")
QUANTIZED_HINT = ("merge into the original 16-bit (bf16/fp16/fp32) base model, then quantize the merged model; "
                  "a bitsandbytes or FP8 base saved by transformers (with its quantization_config) is read as is")


def dequantized(base: BaseCheckpoint) -> BaseCheckpoint:
    """A base whose config.json has a quantization_config, seen as the plain model it stands for.

    Its tensors come dequantized under their plain names (io/quantized.py), its config without
    the quantization_config; methods we cannot dequantize exactly are refused in one line.
    """
    config_path = base.location / "config.json" if base.folder else base.location
    if not isinstance(base.tensors, SafetensorsFiles):
        raise D2MergeError("a quantized base must be stored as safetensors", path=base.tensors.file_of(
            base.tensors.keys()[0]) if base.tensors.keys() else config_path, hint=QUANTIZED_HINT)
    quantization = open_quantized(base.tensors, base.config or {}, config_path)
    config = without_quantization(base.config or {})
    _check_quantized_shapes(base.tensors, quantization, config)
    return replace(base, tensors=DequantizedTensors(base.tensors, quantization),
                   config=config, quantization=quantization)


def _check_quantized_shapes(stored: SafetensorsFiles, quantization: Quantization, config: dict[str, Any]) -> None:
    """A quant state's shape is only a claim: it must be the shape the model's config gives the weight.

    The packed codes of a [16, 16] weight fit a state that says [8, 32] just as well; written out,
    that weight would make a model that does not load (or, square for square, a wrong one).
    """
    from d2merge.io.quantized import llama_like_shapes

    params = llama_like_shapes(config, list(quantization.weights))
    if params is None:  # not the Llama layout: ask transformers (an import and ~130 MB, once)
        from d2merge.io.model_structure import meta_model

        model = meta_model(config)
        if model is None:
            return
        params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    for name, weight in quantization.weights.items():
        param = params.get(name)
        if param is not None and tuple(param) != weight.shape:
            state = weight.parts.get("state", weight.parts["packed"])
            raise D2MergeError(f"quantization state says shape {list(weight.shape)}; config.json's model has "
                               f"{list(param)} for '{name}'", path=stored.file_of(state), tensor=state,
                               hint="the quantization state does not describe this weight; re-save or "
                                    "re-download the quantized base")


def refuse_quantized(base: BaseCheckpoint) -> None:
    """Refuse quantized tensors in a base whose config.json does not say how they were quantized.

    A quantized weight is codes plus scales; the merge formula needs the real weight, and writing
    the codes back as if they were weights (448 where 0.07 was meant) would be a silent error.
    Without a quantization_config nothing says which runtime made them, so nothing is guessed.
    """
    for name in base.tensors.keys():
        dtype = base.tensors.info(name)[0]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in QUANTIZATION_TENSORS or name.endswith(".weight.absmax") or ".quant_state." in name:
            raise D2MergeError("the base is quantized (it holds quantization scales)", path=base.tensors.file_of(name),
                               tensor=name, hint=QUANTIZED_HINT)
        if dtype.is_floating_point and dtype.itemsize == 1:
            raise D2MergeError(f"the base is quantized ({str(dtype).replace('torch.', '')} weights)",
                               path=base.tensors.file_of(name), tensor=name, hint=QUANTIZED_HINT)
        if leaf == "weight" and not dtype.is_floating_point and not dtype.is_complex:
            raise D2MergeError(f"the base is quantized ({str(dtype).replace('torch.', '')} weights)",
                               path=base.tensors.file_of(name), tensor=name, hint=QUANTIZED_HINT)


def open_base(spec: str | Path, *, allow_pickle: bool = False) -> BaseCheckpoint:
    """Open a base model; reads headers and config only (and a quantized base's tiny quant-state blobs)."""
    base = _open_base(spec, allow_pickle=allow_pickle)
    if quantization_config(base.config) is not None:
        return dequantized(base)
    refuse_quantized(base)
    return base


def _open_base(spec: str | Path, *, allow_pickle: bool = False) -> BaseCheckpoint:
    location = resolve_location(spec)
    if location.is_file():
        if location.suffix == ".safetensors":
            return BaseCheckpoint(location, None, SafetensorsFiles([location]), None, (location,))
        if location.suffix in (".bin", ".pt", ".pth"):
            if not allow_pickle:
                raise option_error("base weights are a pickle file", path=location, hint=PICKLE_HINT,
                                   allow_pickle=True)
            return BaseCheckpoint(location, None, PickleFiles([location]), None, (location,))
        raise D2MergeError("not a model: expected a folder or a .safetensors file", path=location,
                           hint="pass the model's folder or its .safetensors file")
    folder = location
    config_path = folder / "config.json"
    config = read_json(config_path, "config.json") if config_path.exists() else None
    if config is not None and not isinstance(config, dict):
        raise D2MergeError("config.json is not a JSON object", path=config_path, hint=JSON_HINT)
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        files, weight_map = _index_shards(index)
        return BaseCheckpoint(folder, folder, SafetensorsFiles(files, weight_map, index), config, tuple(files))
    single = folder / "model.safetensors"
    if single.exists():
        return BaseCheckpoint(folder, folder, SafetensorsFiles([single]), config, (single,))
    others = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if others:
        return BaseCheckpoint(folder, folder, SafetensorsFiles(others), config, tuple(others))
    pickles = ([folder / "pytorch_model.bin"] if (folder / "pytorch_model.bin").exists() else [])
    if (folder / PICKLE_INDEX).exists():
        pickles, _ = _index_shards(folder / PICKLE_INDEX)
    if pickles:
        if not allow_pickle:
            raise option_error("base weights are pickle files (pytorch_model.bin)", path=pickles[0],
                               hint=PICKLE_HINT, allow_pickle=True)
        return BaseCheckpoint(folder, folder, PickleFiles(pickles), config, tuple(pickles))
    if (folder / "adapter_config.json").exists():
        raise D2MergeError("this folder is an adapter, not a base model", path=folder,
                           hint="pass the base model first and the adapter second")
    raise D2MergeError("no model weights found (expected model.safetensors or model.safetensors.index.json)",
                       path=folder, hint="pass the folder that holds the model's weights")


def _index_shards(index: Path) -> tuple[list[Path], dict[str, str]]:
    data = read_json(index, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise D2MergeError("index has no valid 'weight_map'", path=index, hint=JSON_HINT)
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = index.parent / shard
        if Path(shard).name != shard:
            raise D2MergeError(f"index names a shard outside the folder: {shard!r}", path=index,
                               hint="an index may only name files next to it; fix the index or download it again")
        if not shard_path.exists():
            raise D2MergeError(f"index references missing shard {shard}", path=index,
                               hint="the download or copy is incomplete")
        files.append(shard_path)
    return files, weight_map
