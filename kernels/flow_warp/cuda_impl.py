"""torch wrappers around the CUDA C++ warp kernels (csrc/warp_occlusion.cu).

The extension is framework-agnostic: it takes device pointers, element strides, a dtype code and
a stream handle. This module passes ``t.data_ptr()``, the strides and the current torch stream,
allocates the outputs, and builds the deterministic gather plan with torch (kernels.flow_warp.plan),
exactly as the Triton launchers do.
"""

from __future__ import annotations

import torch

from kernels._cuda_types import DTYPE_CODES
from kernels.flow_warp.plan import footprint_count, gather_plan, pixel_grad_buffers
from kernels.registry import cuda_extension


def _ext():
    module, reason = cuda_extension()
    if module is None:
        raise RuntimeError(reason)
    return module


def _pixel_strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _launch_context(t: torch.Tensor) -> tuple[int, int]:
    """(device index, stream handle) of the current torch stream on t's device."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def _common(h: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None) -> dict:
    device, stream = _launch_context(h)
    return dict(
        device=device, stream=stream, shape=tuple(h.shape), dtype=DTYPE_CODES[h.dtype],
        h=h.data_ptr(), h_strides=_pixel_strides(h),
        flow=flow.data_ptr(), flow_strides=tuple(flow.stride()),
        flow_dtype=DTYPE_CODES[flow.dtype],
        occ=0 if occ is None else occ.data_ptr(), occ_strides=_pixel_strides(occ))


def warp_occlusion_fwd(h: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None,
                       residual: bool) -> torch.Tensor:
    """h [B, H, W, C] with channel stride 1; flow, occlusion any strides. Returns out
    contiguous."""
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    _ext().warp_occlusion_fwd(**_common(h, flow, occ), out=out.data_ptr(), residual=residual)
    return out


def warp_occlusion_bwd(dout: torch.Tensor, h: torch.Tensor, flow: torch.Tensor,
                       occ: torch.Tensor | None, residual: bool, deterministic: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as kernels.flow_warp.triton_impl.warp_occlusion_bwd."""
    batch, height, width, channels = h.shape
    n_pix = batch * height * width
    dflow, docc = pixel_grad_buffers(h, flow, occ)
    if h.numel() == 0:
        return (dout.clone() if residual else torch.zeros_like(h)), dflow.zero_(), docc.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    ext = _ext()
    common = _common(h, flow, occ)
    grads = dict(dout=dout.data_ptr(), dout_strides=_pixel_strides(dout),
                 dflow=dflow.data_ptr(), docc=docc.data_ptr())
    if not deterministic:
        base = dout if residual else torch.zeros(h.shape, dtype=h.dtype, device=h.device)
        dh_acc = base.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        ext.warp_occlusion_bwd(**common, **grads, dh_accum=dh_acc.data_ptr(), plan_key=0,
                               plan_wt=0)
        return dh_acc.to(h.dtype), dflow, docc
    key = torch.empty(n_pix, dtype=torch.int32, device=h.device)
    wt = torch.empty(n_pix * 4, dtype=torch.float32, device=h.device)
    ext.warp_occlusion_bwd(**common, **grads, dh_accum=0, plan_key=key.data_ptr(),
                           plan_wt=wt.data_ptr())
    order, row_ptr = gather_plan(key, footprint_count(batch, height, width))
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    ext.warp_occlusion_gather(
        device=common["device"], stream=common["stream"], shape=common["shape"],
        dtype=common["dtype"], dout=dout.data_ptr(), dout_strides=_pixel_strides(dout),
        order=order.data_ptr(), plan_wt=wt.data_ptr(), row_ptr=row_ptr.data_ptr(),
        dh=dh.data_ptr(), residual=residual)
    return dh, dflow, docc
