"""The options of a merge-many run: one frozen model, the source of the CLI's flags, defaults and help.

Free of torch and of the engine (plain names, not dtype objects), so the
command line can build its flags without importing the library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from d2merge.options.base import OptionModel, option, option_like
from d2merge.options.merge import MergeOptions
from d2merge.sizes import parse_size

# Formats one pass over the base can write; the exporters that convert a merged folder
# (onnx, onnx-genai, gguf) run per merged output with `d2merge export-*`.
MANY_FORMATS = ("hf", "safetensors")
PARALLEL_KINDS = ("thread", "process")


@dataclass(frozen=True)
class ManyOptions(OptionModel):
    """Settings of a merge-many run; the CLI's flags and help come from these fields.

    ``dtype``, ``format``, ``max_shard_size``, ``tied_embeddings`` and ``verify`` are
    defaults for every job; the manifest's ``defaults`` and each job override them.
    """

    what: ClassVar[str] = "merge-many option"

    # merge's options (choices, defaults) with the help of a default for every job
    dtype: str = option_like(MergeOptions, "dtype", help="Default output dtype of the jobs (a job's own 'dtype' "
                                                         "wins).")
    format: str = option("hf", choices=MANY_FORMATS,
                         help="Default output format of the jobs: hf folder or one .safetensors file.")
    max_shard_size: str = option_like(MergeOptions, "max_shard_size",
                                      help="Default largest output shard, e.g. 5GB, 2GiB.")
    tied_embeddings: str = option_like(MergeOptions, "tied_embeddings",
                                       help="Default policy when an adapter changes a tied embedding/lm_head (see "
                                            "`d2merge merge`).")
    verify: bool = option(False, help="Verify every job after merging (default thresholds unless the job sets its "
                                      "own); exit 1 on drift.")
    keep_going: bool = option(False, help="Run the jobs that can run when others cannot be planned (the bad ones are "
                                          "still reported, exit 2).")
    overwrite: bool = option(False, help="Replace an existing output whose provenance does not match (only once the new "
                                         "one is complete). Complete outputs with matching provenance are always "
                                         "skipped.")
    allow_pickle: bool = option_like(MergeOptions, "allow_pickle")
    workers: int = option(1, min=1, help="Jobs computed in parallel on this machine (see --parallel).")
    parallel: str = option("thread", choices=PARALLEL_KINDS,
                           help="thread: one pass over the base, jobs of each tensor computed on WORKERS threads; "
                                "process: the jobs split into WORKERS processes, each with its own pass (reads the "
                                "base WORKERS times).")
    max_jobs_per_pass: int = option(32, min=1, help="Most jobs sharing one pass over the base (each holds open files); "
                                                    "more jobs run in further passes.")
    max_inflight: str = option("256MB", help="Cap on the memory a pass holds for tensors read and computed but not yet "
                                             "written, e.g. 512MB, 2GiB (one step may exceed it when a single tensor "
                                             "is larger).")
    device: str = option_like(MergeOptions, "device", help="Where the fp32 math runs (cpu or cuda).")
    html: str | None = option(None, help="Also write the run as one self-contained HTML page there; each verified "
                                         "job's verify page goes beside it, in <page name>-verify/<job>.html, linked "
                                         "from its row.")

    def validate(self) -> None:
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
