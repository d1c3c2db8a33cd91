"""The floating dtypes users name (fp32, bf16, fp16): one table for every module.

A name on the command line (``--dtype bf16``, ``--dtypes fp32,bfloat16``), the
``dtype`` written into ``config.json``, and what one ulp means in verify's
report all come from the same row, so they cannot drift apart. The table names
torch's dtypes without importing torch: the command line's help and option
checks stay fast (``d2merge --help`` never loads torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FloatDtype:
    name: str  # what users type: fp32, bf16, fp16
    config_name: str  # config.json's ``dtype`` value, and torch's attribute name
    mantissa_bits: int  # explicit bits: one ulp at 1.0 is 2**-mantissa_bits
    min_normal_exponent: int  # below 2**this, values are subnormal and the ulp stops shrinking

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.config_name)


FLOAT_DTYPES: dict[str, FloatDtype] = {d.name: d for d in (
    FloatDtype("fp32", "float32", 23, -126),
    FloatDtype("bf16", "bfloat16", 7, -126),
    FloatDtype("fp16", "float16", 10, -14),
)}
# Spellings accepted for the names above (torch's and config.json's among them).
ALIASES: dict[str, str] = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def canonical_name(name: str) -> str:
    """``bfloat16`` -> ``bf16``; an unknown name comes back lower-cased, for the caller to refuse."""
    key = str(name).strip().lower()
    return ALIASES.get(key, key)


def by_torch(dtype: torch.dtype) -> FloatDtype:
    """The row of a torch dtype (KeyError for a dtype outside the table)."""
    for row in FLOAT_DTYPES.values():
        if row.torch_dtype == dtype:
            return row
    raise KeyError(dtype)
