"""The floating dtypes users name (fp32, bf16, fp16): one table for every module.

A name on the command line (``--dtype bf16``, ``--dtypes fp32,bfloat16``), the
``dtype`` written into ``config.json``, and what one ulp means in verify's
report all come from the same row, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatDtype:
    name: str  # what users type: fp32, bf16, fp16
    torch_dtype: torch.dtype
    config_name: str  # config.json's ``dtype`` value
    mantissa_bits: int  # explicit bits: one ulp at 1.0 is 2**-mantissa_bits
    min_normal_exponent: int  # below 2**this, values are subnormal and the ulp stops shrinking


FLOAT_DTYPES: dict[str, FloatDtype] = {d.name: d for d in (
    FloatDtype("fp32", torch.float32, "float32", 23, -126),
    FloatDtype("bf16", torch.bfloat16, "bfloat16", 7, -126),
    FloatDtype("fp16", torch.float16, "float16", 10, -14),
)}
BY_TORCH: dict[torch.dtype, FloatDtype] = {d.torch_dtype: d for d in FLOAT_DTYPES.values()}
# Spellings accepted for the names above (torch's and config.json's among them).
ALIASES: dict[str, str] = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def canonical_name(name: str) -> str:
    """``bfloat16`` -> ``bf16``; an unknown name comes back lower-cased, for the caller to refuse."""
    key = str(name).strip().lower()
    return ALIASES.get(key, key)
