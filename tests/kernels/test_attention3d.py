"""attention3d / rope3d: reference vs an independent float64 composition, gradcheck on the
reference, anchor semantics (forward and gradients), validation messages."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import Anchor
from kernels.attention.ref import attention3d_ref, default_rope_dims, rope3d_ref
from kernels.testing import assert_within_tolerance, nan_empty, run_compiled_mode

# Runtime loop bounds (sequence lengths) in the Triton interpreter: harmless with numpy < 2.4
# (see DESIGN.md, known pitfalls); the deprecation message is noise here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _grid_positions(frames, height, width, t0=0.0):
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width),
                             indexing="ij")
    return torch.stack([t + t0, y, x], dim=-1).reshape(-1, 3)  # [T*h*w, 3]


def _rotate_complex(x, pos, dims, theta, interleaved=False):
    """Independent RoPE: each (x_i, x_{i+d/2}) pair (or (x_{2i}, x_{2i+1}) when interleaved) as a
    complex number times exp(i*angle)."""
    out = x.clone()
    col = 0
    for axis, d in enumerate(dims):
        half = d // 2
        for i in range(half):
            j1, j2 = (col + 2 * i, col + 2 * i + 1) if interleaved else (col + i, col + half + i)
            angle = pos[..., axis].double() * theta ** (-2.0 * i / d)            # [B, N]
            z = torch.complex(x[..., j1], x[..., j2])                            # [B, N, H]
            z = z * torch.polar(torch.ones_like(angle), angle)[..., None]
            out[..., j1], out[..., j2] = z.real, z.imag
        col += d
    return out


def _independent_attention(q, k, v, q_pos, k_pos, dims, theta, anchor, scale, interleaved=False):
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
        q = _rotate_complex(q, q_pos, dims, theta, interleaved)
        k = _rotate_complex(k, k_pos, dims, theta, interleaved)
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
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 4, 4, 1, 8))
    pos = _grid_positions(2, 1, 2).double() + 0.25

    def f(a, b, c):
        return attention3d_ref(a, b, c, q_pos=pos[None].expand(2, -1, -1),
                               k_pos=pos[None].expand(2, -1, -1), anchor=([2, 0], 2, 1))

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)
    x = torch.randn(2, 4, 1, 8, dtype=torch.float64, requires_grad=True)
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
        ({"rope_theta": 0.0}, "rope_theta must be a finite number > 0, got 0.0"),
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


# ----------------------------------------------------------------------------------------------
# Triton (interpreter on CPU, compiled on GPU) vs the fp64 reference, tolerance rule of DESIGN.md


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _batched(pos, batch):
    return None if pos is None else (pos if pos.dim() == 3 else pos[None].expand(batch, -1, -1))


def _plain_torch(q, k, v, q_pos, k_pos, dims, theta, anchor, scale, interleaved=False):
    """Baseline for the tolerance rule: what a user writes today, in q's precision: index copy,
    eager RoPE (fp32 inside, rounded to q's dtype), SDPA, index copy."""
    from kernels.attention.ref import anchor_override

    if anchor is not None:
        k, v = anchor_override(k, *anchor), anchor_override(v, *anchor)
    if q_pos is not None:
        q = rope3d_ref(q, q_pos, dims, theta, interleaved)
        k = rope3d_ref(k, k_pos, dims, theta, interleaved)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
    return out if anchor is None else anchor_override(out, *anchor)


def _check_triton(q, k, v, *, positions=None, anchor=None, rope_dims=None, scale=None,
                  theta=10000.0, layouts=None, interleaved=False):
    """layouts: optional (f_q, f_k, f_v), differentiable same-value views given to the kernels."""
    batch, _, _, dim = q.shape
    dims = default_rope_dims(dim) if rope_dims is None else rope_dims
    scale_v = 1 / math.sqrt(dim) if scale is None else scale
    qp, kp = positions if isinstance(positions, tuple) else (positions, positions)
    qp, kp = _batched(qp, batch), _batched(kp, batch)
    leaves = _leaves(q, k, v)
    inputs = leaves if layouts is None else [f(t) for f, t in zip(layouts, leaves)]
    out = kernels.attention3d(*inputs, positions=positions, rope_dims=rope_dims, scale=scale,
                              rope_theta=theta, anchor=None if anchor is None else Anchor(*anchor),
                              interleaved=interleaved, backend="triton")
    assert out.dtype == q.dtype and out.shape == q.shape
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = _leaves(q.double(), k.double(), v.double())
    ref = attention3d_ref(*ref_leaves, q_pos=qp, k_pos=kp, rope_dims=dims, rope_theta=theta,
                          anchor=anchor, scale=scale_v, interleaved=interleaved)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = _leaves(q, k, v)
    low = _plain_torch(*low_leaves, qp, kp, dims, theta, anchor, scale_v, interleaved)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    assert_within_tolerance(out, ref, low, name="out")
    for name, g, rg, lg in zip("qkv", grads, ref_grads, low_grads):
        assert_within_tolerance(g, rg, lg, factor=3.0, floor=1e-4, name=f"d{name}")


def _frames_positions(frames, h, w, t0=0.0, batch=None):
    pos = _grid_positions(frames, h, w, t0)
    return pos if batch is None else pos[None].repeat(batch, 1, 1)


TRITON_CASES = {
    # odd length, D=40 (32 + 16 columns), integer positions shared by the batch
    "n113_d40_intpos": lambda dt, dev: (_qkv(2, 113, 113, 1, 40, dt, dev),
                                        {"positions": _grid_positions(1, 113, 1).to(dev)}),
    # cross-attention 113 x 203, D=64, fractional positions with t = 1e4 on the keys (lookahead)
    "cross_113x203_d64_t1e4": lambda dt, dev: (
        _qkv(1, 113, 203, 2, 64, dt, dev),
        {"positions": ((_grid_positions(1, 113, 1) * 0.5).to(dev),
                       (_grid_positions(1, 203, 1, t0=1e4) + 0.25).to(dev))}),
    # anchor in the first / a middle / the last frame, different starts, source in the middle,
    # frames of 17 tokens (not tile aligned), D=72, per-sequence positions
    "anchor_mixed_d72": lambda dt, dev: (
        _qkv(3, 68, 68, 1, 72, dt, dev),
        {"positions": _frames_positions(4, 17, 1, batch=3).to(dev),
         "anchor": ([0, 34, 51], 17, 1)}),
    # anchor in the last frame of every sequence, source 0, no RoPE, rope_dims/scale given
    "anchor_last_norope_d40": lambda dt, dev: (
        _qkv(2, 68, 68, 2, 40, dt, dev), {"anchor": ([51, 51], 17, 0), "scale": 0.2}),
    # D=96: the forward's 64 + 32 column blocks, cross-attention, fractional positions
    "cross_20x33_d96": lambda dt, dev: (
        _qkv(1, 20, 33, 1, 96, dt, dev),
        {"positions": ((_grid_positions(1, 20, 1) * 0.5).to(dev),
                       (_grid_positions(1, 33, 1) + 0.25).to(dev))}),
    # B=1 with an anchor (no-op), D=128, a partial rope split with an unrotated tail
    "b1_anchor_d128": lambda dt, dev: (
        _qkv(1, 45, 45, 1, 128, dt, dev),
        {"positions": _frames_positions(3, 3, 5, t0=7.5).to(dev), "anchor": ([15], 15, 0),
         "rope_dims": (48, 32, 32)}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_reference(triton_device, dtype, case):
    (q, k, v), kwargs = TRITON_CASES[case](dtype, triton_device)
    _check_triton(q, k, v, **kwargs)


def test_triton_strided_inputs(triton_device):
    """q, k, v as views into a packed [B, N, 3, H, D] projection (no copies on the way in)."""
    qkv = torch.randn(2, 50, 3, 2, 16, device=triton_device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _check_triton(q, k, v, positions=_grid_positions(2, 5, 5).to(triton_device),
                  anchor=([25, 0], 25, 0))


def _head_padded(t):
    """Same values, head stride D + 4 (not a multiple of 8)."""
    return torch.nn.functional.pad(t, (0, 4))[..., :t.shape[-1]]


def _misaligned(t):
    """Same values, contiguous, data pointer one element past a 16-byte boundary."""
    return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)


def test_triton_alignment_flag_and_generic_path(triton_device):
    """ALIGNED_8 (16-byte tile rows: vector loads, async copies) is chosen per launch: packed
    views of a contiguous projection take it; a head-padded view (head stride 44) or a data
    pointer off 16 bytes takes the generic path, which must give the same results. With RoPE q
    and k are rewritten by the rotation pass and an unaligned v is copied, so the N^2 kernels take
    the aligned path whatever the input layout."""
    from kernels.attention import triton_impl

    assert triton_impl.aligned_8(40, *torch.randn(3, 2, 30, 2, 40).unbind(0))
    assert not triton_impl.aligned_8(40, _head_padded(torch.randn(2, 30, 2, 40)))
    assert not triton_impl.aligned_8(40, _misaligned(torch.randn(2, 30, 2, 40)))
    qkv = torch.randn(2, 30, 3, 2, 40, dtype=torch.float16, device=triton_device)
    pos, anchor = _grid_positions(2, 3, 5).to(triton_device), ([15, 0], 15, 0)
    _check_triton(*qkv.unbind(2), positions=pos, anchor=anchor)  # packed views: aligned
    assert triton_impl.LAUNCH_STATS["fwd_aligned_8"] and triton_impl.LAUNCH_STATS["bwd_aligned_8"]
    layouts = (_head_padded, lambda t: t, _misaligned)
    _check_triton(*qkv.unbind(2), anchor=anchor, layouts=layouts)  # no RoPE: the generic path
    assert not triton_impl.LAUNCH_STATS["fwd_aligned_8"]
    assert not triton_impl.LAUNCH_STATS["bwd_aligned_8"]
    _check_triton(*qkv.unbind(2), positions=pos, anchor=anchor, layouts=layouts)  # RoPE: copies
    assert triton_impl.LAUNCH_STATS["fwd_aligned_8"] and triton_impl.LAUNCH_STATS["bwd_aligned_8"]


@pytest.mark.parametrize("starts_on_device", [False, True])
def test_anchor_skip_launches_no_query_work(triton_device, monkeypatch, starts_on_device):
    """Structural check: no query work for the anchor rows of b != source. The forward launches
    source's tiles plus cdiv(N - length, BLOCK_M) + 1 slots per other sequence (mapped to row
    ranges on the device from starts, so a device tensor of starts works without a sync), and
    the rows it skips are never computed: their log-sum-exp stays unwritten (NaN here). The
    backward's key-tile programs visit B*N - (B-1)*length query rows."""
    from kernels.attention import triton_impl

    batch, frames, per_frame = 4, 4, 32
    n = frames * per_frame
    starts = [0, 2 * per_frame, 3 * per_frame - 5, per_frame - 3]  # two not tile aligned
    q, k, v = _leaves(*_qkv(batch, n, n, 1, 16, torch.float32, triton_device))
    anchor_starts = torch.tensor(starts, device=triton_device) if starts_on_device else starts
    real_empty = torch.empty
    monkeypatch.setattr(triton_impl.torch, "empty", lambda *shape, dtype=None, device=None, **kw:
                        nan_empty(*shape, dtype=dtype or torch.float32, device=device or "cpu"))
    out, lse = triton_impl.attention3d_fwd(q.detach(), k.detach(), v.detach(), None, None,
                                           (8, 4, 4), 1e4, (anchor_starts, per_frame, 2), 0.25)
    monkeypatch.setattr(triton_impl.torch, "empty", real_empty)
    stats = dict(triton_impl.LAUNCH_STATS)
    block_m = stats["fwd_block_m"]
    assert per_frame % block_m == 0
    # cost scales with B*(T-1)+1 frames (+ one slot per other sequence), not B*T
    frames_done = batch * (frames - 1) + 1
    assert stats["fwd_query_tiles"] == frames_done * per_frame // block_m + batch - 1
    assert stats["fwd_dense_query_tiles"] == batch * frames * per_frame // block_m
    for b in range(batch):
        skipped = torch.zeros(n, dtype=torch.bool)
        if b != 2:
            skipped[starts[b]:starts[b] + per_frame] = True
        assert torch.isnan(lse[b, :, skipped]).all() and torch.isfinite(lse[b, :, ~skipped]).all()
    assert torch.isfinite(out).all()
    expected = attention3d_ref(q, k, v, anchor=(starts, per_frame, 2), scale=0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    kernels.attention3d(q, k, v, anchor=Anchor(anchor_starts, per_frame, source=2),
                        backend="triton").sum().backward()
    assert triton_impl.LAUNCH_STATS["bwd_query_rows"] == batch * n - (batch - 1) * per_frame
    assert triton_impl.LAUNCH_STATS["bwd_dense_query_rows"] == batch * n


def test_triton_writes_every_element(triton_device, monkeypatch):
    """Outputs allocated as NaN must come back fully written (copied anchor rows included)."""
    from kernels.attention import triton_impl

    real_empty = torch.empty

    def nan_alloc(*shape, dtype=None, device=None, **kw):
        return nan_empty(*shape, dtype=dtype or torch.float32, device=device or "cpu")

    monkeypatch.setattr(triton_impl.torch, "empty", nan_alloc)
    q, k, v = _qkv(3, 40, 40, 1, 16, torch.float32, triton_device)
    anchor = ([0, 30, 10], 10, 1)
    pos = _grid_positions(4, 10, 1).to(triton_device)
    out, lse = triton_impl.attention3d_fwd(q, k, v, pos[None].expand(3, -1, -1),
                                           pos[None].expand(3, -1, -1), (8, 4, 4), 1e4, anchor,
                                           0.25)
    assert torch.isfinite(out).all()
    grads = triton_impl.attention3d_bwd(torch.randn_like(out), q, k, v, out, lse,
                                        pos[None].expand(3, -1, -1), pos[None].expand(3, -1, -1),
                                        (8, 4, 4), 1e4, anchor, 0.25)
    assert all(torch.isfinite(g).all() for g in grads)
    monkeypatch.setattr(triton_impl.torch, "empty", real_empty)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rope3d_matches_reference(triton_device, dtype, interleaved):
    x = torch.randn(2, 37, 3, 40, dtype=dtype, device=triton_device)
    pos = (_frames_positions(37, 1, 1, t0=1e4, batch=2) * 0.7).to(triton_device)
    (leaf,) = _leaves(x)
    y = kernels.rope3d(leaf, pos, interleaved=interleaved, backend="triton")
    dy = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, leaf, dy)
    (ref_leaf,) = _leaves(x.double())
    ref = rope3d_ref(ref_leaf, pos, default_rope_dims(40), interleaved=interleaved)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, dy.double())
    (low_leaf,) = _leaves(x)
    low = rope3d_ref(low_leaf, pos, default_rope_dims(40), interleaved=interleaved)
    (low_grad,) = torch.autograd.grad(low, low_leaf, dy)
    assert_within_tolerance(y, ref, low, name="rope3d")
    assert_within_tolerance(grad, ref_grad, low_grad, factor=3.0, name="drope3d")


# ----------------------------------------------------------------------------------------------
# Interleaved RoPE (diffusers' Wan / CogVideoX / HunyuanVideo convention)


def _diffusers_style_cos_sin(pos, dims, theta, head_dim):
    """[N, D] cos / sin tables the way diffusers' Wan builds them: per part, the angles of pair i
    repeated twice (repeat_interleave), parts concatenated; an unrotated tail gets cos 1, sin 0."""
    cos, sin = [], []
    for axis, d in enumerate(dims):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)          # [d/2]
        angle = pos[:, axis, None].double() * freqs                                # [N, d/2]
        cos.append(angle.cos().repeat_interleave(2, dim=1))
        sin.append(angle.sin().repeat_interleave(2, dim=1))
    tail = head_dim - sum(dims)
    cos.append(torch.ones(pos.shape[0], tail, dtype=torch.float64))
    sin.append(torch.zeros(pos.shape[0], tail, dtype=torch.float64))
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def test_interleaved_ref_matches_independent_and_diffusers():
    x = torch.randn(2, 12, 3, 40, dtype=torch.float64)
    pos = _grid_positions(3, 2, 2).double() * 0.37 + torch.tensor([1e3, 0.5, -2.25],
                                                                  dtype=torch.float64)
    dims = (16, 8, 12)  # unequal parts and an unrotated tail of 4 columns
    pos_b = pos[None].expand(2, -1, -1)
    out = rope3d_ref(x, pos_b, dims, 500.0, interleaved=True)
    torch.testing.assert_close(out, _rotate_complex(x, pos_b, dims, 500.0, interleaved=True),
                               rtol=0, atol=1e-12)
    # the default stays rotate-half, which differs
    assert (rope3d_ref(x, pos_b, dims, 500.0) - out).abs().max() > 0.1
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    cos, sin = _diffusers_style_cos_sin(pos, dims, 500.0, 40)
    theirs = embeddings.apply_rotary_emb(x.transpose(1, 2), (cos, sin), use_real=True,
                                         use_real_unbind_dim=-1).transpose(1, 2)
    torch.testing.assert_close(out, theirs, rtol=0, atol=1e-6)  # (diffusers rotates in fp32)
    pub = kernels.rope3d(x.float(), pos, rope_dims=dims, rope_theta=500.0, interleaved=True,
                         backend="ref")
    torch.testing.assert_close(pub.double(), theirs, rtol=0, atol=2e-4)


def test_interleaved_attention_ref_matches_independent():
    q, k, v = _qkv(3, 12, 12, 2, 40)
    pos = _grid_positions(3, 2, 2).double() + 0.25
    pos_b = pos[None].expand(3, -1, -1)
    anchor = ([0, 8, 4], 4, 1)
    out = attention3d_ref(q, k, v, q_pos=pos_b, k_pos=pos_b, anchor=anchor, interleaved=True)
    exp = _independent_attention(q, k, v, pos_b, pos_b, default_rope_dims(40), 10000.0, anchor,
                                 1 / math.sqrt(40), interleaved=True)
    torch.testing.assert_close(out, exp, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interleaved_attention(triton_device, dtype):
    """Interleaved pairs through the fused path: anchor (redirected keys rotated with b's
    positions), D = 72 (three parts of 24), fractional positions; output and every gradient."""
    q, k, v = _qkv(3, 45, 45, 2, 72, dtype, triton_device)
    pos = (_frames_positions(3, 5, 3, batch=3) * 1.5 + 0.25).to(triton_device)
    _check_triton(q, k, v, positions=pos, anchor=([0, 30, 15], 15, 1), interleaved=True)


def test_interleaved_must_be_bool():
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(TypeError, match="interleaved must be a bool, got int"):
        kernels.rope3d(x, torch.zeros(4, 3), interleaved=1)
    with pytest.raises(TypeError, match="interleaved must be a bool, got str"):
        kernels.attention3d(x, x, x, interleaved="yes")


# ----------------------------------------------------------------------------------------------
# Edge cases of issue 13: huge positions, non-finite positions, zero sizes, named errors


def test_triton_rope_keeps_accuracy_at_huge_positions(triton_device):
    """t up to 3e7: the angle p * f is rounded to fp32 by both backends (the spec); the Triton
    tables then evaluate cos / sin of exactly that fp32 angle, so the backends agree to fp32
    rounding, where a two-constant in-kernel reduction was off by 0.07 at 1e6 and 1.3 at 1e7."""
    t = torch.tensor([0.0, 1e6, 1e6 + 0.5, 1e7, 1e7 + 3.0, 3e7, -2e7, 12345.678])
    pos = torch.stack([t, t * 0.5, -t], dim=-1).to(triton_device)                   # [8, 3]
    x = torch.randn(2, 8, 3, 40, device=triton_device)
    for interleaved in (False, True):
        tri = kernels.rope3d(x, pos, interleaved=interleaved, backend="triton")
        ref = kernels.rope3d(x, pos, interleaved=interleaved, backend="ref")
        torch.testing.assert_close(tri, ref, rtol=0, atol=1e-5)
    q, k, v = _qkv(1, 8, 8, 2, 40, torch.float32, triton_device)
    tri = kernels.attention3d(q, k, v, positions=pos, backend="triton")
    ref = kernels.attention3d(q, k, v, positions=pos, backend="ref")
    torch.testing.assert_close(tri, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_positions_are_named(bad):
    x = torch.randn(1, 4, 1, 16)
    pos = torch.zeros(4, 3)
    pos[2, 1] = bad
    with pytest.raises(ValueError, match=f"positions must be finite, got a {bad} entry"):
        kernels.attention3d(x, x, x, positions=pos)
    with pytest.raises(ValueError, match="k_positions must be finite"):
        kernels.attention3d(x, x, x, positions=(torch.zeros(4, 3), pos))
    with pytest.raises(ValueError, match="positions must be finite"):
        kernels.rope3d(x, pos[None])


@pytest.mark.parametrize("shape", [(0, 5, 2, 16), (2, 0, 2, 16), (2, 5, 0, 16)])
def test_rope3d_zero_size_same_on_both_backends(triton_device, shape):
    x = torch.randn(*shape, device=triton_device, requires_grad=True)
    pos = torch.zeros(shape[1], 3, device=triton_device)
    outs = []
    for backend in ("ref", "triton"):
        y = kernels.rope3d(x, pos, backend=backend)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert y.shape == x.shape and grad.shape == x.shape
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("shape", [(0, 5, 2, 16), (2, 5, 0, 16)])
def test_attention3d_zero_batch_or_heads_same_on_both_backends(triton_device, shape):
    q = torch.randn(*shape, device=triton_device, requires_grad=True)
    pos = torch.zeros(shape[1], 3, device=triton_device)
    for backend in ("ref", "triton"):
        out = kernels.attention3d(q, q, q, positions=pos, backend=backend)
        (grad,) = torch.autograd.grad(out.sum(), q)
        assert out.shape == q.shape and grad.shape == q.shape


def test_device_errors_name_the_right_argument():
    x = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match=r"positions must be on the same device as x \(cpu\), "
                                         r"got meta"):
        kernels.rope3d(x, torch.zeros(4, 3, device="meta"))
    meta_starts = torch.zeros(2, dtype=torch.int64, device="meta")
    q = torch.randn(2, 4, 1, 16)
    with pytest.raises(ValueError, match=r"anchor.starts must be a tensor on the CPU or on q's "
                                         r"device \(cpu\), got one on meta"):
        kernels.attention3d(q, q, q, anchor=Anchor(meta_starts, 2))


def test_cpu_tensor_starts_are_validated():
    q = torch.randn(2, 6, 1, 16)
    with pytest.raises(ValueError, match=r"anchor.starts\[1\].*got 5"):
        kernels.attention3d(q, q, q, anchor=Anchor(torch.tensor([0, 5]), 2))
    with pytest.raises(ValueError, match="anchor.starts must have B=2 entries, got 3"):
        kernels.attention3d(q, q, q, anchor=Anchor(torch.tensor([0, 1, 2]), 2))


def test_launchers_do_not_sync_or_copy_host_lists(triton_device, monkeypatch):
    """Issue 15 item 7: once the per-configuration caches are warm, the Triton launchers (forward,
    backward, rope3d) call no .item() / .tolist() / .cpu() / .numpy() and build no tensor from a
    Python list, so they can be captured in a CUDA graph and never stall the stream. Starts are a
    tensor on the device (never read on the host) or a list (copied once, then cached)."""
    import sys

    from kernels.attention import triton_impl as ti

    batch, n, dims = 3, 40, (8, 4, 4)
    q, k, v = _qkv(batch, n, n, 2, 16, torch.float32, triton_device)
    pos = _grid_positions(4, 10, 1).to(triton_device)[None].expand(batch, -1, -1)
    dev_starts = torch.tensor([0, 30, 10], device=triton_device)

    def run(starts):
        out, lse = ti.attention3d_fwd(q, k, v, pos, pos, dims, 1e4, (starts, 10, 1), 0.25, True)
        ti.attention3d_bwd(torch.ones_like(out), q, k, v, out, lse, pos, pos, dims, 1e4,
                           (starts, 10, 1), 0.25, True)
        ti.rope3d_bwd(ti.rope3d_fwd(q, pos, dims, 1e4), pos, dims, 1e4)

    run([0, 30, 10])  # warm the caches (column tables, list starts)
    calls = []

    def guard(name, real):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename == ti.__file__:
                calls.append(name)
            return real(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", guard("torch.tensor", torch.tensor))
    run(dev_starts)
    run([0, 30, 10])
    assert calls == []
    ti._STARTS_CACHE.clear()
    run([0, 30, 10])  # (the guard does see a launcher's host-list copy)
    assert calls == ["torch.tensor"]


def test_torch_compile_traces_triton_path(triton_device):
    q, k, v = _leaves(*_qkv(2, 20, 20, 1, 16, torch.float32, triton_device))
    pos = _grid_positions(2, 2, 5).to(triton_device)

    def f(a, b, c):
        rot = kernels.rope3d(a, pos, backend="triton")
        return kernels.attention3d(rot, b, c, positions=pos, anchor=Anchor([0, 10], 10),
                                   backend="triton").sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    out.backward()
    pb = pos[None].expand(2, -1, -1)
    dims = default_rope_dims(16)
    expected = attention3d_ref(rope3d_ref(q, pb, dims), k, v, q_pos=pb, k_pos=pb,
                               anchor=([0, 10], 10, 0)).sum()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert q.grad is not None and torch.isfinite(q.grad).all()

# ----------------------------------------------------------------------------------------------
# Compiled path without a GPU: ahead-of-time compile for sm_80 / sm_90 (a subprocess, since the
# interpreter replaces triton.jit at decoration time)

_AOT_SCRIPT = r"""
import re, sys
import torch
from kernels.attention import triton_impl as ti
from kernels.attention.profile import ops_in_loops, products_per_loop, profile
from kernels.testing import compile_for_gpu

arch, which = int(sys.argv[1]), sys.argv[2]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIXED = {**{n: "*fp32" for n in ("lse_ptr", "delta_ptr", "dq_acc_ptr", "cos_ptr", "sin_ptr",
                                  "q_cos_ptr", "q_sin_ptr", "k_cos_ptr", "k_sin_ptr")},
         "meta_ptr": "*i32", "starts_ptr": "*i32", "qk_scale": "fp32", "sm_scale": "fp32",
         "scale": "fp32"}

def count(ptx, pattern):
    return len(re.findall(pattern, ptx))

def build(kernel, dt, dim, consts, aligned_8=True, **options):
    names = kernel.arg_names
    types = {**{n: "*" + dt for n in names if n.endswith("_ptr")}, **FIXED}
    # what the JIT specialises for contiguous [B, N, H, D] with D % 16 == 0 (D = 72: nothing);
    # ALIGNED_8 is what the launchers pass for such tensors (D % 8 == 0, 16-byte pointers)
    aligned = tuple(n for n in names if dim % 16 == 0 and (
        n == "head_dim" or re.fullmatch(r"stride_(q|k|v|o|dk|x|y)_[bnh]|stride_t_[bn]", n)))
    consts = {"BLOCK_D": ti.block_d(dim), "ALIGNED_8": aligned_8, **consts}
    c = compile_for_gpu(kernel, types, consts, arch=arch, aligned=aligned, **options)
    assert ".entry" in c.asm["ptx"] and c.asm["cubin"]
    assert c.metadata.shared <= {80: 166912, 90: 232448}[arch], c.metadata.shared
    ir = c.asm["ttgir"]
    tiles = re.search(r"async_copy_global_to_local[^\n]*tensor<\d+x\d+x!tt.ptr<b?f16", ir)
    ptx = c.asm["ptx"]  # 16-byte vector loads / async copies, scalar 16-bit loads
    loads = (count(ptx, r"ld\.global[^\n]*\.v4\."),
             count(ptx, r"cp\.async\.c[ga]\.shared\.global[^\n]*, 0x10[,;]"),
             count(ptx, r"ld\.global(\.[a-z0-9:]+)*\.b16 "))
    # no trigonometry anywhere (tables), at most 5 products per tile pair in any loop (each one
    # a product per head-dim column block: two blocks for D = 72)
    assert ops_in_loops(ir, r"math\.(sin|cos)\b") == (0, 0), ops_in_loops(ir, r"math\.(sin|cos)")
    blocks = 2 if consts.get("BLOCK_D1") else 1
    assert max(products_per_loop(ir), default=0) <= 5 * blocks, products_per_loop(ir)
    if arch == 90 and aligned_8:  # the Hopper target of issue 15: no spills (not the generic
        assert profile(c)["stack"] == 0, (dim, consts, profile(c))  # path, not sm_80's mma)
    return ("wgmma" if "warp_group_dot" in ir else "mma", "async" if tiles else "sync",
            *map(str, loads))

# (HAS_ROPE, HAS_ANCHOR, dtype, D): the heaviest variant (both flags, BLOCK_D = 128) and no flags
# on each target, the other two combinations once; D = 72 is 64 + 16 columns
COMBOS = {80: [(1, 1, "bf16", 128), (0, 0, "fp16", 72), (1, 0, "fp16", 64)],
          90: [(1, 1, "fp16", 128), (0, 0, "bf16", 64), (0, 1, "bf16", 72)]}
for rope, anchor, dt, dim in COMBOS[arch]:
    flags = {"HAS_ROPE": bool(rope), "HAS_ANCHOR": bool(anchor), "DOT_PRECISION": "tf32",
             "INTERLEAVED": dim == 64}
    if which == "fwd":  # autotune configs: 4 or 8 warps, 2..4 stages (the most shared memory)
        bm, bn = ti.fwd_blocks(dim, DTYPES[dt])
        bd, bd1 = ti.head_blocks(dim)  # D = 72: 64 + 16 columns
        args = (ti._attention3d_fwd_kernel, dt, dim, {"BLOCK_M": bm, "BLOCK_N": bn, **flags,
                                                      "BLOCK_D": bd, "BLOCK_D1": bd1})
        opts = {"num_warps": 8, "num_stages": 4}
    else:
        blocks = dict(zip(("BLOCK_M", "BLOCK_N"), ti.bwd_blocks(dim, DTYPES[dt])))
        blocks["BLOCK_D"], blocks["BLOCK_D1"] = ti.head_blocks(dim)  # D = 72: 64 + 16 columns
        args = (ti._attention3d_bwd_kernel, dt, dim, {**blocks, **flags})
        opts = {"num_warps": 8, "num_stages": 3}
    print(f"{dim}:" + ",".join(build(*args, **opts)))
    if dim == 72:  # the generic path (ALIGNED_8 False: strides not multiples of 8)
        print("72u:" + ",".join(build(*args, aligned_8=False, **opts)))
for i, dt in enumerate(DTYPES):  # every dtype on each target, BLOCK_D = 64 and 128 (and D = 72)
    for dim in ((64, 128)[(i + arch // 10) % 2],) + ((72,) if dt == "bf16" else ()):
        if which == "fwd":  # rope3d_fwd (4 warps): the anchor-redirecting rotation of K
            # (rotate-half) or the inverse one of dq (interleaved)
            res = build(ti._rope3d_kernel, dt, dim, {
                "BLOCK_R": ti.rope_block_rows(dim), "INVERSE": i == 1,
                "INTERLEAVED": i == 1, "HAS_ANCHOR": i != 1})
        else:
            res = build(ti._attention3d_bwd_preprocess_kernel, dt, dim, {"BLOCK_R": 64})
        if dim == 72:
            print("72r:" + ",".join(res))
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_kernels_compile_for_a100_and_hopper(arch, which):
    """Ahead-of-time compile (no GPU) of the attention forward (+ rope3d) or backward
    (+ preprocess) kernels for sm_80 / sm_90 with the launchers' block sizes, bf16 and fp16, D =
    64, 128 and 72 (64 + 16 columns), RoPE and anchor flags on and off: catches
    compiled-path errors the interpreter cannot see and shared memory over the target's limit.
    Every kernel: no sin/cos (RoPE comes from tables), at most 5 products per loop body (the
    FA2 backward), no register spills on sm_90 (aligned paths). On sm_90 the products must
    use wgmma; the K/V (Q/dO) tile loads must be pipelined (async copies) for every D, D = 72
    included: with ALIGNED_8 the kernels show the compiler that head_dim and the row strides are
    multiples of 8, so the tiles move as 16-byte async copies / vector loads with no scalar 16-bit
    loads left. D = 72 is also compiled on the generic path (ALIGNED_8 False, for unaligned
    views), which must compile; its loads are scalar (not asserted)."""
    done = run_compiled_mode(_AOT_SCRIPT, str(arch), which)
    assert done.returncode == 0, done.stderr[-3000:]
    *lines, last = done.stdout.split()
    assert last == "compiled", done.stdout
    results = {line.split(":")[0]: line.split(":")[1].split(",") for line in lines}
    assert sorted(results) == sorted(["64", "128", "72", "72u", "72r"]), done.stdout
    for key, (product, tiles, v4, cp16, scalar16) in results.items():
        if key != "72r":  # (the row kernels have no product and nothing to pipeline)
            assert product == ("wgmma" if arch == 90 else "mma"), (key, results[key])
        if key in ("64", "128", "72"):
            assert tiles == "async", (key, results[key])
        if key == "72":  # (these combos have no RoPE) every tile load is 16-byte
            assert int(v4) + int(cp16) > 0 and int(scalar16) == 0, (key, results[key])
        if key == "72r":  # rope3d / preprocess rows; rope3d's partner-column loads stay scalar
            assert int(v4) > 0, (key, results[key])


# ----------------------------------------------------------------------------------------------
# GPU lane: real shapes, every dtype


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 72, 128])
def test_gpu_sdit_shapes_with_anchor(dtype, dim):
    batch, frames, per_frame, heads = 4, 4, 256, 4
    q, k, v = _qkv(batch, frames * per_frame, frames * per_frame, heads, dim, dtype, "cuda")
    pos = _frames_positions(frames, 16, 16).cuda()
    starts = [0, per_frame, 3 * per_frame, 2 * per_frame]
    _check_triton(q, k, v, positions=pos, anchor=(starts, per_frame, 0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_lookahead_cross_and_odd(dtype):
    q, k, v = _qkv(2, 1203, 1560 + 203, 2, 128, dtype, "cuda")
    qp = _frames_positions(3, 401, 1).cuda()
    kp = torch.cat([_frames_positions(4, 390, 1), _frames_positions(1, 203, 1, t0=1e4)]).cuda()
    _check_triton(q, k, v, positions=(qp, kp))
    q, k, v = _qkv(1, 203, 203, 3, 256, dtype, "cuda")
    _check_triton(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_wan_like_interleaved_with_device_starts(dtype):
    """Wan-like head dim 128, interleaved pairs, anchor starts as a device tensor, t = 1e4."""
    q, k, v = _qkv(3, 3 * 390, 3 * 390, 2, 128, dtype, "cuda")
    pos = _frames_positions(3, 15, 26, t0=1e4).cuda()
    _check_triton(q, k, v, positions=pos, anchor=([0, 390, 780], 390, 1), interleaved=True)
    out = kernels.attention3d(q, k, v, positions=pos, interleaved=True,
                              anchor=Anchor(torch.tensor([0, 390, 780], device="cuda"), 390, 1))
    ref = kernels.attention3d(q, k, v, positions=pos, interleaved=True,
                              anchor=Anchor([0, 390, 780], 390, 1))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    q, k, v = _qkv(2, 512, 512, 4, 64, torch.bfloat16, "cuda")
    pos = _frames_positions(2, 16, 16).cuda()
    f = torch.compile(lambda a, b, c: kernels.attention3d(a, b, c, positions=pos,
                                                          anchor=Anchor([0, 256], 256)))
    out = f(q, k, v)
    ref = kernels.attention3d(q, k, v, positions=pos, anchor=Anchor([0, 256], 256))
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_with_device_starts():
    """No host sync anywhere in forward + backward (device starts, RoPE, anchor): the whole step
    captures into a CUDA graph and replays to the eager result."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 512, 512, 4, 64, torch.bfloat16, "cuda"))
    pos = _frames_positions(2, 16, 16).cuda()
    starts = torch.tensor([0, 256], device="cuda")

    def step():
        out = kernels.attention3d(q, k, v, positions=pos, anchor=Anchor(starts, 256),
                                  interleaved=True)
        out.float().square().sum().backward()
        return out

    for _ in range(2):  # warm up (autotuning, caches) outside the capture
        expected = step().detach().clone()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)
    for t, g in zip((q, k, v), grads):
        torch.testing.assert_close(t.grad, g, rtol=2e-2, atol=2e-2)
