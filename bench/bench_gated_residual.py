"""Benchmark the gated residual ``x + gate * y`` of adaLN-Zero blocks (issue 2; memory-bound, so
the target is the measured copy bandwidth, like adaLN modulation's).

Workloads: the adaLN ones (sDiT-XL/2 C=1152, 1024 tokens = 4 frames x 256, per-frame gates;
Wan-like C=3072). Baselines: eager ``x + gate.repeat_interleave(...) * y`` and torch.compile of it.

    python -m bench.bench_gated_residual [--dtype bf16] [--mode fwd] [--smoke]
"""

from __future__ import annotations

import torch

import kernels
from bench.bench_adaln import QUICK as ADALN_QUICK
from bench.bench_adaln import SHAPES
from bench.harness import Provider, Workload, compiled_provider, main, registry_providers

OP = "gated_residual"


def eager_gated_residual(x, y, gate):
    return x + gate.repeat_interleave(x.shape[1] // gate.shape[1], dim=1) * y


def _workload(name: str, batch: int, tokens: int, frames: int, channels: int) -> Workload:
    def make_inputs(dtype, device, smoke):
        b, n, c = (2, 4 * frames, 64) if smoke else (batch, tokens, channels)
        x, y = (torch.randn(b, n, c, dtype=dtype, device=device, requires_grad=True)
                for _ in range(2))
        gate = torch.randn(b, frames, c, dtype=dtype, device=device, requires_grad=True)
        return {"x": x, "y": y, "gate": gate}

    elem = 2  # bf16/fp16 bytes; compulsory traffic: read x, y, write out (fwd); read dout, y,
    # write dx, dy (bwd; dgate is [B, T, C], negligible)
    per_mode = {"fwd": 3, "bwd": 4, "fwd_bwd": 7}
    return Workload(
        name, {"B": batch, "N": tokens, "T": frames, "C": channels}, make_inputs,
        bytes=lambda mode: per_mode[mode] * batch * tokens * channels * elem,
        dtypes=("bf16", "fp16"))


WORKLOADS = [_workload(*shape) for shape in SHAPES]
QUICK = ADALN_QUICK


def providers(device: str) -> list[Provider]:
    return registry_providers(OP, kernels.gated_residual, device) + [
        Provider("torch_eager", eager_gated_residual),
        compiled_provider("torch_compile", eager_gated_residual),
    ]


if __name__ == "__main__":
    main(OP, WORKLOADS, providers)
