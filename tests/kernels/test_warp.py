"""warp_occlusion / warp: the reference against independent math (integer shifts, grid_sample,
gradcheck), the Triton kernels (interpreter on CPU, compiled on GPU) and the CUDA C++ kernels (GPU
lane) against the fp64 reference for the output and all three gradients, finite differences of
the flow gradient, the NaN rule, deterministic mode, validation messages, registry reasons, and
the CuPy path through DLPack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.flow_warp.ref import warp_occlusion_ref
from kernels.registry import cuda_extension
from kernels.testing import assert_within_tolerance, run_compiled_mode

NAN, INF = float("nan"), float("inf")


def _flow(kind: str, batch: int, height: int, width: int, device="cpu") -> torch.Tensor:
    """Flows whose fractional parts stay in [0.1, 0.9] (no floor crossing between fp32 and fp64
    coordinates, finite differences well defined) unless the kind is integer by design."""
    shape = (batch, height, width, 2)
    frac = 0.1 + 0.8 * torch.rand(shape)
    if kind == "zero":
        flow = torch.zeros(shape)
    elif kind == "integer":
        flow = torch.randint(-2, 3, shape).float()
    elif kind == "fractional":
        flow = torch.randint(-2, 2, shape).float() + frac
    elif kind == "partial":  # many pixels sample across the border or fully outside
        span = torch.tensor([width, height]).float()
        flow = torch.floor((2 * torch.rand(shape) - 1) * span) + frac
    elif kind == "outside":  # every pixel samples at least one pixel beyond the image
        sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
        flow = sign * (torch.tensor([width, height]).float() + 1) + frac
    elif kind == "nonfinite":
        flow = torch.randint(-1, 2, shape).float() + frac
        flat = flow.view(-1, 2)
        flat[0, 0], flat[1, 1], flat[2, 0], flat[3, 1] = NAN, INF, -INF, NAN
        flat[4] = torch.tensor([NAN, INF])
    else:
        raise ValueError(kind)
    return flow.to(device)


def _inputs(batch, height, width, channels, kind, dtype, device, flow_dtype=None):
    h = torch.randn(batch, height, width, channels).to(device, dtype)
    flow = _flow(kind, batch, height, width, device).to(flow_dtype or dtype)
    occ = torch.rand(batch, height, width, 1).to(device, dtype)
    return h, flow, occ


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out, leaves, dout):
    wanted = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, wanted, dout)


# ----------------------------------------------------------------------------------------------
# the reference against independent math


def test_ref_zero_flow_and_integer_shift_are_exact():
    h = torch.randn(2, 5, 7, 3, dtype=torch.float64)
    occ = torch.rand(2, 5, 7, 1, dtype=torch.float64)
    zero = torch.zeros(2, 5, 7, 2, dtype=torch.float64)
    torch.testing.assert_close(warp_occlusion_ref(h, zero, occ), h + occ * h, rtol=0, atol=0)
    shifted = torch.zeros_like(h)  # sample at (x + 2, y - 1)
    shifted[:, 1:, :5] = h[:, :4, 2:]
    flow = torch.tensor([2.0, -1.0], dtype=torch.float64).expand(2, 5, 7, 2)
    torch.testing.assert_close(warp_occlusion_ref(h, flow, None, residual=False), shifted,
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fractional", "partial", "outside", "integer"])
def test_ref_matches_grid_sample(kind):
    """Second, independent reference: grid_sample with align_corners=True and zero padding."""
    batch, height, width, channels = 2, 6, 9, 4
    h = torch.randn(batch, height, width, channels, dtype=torch.float64)
    flow = _flow(kind, batch, height, width).double()
    occ = torch.rand(batch, height, width, 1, dtype=torch.float64)
    xs = torch.arange(width, dtype=torch.float64)[None, None, :] + flow[..., 0]
    ys = torch.arange(height, dtype=torch.float64)[None, :, None] + flow[..., 1]
    grid = torch.stack([2 * xs / (width - 1) - 1, 2 * ys / (height - 1) - 1], dim=-1)
    sampled = F.grid_sample(h.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(warp_occlusion_ref(h, flow, occ), h + occ * sampled,
                               rtol=0, atol=1e-12)


def test_ref_gradcheck():
    h, flow, occ = _leaves(*_inputs(1, 4, 5, 3, "partial", torch.float64, "cpu"))
    assert torch.autograd.gradcheck(warp_occlusion_ref, (h, flow, occ))
    assert torch.autograd.gradcheck(lambda a, b: warp_occlusion_ref(a, b, None, False),
                                    (h, flow))


def test_ref_nonfinite_rule():
    """NaN/inf displacement: sample zero, flow gradient zero, no contribution to dh."""
    h, flow, occ = _leaves(*_inputs(1, 4, 5, 3, "nonfinite", torch.float64, "cpu"))
    bad = ~torch.isfinite(flow).all(dim=-1)  # [B, H, W]
    out = warp_occlusion_ref(h, flow, occ, residual=False)
    assert (out[bad] == 0).all() and torch.isfinite(out).all()
    dout = torch.zeros_like(out)
    dout[bad] = 1.0  # gradient only through the non-finite pixels
    dh, dflow, docc = torch.autograd.grad(out, (h, flow, occ), dout)
    assert (dh == 0).all() and (dflow == 0).all() and (docc == 0).all()


# ----------------------------------------------------------------------------------------------
# compiled backends against the fp64 reference


def _check_backend(backend, case, dtype, device, flow_dtype=None, deterministic=False,
                   with_occ=True, residual=True):
    batch, height, width, channels, kind = case
    h, flow, occ = _inputs(batch, height, width, channels, kind, dtype, device, flow_dtype)
    occ = occ if with_occ else None
    leaves = _leaves(h, flow, occ)
    if callable(backend):
        out = backend(*leaves, residual, deterministic)
    else:
        out = kernels.warp_occlusion(*leaves, residual=residual, deterministic=deterministic,
                                     backend=backend)
    assert out.dtype == dtype and out.shape == h.shape and out.is_contiguous()
    dout = torch.randn_like(out)
    grads = _grads(out, leaves, dout)
    ref_leaves = _leaves(*(None if t is None else t.double() for t in (h, flow, occ)))
    ref = warp_occlusion_ref(*ref_leaves, residual=residual)
    ref_grads = _grads(ref, ref_leaves, dout.double())
    low_leaves = _leaves(h, flow, occ)  # plain PyTorch in the same precision: the baseline
    low = warp_occlusion_ref(*low_leaves, residual=residual)
    low_grads = _grads(low, low_leaves, dout)
    assert_within_tolerance(out, ref, low, name="out")
    for name, g, rg, lg in zip(("h", "flow", "occlusion"), grads, ref_grads, low_grads):
        assert g.dtype == lg.dtype and g.shape == rg.shape, name
        floor = 1e-4 * max(1.0, rg.abs().max().item())
        assert_within_tolerance(g, rg, lg, factor=3.0, floor=floor, name=f"d{name}")
    return grads


CASES = [  # (B, H, W, C, flow kind): C in {1, 3, 77, 320}, H != W, B = 1
    (1, 5, 7, 1, "zero"),
    (2, 4, 6, 3, "integer"),
    (1, 6, 5, 77, "fractional"),
    (1, 3, 4, 320, "partial"),
    (2, 5, 3, 8, "outside"),
    (1, 4, 7, 5, "nonfinite"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] + f"-C{c[3]}" for c in CASES])
def test_triton_matches_reference(triton_device, dtype, case):
    _check_backend("triton", case, dtype, triton_device)


@pytest.mark.parametrize("variant", [
    dict(flow_dtype=torch.float32, dtype=torch.float16),
    dict(with_occ=False, residual=False, dtype=torch.float32),
    dict(residual=False, deterministic=True, dtype=torch.float16),
])
def test_triton_variants(triton_device, variant):
    variant = dict(variant)
    dtype = variant.pop("dtype")
    _check_backend("triton", (2, 5, 6, 24, "partial"), dtype, triton_device, **variant)


@pytest.mark.parametrize("target", [1, 1 << 30], ids=["largest-tiles", "one-pixel-tiles"])
def test_triton_tile_extremes(triton_device, monkeypatch, target):
    """Both ends of the pixels-per-program heuristic (GPU: 1 pixel for small latents)."""
    from kernels.flow_warp import triton_impl

    monkeypatch.setattr(triton_impl, "INTERPRETER_PROGRAM_TARGET", target)
    monkeypatch.setattr(triton_impl, "PROGRAM_TARGET", target)
    _check_backend("triton", (1, 3, 5, 130, "partial"), torch.float32, triton_device)
    _check_backend("triton", (1, 3, 5, 130, "partial"), torch.float32, triton_device,
                   deterministic=True)


def test_triton_integer_shift_is_exact(triton_device):
    h = torch.randn(1, 5, 7, 6, device=triton_device)
    flow = torch.tensor([2.0, -1.0], device=triton_device).expand(1, 5, 7, 2)
    out = kernels.warp(h, flow, backend="triton")
    expected = torch.zeros_like(h)
    expected[:, 1:, :5] = h[:, :4, 2:]
    assert torch.equal(out, expected)


def test_triton_zero_flow(triton_device):
    h, _, occ = _inputs(1, 4, 6, 5, "zero", torch.float32, triton_device)
    out = kernels.warp_occlusion(h, torch.zeros(1, 4, 6, 2, device=triton_device), occ,
                                 backend="triton")
    torch.testing.assert_close(out, h + occ * h, rtol=1e-6, atol=1e-6)


def test_triton_edges_and_huge_flows(triton_device):
    """Coordinates exactly on the border, just outside it, and absurdly far (no int overflow)."""
    height, width = 3, 4
    h = torch.randn(1, height, width, 5, device=triton_device)
    flow = torch.zeros(1, height, width, 2)
    flow[0, 0, :, 0] = torch.tensor([-1.0, -1.5, 1e30, -1e30])  # x + dx = -1, -0.5, far, far
    flow[0, 1, :, 0] = torch.tensor([3.0, 2.0, 1.5, 0.75])       # x + dx = 3, 3, 3.5, 3.75
    flow[0, 2, :, 1] = torch.tensor([-2.0, -3.0, 1e38, -3.4e38])
    flow = flow.to(triton_device)
    _check_exact_against_ref(h, flow)


def _check_exact_against_ref(h, flow):
    leaves = _leaves(h, flow)
    out = kernels.warp(*leaves, backend="triton")
    dout = torch.randn_like(out)
    grads = _grads(out, leaves, dout)
    ref_leaves = _leaves(h.double(), flow.double())
    ref = warp_occlusion_ref(*ref_leaves, None, residual=False)
    ref_grads = _grads(ref, ref_leaves, dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-5)


def test_triton_converging_flow(triton_device):
    """Every pixel samples near one point: long gather lists and colliding atomics."""
    height, width = 6, 5
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    flow = torch.stack([2.3 - xs, 1.6 - ys], dim=-1)[None].float().to(triton_device)
    h = torch.randn(1, height, width, 7, device=triton_device)
    for deterministic in (False, True):
        leaves = _leaves(h, flow)
        out = kernels.warp(*leaves, deterministic=deterministic, backend="triton")
        grads = _grads(out, leaves, torch.ones_like(out))
        ref_leaves = _leaves(h.double(), flow.double())
        ref = warp_occlusion_ref(*ref_leaves, None, residual=False)
        ref_grads = _grads(ref, ref_leaves, torch.ones_like(ref))
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-4)


def test_triton_flow_gradient_matches_finite_differences(triton_device):
    """dflow of the kernel (fp32) against central differences of the fp64 reference. Output
    pixel p depends on flow[p] only, so perturbing one component everywhere at once gives every
    pixel's partial derivative in two reference evaluations."""
    h, flow, occ = _inputs(2, 5, 6, 9, "partial", torch.float32, triton_device)
    leaves = _leaves(h, flow, occ)
    out = kernels.warp_occlusion(*leaves, backend="triton")
    dout = torch.randn_like(out)
    dflow = torch.autograd.grad(out, leaves[1], dout)[0]
    h64, flow64, occ64, dout64 = h.double(), flow.double(), occ.double(), dout.double()
    eps = 1e-6
    for comp in range(2):
        bump = torch.zeros_like(flow64)
        bump[..., comp] = eps
        plus = (warp_occlusion_ref(h64, flow64 + bump, occ64) * dout64).sum(-1)
        minus = (warp_occlusion_ref(h64, flow64 - bump, occ64) * dout64).sum(-1)
        fd = (plus - minus) / (2 * eps)
        torch.testing.assert_close(dflow[..., comp].double(), fd, rtol=1e-4, atol=1e-4)


