"""d2merge: merge low-rank adapters into base weights exactly, verify, export, publish."""

from __future__ import annotations

__version__ = "0.1.0"
