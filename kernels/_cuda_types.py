"""Codes shared between Python wrappers and the CUDA extension (csrc/common.h, avatar::DType)."""

from __future__ import annotations

import torch

# Must match avatar::DType in csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
