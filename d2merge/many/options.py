"""The options of a merge-many run: one frozen model, the source of the CLI's flags, defaults and help.

Free of torch and of the engine (plain names, not dtype objects), so the
command line can build its flags without importing the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from d2merge.errors import D2MergeError
from d2merge.sizes import parse_size

# The names `d2merge merge` takes (d2merge.plan checks them against its own tables).
OUT_DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")
TIED_POLICY_NAMES = ("untie", "tie", "error")
# Formats one pass over the base can write; the exporters that convert a merged folder
# (onnx, onnx-genai, gguf) run per merged output with `d2merge export-*`.
MANY_FORMATS = ("hf", "safetensors")
PARALLEL_KINDS = ("thread", "process")


@dataclass(frozen=True)
class ManyOptions:
    """Settings of a merge-many run; the CLI's flags and help come from these fields.

    ``dtype``, ``format``, ``max_shard_size``, ``tied_embeddings`` and ``verify`` are
    defaults for every job; the manifest's ``defaults`` and each job override them.
    """

    dtype: str = field(default="auto", metadata={
        "help": "Default output dtype of the jobs (a job's own 'dtype' wins).", "choices": OUT_DTYPE_NAMES})
    format: str = field(default="hf", metadata={
        "help": "Default output format of the jobs: hf folder or one .safetensors file.", "choices": MANY_FORMATS})
    max_shard_size: str = field(default="5GB", metadata={"help": "Default largest output shard, e.g. 5GB, 2GiB."})
    tied_embeddings: str = field(default="untie", metadata={
        "help": "Default policy when an adapter changes a tied embedding/lm_head (see `d2merge merge`).",
        "choices": TIED_POLICY_NAMES})
    verify: bool = field(default=False, metadata={
        "help": "Verify every job after merging (default thresholds unless the job sets its own); exit 1 on drift."})
    keep_going: bool = field(default=False, metadata={
        "help": "Run the jobs that can run when others cannot be planned (the bad ones are still reported, exit 2)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output whose provenance does not match (only once the new one is complete). "
                "Complete outputs with matching provenance are always skipped."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Allow .bin (pickle) weights; loaded with weights_only=True. Only for files you trust."})
    workers: int = field(default=1, metadata={
        "help": "Jobs computed in parallel on this machine (see --parallel)."})
    parallel: str = field(default="thread", metadata={
        "help": "thread: one pass over the base, jobs of each tensor computed on WORKERS threads; process: the jobs "
                "split into WORKERS processes, each with its own pass (reads the base WORKERS times).",
        "choices": PARALLEL_KINDS})
    max_jobs_per_pass: int = field(default=32, metadata={
        "help": "Most jobs sharing one pass over the base (each holds open files); more jobs run in further passes."})
    max_inflight: str = field(default="256MB", metadata={
        "help": "Cap on the memory a pass holds for tensors read and computed but not yet written, e.g. 512MB, "
                "2GiB (one step may exceed it when a single tensor is larger)."})
    device: str = field(default="cpu", metadata={
        "help": "Where the fp32 math runs (cpu or cuda).", "choices": ("cpu", "cuda")})
    html: str | None = field(default=None, metadata={
        "help": "Also write the run as one self-contained HTML page there; each verified job's verify page "
                "goes beside it, in <page name>-verify/<job>.html, linked from its row."})

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise D2MergeError(f"invalid {f.name} {getattr(self, f.name)!r}; choose one of {', '.join(choices)}")
        for name in ("workers", "max_jobs_per_pass"):
            if getattr(self, name) < 1:
                raise D2MergeError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        parse_size(self.max_inflight)

    def job_defaults(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "format": self.format, "max_shard_size": self.max_shard_size,
                "tied_embeddings": self.tied_embeddings, "verify": self.verify or None}


def job_page_path(html: str | Path, job_name: str) -> Path:
    """Where the verify page of ``job_name`` goes: ``<page stem>-verify/<job>.html`` beside the run's page.

    The ``html`` option's rule lives here, beside the option, so that the run (which writes the job
    pages) and the run's page (which links to them) share it without importing each other.
    """
    html = Path(html).expanduser().absolute()
    return html.with_name(f"{html.stem}-verify") / f"{job_name}.html"
