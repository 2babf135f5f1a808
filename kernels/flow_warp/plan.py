"""Backward-pass pieces shared by the Triton and CUDA backends: the per-pixel gradient buffers
and the deterministic backward's gather plan.

The backward kernel writes, for each output pixel p and bilinear tap k, the flat index of the
source pixel that tap reads (``tgt[4p + k]``, or N when the tap is outside the image or the flow is
non-finite) and its weight ``occ[p] * w_k(p)``. Inverting that scatter into a gather needs, for each
source pixel s, the list of entries e = 4p + k with tgt[e] == s, in an order that never changes:
a stable sort by target gives exactly that (equal targets keep increasing e), a CSR row pointer
delimits each source pixel's list, and the gather kernels sum each list front to back.

Cost: one radix sort of 4N int32 keys and one binary search over N + 1 boundaries, where N is the
pixel count (B*H*W), independent of the channel count C: for C >= 64 that is a few percent of the
dh traffic.
"""

from __future__ import annotations

import torch


def gather_plan(tgt: torch.Tensor, n_pix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tgt [4N] int32 -> (order [4N] int64: entries grouped by target, increasing within a
    group; row_ptr [N + 1] int64: source pixel s owns order[row_ptr[s]:row_ptr[s + 1]])."""
    keys, order = torch.sort(tgt, stable=True)
    bounds = torch.arange(n_pix + 1, dtype=tgt.dtype, device=tgt.device)
    row_ptr = torch.searchsorted(keys, bounds)
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
