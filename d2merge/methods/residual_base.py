"""PiSSA and OLoRA adapters saved without conversion: the residual base PEFT rebuilds on load.

An adapter whose ``adapter_config.json`` says ``init_lora_weights: "pissa"`` or
``"olora"`` was trained on a *residual* base, not on W0: when PEFT loads it, it
takes the top-r part of W0 out of the base layer (from an SVD for PiSSA, from a QR
for OLoRA), then loads the trained factors on top. Merging into W0 itself would add
that part twice (errors of 2.4x the tensor's largest element were measured). Both
decompositions are deterministic, so d2merge rebuilds the same residual here, from
W0 and the module's rank and scale, and every formula then applies to it:

    PiSSA:  W0 = V S U^T;  W_res = W0 - V_r S_r U_r^T          (the top-r singular part)
    OLoRA:  W0 = Q R;      W_res = W0 - s * Q_r R_r             (the first r columns of Q)

The residual is computed in fp32 as PEFT computes it, also when the caller works in
fp64 (verify's reference): PEFT's fp32 SVD/QR defines the base the adapter was trained
on, and an fp64 decomposition differs from it by more than the merge's own rounding.
It is not rounded to the base's storage dtype before the merge: d2merge rounds once,
at the end. A model trained in bf16 held a residual rounded to bf16, which differs
by at most half a bf16 ulp of W_res, below the final bf16 rounding.

``pissa_niter_<n>`` uses a randomised SVD (torch.svd_lowrank with a fresh random
sketch): its residual cannot be rebuilt, so it is refused in methods/fields.py.
"""

from __future__ import annotations

import torch

PISSA = "pissa"
OLORA = "olora"
INITS = (PISSA, OLORA)


def residual_base(w0: torch.Tensor, init: str, r: int, scale: float) -> torch.Tensor:
    """W0 (out, in) minus the part PEFT's ``init`` moved into the factors at load time."""
    work = w0.to(torch.float32)
    if init == PISSA:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        # PEFT splits S_r / scale evenly between B and A and multiplies by scale again: the
        # scale cancels and the top-r singular part is what leaves the base.
        root = torch.sqrt(s[:r] / scale)
        low_b, low_a = u[:, :r] * root, root[:, None] * vh[:r]
    elif init == OLORA:
        q, upper = torch.linalg.qr(work)
        low_b, low_a = q[:, :r], upper[:r]
    else:
        raise ValueError(f"unknown residual init {init!r}")
    return (work - scale * (low_b @ low_a)).to(w0.dtype)
