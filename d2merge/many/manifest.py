"""The merge-many manifest: which adapters to merge into one base, under which names, with which options.

A manifest is JSON or YAML. The common case is a plain list of adapter folders;
each output is then named after its folder. A mapping with ``jobs`` (and
optional ``defaults``) sets per-job options. Every field is checked: an
unknown one is refused, naming the job, never ignored.

    # jobs.yaml
    defaults: {dtype: bf16}
    jobs:
      - ./adapters/customer-a                 # output OUTDIR/customer-a
      - adapter: ./adapters/customer-b
        name: customer-b-fp16
        dtype: fp16
        verify: {max_abs_diff: 0.05}          # verify with these thresholds
      - {adapter: ./adapters/customer-c, format: safetensors}

Relative adapter paths are relative to the manifest's folder, so a manifest
and its adapters move together.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from d2merge.errors import D2MergeError
from d2merge.io.checkpoint import read_text
from d2merge.export.registry import get_format
from d2merge.options.many import MANY_FORMATS
from d2merge.options.merge import TIED_POLICIES
from d2merge.planning import parse_dtype
from d2merge.sizes import parse_size

JOB_FIELDS = ("adapter", "name", "format", "dtype", "max_shard_size", "tied_embeddings", "verify")
DEFAULT_FIELDS = tuple(f for f in JOB_FIELDS if f not in ("adapter", "name"))
THRESHOLD_FIELDS = ("max_abs_diff", "max_gap_pp", "min_top1", "max_ulp")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


@dataclass(frozen=True)
class Job:
    """One merge of the many: an adapter, the output name under OUTDIR, and its options."""

    name: str
    adapter: Path
    format: str = "hf"
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    tied_embeddings: str = "untie"
    verify: bool = False
    # verify thresholds that override the per-dtype defaults, as (name, value) pairs
    thresholds: tuple[tuple[str, float], ...] = field(default=())

    def output(self, outdir: Path) -> Path:
        return Path(outdir) / get_format(self.format).output_name(self.name)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": str(self.adapter), "format": self.format, "dtype": self.dtype,
                "max_shard_size": self.max_shard_size, "tied_embeddings": self.tied_embeddings,
                "verify": self.verify, "thresholds": dict(self.thresholds)}


def load_manifest(path: str | Path, defaults: Mapping[str, Any] | None = None) -> list[Job]:
    """The jobs of a JSON or YAML manifest; ``defaults`` (the command line's options) apply under the file's."""
    path = Path(path)
    text = read_text(path, "manifest")
    data = _parse(path, text)
    return jobs_from(data, base_folder=path.absolute().parent, defaults=defaults, source=path)


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() == ".json":
        return _parse_json(path, text)
    if path.suffix.lower() not in (".yaml", ".yml"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # not JSON: YAML is a superset, try it
    try:
        import yaml
    except ImportError:
        raise D2MergeError("reading a YAML manifest needs pyyaml, which is not installed", path=path,
                           hint="pip install pyyaml, or write the manifest as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise D2MergeError(f"manifest is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}", path=path,
                           hint="fix the file; a plain list of adapter folders is enough") from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise D2MergeError(f"manifest is not valid JSON (line {exc.lineno}: {exc.msg})", path=path,
                           hint="fix the file; a plain list of adapter folders is enough") from None


def jobs_from(data: Any, *, base_folder: Path, defaults: Mapping[str, Any] | None = None,
              source: Path | str = "manifest") -> list[Job]:
    """Jobs from parsed manifest data (a list, or a mapping with ``jobs`` and ``defaults``)."""
    file_defaults: Mapping[str, Any] = {}
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"jobs", "defaults"})
        if unknown:
            raise D2MergeError(f"unknown top-level manifest field '{unknown[0]}'", path=source,
                               hint="a manifest is a list of adapters, or a mapping with 'jobs' and 'defaults'")
        file_defaults = data.get("defaults") or {}
        if not isinstance(file_defaults, dict):
            raise D2MergeError("manifest 'defaults' must be a mapping", path=source)
        bad = sorted(set(file_defaults) - set(DEFAULT_FIELDS))
        if bad:
            raise D2MergeError(f"unknown field '{bad[0]}' in manifest defaults", path=source,
                               hint=f"defaults may set {', '.join(DEFAULT_FIELDS)}")
        data = data.get("jobs")
    if not isinstance(data, list) or not data:
        raise D2MergeError("manifest lists no jobs", path=source,
                           hint="write a list of adapter folders, or a mapping with a 'jobs' list")
    merged_defaults = {**{k: v for k, v in (defaults or {}).items() if v is not None}, **file_defaults}
    jobs: list[Job] = []
    for number, entry in enumerate(data, start=1):
        jobs.append(_job(entry, number, base_folder, merged_defaults, source))
    seen: dict[str, int] = {}
    for number, job in enumerate(jobs, start=1):
        key = job.output(Path(".")).name.lower()  # case-insensitive filesystems would clash too
        if key in seen:
            raise D2MergeError(f"jobs {seen[key]} and {number} both write '{job.output(Path('.')).name}'",
                               path=source, hint="give one of them a 'name'")
        seen[key] = number
    return jobs


def _job(entry: Any, number: int, base_folder: Path, defaults: Mapping[str, Any], source: Path | str) -> Job:
    where = f"manifest job {number}"
    if isinstance(entry, str):
        entry = {"adapter": entry}
    if not isinstance(entry, dict):
        raise D2MergeError(f"{where} is a {type(entry).__name__}; expected an adapter folder or a mapping",
                           path=source)
    label = entry.get("name") or (Path(entry["adapter"]).name if isinstance(entry.get("adapter"), str) else None)
    if isinstance(label, str) and label:
        where = f"{where} ({label})"
    unknown = sorted(set(entry) - set(JOB_FIELDS))
    if unknown:
        raise D2MergeError(f"{where}: unknown field '{unknown[0]}'", path=source,
                           hint=f"a job may set {', '.join(JOB_FIELDS)}")
    adapter_text = entry.get("adapter")
    if not isinstance(adapter_text, str) or not adapter_text.strip():
        raise D2MergeError(f"{where} has no 'adapter' folder", path=source)
    adapter = Path(adapter_text).expanduser()
    if not adapter.is_absolute():
        adapter = base_folder / adapter
    name = entry.get("name", adapter.name if adapter.name not in ("", ".", "..") else adapter.resolve().name)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(".safetensors"):
        raise D2MergeError(f"{where}: output name {name!r} is not a plain file name", path=source,
                           hint="use letters, digits and . _ + - (no folders, not hidden); "
                                "format safetensors adds the .safetensors suffix itself")
    where = f"manifest job {number} ({name})"
    options = {**defaults, **{k: v for k, v in entry.items() if k not in ("adapter", "name")}}
    output_format = options.get("format", "hf")
    if output_format not in MANY_FORMATS:
        raise D2MergeError(f"{where}: format {output_format!r} is not written by merge-many", path=source,
                           hint=f"choose {' or '.join(MANY_FORMATS)}; export the merged folder afterwards with "
                                "`d2merge export-onnx` or `d2merge export-gguf`")
    try:
        dtype = parse_dtype(str(options.get("dtype", "auto")))
        shard = str(options.get("max_shard_size", "5GB"))
        parse_size(shard)
    except D2MergeError as exc:
        raise D2MergeError(f"{where}: {exc.reason}", path=source, hint=exc.hint) from None
    tied = options.get("tied_embeddings", "untie")
    if tied not in TIED_POLICIES:
        raise D2MergeError(f"{where}: unknown tied_embeddings {tied!r}", path=source,
                           hint=f"choose one of {', '.join(TIED_POLICIES)}")
    verify, thresholds = _verify_field(options.get("verify", False), where, source)
    if verify and output_format != "hf":
        raise D2MergeError(f"{where}: verify works on a Hugging Face folder, not format {output_format}",
                           path=source, hint="use format hf for a verified job")
    return Job(name=name, adapter=adapter, format=output_format, dtype=dtype, max_shard_size=shard,
               tied_embeddings=tied, verify=verify, thresholds=thresholds)


def _verify_field(value: Any, where: str, source: Path | str) -> tuple[bool, tuple[tuple[str, float], ...]]:
    """``verify: true`` (default thresholds) or a mapping of thresholds (which implies verify)."""
    if isinstance(value, bool):
        return value, ()
    if isinstance(value, dict):
        bad = sorted(set(value) - set(THRESHOLD_FIELDS))
        if bad:
            raise D2MergeError(f"{where}: unknown verify threshold '{bad[0]}'", path=source,
                               hint=f"thresholds are {', '.join(THRESHOLD_FIELDS)}")
        pairs = []
        for key in THRESHOLD_FIELDS:
            if key in value:
                number = value[key]
                if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
                    raise D2MergeError(f"{where}: verify threshold {key} must be a number >= 0, got {number!r}",
                                       path=source)
                if key == "min_top1" and number > 1:
                    raise D2MergeError(f"{where}: verify threshold min_top1 is a fraction (0-1), got {number!r}",
                                       path=source)
                pairs.append((key, float(number)))
        return True, tuple(pairs)
    raise D2MergeError(f"{where}: verify must be true, false or a mapping of thresholds, got {value!r}", path=source)
