"""Many adapters over one base: one pass over the base writes every merge (``d2merge merge-many``)."""

from d2merge.many.manifest import Job, load_manifest
from d2merge.many.run import JobOutcome, ManyOptions, ManyReport, merge_many

__all__ = ["Job", "JobOutcome", "ManyOptions", "ManyReport", "load_manifest", "merge_many"]
