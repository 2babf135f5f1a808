"""No host syncs and no per-call host-to-device copies in any op's Triton path (issue 15 item 7).

Each op runs forward + backward on the Triton backend (under TRITON_INTERPRET=1 on the CPU lane)
twice; the second call runs inside ``kernels.testing.forbid_host_syncs``, which fails on any
tensor-to-host read (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``int()``/``float()``/
``bool()`` of a tensor) or ``torch.tensor`` of Python data made from code in ``kernels/``. On a GPU
each one stalls the stream and breaks CUDA-graph capture; the first call is a warm-up, so tables
cached per configuration may be built once.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.testing import forbid_host_syncs


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _case_adaln():
    x, s = _leaf(2, 6, 24), _leaf(2, 3, 24)
    return lambda: kernels.adaln_modulate(x, s, s, backend="triton")


def _case_gated():
    x, y, g = _leaf(2, 6, 24), _leaf(2, 6, 24), _leaf(2, 24)
    return lambda: kernels.gated_residual(x, y, g, backend="triton")


def _case_attention(anchor: bool):
    q, k, v = (_leaf(2, 12, 2, 16) for _ in range(3))
    pos = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(2),
                                     indexing="ij"), -1).reshape(12, 3)
    # starts as a Python list: no tensor may be built from it per call (a host-to-device copy on
    # a GPU). A CPU tensor of starts is host memory on a GPU machine too, so reading it is no
    # sync; device-resident starts are the GPU lane's to check (CUDA-graph capture).
    a = kernels.Anchor(starts=[4, 8], length=4, source=0) if anchor else None
    return lambda: kernels.attention3d(q, k, v, positions=pos, anchor=a, backend="triton")


def _case_rope():
    x = _leaf(2, 6, 2, 16)
    pos = torch.randint(0, 5, (6, 3))
    return lambda: kernels.rope3d(x, pos, backend="triton")


def _case_warp(deterministic: bool, occlusion: bool):
    h, flow = _leaf(1, 5, 6, 8), (torch.randn(1, 5, 6, 2) * 2).requires_grad_()
    occ = torch.rand(1, 5, 6, 1).requires_grad_() if occlusion else None
    if not occlusion:
        return lambda: kernels.warp(h, flow, deterministic=deterministic, backend="triton")
    return lambda: kernels.warp_occlusion(h, flow, occ, deterministic=deterministic,
                                          backend="triton")


def _case_performer(causal: bool):
    q, k, v = ((torch.randn(1, 13, 2, 16) * 0.5).requires_grad_() for _ in range(3))
    w = kernels.orthogonal_features(20, 16, generator=torch.Generator().manual_seed(0))
    return lambda: kernels.performer_attention(q, k, v, w, causal=causal, backend="triton")


def _case_frame_causal(sorted_ids: bool, rope: bool):
    q, k, v = (_leaf(1, 10, 2, 16) for _ in range(3))
    ids = torch.arange(10) // 3
    ids = ids if sorted_ids else ids.flip(0)
    theta = 10000.0 if rope else None
    return lambda: kernels.frame_causal_attention(q, k, v, frame_ids=ids, rope_theta=theta,
                                                  backend="triton")


CASES = [
    pytest.param(_case_adaln, id="adaln_modulate"),
    pytest.param(_case_gated, id="gated_residual"),
    pytest.param(lambda: _case_attention(False), id="attention3d-rope"),
    pytest.param(lambda: _case_attention(True), id="attention3d-rope-anchor"),
    pytest.param(_case_rope, id="rope3d"),
    pytest.param(lambda: _case_warp(False, True), id="warp_occlusion"),
    pytest.param(lambda: _case_warp(True, True), id="warp_occlusion-deterministic"),
    pytest.param(lambda: _case_warp(False, False), id="warp"),
    pytest.param(lambda: _case_performer(False), id="performer_attention"),
    pytest.param(lambda: _case_performer(True), id="performer_attention-causal"),
    pytest.param(lambda: _case_frame_causal(True, False), id="frame_causal_attention-sorted"),
    pytest.param(lambda: _case_frame_causal(False, True), id="frame_causal_attention-rope"),
]


@pytest.mark.parametrize("make_case", CASES)
def test_triton_path_has_no_host_sync_per_call(triton_device, make_case):
    if triton_device != "cpu":
        pytest.skip("CPU lane (TRITON_INTERPRET=1); the GPU lane captures CUDA graphs instead")
    call = make_case()

    def forward_backward():
        out = call()
        out.backward(torch.ones_like(out))

    forward_backward()  # warm-up: tables cached per configuration may be built once
    with forbid_host_syncs():
        forward_backward()


def test_the_guard_catches_a_sync_made_from_kernels_code():
    """The check above can fail: a read made by a module of kernels/ raises."""
    probe = {"__name__": "kernels._probe", "t": torch.ones(())}
    with forbid_host_syncs(), pytest.raises(AssertionError, match="host sync"):
        exec("t.item()", probe)
