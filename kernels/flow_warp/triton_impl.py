"""Triton kernels for flow warping with occlusion (forward, backward, deterministic gather).

Layout: h, out, dout, dh are contiguous channels-last rows [N, C] with N = B*H*W and pixel
p = (b*H + y)*W + x. flow [B, H, W, 2] and occlusion [B, H, W, 1] are read through their strides.
Every program owns a tile of BLOCK_P pixels x BLOCK_C channels; the four bilinear taps of a pixel
are whole channel rows of h, so each tap is a contiguous (coalesced) load of BLOCK_C values.

Forward: grid (pixel tiles, channel tiles). Reads h at the pixel (residual) and at its 4 taps
(neighbouring pixels: L2 hits for smooth flows), flow and occlusion once, writes out once.

Backward, per pixel tile and looping over all channel tiles (constexpr trip count) so that the
per-pixel reductions over C stay in registers:
    docc  = sum_c dout * S
    dflow = sum_c occ * dout * dS/d(sx, sy)
    dh[tap] += occ * w_tap * dout       for the 4 taps (a scatter)
The scatter is done one of two ways (flags of the same kernel):
    ATOMIC_DH:  relaxed fp32 atomics into an fp32 buffer (default; fast, order not
                reproducible);
    WRITE_PLAN: write each pixel's footprint key and its 4 tap weights instead; the caller sorts
                the N keys stably (plan.py) and _warp_occlusion_gather_kernel sums, for each
                source pixel, the contributions of its 4 footprint groups in that fixed order:
                bitwise reproducible, no float atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.flow_warp.plan import footprint_count, gather_plan, pixel_grad_buffers
from kernels.registry import interpreter_enabled

TILE = 2048  # elements per program tile (pixels x channels)
PROGRAM_TARGET = 1024
INTERPRETER_PROGRAM_TARGET = 8


def _block_c(channels: int, cap: int) -> int:
    return max(4, min(triton.next_power_of_2(channels), cap))


@triton.jit
def _bilinear_taps(flow_ptr, pix, pmask, height, width,
                   stride_f_b, stride_f_y, stride_f_x, stride_f_c):
    """Per pixel: valid (finite flow), fractions fx, fy, the flat target row of tap 00, the
    in-image mask of each tap (all False for invalid or masked-off pixels) and the footprint key
    of the deterministic plan (see plan.py)."""
    hw = height * width
    b = pix // hw
    rem = pix - b * hw
    y = rem // width
    x = rem - y * width
    f_off = (b.to(tl.int64) * stride_f_b + y.to(tl.int64) * stride_f_y
             + x.to(tl.int64) * stride_f_x)
    dx = tl.load(flow_ptr + f_off, mask=pmask, other=0.0).to(tl.float32)
    dy = tl.load(flow_ptr + f_off + stride_f_c, mask=pmask, other=0.0).to(tl.float32)
    sx = x.to(tl.float32) + dx
    sy = y.to(tl.float32) + dy
    valid = pmask & (tl.abs(sx) < float("inf")) & (tl.abs(sy) < float("inf"))
    # Far-away coordinates are clamped to just outside the image: every tap stays outside, so
    # nothing changes, and the int32 conversion below cannot overflow.
    sx = tl.minimum(tl.maximum(tl.where(valid, sx, 0.0), -2.0), width + 1.0)
    sy = tl.minimum(tl.maximum(tl.where(valid, sy, 0.0), -2.0), height + 1.0)
    x0f = tl.floor(sx)
    y0f = tl.floor(sy)
    fx = sx - x0f
    fy = sy - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    in_x0 = (x0 >= 0) & (x0 < width)
    in_x1 = (x0 + 1 >= 0) & (x0 + 1 < width)
    in_y0 = valid & (y0 >= 0) & (y0 < height)
    in_y1 = valid & (y0 + 1 >= 0) & (y0 + 1 < height)
    t00 = (b * height + y0) * width + x0
    # footprint key of the deterministic plan (plan.py); meaningful when any tap is inside
    corner = (b * (height + 1) + y0 + 1) * (width + 1) + x0 + 1
    return (valid, fx, fy, t00, in_y0 & in_x0, in_y0 & in_x1, in_y1 & in_x0, in_y1 & in_x1,
            corner)


@triton.jit
def _load_occlusion(occ_ptr, pix, pmask, height, width, stride_o_b, stride_o_y, stride_o_x,
                    HAS_OCC: tl.constexpr):
    if HAS_OCC:
        hw = height * width
        b = pix // hw
        rem = pix - b * hw
        y = rem // width
        x = rem - y * width
        o_off = (b.to(tl.int64) * stride_o_b + y.to(tl.int64) * stride_o_y
                 + x.to(tl.int64) * stride_o_x)
        occ = tl.load(occ_ptr + o_off, mask=pmask, other=0.0).to(tl.float32)
    else:
        occ = tl.where(pmask, 1.0, 0.0)
    return occ


@triton.jit
def _warp_occlusion_fwd_kernel(
    h_ptr, flow_ptr, occ_ptr, out_ptr,
    n_pix, height, width, channels,
    stride_f_b, stride_f_y, stride_f_x, stride_f_c, stride_o_b, stride_o_y, stride_o_x,
    HAS_OCC: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = pix < n_pix
    cmask = cols[None, :] < channels
    valid, fx, fy, t00, m00, m01, m10, m11, _ = _bilinear_taps(
        flow_ptr, pix, pmask, height, width, stride_f_b, stride_f_y, stride_f_x, stride_f_c)
    occ = _load_occlusion(occ_ptr, pix, pmask, height, width, stride_o_b, stride_o_y,
                          stride_o_x, HAS_OCC)
    r00 = t00.to(tl.int64) * channels
    r10 = (t00.to(tl.int64) + width) * channels
    c2 = cols[None, :]
    v00 = tl.load(h_ptr + r00[:, None] + c2, mask=m00[:, None] & cmask, other=0.0).to(tl.float32)
    v01 = tl.load(h_ptr + (r00 + channels)[:, None] + c2, mask=m01[:, None] & cmask,
                  other=0.0).to(tl.float32)
    v10 = tl.load(h_ptr + r10[:, None] + c2, mask=m10[:, None] & cmask, other=0.0).to(tl.float32)
    v11 = tl.load(h_ptr + (r10 + channels)[:, None] + c2, mask=m11[:, None] & cmask,
                  other=0.0).to(tl.float32)
    gx = 1.0 - fx
    gy = 1.0 - fy
    s = ((gx * gy)[:, None] * v00 + (fx * gy)[:, None] * v01 + (gx * fy)[:, None] * v10
         + (fx * fy)[:, None] * v11)
    out = occ[:, None] * s
    self_off = pix.to(tl.int64)[:, None] * channels + c2
    iomask = pmask[:, None] & cmask
    if RESIDUAL:
        out += tl.load(h_ptr + self_off, mask=iomask, other=0.0).to(tl.float32)
    tl.store(out_ptr + self_off, out.to(out_ptr.dtype.element_ty), mask=iomask)


@triton.jit
def _warp_occlusion_bwd_kernel(
    dout_ptr, h_ptr, flow_ptr, occ_ptr, dh_acc_ptr, dflow_ptr, docc_ptr, key_ptr, wt_ptr,
    n_pix, height, width, channels,
    stride_f_b, stride_f_y, stride_f_x, stride_f_c, stride_o_b, stride_o_y, stride_o_x,
    HAS_OCC: tl.constexpr, ATOMIC_DH: tl.constexpr, WRITE_PLAN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NUM_C_BLOCKS: tl.constexpr,
):
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pix < n_pix
    valid, fx, fy, t00, m00, m01, m10, m11, corner = _bilinear_taps(
        flow_ptr, pix, pmask, height, width, stride_f_b, stride_f_y, stride_f_x, stride_f_c)
    occ = _load_occlusion(occ_ptr, pix, pmask, height, width, stride_o_b, stride_o_y,
                          stride_o_x, HAS_OCC)
    gx = 1.0 - fx
    gy = 1.0 - fy
    # occlusion-scaled tap weights: the coefficient of dout in each tap's dh contribution
    ow00 = occ * gx * gy
    ow01 = occ * fx * gy
    ow10 = occ * gx * fy
    ow11 = occ * fx * fy
    r00 = t00.to(tl.int64) * channels
    r10 = (t00.to(tl.int64) + width) * channels
    pix64 = pix.to(tl.int64)  # 4 * pix overflows int32 beyond 2**29 pixels
    self_row = pix64 * channels
    docc = tl.zeros([BLOCK_P], dtype=tl.float32)
    dsx = tl.zeros([BLOCK_P], dtype=tl.float32)
    dsy = tl.zeros([BLOCK_P], dtype=tl.float32)
    for cb in range(NUM_C_BLOCKS):  # constexpr trip count: see DESIGN.md's interpreter pitfall
        c2 = (cb * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        cmask = c2 < channels
        dout = tl.load(dout_ptr + self_row[:, None] + c2, mask=pmask[:, None] & cmask,
                       other=0.0).to(tl.float32)
        k00 = m00[:, None] & cmask
        k01 = m01[:, None] & cmask
        k10 = m10[:, None] & cmask
        k11 = m11[:, None] & cmask
        v00 = tl.load(h_ptr + r00[:, None] + c2, mask=k00, other=0.0).to(tl.float32)
        v01 = tl.load(h_ptr + (r00 + channels)[:, None] + c2, mask=k01, other=0.0).to(tl.float32)
        v10 = tl.load(h_ptr + r10[:, None] + c2, mask=k10, other=0.0).to(tl.float32)
        v11 = tl.load(h_ptr + (r10 + channels)[:, None] + c2, mask=k11, other=0.0).to(tl.float32)
        s = ((gx * gy)[:, None] * v00 + (fx * gy)[:, None] * v01 + (gx * fy)[:, None] * v10
             + (fx * fy)[:, None] * v11)
        g = occ[:, None] * dout
        docc += tl.sum(dout * s, axis=1)
        dsx += tl.sum(g * (gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)), axis=1)
        dsy += tl.sum(g * (gx[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)), axis=1)
        if ATOMIC_DH:
            # relaxed: only the final sums matter (read after the kernel ends), so no ordering
            # is needed; the default acq_rel adds a fence (MEMBAR.GPU) per atomic
            tl.atomic_add(dh_acc_ptr + r00[:, None] + c2, ow00[:, None] * dout, mask=k00,
                          sem="relaxed")
            tl.atomic_add(dh_acc_ptr + (r00 + channels)[:, None] + c2, ow01[:, None] * dout,
                          mask=k01, sem="relaxed")
            tl.atomic_add(dh_acc_ptr + r10[:, None] + c2, ow10[:, None] * dout, mask=k10,
                          sem="relaxed")
            tl.atomic_add(dh_acc_ptr + (r10 + channels)[:, None] + c2, ow11[:, None] * dout,
                          mask=k11, sem="relaxed")
    tl.store(dflow_ptr + 2 * pix64, tl.where(valid, dsx, 0.0).to(dflow_ptr.dtype.element_ty),
             mask=pmask)
    tl.store(dflow_ptr + 2 * pix64 + 1, tl.where(valid, dsy, 0.0).to(dflow_ptr.dtype.element_ty),
             mask=pmask)
    tl.store(docc_ptr + pix64, docc.to(docc_ptr.dtype.element_ty), mask=pmask)
    if WRITE_PLAN:
        # one footprint key per pixel (n_keys, which sorts last, when no tap is inside) and the
        # four tap weights
        n_keys = (n_pix // (height * width)) * (height + 1) * (width + 1)
        tl.store(key_ptr + pix64, tl.where(m00 | m01 | m10 | m11, corner, n_keys), mask=pmask)
        tl.store(wt_ptr + 4 * pix64, ow00, mask=pmask)
        tl.store(wt_ptr + 4 * pix64 + 1, ow01, mask=pmask)
        tl.store(wt_ptr + 4 * pix64 + 2, ow10, mask=pmask)
        tl.store(wt_ptr + 4 * pix64 + 3, ow11, mask=pmask)


@triton.jit
def _warp_occlusion_gather_kernel(
    dout_ptr, order_ptr, wt_ptr, row_ptr_ptr, dh_ptr,
    n_pix, height, width, channels,
    RESIDUAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dh[s] = (dout[s] if RESIDUAL) + for tap k = (dy, dx) in order 00, 01, 10, 11, for each
    pixel p of footprint group (y - dy, x - dx) front to back: wt[4p + k] * dout[p]. A fixed
    order, so bitwise reproducible (plan.py)."""
    src = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c2 = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    smask = src < n_pix
    cmask = c2 < channels
    hw = height * width
    b = src // hw
    rem = src - b * hw
    y = rem // width
    x = rem - y * width
    self_off = src.to(tl.int64)[:, None] * channels + c2
    iomask = smask[:, None] & cmask
    if RESIDUAL:
        acc = tl.load(dout_ptr + self_off, mask=iomask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for tap in tl.static_range(4):
        # footprint whose tap (tap // 2, tap % 2) is this source pixel
        group = (b * (height + 1) + y + 1 - tap // 2) * (width + 1) + x + 1 - tap % 2
        start = tl.load(row_ptr_ptr + group, mask=smask, other=0)
        count = tl.load(row_ptr_ptr + group + 1, mask=smask, other=0) - start
        # Runtime bound (the longest group in the tile): nothing constexpr bounds a group. The
        # interpreter accepts it with numpy < 2.4 only (DESIGN.md pitfall; a DeprecationWarning).
        for j in range(0, tl.max(count, axis=0)):
            live = j < count
            # int64: 4 * pixel passes 2^31 beyond 2^29 pixels, pixel * C at 2^31 elements
            pixel = tl.load(order_ptr + start + j, mask=live, other=0).to(tl.int64)
            w = tl.load(wt_ptr + 4 * pixel + tap, mask=live, other=0.0)
            d = tl.load(dout_ptr + pixel[:, None] * channels + c2, mask=live[:, None] & cmask,
                        other=0.0).to(tl.float32)
            acc += w[:, None] * d
    tl.store(dh_ptr + self_off, acc.to(dh_ptr.dtype.element_ty), mask=iomask)


# ----------------------------------------------------------------------------------------------
# Launchers. h [B, H, W, C] contiguous; flow [B, H, W, 2] and occlusion [B, H, W, 1] any strides.


def _occ_strides(occ: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if occ is None else (occ.stride(0), occ.stride(1), occ.stride(2))


def _pixels_per_program(n_pix: int, channel_blocks: int, cap: int) -> int:
    """Pixels per tile: grow tiles (fewer, larger programs) only once there are PROGRAM_TARGET
    programs, enough to fill the 132 SMs of an H100/H200 several times over; small latents (8x8,
    16x16) get one pixel per program instead of a handful of programs on idle SMs. Under the
    interpreter every program costs milliseconds, so the target there is much lower."""
    target = INTERPRETER_PROGRAM_TARGET if interpreter_enabled() else PROGRAM_TARGET
    want = triton.next_power_of_2(max(1, n_pix * channel_blocks // target))
    return max(1, min(cap, want))


def warp_occlusion_fwd(h: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None,
                       residual: bool) -> torch.Tensor:
    batch, height, width, channels = h.shape
    n_pix = batch * height * width
    out = torch.empty_like(h)
    if out.numel() == 0:
        return out
    block_c = _block_c(channels, 128)
    block_p = _pixels_per_program(n_pix, triton.cdiv(channels, block_c), TILE // block_c)
    grid = (triton.cdiv(n_pix, block_p), triton.cdiv(channels, block_c))
    _warp_occlusion_fwd_kernel[grid](
        h, flow, h if occ is None else occ, out, n_pix, height, width, channels,
        *flow.stride(), *_occ_strides(occ),
        HAS_OCC=occ is not None, RESIDUAL=residual, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=4)
    return out


def warp_occlusion_bwd(dout: torch.Tensor, h: torch.Tensor, flow: torch.Tensor,
                       occ: torch.Tensor | None, residual: bool, deterministic: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh like h, dflow [B, H, W, 2] in flow's dtype, docc [B, H, W, 1] in h's dtype; docc is
    computed even without occlusion, where the caller drops it)."""
    batch, height, width, channels = h.shape
    n_pix = batch * height * width
    dflow, docc = pixel_grad_buffers(h, flow, occ)
    if h.numel() == 0:
        return (dout.clone() if residual else torch.zeros_like(h)), dflow.zero_(), docc.zero_()
    if deterministic:
        dh_acc = None
        key = torch.empty(n_pix, dtype=torch.int32, device=h.device)
        wt = torch.empty(n_pix * 4, dtype=torch.float32, device=h.device)
    else:
        base = dout if residual else torch.zeros_like(h)
        dh_acc = base.to(torch.float32, copy=True)
        key = wt = None
    block_c = _block_c(channels, 128)
    # one program reduces all of C for its pixels, so the grid is pixel tiles only
    block_p = _pixels_per_program(n_pix, 1, TILE // block_c // 2)
    unused = docc  # stands in for pointers a variant never touches
    _warp_occlusion_bwd_kernel[(triton.cdiv(n_pix, block_p),)](
        dout, h, flow, h if occ is None else occ, unused if dh_acc is None else dh_acc, dflow,
        docc, unused if key is None else key, unused if wt is None else wt,
        n_pix, height, width, channels, *flow.stride(), *_occ_strides(occ),
        HAS_OCC=occ is not None, ATOMIC_DH=not deterministic, WRITE_PLAN=deterministic,
        BLOCK_P=block_p, BLOCK_C=block_c, NUM_C_BLOCKS=triton.cdiv(channels, block_c),
        num_warps=4)
    if not deterministic:
        return dh_acc.to(h.dtype), dflow, docc
    order, row_ptr = gather_plan(key, footprint_count(batch, height, width))
    dh = torch.empty_like(h)
    block_p = _pixels_per_program(n_pix, triton.cdiv(channels, block_c), 1024 // block_c)
    grid = (triton.cdiv(n_pix, block_p), triton.cdiv(channels, block_c))
    _warp_occlusion_gather_kernel[grid](
        dout, order, wt, row_ptr, dh, n_pix, height, width, channels,
        RESIDUAL=residual, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return dh, dflow, docc