def test_triton_strided_flow_and_occlusion(triton_device):
    h, flow, occ = _inputs(1, 4, 5, 6, "fractional", torch.float32, triton_device)
    flow_t = flow.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    occ_big = torch.rand(1, 4, 5, 3, device=triton_device)
    occ_big[..., 1:2] = occ
    occ_s = occ_big[..., 1:2]
    assert not flow_t.is_contiguous() and not occ_s.is_contiguous()
    a = kernels.warp_occlusion(h, flow, occ, backend="triton")
    b = kernels.warp_occlusion(h, flow_t, occ_s, backend="triton")
    assert torch.equal(a, b)


def test_triton_deterministic_mode(triton_device):
    """Deterministic gradients equal the default ones within tolerance and are bitwise equal
    across runs."""
    h, flow, occ = _inputs(2, 5, 7, 33, "partial", torch.float32, triton_device)
    runs = []
    for deterministic in (False, True, True):
        leaves = _leaves(h, flow, occ)
        out = kernels.warp_occlusion(*leaves, deterministic=deterministic, backend="triton")
        runs.append(_grads(out, leaves, torch.ones_like(out)))
    for a, b in zip(runs[0], runs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(runs[1], runs[2]):
        assert torch.equal(a, b)


def test_triton_deterministic_plan_sorts_one_key_per_pixel(triton_device, monkeypatch):
    """The plan sorts N int32 footprint keys (not 4N per-tap targets), over B(H+1)(W+1) groups."""
    from kernels.flow_warp import plan, triton_impl

    seen = []

    def recording_plan(key, n_keys):
        seen.append((key.dtype, key.numel(), n_keys))
        return plan.gather_plan(key, n_keys)

    monkeypatch.setattr(triton_impl, "gather_plan", recording_plan)
    _check_backend("triton", (2, 3, 5, 4, "partial"), torch.float32, triton_device,
                   deterministic=True)
    assert seen == [(torch.int32, 2 * 3 * 5, 2 * 4 * 6)]


class _NanTorch:
    """torch with empty/empty_like returning NaN-filled (or -7-filled integer) tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _fill(t):
        return t.fill_(NAN if t.dtype.is_floating_point else -7)

    def empty(self, *args, **kwargs):
        return self._fill(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._fill(torch.empty_like(*args, **kwargs))


def test_triton_writes_every_element(triton_device, monkeypatch):
    from kernels.flow_warp import triton_impl

    monkeypatch.setattr(triton_impl, "torch", _NanTorch())
    h, flow, occ = _inputs(1, 5, 3, 70, "partial", torch.float32, triton_device)
    out = triton_impl.warp_occlusion_fwd(h, flow, occ, True)
    assert torch.isfinite(out).all()
    dout = torch.randn_like(h)
    for deterministic in (False, True):
        for grad in triton_impl.warp_occlusion_bwd(dout, h, flow, None, False, deterministic):
            assert torch.isfinite(grad).all()


def test_torch_compile_traces_triton_path(triton_device):
    h, flow, occ = _leaves(*_inputs(1, 4, 5, 8, "fractional", torch.float32, triton_device))

    def f(a, b, c):
        return kernels.warp_occlusion(a, b, c, backend="triton").square().sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(h, flow, occ)
    out.backward()
    expected = warp_occlusion_ref(h, flow, occ).square().sum()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (h, flow, occ))

# ----------------------------------------------------------------------------------------------
# Compiled path without a GPU: ahead-of-time compile for sm_80 / sm_90 (a subprocess, since the
# interpreter replaces triton.jit at decoration time)

_AOT_SCRIPT = r"""
import triton
from kernels.flow_warp import triton_impl as ti
from kernels.testing import compile_for_gpu

def build(kernel, arch, types, consts, shape):
    # the launchers' int arguments for contiguous tensors of this shape: the JIT marks those
    # that are multiples of 16
    b, h, w, c = shape
    ints = {"n_pix": b * h * w, "height": h, "width": w, "channels": c, "stride_f_b": h * w * 2,
            "stride_f_y": w * 2, "stride_f_x": 2, "stride_f_c": 1, "stride_o_b": h * w,
            "stride_o_y": w, "stride_o_x": 1}
    aligned = tuple(n for n in kernel.arg_names if ints.get(n, 1) % 16 == 0)
    compiled = compile_for_gpu(kernel, types, consts, arch=arch, aligned=aligned, num_warps=4)
    assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"]

# (B, H, W, C): the launchers' tile-size extremes, one pixel per program (small latent, C = 4),
# many pixels x few channels, and 128-channel tiles over C = 320 (3 channel blocks)
SHAPES = [(1, 8, 8, 4), (4, 128, 128, 4), (2, 64, 64, 320)]
n = 0
for arch in (80, 90):
    for i, dt in enumerate(("bf16", "fp16", "fp32")):
        shape = SHAPES[(i + arch // 10) % 3]
        n_pix, channels = shape[0] * shape[1] * shape[2], shape[3]
        flow = "fp32" if (i + arch // 10) % 2 else dt  # h's dtype or fp32
        bc = ti._block_c(channels, 128)
        # (occlusion, flag) over the three dtypes: all four combinations on each target
        for occ, flag in ((1, 0), (0, 1)) if i % 2 else ((1, 1), (0, 0)):
            occ, flag = bool(occ), bool(flag)
            # warp_occlusion_fwd: HAS_OCC = occ, RESIDUAL = flag
            bp = ti._pixels_per_program(n_pix, triton.cdiv(channels, bc), ti.TILE // bc)
            types = {"h_ptr": "*" + dt, "flow_ptr": "*" + flow, "occ_ptr": "*" + dt,
                     "out_ptr": "*" + dt}
            build(ti._warp_occlusion_fwd_kernel, arch, types,
                  {"HAS_OCC": occ, "RESIDUAL": flag, "BLOCK_P": bp, "BLOCK_C": bc}, shape)
            # warp_occlusion_bwd: HAS_OCC = occ, deterministic = flag; unused pointers are docc
            bp = ti._pixels_per_program(n_pix, 1, ti.TILE // bc // 2)
            types = {"dout_ptr": "*" + dt, "h_ptr": "*" + dt, "flow_ptr": "*" + flow,
                     "occ_ptr": "*" + dt, "dh_acc_ptr": "*" + (dt if flag else "fp32"),
                     "dflow_ptr": "*" + flow, "docc_ptr": "*" + dt,
                     "key_ptr": "*" + ("i32" if flag else dt),
                     "wt_ptr": "*" + ("fp32" if flag else dt)}
            build(ti._warp_occlusion_bwd_kernel, arch, types,
                  {"HAS_OCC": occ, "ATOMIC_DH": not flag, "WRITE_PLAN": flag, "BLOCK_P": bp,
                   "BLOCK_C": bc, "NUM_C_BLOCKS": triton.cdiv(channels, bc)}, shape)
            # the deterministic gather (order, row_ptr int64 from plan.gather_plan)
            bp = ti._pixels_per_program(n_pix, triton.cdiv(channels, bc), 1024 // bc)
            types = {"dout_ptr": "*" + dt, "order_ptr": "*i64", "wt_ptr": "*fp32",
                     "row_ptr_ptr": "*i64", "dh_ptr": "*" + dt}
            build(ti._warp_occlusion_gather_kernel, arch, types,
                  {"RESIDUAL": flag, "BLOCK_P": bp, "BLOCK_C": bc}, shape)
            n += 3
print("compiled", n)
"""


@pytest.mark.slow
def test_kernels_compile_for_a100_and_hopper():
    """Ahead-of-time compile (no GPU) of the forward, backward (atomic and deterministic) and
    gather kernels for sm_80 and sm_90 in bf16, fp16 and fp32 (fp32 flows too), with and without
    occlusion and residual, at the launchers' tile sizes (1 to 512 pixels per program, 1 to 3
    channel blocks): catches compiled-path errors the interpreter cannot see."""
    done = run_compiled_mode(_AOT_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["compiled", "36"], done.stdout



_ATOMICS_SCRIPT = r"""
import os, re, subprocess, tempfile
import triton
from kernels.flow_warp import triton_impl as ti
from kernels.testing import compile_for_gpu

types = {"h_ptr": "*bf16", "flow_ptr": "*fp32", "occ_ptr": "*bf16", "dout_ptr": "*bf16",
         "dh_acc_ptr": "*fp32", "dflow_ptr": "*fp32", "docc_ptr": "*bf16", "key_ptr": "*bf16",
         "wt_ptr": "*bf16"}
compiled = compile_for_gpu(ti._warp_occlusion_bwd_kernel, types,
                           dict(HAS_OCC=True, ATOMIC_DH=True, WRITE_PLAN=False, BLOCK_P=4,
                                BLOCK_C=128, NUM_C_BLOCKS=3), arch=90, num_warps=4)
ptx = compiled.asm["ptx"]
print("ptx", *sorted(set(re.findall(r"\b(?:red|atom|fence|membar)\.[\w.]+", ptx))))
nvdisasm = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "nvdisasm")
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "k.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([nvdisasm, path], capture_output=True, text=True, check=True).stdout
print("sass", *sorted(set(re.findall(r"\b(?:MEMBAR|REDG|ATOMG|CCTL)[\w.]*", sass))))
"""


@pytest.mark.slow
def test_triton_scatter_atomics_are_relaxed():
    """The dh scatter needs no memory ordering (its sums are read after the kernel), so its
    atomics are relaxed: PTX atom/red carry .relaxed, and the sm_90 SASS has plain REDG with no
    MEMBAR.ALL.GPU or L1 invalidate (CCTL.IVALL), which the default acq_rel emits per atomic."""
    done = run_compiled_mode(_ATOMICS_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    ptx_ops, sass_ops = lines["ptx"].split(), lines["sass"].split()
    assert ptx_ops and all(".relaxed." in op for op in ptx_ops), ptx_ops
    assert not any(op.startswith(("fence", "membar")) for op in ptx_ops), ptx_ops
    assert any(op.startswith("REDG") for op in sass_ops), sass_ops
    assert not any(op.startswith(("MEMBAR", "CCTL")) for op in sass_ops), sass_ops

@pytest.mark.slow
def test_cuda_atomic_backward_uses_vector_atomics_on_hopper(tmp_path):
    """nvcc's sm_90 SASS of the CUDA backward has float4 reductions (REDG.E.ADD.F32x4), the
    sm_80 SASS only scalar ones."""
    import shutil
    import subprocess

    import triton

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = {}
    for arch in (80, 90):
        cubin = tmp_path / f"warp_sm{arch}.cubin"
        subprocess.run([nvcc, "-std=c++17", "-cubin", f"-arch=sm_{arch}", f"-I{CSRC}",
                        str(CSRC / "warp_occlusion.cu"), "-o", str(cubin)], check=True,
                       capture_output=True)
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
        found[arch] = {op for op in sass.split() if op.startswith(("RED", "ATOM"))}
    assert any(op.endswith("F32x4.FTZ.RN.STRONG.GPU") for op in found[90]), found[90]
    assert found[80] and not any("x4" in op for op in found[80]), found[80]

def test_warp_is_warp_occlusion_without_occlusion_or_residual():
    h, flow, _ = _inputs(1, 3, 4, 2, "fractional", torch.float32, "cpu")
    a = kernels.warp(h, flow, backend="ref")
    b = kernels.warp_occlusion(h, flow, None, residual=False, backend="ref")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# validation


def _bad_cases():
    h = torch.randn(2, 4, 5, 3)
    flow = torch.randn(2, 4, 5, 2)
    occ = torch.rand(2, 4, 5, 1)
    return [
        ((h, torch.randn(2, 4, 5, 3), occ), ValueError, r"flow must have shape \[B, H, W, 2\].*"
         r"got last dim 3"),
        ((h, torch.randn(2, 4, 6, 2), occ), ValueError,
         r"flow must have shape \[2, 4, 5, 2\].*got \[2, 4, 6, 2\]"),
        ((h.permute(0, 3, 1, 2).contiguous(), flow, occ), ValueError,
         r"looks channels-first \[B, C, H, W\].*permute\(0, 2, 3, 1\)"),
        ((torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1), flow, occ), ValueError,
         r"channels-last \[B, H, W, C\] and contiguous.*strides"),
        ((h, flow, torch.rand(2, 4, 5, 3)), ValueError,
         r"occlusion must have shape \[2, 4, 5, 1\].*got \[2, 4, 5, 3\]"),
        ((h, flow, occ.half()), TypeError, r"occlusion must have the same dtype as h \(float32\)"),
        ((h.half(), flow.bfloat16(), occ.half()), TypeError,
         r"flow must have the dtype of h \(float16\) or float32, got bfloat16"),
        ((h, flow.to("meta"), occ), ValueError, r"flow must be on the same device as h"),
        ((h, flow, occ.to("meta")), ValueError, r"occlusion must be on the same device as h"),
        ((h[0], flow, occ), ValueError, r"h must be 4-D, got 3-D"),
        ((h.int(), flow, occ), TypeError, r"h must have dtype in"),
        (("h", flow, occ), TypeError, r"h must be a torch.Tensor, got str"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_input_is_named(index):
    args, exc, match = _bad_cases()[index]
    with pytest.raises(exc, match=match):
        kernels.warp_occlusion(*args)


def test_bad_flags():
    h, flow = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 2)
    with pytest.raises(TypeError, match="residual must be a bool, got int"):
        kernels.warp_occlusion(h, flow, residual=1)
    with pytest.raises(TypeError, match="deterministic must be a bool, got str"):
        kernels.warp(h, flow, deterministic="yes")


# ----------------------------------------------------------------------------------------------
# the CUDA extension on the CPU lane: built entry points and registry reasons


def test_cuda_backend_reason_and_extension_entry_points():
    reasons = kernels.available_backends("warp_occlusion", device="cuda")["cuda"]
    module, err = cuda_extension()
    if module is None:
        assert any("kernels._cuda is not available" in r for r in reasons)
        pytest.skip(f"extension not built: {err}")
    assert "warp_occlusion" in module.ops
    for name in ("warp_occlusion_fwd", "warp_occlusion_bwd", "warp_occlusion_gather"):
        assert callable(getattr(module, name))
    if not module.has_device():
        assert any(r.startswith("no CUDA device: ") for r in reasons)
        cpu = kernels.available_backends("warp_occlusion", device="cpu")["cuda"]
        assert any("does not run on cpu tensors" in r for r in cpu)
    else:
        assert reasons == []


def test_cuda_extension_validates_arguments_before_any_launch():
    """The bindings reject bad codes and null pointers with ValueError, no device needed."""
    module, err = cuda_extension()
    if module is None:
        pytest.skip(f"extension not built: {err}")
    common = dict(device=0, stream=0, shape=(1, 2, 3, 4), h=64, h_strides=(24, 12, 4), flow=64,
                  flow_strides=(12, 6, 2, 1), occ=0, occ_strides=(0, 0, 0), out=64,
                  residual=True)
    with pytest.raises(ValueError, match="dtype must be a dtype code"):
        module.warp_occlusion_fwd(**common, dtype=7, flow_dtype=0)
    with pytest.raises(ValueError, match="flow_dtype must equal dtype or be 0"):
        module.warp_occlusion_fwd(**common, dtype=1, flow_dtype=2)
    with pytest.raises(ValueError, match="h must be a device pointer, got 0"):
        module.warp_occlusion_fwd(**{**common, "h": 0}, dtype=0, flow_dtype=0)
    with pytest.raises(ValueError, match="B\\*H\\*W must be below 2\\*\\*31"):
        module.warp_occlusion_fwd(**{**common, "shape": (1 << 16, 1 << 8, 1 << 8, 1)}, dtype=0,
                                  flow_dtype=0)


# ----------------------------------------------------------------------------------------------
# the CUDA kernels, emulated on the CPU: csrc/warp_occlusion_kernels.cuh compiled by g++ with a
# shim for the CUDA built-ins (tests/kernels/cuda_emulation/), driven through
# kernels.flow_warp.cuda_impl
# unchanged. Checks indexing, math, the NaN rule, vector and scalar paths and the deterministic
# plan; not races between real warps, alignment faults or speed (GPU lane below).

EMU_DIR = Path(__file__).parent / "cuda_emulation"
CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.fixture(scope="module")
def emulated_cuda(tmp_path_factory):
    import ctypes
    import shutil
    import subprocess

    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    compiler = shutil.which("g++")
    if compiler is None or not (cuda_include / "cuda_fp16.h").exists():
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h) to emulate the CUDA kernels")
    lib = tmp_path_factory.mktemp("emu") / "warp_emulation.so"
    cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w",
           f"-I{cuda_include}", f"-I{CSRC}", str(EMU_DIR / "warp_emulation.cpp"), "-o", str(lib)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"emulation build failed:\n{build.stderr[-3000:]}")
    return ctypes.CDLL(str(lib))


class _EmulatedExtension:
    """The pybind module's warp entry points, same keywords, running the emulated kernels."""

    def __init__(self, lib, allow_vec: bool):
        self.lib, self.allow_vec, self.vec_used = lib, int(allow_vec), []

    @staticmethod
    def _arr(values):
        import ctypes

        return (ctypes.c_int64 * len(values))(*values)

    @staticmethod
    def _ptr(address):
        import ctypes

        return ctypes.c_void_p(address or None)

    def _record(self, used):
        assert used > 0, "unsupported dtype pair"
        self.vec_used.append(used)

    def warp_occlusion_fwd(self, *, device, stream, shape, dtype, h, h_strides, flow,
                           flow_strides, flow_dtype, occ, occ_strides, out, residual):
        a, p = self._arr, self._ptr
        self._record(self.lib.emu_warp_fwd(
            dtype, flow_dtype, a(shape), p(h), a(h_strides), p(flow), a(flow_strides), p(occ),
            a(occ_strides), p(out), int(residual), self.allow_vec))

    def warp_occlusion_bwd(self, *, device, stream, shape, dtype, dout, dout_strides, h,
                           h_strides, flow, flow_strides, flow_dtype, occ, occ_strides, dh_accum,
                           dflow, docc, plan_key, plan_wt):
        a, p = self._arr, self._ptr
        self._record(self.lib.emu_warp_bwd(
            dtype, flow_dtype, a(shape), p(dout), a(dout_strides), p(h), a(h_strides), p(flow),
            a(flow_strides), p(occ), a(occ_strides), p(dh_accum), p(dflow), p(docc),
            p(plan_key), p(plan_wt), self.allow_vec))

    def warp_occlusion_gather(self, *, device, stream, shape, dtype, dout, dout_strides, order,
                              plan_wt, row_ptr, dh, residual):
        a, p = self._arr, self._ptr
        self._record(self.lib.emu_warp_gather(
            dtype, a(shape), p(dout), a(dout_strides), p(order), p(plan_wt), p(row_ptr), p(dh),
            int(residual), self.allow_vec))


@pytest.fixture
def emulated_backend(emulated_cuda, monkeypatch):
    """Returns make(allow_vec) -> (run, extension): run(h, flow, occ, residual, deterministic)
    goes through the cuda custom ops and kernels.flow_warp.cuda_impl with the emulated extension."""
    from kernels.flow_warp import cuda_impl
    from kernels.flow_warp.op import WarpOcclusionFunction

    monkeypatch.setattr(cuda_impl, "_launch_context", lambda t: (0, 0))

    def make(allow_vec=True):
        ext = _EmulatedExtension(emulated_cuda, allow_vec)
        monkeypatch.setattr(cuda_impl, "_ext", lambda: ext)

        def run(h, flow, occ, residual, deterministic):
            return WarpOcclusionFunction.apply(h, flow, occ, residual, deterministic, "cuda")
        return run, ext
    return make


EMU_CASES = [  # C=320, 16, 8: vectorised for every dtype; 77, 3, 1: scalar
    (1, 4, 5, 320, "partial"),
    (2, 3, 5, 16, "fractional"),
    (1, 4, 3, 77, "nonfinite"),
    (2, 3, 4, 3, "outside"),
    (1, 5, 4, 1, "integer"),
    (1, 3, 3, 8, "zero"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", EMU_CASES, ids=[c[-1] + f"-C{c[3]}" for c in EMU_CASES])
def test_emulated_cuda_matches_reference(emulated_backend, dtype, case):
    run, ext = emulated_backend(allow_vec=True)
    for deterministic in (False, True):
        _check_backend(run, case, dtype, "cpu", deterministic=deterministic)
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    assert set(ext.vec_used) == ({vec} if case[3] % vec == 0 else {1})


@pytest.mark.parametrize("variant", [
    dict(flow_dtype=torch.float32, dtype=torch.bfloat16),
    dict(with_occ=False, residual=False, dtype=torch.float16),
    dict(residual=False, deterministic=True, dtype=torch.float32),
])
def test_emulated_cuda_variants(emulated_backend, variant):
    run, ext = emulated_backend(allow_vec=False)  # the scalar path at a vectorisable C
    variant = dict(variant)
    dtype = variant.pop("dtype")
    _check_backend(run, (2, 4, 5, 24, "partial"), dtype, "cpu", **variant)
    assert set(ext.vec_used) == {1}


@pytest.mark.parametrize("channels, vec, lanes", [
    (320, 8, 8),    # bf16 C=320: 40 vectors, 5 full passes of 8 lanes (4 pixels per warp)
    (64, 8, 8),     # bf16 C=64: 8 vectors, 4 pixels per warp instead of 8 busy lanes of 32
    (1280, 8, 32),  # 160 vectors: a whole warp, no idle lane
    (320, 4, 16),   # fp32 C=320: 80 vectors
    (77, 1, 16),    # scalar: 3 idle lanes in the last pass of 16 (19 of 32)
    (3, 1, 4), (1, 1, 1),
])
def test_cuda_lanes_per_pixel_leaves_few_lanes_idle(emulated_cuda, channels, vec, lanes):
    import ctypes

    emulated_cuda.emu_lanes_per_pixel.argtypes = [ctypes.c_int64, ctypes.c_int]
    assert emulated_cuda.emu_lanes_per_pixel(channels, vec) == lanes


def test_emulated_cuda_strided_inputs_and_determinism(emulated_backend):
    run, _ = emulated_backend()
    h, flow, occ = _inputs(1, 6, 5, 12, "partial", torch.float32, "cpu")
    flow_t = flow.transpose(1, 2).contiguous().transpose(1, 2)
    occ_s = torch.cat([torch.rand_like(occ), occ], dim=-1)[..., 1:2]
    results = []
    for f, o in ((flow, occ), (flow_t, occ_s), (flow_t, occ_s)):
        leaves = _leaves(h, f, o)
        out = run(*leaves, True, True)
        dout = torch.linspace(-1, 1, out.numel()).view_as(out).expand_as(out)
        results.append((out, *_grads(out, leaves, dout)))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)


def test_emulated_cuda_converging_flow(emulated_backend):
    run, _ = emulated_backend()
    height, width = 6, 5
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    flow = torch.stack([2.3 - xs, 1.6 - ys], dim=-1)[None].float()
    h = torch.randn(1, height, width, 8)
    for deterministic in (False, True):
        leaves = _leaves(h, flow)
        out = run(*leaves, None, False, deterministic)
        grads = _grads(out, leaves, torch.ones_like(out))
        ref_leaves = _leaves(h.double(), flow.double())
        ref = warp_occlusion_ref(*ref_leaves, None, residual=False)
        for g, rg in zip(grads, _grads(ref, ref_leaves, torch.ones_like(ref))):
            torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# GPU lane: both compiled backends at real channel counts, bf16, determinism, CuPy


def _gpu_backends():
    module, err = cuda_extension()
    cuda = pytest.param("cuda", marks=pytest.mark.skipif(
        module is None, reason=f"CUDA extension not built: {err}"))
    return ["triton", cuda]


GPU_CASES = [
    (2, 16, 16, 1280, "fractional"),
    (2, 33, 31, 320, "partial"),
    (1, 17, 23, 77, "nonfinite"),
    (2, 9, 12, 3, "outside"),
    (1, 8, 8, 1, "integer"),
    (2, 8, 8, 640, "zero"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[-1] + f"-C{c[3]}" for c in GPU_CASES])
def test_gpu_backend_matches_reference(backend, dtype, case):
    _check_backend(backend, case, dtype, "cuda")
    _check_backend(backend, case, dtype, "cuda", deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("variant", [
    dict(flow_dtype=torch.float32, dtype=torch.bfloat16),
    dict(with_occ=False, residual=False, dtype=torch.float16),
    dict(residual=False, deterministic=True, dtype=torch.bfloat16),
])
def test_gpu_variants(backend, variant):
    variant = dict(variant)
    dtype = variant.pop("dtype")
    _check_backend(backend, (2, 20, 24, 96, "partial"), dtype, "cuda", **variant)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_deterministic_is_bitwise_reproducible(backend):
    h, flow, occ = _inputs(4, 32, 32, 320, "partial", torch.bfloat16, "cuda")
    flow = flow * 0.25  # many pixels share taps: the atomics path would race here
    runs = []
    for _ in range(2):
        leaves = _leaves(h, flow, occ)
        out = kernels.warp_occlusion(*leaves, deterministic=True, backend=backend)
        runs.append(_grads(out, leaves, torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_exact_integer_shift_and_strided_inputs(backend):
    h = torch.randn(2, 12, 10, 40, device="cuda", dtype=torch.float16)
    flow = torch.tensor([-3.0, 2.0], device="cuda", dtype=torch.float16).expand(2, 12, 10, 2)
    out = kernels.warp(h, flow, backend=backend)  # expanded flow: stride-0 axes
    expected = torch.zeros_like(h)
    expected[:, :10, 3:] = h[:, 2:, :7]
    assert torch.equal(out, expected)
    occ_big = torch.rand(2, 12, 10, 3, device="cuda", dtype=torch.float16)
    a = kernels.warp_occlusion(h, flow.contiguous(), occ_big[..., 1:2].contiguous(),
                               backend=backend)
    b = kernels.warp_occlusion(h, flow, occ_big[..., 1:2], backend=backend)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_backends_agree():
    module, err = cuda_extension()
    if module is None:
        pytest.skip(f"CUDA extension not built: {err}")
    h, flow, occ = _inputs(2, 16, 16, 320, "fractional", torch.bfloat16, "cuda")
    a = kernels.warp_occlusion(h, flow, occ, backend="triton")
    b = kernels.warp_occlusion(h, flow, occ, backend="cuda")
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_cupy_through_dlpack():
    cp = pytest.importorskip("cupy")
    h = cp.random.standard_normal((1, 8, 8, 32)).astype(cp.float32)
    flow = (cp.random.random((1, 8, 8, 2)) - 0.5).astype(cp.float32)
    occ = cp.random.random((1, 8, 8, 1)).astype(cp.float32)
    out = cp.from_dlpack(kernels.warp_occlusion(torch.from_dlpack(h), torch.from_dlpack(flow),
                                                torch.from_dlpack(occ)))
    ref = warp_occlusion_ref(*(torch.from_dlpack(t).double() for t in (h, flow, occ)))
    torch.testing.assert_close(torch.from_dlpack(out).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    h, flow, occ = _leaves(*_inputs(2, 16, 16, 64, "fractional", torch.float16, "cuda"))
    f = torch.compile(lambda a, b, c: kernels.warp_occlusion(a, b, c).float().sum())
    f(h, flow, occ).backward()
    assert all(torch.isfinite(t.grad).all() for t in (h, flow, occ))
