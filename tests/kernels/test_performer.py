"""performer_attention / orthogonal_features: reference vs an independent dense fp64 formula,
gradcheck, approximation of softmax attention, Triton (interpreter on CPU, compiled on GPU) vs
reference for the output and every gradient, causal prefix property, large-norm inputs, validation.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import kernels
from kernels.performer.ref import performer_attention_ref
from kernels.testing import (
    assert_within_tolerance,
    eager_and_graph_replay,
    nan_empty,
    run_compiled_mode,
)


def _qkv(batch, seq_len, heads, head_dim, dtype=torch.float32, device="cpu", norm=None):
    out = []
    for _ in range(3):
        x = torch.randn(batch, seq_len, heads, head_dim, dtype=torch.float64)
        if norm is not None:  # every row on the sphere of radius `norm`
            x = norm * x / x.norm(dim=-1, keepdim=True)
        out.append(x.to(device=device, dtype=dtype))
    return out


def _features(m, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return kernels.orthogonal_features(m, d, generator=gen, dtype=dtype, device=device)


def dense_fp64(q, k, v, w, causal):
    """The issue's formula verbatim, in float64: explicit phi, explicit N x N kernel matrix."""
    q, k, v, w = (t.double() for t in (q, k, v, w))
    d, m = q.shape[-1], w.shape[0]

    def phi(x):                                                  # [B, N, H, D] -> [B, H, N, M]
        x = x * d ** -0.25
        proj = torch.einsum("bnhd,md->bhnm", x, w)
        return torch.exp(proj - 0.5 * (x * x).sum(-1).transpose(1, 2)[..., None]) / math.sqrt(m)

    kern = phi(q) @ phi(k).transpose(-1, -2)                     # [B, H, N, N]
    if causal:
        kern = kern.tril()
    out = (kern @ v.transpose(1, 2)) / kern.sum(-1, keepdim=True)
    return out.transpose(1, 2)


def lowp_favor(q, k, v, w, causal):
    """Plain PyTorch FAVOR+ entirely in the input dtype (Performer's usual stabilisers): the
    baseline of the tolerance rule."""
    d = q.shape[-1]
    qh, kh = q * d ** -0.25, k * d ** -0.25
    a = torch.einsum("bnhd,md->bhnm", qh, w)
    b = torch.einsum("bnhd,md->bhnm", kh, w) - 0.5 * (kh * kh).sum(-1).transpose(1, 2)[..., None]
    qa = torch.exp(a - a.amax(-1, keepdim=True).detach())
    kb = torch.exp(b - b.amax((-1, -2), keepdim=True).detach())
    kern = qa @ kb.transpose(-1, -2)
    if causal:
        kern = kern.tril()
    return ((kern @ v.transpose(1, 2)) / kern.sum(-1, keepdim=True)).transpose(1, 2)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ----------------------------------------------------------------------------------------------
