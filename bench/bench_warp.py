"""Benchmark warp_occlusion, WarpCA's H' = H + O * W(H, F) (issue 4's targets on H100/H200:
forward >= 70% of the measured copy bandwidth and >= 3x eager; backward >= 2x eager autograd;
deterministic backward <= 2x the default backward).

Workloads: WarpFace's DenoisingNet is SD1.5-like; WarpCA runs in its mid and up blocks at every
denoising step, with classifier-free guidance doubling the batch (B=2). At 512 px (64x64 latent)
the mid block is 8x8x1280 and the up blocks 16x16x1280, 32x32x640, 64x64x320; at 256 px (32x32
latent) the same channel counts at half the side (8x8x1280 is 256 px's first up block). Plus a
training-sized B=16 at 64x64x320.

Providers: every usable registry backend (cuda, triton, ref), the compiled backends with
deterministic=True (backward modes), the eager composite (sampling grid + grid_sample + mul + add,
what a model without this op runs) and torch.compile of it. GB/s counts compulsory bytes only.

    python -m bench.bench_warp [--dtype bf16] [--mode fwd] [--workload 64x64] [--smoke]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from bench.harness import Provider, Workload, compiled_provider, main, registry_providers

OP = "warp_occlusion"


def eager_warp_occlusion(h, flow, occlusion):
    """The eager composite: normalised sampling grid, grid_sample on an NCHW view, mul, add."""
    _, height, width, _ = h.shape
    xs = torch.arange(width, device=h.device, dtype=torch.float32)
    ys = torch.arange(height, device=h.device, dtype=torch.float32)
    gx = (xs + flow[..., 0].float()) * (2.0 / (width - 1)) - 1.0
    gy = (ys[:, None] + flow[..., 1].float()) * (2.0 / (height - 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(h.dtype)
    sampled = F.grid_sample(h.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
    return h + occlusion * sampled.permute(0, 2, 3, 1)


def _workload(name: str, batch: int, side: int, channels: int) -> Workload:
    def make_inputs(dtype, device, smoke):
        b, s, c = (1, 5, 16) if smoke else (batch, side, channels)
        h = torch.randn(b, s, s, c, dtype=dtype, device=device, requires_grad=True)
        # smooth-ish sub-pixel to few-pixel motion, as a flow head produces
        flow = (2.0 * torch.randn(b, s, s, 2, device=device)).to(dtype).requires_grad_(True)
        occ = torch.rand(b, s, s, 1, dtype=dtype, device=device, requires_grad=True)
        return {"h": h, "flow": flow, "occlusion": occ}

    elem = 2  # bf16/fp16 bytes
    pixels = batch * side * side
    # fwd: read h, flow (2), occlusion (1), write out. bwd: read dout, h, flow, occlusion, write
    # dh, dflow (2), docc (1). Taps re-read neighbouring rows of h: cache traffic, not compulsory.
    per_pixel = {"fwd": 2 * channels + 3, "bwd": 3 * channels + 6, "fwd_bwd": 5 * channels + 9}
    return Workload(name, {"B": batch, "H": side, "W": side, "C": channels}, make_inputs,
                    bytes=lambda mode: per_pixel[mode] * pixels * elem, dtypes=("bf16", "fp16"))


WORKLOADS = [
    _workload("warpface_8x8x1280_b2", 2, 8, 1280),      # 512 px mid, 256 px up1
    _workload("warpface_16x16x1280_b2", 2, 16, 1280),   # 512 px up1, 256 px up2 side
    _workload("warpface_32x32x640_b2", 2, 32, 640),     # 512 px up2
    _workload("warpface_64x64x320_b2", 2, 64, 320),     # 512 px up3
    _workload("warpface_64x64x320_b16", 16, 64, 320),   # training batch
]
# `python -m bench --quick` (and `make gpu-evidence`) runs these only.
QUICK = ("warpface_32x32x640_b2",)


def providers(device: str) -> list[Provider]:
    found = registry_providers(OP, kernels.warp_occlusion, device)
    deterministic = [
        Provider(f"{p.name}_deterministic",
                 lambda _b=p.name, **kw: kernels.warp_occlusion(backend=_b, deterministic=True,
                                                                **kw),
                 modes=("bwd", "fwd_bwd"))
        for p in found if p.name in ("cuda", "triton")]
    return found + deterministic + [
        Provider("torch_eager", eager_warp_occlusion),
        compiled_provider("torch_compile", eager_warp_occlusion),
    ]


if __name__ == "__main__":
    main(OP, WORKLOADS, providers)
