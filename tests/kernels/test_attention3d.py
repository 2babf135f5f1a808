"""attention3d / rope3d: reference vs an independent float64 composition, gradcheck on the
reference, anchor semantics (forward and gradients), validation messages."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import Anchor
from kernels.attention3d.ref import attention3d_ref, default_rope_dims, rope3d_ref


def _grid_positions(frames, height, width, t0=0.0):
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width),
                             indexing="ij")
    return torch.stack([t + t0, y, x], dim=-1).reshape(-1, 3)  # [T*h*w, 3]


def _rotate_complex(x, pos, dims, theta):
    """Independent RoPE: each (x_i, x_{i+d/2}) pair as a complex number times exp(i*angle)."""
    out = x.clone()
    col = 0
    for axis, d in enumerate(dims):
        half = d // 2
        for i in range(half):
            angle = pos[..., axis].double() * theta ** (-2.0 * i / d)            # [B, N]
            z = torch.complex(x[..., col + i], x[..., col + half + i])           # [B, N, H]
            z = z * torch.polar(torch.ones_like(angle), angle)[..., None]
            out[..., col + i], out[..., col + half + i] = z.real, z.imag
        col += d
    return out


def _independent_attention(q, k, v, q_pos, k_pos, dims, theta, anchor, scale):
    k, v = k.clone(), v.clone()
    if anchor is not None:
        starts, length, src = anchor
        for b in range(q.shape[0]):
            if b != src:
                rows = torch.arange(starts[b], starts[b] + length)
                src_rows = torch.arange(starts[src], starts[src] + length)
                k[b].index_copy_(0, rows, k[src].index_select(0, src_rows))
                v[b].index_copy_(0, rows, v[src].index_select(0, src_rows))
    if q_pos is not None:
        q, k = _rotate_complex(q, q_pos, dims, theta), _rotate_complex(k, k_pos, dims, theta)
    s = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)) * scale                  # [B, H, Nq, Nk]
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    out = ((e / e.sum(dim=-1, keepdim=True)) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    if anchor is not None:
        out = out.clone()
        for b in range(q.shape[0]):
            if b != src:
                out[b, starts[b]:starts[b] + length] = out[src, starts[src]:starts[src] + length]
    return out


def _qkv(batch, nq, nk, heads, dim, dtype=torch.float64, device="cpu"):
    return (torch.randn(batch, nq, heads, dim, dtype=dtype, device=device),
            torch.randn(batch, nk, heads, dim, dtype=dtype, device=device),
            torch.randn(batch, nk, heads, dim, dtype=dtype, device=device))


def test_default_rope_dims():
    assert default_rope_dims(72) == (24, 24, 24)
    assert default_rope_dims(64) == (24, 20, 20)
    assert default_rope_dims(40) == (16, 12, 12)
    assert default_rope_dims(128) == (44, 42, 42)


@pytest.mark.parametrize("anchor", [None, ([0, 8, 4], 4, 0), ([8, 0, 4], 4, 1), ([4, 4, 8], 4, 2)])
@pytest.mark.parametrize("float_pos", [False, True])
def test_ref_matches_independent_fp64(anchor, float_pos):
    q, k, v = _qkv(3, 12, 12, 2, 40)
    pos = _grid_positions(3, 2, 2)
    if float_pos:
        pos = pos.double() * 0.37 + torch.tensor([1e4, 0.5, -2.25], dtype=torch.float64)
    pos_b = pos[None].expand(3, -1, -1)
    dims = default_rope_dims(40)
    out = attention3d_ref(q, k, v, q_pos=pos_b, k_pos=pos_b, anchor=anchor)
    exp = _independent_attention(q, k, v, pos_b, pos_b, dims, 10000.0, anchor, 1 / math.sqrt(40))
    torch.testing.assert_close(out, exp, rtol=0, atol=1e-10)
    # the public function (fp32 only: fp64 is not a public dtype) on the ref backend agrees
    a = None if anchor is None else Anchor(*anchor)
    pub = kernels.attention3d(q.float(), k.float(), v.float(), positions=pos, anchor=a,
                              backend="ref")
    torch.testing.assert_close(pub.double(), exp, rtol=0, atol=2e-4)


def test_ref_cross_attention_and_rope3d():
    q, k, v = _qkv(2, 7, 11, 1, 24)
    qp, kp = _grid_positions(7, 1, 1), _grid_positions(11, 1, 1, t0=0.5)
    dims = (8, 8, 8)
    out = kernels.attention3d(q.float(), k.float(), v.float(), positions=(qp, kp),
                              rope_dims=dims, rope_theta=100.0, scale=0.3, backend="ref").double()
    exp = _independent_attention(q, k, v, qp[None].expand(2, -1, -1), kp[None].expand(2, -1, -1),
                                 dims, 100.0, None, 0.3)
    torch.testing.assert_close(out, exp, rtol=0, atol=1e-5)
    x = torch.randn(2, 7, 3, 24, dtype=torch.float64)
    torch.testing.assert_close(kernels.rope3d(x.float(), qp, rope_dims=dims, rope_theta=100.0),
                               _rotate_complex(x, qp[None].expand(2, -1, -1), dims, 100.0).float(),
                               rtol=0, atol=1e-5)


def test_ref_anchor_gradients_follow_semantics():
    q, k, v = (t.requires_grad_(True) for t in _qkv(3, 10, 10, 1, 8))
    starts, length, src = [2, 6, 0], 3, 1
    out = attention3d_ref(q, k, v, anchor=(starts, length, src))
    out.backward(torch.randn_like(out))
    for b in (0, 2):  # replaced k/v rows get zero gradient; so do q rows whose output is copied
        rows = slice(starts[b], starts[b] + length)
        assert k.grad[b, rows].abs().max() == 0 and v.grad[b, rows].abs().max() == 0
        assert q.grad[b, rows].abs().max() == 0
    assert k.grad[src, 6:9].abs().min() > 0


def test_ref_gradcheck():
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 6, 6, 1, 8))
    pos = _grid_positions(3, 1, 2).double() + 0.25

    def f(a, b, c):
        return attention3d_ref(a, b, c, q_pos=pos[None].expand(2, -1, -1),
                               k_pos=pos[None].expand(2, -1, -1), anchor=([2, 0], 2, 1))

    assert torch.autograd.gradcheck(f, (q, k, v))
    x = torch.randn(2, 6, 1, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rope3d_ref(t, pos[None].expand(2, -1, -1),
                                                         (4, 2, 2)), (x,))


def test_anchor_single_sequence_is_noop():
    q, k, v = _qkv(1, 9, 9, 2, 16, torch.float32)
    plain = kernels.attention3d(q, k, v, backend="ref")
    anchored = kernels.attention3d(q, k, v, anchor=Anchor(torch.tensor([3]), 3), backend="ref")
    torch.testing.assert_close(plain, anchored, rtol=0, atol=0)


def _bad_cases():
    q = torch.randn(2, 6, 1, 16)
    pos = torch.zeros(6, 3)
    k8 = torch.randn(2, 8, 1, 16)
    return [
        ({"q": torch.randn(2, 6, 1, 12)}, r"head dim D must be a positive multiple of 8.*D=12"),
        ({"q": torch.randn(2, 6, 1, 264)}, r"up to 256, got D=264"),
        ({"k": torch.randn(2, 6, 2, 16)}, r"k must have shape \[2, \*, 1, 16\]"),
        ({"v": torch.randn(2, 5, 1, 16)}, r"v must have shape \[2, 6, 1, 16\]"),
        ({"v": q.half()}, "v must have the same dtype as q"),
        ({"positions": torch.zeros(5, 3)}, r"positions must have shape \[6, 3\]"),
        ({"positions": torch.zeros(2, 6, 2)}, r"positions must have shape \[2, 6, 3\]"),
        ({"positions": torch.zeros(6, 3, dtype=torch.bool)}, "positions must have dtype in"),
        ({"positions": (pos, torch.zeros(4, 3))}, r"k_positions must have shape \[6, 3\]"),
        ({"positions": pos, "rope_dims": (6, 6, 6)}, r"sum <= D=16, got \(6, 6, 6\)"),
        ({"positions": pos, "rope_dims": (5, 5, 6)}, "rope_dims must be 3 non-negative even"),
        ({"rope_theta": 0.0}, "rope_theta must be a finite float > 0, got 0.0"),
        ({"anchor": Anchor([0, 7], 2)}, (r"anchor.starts\[1\] must be in \[0, N - length\] = "
                                         r"\[0, 4\].*got 7")),
        ({"anchor": Anchor([0, 5], 2)}, r"anchor.starts\[1\].*got 5"),
        ({"anchor": Anchor([0, -1], 2)}, r"anchor.starts\[1\].*got -1"),
        ({"anchor": Anchor([0, 0], 0)}, "anchor.length must be > 0, got 0"),
        ({"anchor": Anchor([0, 0], 2, source=2)}, r"anchor.source must be in \[0, B=2\), got 2"),
        ({"anchor": Anchor([0], 2)}, "anchor.starts must have B=2 entries, got 1"),
        ({"anchor": Anchor(torch.zeros(2), 2)}, "anchor.starts must have dtype in"),
        ({"anchor": (0, 2)}, "anchor must be a kernels.Anchor"),
        ({"k": k8, "v": k8, "anchor": Anchor([0, 0], 2)},
         "anchor requires self-attention \\(Nq == Nk\\), got Nq=6 and Nk=8"),
        ({"k": k8, "v": k8, "positions": pos},
         "must be a tuple \\(q_positions, k_positions\\) for cross-attention"),
    ]


@pytest.mark.parametrize("kwargs, match", _bad_cases())
def test_bad_input_is_named(kwargs, match):
    args = {name: torch.randn(2, 6, 1, 16) for name in "qkv"}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.attention3d(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_rope3d_bad_input():
    with pytest.raises(ValueError, match=r"positions must have shape \[4, 3\]"):
        kernels.rope3d(torch.randn(1, 4, 1, 8), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="x must be 4-D"):
        kernels.rope3d(torch.randn(4, 1, 8), torch.zeros(4, 3))


def test_public_name_is_the_function_not_the_package():
    """kernels/attention3d/ shares its name with the function; both spellings must call it."""
    import importlib

    from kernels.attention3d import op

    assert kernels.attention3d is op.attention3d
    package = importlib.import_module("kernels.attention3d")
    q = torch.randn(1, 5, 1, 8)
    torch.testing.assert_close(package(q, q, q, backend="ref"),
                               op.attention3d(q, q, q, backend="ref"))