# Reference


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 113, 3, 40, 148), (1, 1, 1, 8, 3), (1, 130, 2, 16, 7)])
def test_ref_matches_dense_fp64(causal, shape):
    batch, n, heads, d, m = shape
    q, k, v = _qkv(batch, n, heads, d, torch.float64)
    w = _features(m, d, torch.float64)
    out = kernels.performer_attention(q, k, v, w, causal=causal, backend="ref")
    torch.testing.assert_close(out, dense_fp64(q, k, v, w, causal), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_ref_gradcheck(causal):
    q, k, v = _leaves(*_qkv(1, 6, 2, 4, torch.float64))
    w = _features(7, 4, torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, c: performer_attention_ref(a, b, c, w, causal), (q, k, v), fast_mode=True)


def test_orthogonal_features_structure_and_redraw():
    d, m = 16, 40                                     # two full blocks and a truncated one
    w = _features(m, d, torch.float64, seed=3)
    assert w.shape == (m, d) and w.dtype == torch.float64
    for start in range(0, m, d):
        block = w[start:start + d]
        gram = block @ block.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10               # rows of a block are orthogonal
    norms = w.norm(dim=1)
    assert norms.std() > 0.1                          # chi-distributed norms, not all sqrt(D)
    torch.testing.assert_close(_features(m, d, torch.float64, seed=3), w, rtol=0, atol=0)
    assert not torch.allclose(_features(m, d, torch.float64, seed=4), w)
    big = _features(4096, d, torch.float64, seed=5)   # row norms follow chi(D): E|w|^2 = D
    assert abs(big.square().sum(1).mean().item() / d - 1) < 0.05
    assert _features(5, 64, torch.float16).dtype == torch.float16


def test_approximates_softmax_attention_as_features_grow():
    """FAVOR+ estimates exp(q.k / sqrt(D)); the error vs exact softmax attention must shrink as M
    grows (averaged over feature draws, fixed seeds)."""
    q, k, v = _qkv(1, 64, 2, 16, torch.float64)
    q, k = 0.5 * q, 0.5 * k
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    errors = []
    for m in (8, 32, 128, 512):
        errs = [(kernels.performer_attention(q, k, v, _features(m, 16, torch.float64, seed=s),
                                             backend="ref") - exact).abs().mean().item()
                for s in range(4)]
        errors.append(sum(errs) / len(errs))
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.35 * errors[0], errors


def test_ref_large_norm_fp16_long_sequence_is_finite():
    """N = 8192, fp16 rows of norm 20: no inf or NaN and close to fp64, both cases."""
    q, k, v = _qkv(1, 8192, 1, 64, torch.float16, norm=20.0)
    w = _features(266, 64, torch.float16)
    for causal in (False, True):
        out = kernels.performer_attention(q, k, v, w, causal=causal, backend="ref")
        assert torch.isfinite(out).all()
        ref = performer_attention_ref(q.double(), k.double(), v.double(), w.double(), causal)
        assert (out.double() - ref).abs().max() < 0.05


# ----------------------------------------------------------------------------------------------
# Triton vs reference (interpreter on CPU)

CASES = [  # (B, N, H, D, M): odd N, M not a power of two (two feature blocks), one token,
    # D not a multiple of 8 (the kernels' generic path, ALIGNED_8 off)
    (1, 37, 2, 16, 20),
    (2, 29, 1, 40, 45),
    (1, 1, 1, 16, 5),
    (1, 23, 2, 12, 20),
]


def _check_triton(shape, dtype, causal, device, oracle):
    """Triton output and q, k, v gradients vs ``oracle`` on fp64 leaves, under the tolerance rule
    (baseline: plain-PyTorch FAVOR+ in the same low precision)."""
    batch, n, heads, d, m = shape
    inputs = _qkv(batch, n, heads, d, dtype, device)
    w = _features(m, d, dtype, device)
    leaves = _leaves(*inputs)
    out = kernels.performer_attention(*leaves, w, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = _leaves(*(t.double() for t in inputs))
    ref = oracle(*ref_leaves, w, causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = _leaves(*inputs)
    low = lowp_favor(*low_leaves, w, causal)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_within_tolerance(out, ref, low, name="out")
    for name, g, rg, lg in zip("qkv", grads, ref_grads, low_grads):
        assert_within_tolerance(g, rg, lg, factor=3.0, floor=1e-4, name=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(triton_device, dtype, causal, case):
    _check_triton(case, dtype, causal, triton_device, dense_fp64)


def test_triton_strided_inputs(triton_device):
    """q, k, v as views of one packed [B, N, 3, H, D] projection (no copies)."""
    qkv = torch.randn(2, 19, 3, 2, 16, device=triton_device)
    q, k, v = qkv.unbind(2)
    w = _features(24, 16, device=triton_device)
    for causal in (False, True):
        out = kernels.performer_attention(q, k, v, w, causal=causal, backend="triton")
        torch.testing.assert_close(out.double(), dense_fp64(q, k, v, w, causal),
                                   rtol=0, atol=2e-5)


def test_triton_writes_every_element(triton_device, monkeypatch):
    """Every buffer the launchers allocate starts as NaN and must come back fully written."""
    from kernels.performer import triton_impl

    real_full = torch.full

    def nan_tensor(*shape, device=None, dtype=torch.float32):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        return real_full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(triton_impl.torch, "empty", nan_tensor)
    monkeypatch.setattr(triton_impl.torch, "empty_like",
                        lambda t: nan_tensor(t.shape, device=t.device, dtype=t.dtype))
    for m in (12, 40):                                 # one and three feature blocks
        q, k, v = _qkv(1, 21, 2, 16, device=triton_device)
        w = _features(m, 16, device=triton_device)
        for causal in (False, True):
            out, *saved = triton_impl.performer_fwd(q, k, v, w, causal)
            assert all(torch.isfinite(t).all() for t in (out, *saved))
            grads = triton_impl.performer_bwd(torch.randn_like(q), q, k, v, w, out, *saved,
                                              causal)
            assert all(torch.isfinite(g).all() for g in grads)
    assert torch.isnan(nan_empty(2)).all()


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_causal_prefix_is_bitwise_independent_of_the_future(triton_device, backend):
    """Perturbing tokens from position p on leaves outputs before p bit-identical (p inside a
    chunk of either backend)."""
    n, p = (150, 70) if backend == "ref" else (45, 23)
    q, k, v = _qkv(1, n, 2, 16, device=triton_device)
    w = _features(20, 16, device=triton_device)
    out = kernels.performer_attention(q, k, v, w, causal=True, backend=backend)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, p:] = 3.0 * torch.randn_like(t[:, p:])
    out2 = kernels.performer_attention(q2, k2, v2, w, causal=True, backend=backend)
    assert torch.equal(out[:, :p], out2[:, :p])
    assert not torch.equal(out[:, p:], out2[:, p:])


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("poison", ["nan_k", "inf_k", "ninf_k", "nan_v", "inf_v"])
def test_causal_nonfinite_future_token_does_not_leak(triton_device, backend, poison):
    """A NaN/inf in k[7] or v[7] leaves outputs 0..6 finite and bitwise unchanged (the token
    sits inside a chunk of either backend, so masked future entries are selected, never
    multiplied by 0); output 7 itself is non-finite."""
    q, k, v = _qkv(1, 21, 2, 16, device=triton_device)
    w = _features(20, 16, device=triton_device)
    out = kernels.performer_attention(q, k, v, w, causal=True, backend=backend)
    k2, v2 = k.clone(), v.clone()
    value = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")}[poison[:-2]]
    (k2 if poison.endswith("k") else v2)[:, 7, :, 3] = value
    out2 = kernels.performer_attention(q, k2, v2, w, causal=True, backend=backend)
    assert torch.isfinite(out2[:, :7]).all()
    assert torch.equal(out[:, :7], out2[:, :7])
    assert not torch.isfinite(out2[:, 7]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_triton_norm_30_fp16_is_finite_and_accurate(triton_device, causal):
    """Rows of norm 30 in fp16 at D = 64 (logits up to ~|w| 30 / 64^(1/4) ~ 100, far past
    exp's fp32 range): output and every gradient finite, and close to the fp64 reference
    (relative to the gradient's scale). N = 8192 in bf16 runs in the GPU lane; the README gives
    the argument why nothing grows with N."""
    q, k, v = _qkv(1, 80, 1, 64, torch.float16, triton_device, norm=30.0)
    w = _features(70, 64, torch.float16, triton_device)        # five feature blocks
    leaves = _leaves(q, k, v)
    out = kernels.performer_attention(*leaves, w, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = _leaves(q.double(), k.double(), v.double())
    ref = performer_attention_ref(*ref_leaves, w.double(), causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out.double() - ref).abs().max() < 0.05
    for g, rg in zip(grads, ref_grads):
        assert (g.double() - rg).abs().max() < 0.05 * rg.abs().max() + 1e-3


def test_torch_compile_traces_triton_path(triton_device):
    q, k, v = _leaves(*_qkv(1, 17, 2, 16, device=triton_device))
    w = _features(20, 16, device=triton_device)

    def f(a, b, c):
        return kernels.performer_attention(a, b, c, w, causal=True, backend="triton").sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    out.backward()
    torch.testing.assert_close(out.double(), dense_fp64(q, k, v, w, True).sum(), rtol=1e-5,
                               atol=1e-4)
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------------------------
# Validation and dispatch


@pytest.mark.parametrize("bad, match", [
    (lambda q, w: (q, q, q, w[:, :8]),
     r"features must have shape \[M, D\] with D = 16.*got \[5, 8\]"),
    (lambda q, w: (q, q, q, w[:0]), r"features must have at least one row \(M >= 1\), got M=0"),
    (lambda q, w: (q, q[:, :3], q, w), r"k must have shape \[2, 4, 3, 16\].*got \[2, 3, 3, 16\]"),
    (lambda q, w: (q, q, q[..., :8], w), r"v must have shape \[2, 4, 3, 16\]"),
    (lambda q, w: (q, q.half(), q, w), "k must have the same dtype as q"),
    (lambda q, w: (q, q, q, w.half()), "features must have the same dtype as q"),
    (lambda q, w: (q, q, q.to("meta"), w), r"v must be on the same device as q \(cpu\), got meta"),
    (lambda q, w: (q[0], q[0], q[0], w), "q must be 4-D, got 3-D"),
    (lambda q, w: (q.int(), q, q, w), "q must have dtype in"),
    (lambda q, w: (q, q, q, w[0]), "features must be 2-D, got 1-D"),
    (lambda q, w: (q, q, "v", w), "v must be a torch.Tensor, got str"),
])
def test_bad_input_is_named(bad, match):
    q = torch.randn(2, 4, 3, 16)
    w = torch.randn(5, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.performer_attention(*bad(q, w))


def test_bad_causal_and_feature_arguments():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(TypeError, match="causal must be a bool, got int"):
        kernels.performer_attention(q, q, q, torch.randn(3, 8), causal=1)
    with pytest.raises(ValueError, match="num_features must be >= 1, got 0"):
        kernels.orthogonal_features(0, 8)
    with pytest.raises(TypeError, match="head_dim must be an int, got float"):
        kernels.orthogonal_features(4, 8.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        kernels.orthogonal_features(4, 8, generator=1)
    with pytest.raises(TypeError, match=r"dtype must be one of \(torch.float32, .*got torch.int32"):
        kernels.orthogonal_features(4, 8, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype, one of \(torch.float32, "
                                        r".*\), got str 'float32'"):
        kernels.orthogonal_features(4, 8, dtype="float32")


def test_registry_reasons_and_empty_input():
    reasons = kernels.available_backends("performer_attention", device="cpu")
    assert reasons["ref"] == []
    from kernels.performer.op import _head_dim_limit
    from kernels.registry import CallInfo

    why = _head_dim_limit(CallInfo(torch.device("cpu"), torch.float16, {"D": 256}))
    assert why == ["head dim D=256 exceeds the Triton kernel's limit D <= 128"]
    q = torch.randn(0, 5, 2, 8, requires_grad=True)
    out = kernels.performer_attention(q, q, q, torch.randn(3, 8))
    assert out.shape == q.shape
    out.sum().backward()


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(0, 5, 2, 8), (2, 0, 2, 8), (2, 5, 0, 8)])
def test_zero_size_inputs_give_empty_results_on_every_backend(triton_device, backend, causal,
                                                             shape):
    q = torch.randn(*shape, device=triton_device, requires_grad=True)
    w = _features(3, 8, device=triton_device)
    out = kernels.performer_attention(q, q, q, w, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert grad.shape == q.shape


# ----------------------------------------------------------------------------------------------
# GPU lane: real shapes, every dtype


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 300, 8, 64, 266), (2, 1800, 4, 40, 148),
                                   (8, 32, 16, 64, 64), (1, 203, 2, 64, 256)])
def test_gpu_triton_matches_reference(dtype, causal, shape):
    _check_triton(shape, dtype, causal, "cuda", performer_attention_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_long_large_norm_is_finite_and_causal(dtype):
    q, k, v = _qkv(2, 8192, 4, 64, dtype, "cuda", norm=30.0)
    w = _features(266, 64, dtype, "cuda")
    for causal in (False, True):
        leaves = _leaves(q, k, v)
        out = kernels.performer_attention(*leaves, w, causal=causal, backend="triton")
        grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        ref = performer_attention_ref(q.double(), k.double(), v.double(), w.double(), causal)
        assert (out.double() - ref).abs().max() < 0.1
    p = 5000
    k2 = k.clone()
    k2[:, p:] = -k2[:, p:]
    a = kernels.performer_attention(q, k, v, w, causal=True, backend="triton")
    b = kernels.performer_attention(q, k2, v, w, causal=True, backend="triton")
    assert torch.equal(a[:, :p], b[:, :p])


_AOT_SCRIPT = """
import math
from kernels.attention.profile import profile
from kernels.performer import triton_impl as ti
from kernels.testing import compile_for_gpu

count = 0
for arch, dt, head_dims in ((80, "fp16", (64,)), (90, "bf16", (40, 64))):
    for head_dim in head_dims:
        n_features = round(head_dim * math.log(head_dim))                    # the default M
        types = {name: "*" + dt for name in ("q_ptr", "k_ptr", "v_ptr", "w_ptr", "do_ptr",
                                             "x_ptr", "y_ptr", "o_ptr", "dq_ptr", "dk_ptr",
                                             "dv_ptr")}
        types.update({name: "*fp32" for name in ("lse_ptr", "rowmax_ptr", "state_ptr",
                                                 "norm_ptr", "cmax_ptr")}, scale="fp32")
        variants = [(ti._performer_state_kernel, {"QUERY_SIDE": side}) for side in (0, 1)]
        variants += [(ti._performer_fwd_kernel, {"CAUSAL": causal}) for causal in (0, 1)]
        variants += [(ti._performer_bwd_kernel, {"CAUSAL": causal, "KEY_GRADS": key})
                     for causal in (0, 1) for key in (0, 1)]
        for kernel, flags in variants:
            cfg = ti.config(7200, head_dim, n_features, causal=bool(flags.get("CAUSAL")))
            consts = {"BLOCK_N": cfg.block_n, "BLOCK_M": cfg.block_m, "BLOCK_D": cfg.block_d,
                      "FEAT_BF16": dt == "bf16", "PREC": "tf32", "ALIGNED_8": True}
            compiled = compile_for_gpu(kernel, types, {**consts, **flags}, arch=arch,
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            ptx = compiled.asm["ptx"]
            assert ".entry" in ptx
            if arch == 90:  # every product on Hopper's warpgroup tensor cores
                assert "wgmma.mma_async" in ptx and "mma.sync" not in ptx, (kernel, flags)
                # and no spill but in the causal backward (its chunk code, see the README)
                if not (kernel is ti._performer_bwd_kernel and flags["CAUSAL"]):
                    assert profile(compiled)["stack"] == 0, (kernel, flags, head_dim)
            count += 1
print("compiled", count)
"""


@pytest.mark.slow
def test_kernels_compile_for_a100_and_hopper():
    """The compiled path (not the interpreter): the state kernel (both sides), forward and
    backward (both passes), causal and not, at the launcher's GPU tile sizes for the MCDM head
    dims 40 and 64 with the default feature count (five feature blocks at D=64), fp16 on sm_80
    and bf16 on sm_90, where every product must be a wgmma (no mma.sync fallback) and every
    kernel but the causal backward must compile without spills."""
    done = run_compiled_mode(_AOT_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["compiled", "24"], done.stdout


def test_triton_launchers_never_sync_with_the_host(triton_device):
    """Forward and backward, causal and not, several feature blocks: no launcher or op code
    reads a tensor value on the host or copies Python data to the device (issue 15, item 7)."""
    from kernels.testing import forbid_host_syncs

    q, k, v = _leaves(*_qkv(1, 19, 2, 16, device=triton_device))
    w = _features(40, 16, device=triton_device)
    for causal in (False, True):
        with forbid_host_syncs():
            out = kernels.performer_attention(q, k, v, w, causal=causal, backend="triton")
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_and_backward_capture_in_a_cuda_graph(causal):
    """No host sync anywhere in the call: forward and backward record into a CUDA graph and the
    replay reproduces the eager result bit for bit (no atomics)."""
    q, k, v = _leaves(*_qkv(2, 700, 4, 64, torch.bfloat16, "cuda"))
    w = _features(266, 64, torch.bfloat16, "cuda")
    dout = torch.randn_like(q)

    def step():
        out = kernels.performer_attention(q, k, v, w, causal=causal, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    eager, captured = eager_and_graph_replay(step)
    assert all(torch.equal(got, want) for got, want in zip(captured, eager))
