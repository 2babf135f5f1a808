"""End-to-end rows: one denoising step of a whole model, fused path against the reference path.

sDiT-XL/2 with anchoring (Anchored Diffusion, seeds/000): B = 8 sequences x T = 4 frames at 256 px
(SD-VAE latents 4 x 32 x 32, patch 2: 256 tokens per frame, 1024 per sequence), anchor frame 0 of
sequence 0 shared by all sequences. One step is one forward of the model on the batch, in bf16,
with random weights (timing does not depend on the values).

Providers:
- ``fused_packed``: the model as shipped: ``anchor_mode="packed"`` (the anchor frame computed once
  per batch), adaLN and attention through the registry's fastest backends;
- ``reference_sdpa_<backend>``: what a user writes without this library: ``anchor_mode=
  "override"`` (the plain batched model, anchor rows overwritten after every block), adaLN in
  eager PyTorch (the ``ref`` backend), and attention through one torch SDPA backend (flash, cuDNN,
  memory-efficient; the fastest of them is the baseline to beat; ``math`` on a CPU).

Rows report the step time and the peak memory; no FLOP count (the model's work is the sum of its
layers, dominated by GEMMs that are not this library's).

    python -m bench --op models
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F

import kernels
from avatar_models.anchored_diffusion import Conditions as SDiTConditions
from avatar_models.anchored_diffusion import SDiT, SDiTConfig, frame_anchor
from bench.harness import Provider, Workload

OP = "models"


def _sdit_workload(name: str, config: str, batch: int, frames: int, latent: int) -> Workload:
    def make_inputs(dtype, device, smoke):
        cfg = SDiTConfig.from_name("tiny") if smoke else SDiTConfig.from_name(
            config, input_size=latent, frames=frames)
        b, t, size = (2, cfg.frames, cfg.input_size) if smoke else (batch, frames, latent)
        with torch.device(device):  # initialise on the device: XL/2 has 675M parameters
            model = SDiT(cfg).to(dtype).eval()
        x = torch.randn(b, t, cfg.in_channels, size, size, dtype=dtype, device=device)
        cond = SDiTConditions(torch.randn(b, cfg.global_dim, dtype=dtype, device=device),
                              torch.randn(b, t, cfg.control_dim, dtype=dtype, device=device))
        steps = torch.full((b,), 500, device=device)
        anchor = frame_anchor([0] * b, cfg.tokens_per_frame, source=0)
        return {"model": model, "x": x, "t": steps, "cond": cond, "anchor": anchor}

    shape = {"config": config, "B": batch, "T": frames, "latent": latent,
             "pixels": latent * 8, "anchor": True}
    return Workload(name, shape, make_inputs, dtypes=("bf16",))


WORKLOADS = [_sdit_workload("sdit_xl2_anchored_b8_t4_256px", "sdit-xl/2", 8, 4, 32)]
# `python -m bench --quick` (and `make gpu-evidence`) runs these only.
QUICK = ("sdit_xl2_anchored_b8_t4_256px",)


def fused_step(model, x, t, cond, anchor):
    return model(x, t, cond, anchor=anchor, anchor_mode="packed")


def _sdpa_attention3d(sdpa_backend):
    """Stand-in for ``kernels.attention3d`` on the reference path: plain SDPA, [B, N, H, D]."""
    from torch.nn.attention import sdpa_kernel

    def attention3d(q, k, v, *, positions=None, rope_dims=None, anchor=None, backend=None,
                    **unused):
        if positions is not None or anchor is not None:
            raise ValueError("the reference path applies neither RoPE nor the anchor in attention "
                             f"(positions={positions is not None}, anchor={anchor is not None})")
        with sdpa_kernel(sdpa_backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2))
        return out.transpose(1, 2)
    return attention3d


def reference_step(sdpa_backend):
    def step(model, x, t, cond, anchor):
        # The reference model is the same module; only its kernels are swapped for the
        # eager / SDPA ones for the duration of the call.
        with kernels.backend("ref"), mock.patch.object(kernels, "attention3d",
                                                       _sdpa_attention3d(sdpa_backend)):
            return model(x, t, cond, anchor=anchor, anchor_mode="override")
    return step


def providers(device: str) -> list[Provider]:
    from torch.nn.attention import SDPBackend

    backends = (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)) if device == "cuda" else (
        ("math", SDPBackend.MATH),)
    return [Provider("fused_packed", fused_step, modes=("fwd",))] + [
        Provider(f"reference_sdpa_{name}", reference_step(backend), modes=("fwd",))
        for name, backend in backends]

