"""Backward-pass pieces shared by the Triton and CUDA backends: the per-pixel gradient buffers
and the deterministic backward's gather plan.

Output pixel p reads a 2x2 footprint of source pixels whose top-left tap is (y0, x0), with
y0 in [-1, H-1] and x0 in [-1, W-1] whenever any tap lies inside the image. The backward kernel
writes ONE key per pixel, the index of that footprint on the (H+1) x (W+1) grid of possible
top-left corners,

    key[p] = (b * (H + 1) + y0 + 1) * (W + 1) + x0 + 1          (n_keys = B (H+1) (W+1) when
                                                                 no tap is inside / flow NaN)

and its four occlusion-scaled tap weights wt[4p + k]. A stable sort of the N keys groups the
pixels by footprint (equal keys keep increasing p) and a CSR row pointer delimits each group.
Source pixel s = (b, y, x) is tap k = (dy, dx) of exactly the pixels in group (y - dy, x - dx),
so the gather kernels visit, for each s, those four groups in tap order and each group front to
back: a fixed order, bitwise reproducible, with no per-tap entries at all.

Cost: one sort of N int32 keys (the earlier plan sorted 4N) and a binary search over
n_keys + 1 ~ N (1 + 1/H + 1/W) boundaries, independent of the channel count C.
"""

from __future__ import annotations

import torch

# footprint keys are int32 on both compiled backends
MAX_KEYS = 2**31 - 2


def footprint_count(batch: int, height: int, width: int) -> int:
    """Number of possible 2x2 footprints (top-left corners on the (H+1) x (W+1) grid)."""
    return batch * (height + 1) * (width + 1)


def gather_plan(key: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """key [N] int32 -> (order [N] int64: pixels grouped by footprint, increasing within a group;
    row_ptr [n_keys + 1] int64: footprint f owns order[row_ptr[f]:row_ptr[f + 1]])."""
    sorted_keys, order = torch.sort(key, stable=True)
    bounds = torch.arange(n_keys + 1, dtype=key.dtype, device=key.device)
    row_ptr = torch.searchsorted(sorted_keys, bounds)
    return order, row_ptr


def pixel_grad_buffers(h: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (dflow [B, H, W, 2] in flow's dtype, docc [B, H, W, 1] in occlusion's dtype,
    h's when there is no occlusion: the caller then drops it)."""
    batch, height, width, _ = h.shape
    dflow = torch.empty(batch, height, width, 2, dtype=flow.dtype, device=h.device)
    docc_dtype = h.dtype if occ is None else occ.dtype
    docc = torch.empty(batch, height, width, 1, dtype=docc_dtype, device=h.device)
    return dflow, docc
