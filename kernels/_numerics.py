"""Numerical helpers shared by the reference implementations."""

from __future__ import annotations

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: fp16/bf16 -> fp32, fp32 and fp64 unchanged. References compute in this
    dtype, so the same code is the fp32 CPU path and the fp64 test oracle."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
