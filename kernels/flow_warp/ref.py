"""Reference flow warping with occlusion: the spec, the CPU path and the test oracle.

Plain PyTorch, fp32 inside (fp64 when given fp64), readable first. Shapes:
    h:         [B, H, W, C]  channels-last features
    flow:      [B, H, W, 2]  displacement in pixels, (dx, dy)
    occlusion: [B, H, W, 1]  or None (ones)

Output pixel (y, x) samples h bilinearly at (x + dx, y + dy); pixel centres sit at integer
coordinates and taps outside the image contribute zero. A non-finite displacement samples zero
(and gets a zero flow gradient). With x0 = floor(sx), fx = sx - x0 (same for y):

    S = (1-fx)(1-fy) h[y0, x0] + fx(1-fy) h[y0, x0+1] + (1-fx)fy h[y0+1, x0] + fx fy h[y0+1, x0+1]
    out = h + occlusion * S    (residual=True)      out = occlusion * S    (residual=False)

Gradients come from autograd through this formula (floor is piecewise constant, so at an integer
coordinate the flow gradient is the one-sided difference towards x0 + 1).
"""

from __future__ import annotations

import torch

from kernels._numerics import upcast

# (dy, dx) offset of each bilinear tap from (y0, x0), in the order every implementation uses.
TAPS = ((0, 0), (0, 1), (1, 0), (1, 1))


def sample_coordinates(flow: torch.Tensor, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sx, sy, valid): sampling coordinates [B, H, W] in ``dtype`` and the finite mask.

    Non-finite coordinates are replaced by 0 so that they stay out of every later computation."""
    _, height, width, _ = flow.shape
    xs = torch.arange(width, device=flow.device, dtype=dtype)
    ys = torch.arange(height, device=flow.device, dtype=dtype)
    sx = xs[None, None, :] + flow[..., 0].to(dtype)
    sy = ys[None, :, None] + flow[..., 1].to(dtype)
    valid = torch.isfinite(sx) & torch.isfinite(sy)
    zero = torch.zeros((), dtype=dtype, device=flow.device)
    return torch.where(valid, sx, zero), torch.where(valid, sy, zero), valid


def bilinear_sample(h: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """S = h sampled at (x + dx, y + dy), zero outside and for non-finite flow. [B, H, W, C]
    in the compute dtype (at least fp32, fp64 for fp64 inputs)."""
    batch, height, width, channels = h.shape
    dtype = torch.promote_types(upcast(h).dtype, upcast(flow).dtype)
    hc = h.to(dtype).reshape(batch, height * width, channels)
    sx, sy, valid = sample_coordinates(flow, dtype)
    x0 = torch.floor(sx).detach()
    y0 = torch.floor(sy).detach()
    fx, fy = sx - x0, sy - y0
    weights = ((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy)
    out = torch.zeros(batch, height, width, channels, dtype=dtype, device=h.device)
    for (oy, ox), weight in zip(TAPS, weights):
        xi, yi = x0 + ox, y0 + oy
        inside = valid & (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
        index = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).long()  # [B, H, W]
        index = index.reshape(batch, height * width, 1).expand(-1, -1, channels)
        tap = torch.gather(hc, 1, index).reshape(batch, height, width, channels)
        out = out + torch.where(inside[..., None], weight[..., None] * tap, 0.0)
    return out


def warp_occlusion_ref(h: torch.Tensor, flow: torch.Tensor, occlusion: torch.Tensor | None = None,
                       residual: bool = True) -> torch.Tensor:
    """``h + occlusion * warp(h, flow)`` (or without ``h +`` when ``residual`` is False)."""
    sampled = bilinear_sample(h, flow)
    if occlusion is not None:
        sampled = occlusion.to(sampled.dtype) * sampled
    if residual:
        sampled = h.to(sampled.dtype) + sampled
    return sampled.to(h.dtype)


def warp_ref(h: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    return warp_occlusion_ref(h, flow, None, residual=False)
