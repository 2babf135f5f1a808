"""Benchmark adaLN modulation + gated residual (issue 2's targets: >= 80% of measured copy
bandwidth and >= 2.5x torch eager, forward and backward, on H100/H200).

Workloads: sDiT-XL/2 (C=1152, 1024 tokens per sample = 4 frames x 256, per-frame modulation, B 8
to 32) and a Wan-like C=3072 (1560 tokens per frame). Baselines: eager layer_norm + mul + add, and
torch.compile of the same.

    python -m bench.bench_adaln [--dtype bf16] [--mode fwd] [--smoke]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from bench.harness import Provider, Workload, compiled_provider, main, registry_providers

OP = "adaln_modulate"


def eager_adaln(x, shift, scale):
    n, frames = x.shape[1], shift.shape[1]
    y = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    scale = scale.repeat_interleave(n // frames, dim=1)
    shift = shift.repeat_interleave(n // frames, dim=1)
    return y * (1 + scale) + shift


def _workload(name: str, batch: int, tokens: int, frames: int, channels: int) -> Workload:
    def make_inputs(dtype, device, smoke):
        b, n, c = (2, 4 * frames, 64) if smoke else (batch, tokens, channels)
        x = torch.randn(b, n, c, dtype=dtype, device=device, requires_grad=True)
        shift = torch.randn(b, frames, c, dtype=dtype, device=device, requires_grad=True)
        scale = torch.randn(b, frames, c, dtype=dtype, device=device, requires_grad=True)
        return {"x": x, "shift": shift, "scale": scale}

    elem = 2  # bf16/fp16 bytes; compulsory traffic: read x, write y (fwd); read x, dy, write dx
    per_mode = {"fwd": 2, "bwd": 3, "fwd_bwd": 5}
    return Workload(
        name, {"B": batch, "N": tokens, "T": frames, "C": channels}, make_inputs,
        bytes=lambda mode: per_mode[mode] * batch * tokens * channels * elem,
        dtypes=("bf16", "fp16"))


# (name, B, N tokens, T frames, C): shared with bench_gated_residual (the same adaLN blocks)
SHAPES = [
    ("sdit_xl2_b8_t4_256px", 8, 1024, 4, 1152),
    ("sdit_xl2_b32_t4_256px", 32, 1024, 4, 1152),
    ("wan_c3072_b2_t4_1560tok", 2, 4 * 1560, 4, 3072),
]
WORKLOADS = [_workload(*shape) for shape in SHAPES]
# `python -m bench --quick` (and `make gpu-evidence`) runs these only.
QUICK = ("sdit_xl2_b8_t4_256px",)


def providers(device: str) -> list[Provider]:
    return registry_providers(OP, kernels.adaln_modulate, device) + [
        Provider("torch_eager", eager_adaln),
        compiled_provider("torch_compile", eager_adaln),
    ]


if __name__ == "__main__":
    main(OP, WORKLOADS, providers)
