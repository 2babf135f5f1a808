"""Every public op of ``kernels`` with small inputs: one table for the sanitizer launches
(``python -m bench.sanitize_launch``) and the host-overhead benchmarks
(``tests/test_bench_host_overhead.py``).

Each :class:`OpCall` builds small inputs (``make(device, dtype)``, tensors that the op
differentiates already ``requires_grad``) and calls the public function with an explicit backend
(``call(backend, inputs)``). Variants that reach a different kernel (anchor, RoPE, causal,
deterministic backward) are separate entries, so "one launch of every kernel" is one loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import kernels


@dataclass(frozen=True)
class OpCall:
    name: str            # entry name (op plus variant)
    op: str              # registry op name
    make: Callable[[str, torch.dtype], dict]
    call: Callable[[str | None, dict], torch.Tensor]


def _leaf(*shape, device, dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_(True)


def _adaln_inputs(device, dtype):
    return {"x": _leaf(2, 24, 64, device=device, dtype=dtype),
            "shift": _leaf(2, 3, 64, device=device, dtype=dtype),
            "scale": _leaf(2, 3, 64, device=device, dtype=dtype)}


def _gated_inputs(device, dtype):
    return {"x": _leaf(2, 24, 64, device=device, dtype=dtype),
            "y": _leaf(2, 24, 64, device=device, dtype=dtype),
            "gate": _leaf(2, 3, 64, device=device, dtype=dtype)}


def _positions(frames: int, side: int, device) -> torch.Tensor:
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(side), torch.arange(side),
                             indexing="ij")
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3).float().to(device)    # [N, 3]


def _attention_inputs(device, dtype):
    # 2 sequences of 3 frames of 4x4 tokens, 2 heads, D=32
    return {name: _leaf(2, 48, 2, 32, device=device, dtype=dtype) for name in "qkv"}


def _rope_inputs(device, dtype):
    return {"x": _leaf(2, 48, 2, 32, device=device, dtype=dtype),
            "positions": _positions(3, 4, device)}


def _warp_inputs(device, dtype):
    return {"h": _leaf(1, 6, 7, 16, device=device, dtype=dtype),
            "flow": _leaf(1, 6, 7, 2, device=device, dtype=dtype, scale=2.0),
            "occlusion": torch.rand(1, 6, 7, 1, device=device).to(dtype).requires_grad_(True)}


def _performer_inputs(device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = {name: _leaf(1, 40, 2, 16, device=device, dtype=dtype) for name in "qkv"}
    inputs["features"] = kernels.orthogonal_features(24, 16, generator=gen, device=device,
                                                     dtype=dtype)
    return inputs


def _frame_causal_inputs(device, dtype):
    ids = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor([13, 27, 9],
                                                                                 device=device))
    inputs = {name: _leaf(1, 49, 2, 32, device=device, dtype=dtype) for name in "qkv"}
    inputs["frame_ids"] = ids
    return inputs


PUBLIC_OPS: tuple[OpCall, ...] = (
    OpCall("adaln_modulate", "adaln_modulate", _adaln_inputs,
           lambda b, i: kernels.adaln_modulate(i["x"], i["shift"], i["scale"], backend=b)),
    OpCall("gated_residual", "gated_residual", _gated_inputs,
           lambda b, i: kernels.gated_residual(i["x"], i["y"], i["gate"], backend=b)),
    OpCall("attention3d", "attention3d", _attention_inputs,
           lambda b, i: kernels.attention3d(i["q"], i["k"], i["v"], backend=b)),
    OpCall("attention3d_rope_anchor", "attention3d",
           lambda d, t: {**_attention_inputs(d, t), "positions": _positions(3, 4, d)},
           lambda b, i: kernels.attention3d(i["q"], i["k"], i["v"], positions=i["positions"],
                                            anchor=kernels.Anchor([0, 16], 16, source=0),
                                            backend=b)),
    OpCall("rope3d", "rope3d", _rope_inputs,
           lambda b, i: kernels.rope3d(i["x"], i["positions"], backend=b)),
    OpCall("warp_occlusion", "warp_occlusion", _warp_inputs,
           lambda b, i: kernels.warp_occlusion(i["h"], i["flow"], i["occlusion"], backend=b)),
    OpCall("warp_occlusion_deterministic", "warp_occlusion", _warp_inputs,
           lambda b, i: kernels.warp_occlusion(i["h"], i["flow"], i["occlusion"],
                                               deterministic=True, backend=b)),
    OpCall("warp", "warp_occlusion", _warp_inputs,
           lambda b, i: kernels.warp(i["h"], i["flow"], backend=b)),
    OpCall("performer_attention", "performer_attention", _performer_inputs,
           lambda b, i: kernels.performer_attention(i["q"], i["k"], i["v"], i["features"],
                                                    backend=b)),
    OpCall("performer_attention_causal", "performer_attention", _performer_inputs,
           lambda b, i: kernels.performer_attention(i["q"], i["k"], i["v"], i["features"],
                                                    causal=True, backend=b)),
    OpCall("frame_causal_attention_rope", "frame_causal_attention", _frame_causal_inputs,
           lambda b, i: kernels.frame_causal_attention(i["q"], i["k"], i["v"],
                                                       frame_ids=i["frame_ids"],
                                                       rope_theta=10000.0, backend=b)),
)


def differentiable(inputs: dict) -> list[torch.Tensor]:
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
