"""adaln_modulate / gated_residual: reference vs independent fp64 math, gradcheck on the reference,
Triton (interpreter on CPU, compiled on GPU) vs reference for output and every gradient, validation,
registry behaviour and torch.compile."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.adaln.ref import adaln_modulate_ref, expand_modulation, gated_residual_ref
from kernels.testing import assert_within_tolerance, nan_empty, run_compiled_mode


def _inputs(batch, tokens, frames, channels, dtype, device, per_frame=True):
    x = torch.randn(batch, tokens, channels, dtype=dtype, device=device)
    mod_shape = (batch, frames, channels) if per_frame else (batch, channels)
    shift = torch.randn(mod_shape, dtype=dtype, device=device)
    scale = 0.5 * torch.randn(mod_shape, dtype=dtype, device=device)
    return x, shift, scale


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def test_ref_matches_independent_fp64_math():
    x, shift, scale = _inputs(2, 6, 3, 10, torch.float64, "cpu")
    out = adaln_modulate_ref(x, shift, scale, eps=1e-6)
    # independent: torch.nn.functional.layer_norm, explicit per-frame loop
    ln = torch.nn.functional.layer_norm(x, (10,), eps=1e-6)
    expected = torch.empty_like(x)
    for t in range(3):
        rows = slice(2 * t, 2 * t + 2)
        expected[:, rows] = ln[:, rows] * (1 + scale[:, t, None]) + shift[:, t, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    y = torch.randn_like(x)
    gated = gated_residual_ref(x, y, shift[:, 0])
    torch.testing.assert_close(gated, x + shift[:, 0, None] * y, rtol=0, atol=1e-12)


def test_ref_gradcheck():
    x, shift, scale = _leaves(*_inputs(2, 4, 2, 6, torch.float64, "cpu"))
    assert torch.autograd.gradcheck(lambda a, b, c: adaln_modulate_ref(a, b, c), (x, shift, scale))
    y = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gated_residual_ref, (x, y, shift))


CASES = [  # (B, N, T, C, per_frame): odd C, one frame, B=1, per-sample, several row tiles
    (2, 12, 4, 40, True),
    (1, 7, 1, 77, False),
    (3, 10, 5, 130, True),
    (1, 3, 3, 8, True),
    (2, 80, 2, 24, True),  # 40 tokens per frame: 3 chunks of 16 rows, 4-row tiles, last partial
]

# (weight, bias, modulation dtype): affine LayerNorm (CogVideoX), fp32 modulation (Wan)
VARIANTS = {"plain": (False, False, None), "affine": (True, True, None),
            "weight-only": (True, False, None), "fp32-modulation": (False, False, torch.float32),
            "affine-fp32-all": (True, True, torch.float32)}


def _low_precision_adaln(x, shift, scale, weight, bias, eps=1e-6):
    """Plain PyTorch in x's precision (the tolerance baseline): layer_norm, then the modulation
    in the modulation's dtype, cast back to x's dtype."""
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    ln = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight=w, bias=b, eps=eps)
    tokens = x.shape[1]
    scale_e, shift_e = expand_modulation(scale, tokens), expand_modulation(shift, tokens)
    return (ln * (1 + scale_e) + shift_e).to(x.dtype)


# every case plain; the variants on the first and the multi-tile case (interpreter time)
CASE_VARIANTS = [(c, "plain") for c in CASES] + [
    (c, v) for c in (CASES[0], CASES[-1]) for v in VARIANTS if v != "plain"]


def _check_adaln(case, dtype, device, variant, floor=1e-4):
    """Triton adaLN (output and every gradient) against the fp64 reference, within the tolerance
    rule against plain PyTorch in the low precision."""
    batch, tokens, frames, channels, per_frame = case
    has_weight, has_bias, mod_dtype = VARIANTS[variant]
    x, shift, scale = _inputs(batch, tokens, frames, channels, dtype, device, per_frame)
    shift, scale = shift.to(mod_dtype or dtype), scale.to(mod_dtype or dtype)
    weight = (1 + 0.3 * torch.randn(channels)).to(device, mod_dtype or dtype)
    bias = (0.3 * torch.randn(channels)).to(device, mod_dtype or dtype)
    inputs = [x, shift, scale, weight if has_weight else None, bias if has_bias else None]
    leaves = _leaves(*inputs)
    out = kernels.adaln_modulate(*leaves[:3], weight=leaves[3], bias=leaves[4], backend="triton")
    assert out.dtype == dtype
    dout = torch.randn_like(out)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, dout)
    # oracle: reference in fp64; baseline: plain PyTorch in the low precision
    ref_leaves = _leaves(*(None if t is None else t.double() for t in inputs))
    ref = adaln_modulate_ref(*ref_leaves[:3], 1e-6, *ref_leaves[3:])
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], dout.double())
    low_leaves = _leaves(*inputs)
    low = _low_precision_adaln(*low_leaves)
    low_grads = torch.autograd.grad(low, [t for t in low_leaves if t is not None], dout)
    assert_within_tolerance(out, ref, low, name="out")
    names = [n for n, t in zip(("x", "shift", "scale", "weight", "bias"), inputs) if t is not None]
    for name, g, rg, lg, leaf in zip(names, grads, ref_grads, low_grads, wanted):
        assert g.shape == rg.shape and g.dtype == leaf.dtype, name
        bound = floor * max(1.0, rg.abs().max().item())
        assert_within_tolerance(g, rg, lg, factor=3.0, floor=bound, name=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case, variant", CASE_VARIANTS)
def test_triton_adaln_matches_reference(triton_device, dtype, case, variant):
    _check_adaln(case, dtype, triton_device, variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case, gate_fp32", [(c, False) for c in CASES] + [(CASES[-1], True)])
def test_triton_gated_residual_matches_reference(triton_device, dtype, case, gate_fp32):
    batch, tokens, frames, channels, per_frame = case
    x, gate, _ = _inputs(batch, tokens, frames, channels, dtype, triton_device, per_frame)
    gate = gate.float() if gate_fp32 else gate
    y = torch.randn_like(x)
    leaves = _leaves(x, y, gate)
    out = kernels.gated_residual(*leaves, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = _leaves(x.double(), y.double(), gate.double())
    ref = gated_residual_ref(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = _leaves(x, y, gate)
    low = gated_residual_ref(*low_leaves)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    assert out.dtype == dtype and grads[2].dtype == gate.dtype
    assert_within_tolerance(out, ref, low, name="out")
    for name, g, rg, lg in zip(("x", "y", "gate"), grads, ref_grads, low_grads):
        assert_within_tolerance(g, rg, lg, factor=3.0, floor=1e-4, name=f"d{name}")


def test_triton_writes_every_element(triton_device, monkeypatch):
    """Outputs allocated as NaN must come back fully written."""
    from kernels.adaln import triton_impl

    monkeypatch.setattr(triton_impl.torch, "empty_like",
                        lambda t, **kw: nan_empty(*t.shape, dtype=t.dtype, device=t.device))
    x, shift, scale = _inputs(2, 9, 3, 33, torch.float32, triton_device)
    weight = torch.randn(33, device=triton_device)
    y, mean, rstd = triton_impl.adaln_modulate_fwd(x, shift, scale, weight, weight, 1e-6)
    assert torch.isfinite(y).all() and torch.isfinite(mean).all() and torch.isfinite(rstd).all()
    grads = triton_impl.adaln_modulate_bwd(torch.randn_like(x), x, scale, weight, mean, rstd)
    assert all(torch.isfinite(g).all() for g in grads)
    out = triton_impl.gated_residual_fwd(x, y, scale)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in triton_impl.gated_residual_bwd(y, x, scale))


def test_large_channel_count_and_large_mean(triton_device):
    """C = 8192 (the documented limit) and a large common offset: fp32 statistics hold."""
    x = 1000.0 + torch.randn(1, 2, 8192, device=triton_device)
    shift = torch.zeros(1, 8192, device=triton_device)
    out = kernels.adaln_modulate(x, shift, shift, backend="triton")
    ref = adaln_modulate_ref(x.double(), shift.double(), shift.double())
    assert (out.double() - ref).abs().max() < 2e-3


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_huge_rows_normalise_like_fp64(request, backend):
    """x * 1e20 in fp32 (and bf16) overflows a plain (x - mean)^2; the power-of-two row scaling
    must normalise it as fp64 does (issue 13, item 5), including a constant huge row and a row
    near the fp32 maximum; ordinary rows in the same batch are unaffected."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    x = torch.randn(1, 6, 40, device=device)
    x[0, 0] *= 1e20
    x[0, 1] = 3e20                                           # constant: x_hat = 0
    x[0, 2] *= 1e37
    x[0, 3] = x[0, 3] * 1e-30                                # tiny: eps dominates
    shift = torch.randn(1, 40, device=device)
    scale = 0.5 * torch.randn(1, 40, device=device)
    weight, bias = torch.randn(40, device=device), torch.randn(40, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
            continue  # bf16 kernels are tested on the GPU lane only
        leaves = _leaves(x.to(dtype), shift, scale, weight, bias)
        out = kernels.adaln_modulate(*leaves[:3], weight=leaves[3], bias=leaves[4],
                                     backend=backend)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
        ref_leaves = _leaves(*(t.double() for t in (x.to(dtype), shift, scale, weight, bias)))
        ref = adaln_modulate_ref(*ref_leaves[:3], 1e-6, *ref_leaves[3:])
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
        tol = 1e-5 if dtype == torch.float32 else 4e-2
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        assert not torch.allclose(out[0, 0].double(), shift[0].double(), atol=0.1)
        for name, g, rg in zip(("x", "shift", "scale", "weight", "bias"), grads, ref_grads):
            assert torch.isfinite(g).all(), name
            if name != "x":  # dx of the huge rows is ~1e-20: compare relative to its size
                torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-4 * rg.abs().max())
        rel = (grads[0].double() - ref_grads[0]) / ref_grads[0].abs().amax(-1, keepdim=True)
        assert rel[0, [0, 2, 4, 5]].abs().max() < (1e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("shape", [(2, 6, 0), (2, 0, 8), (0, 6, 8)], ids=["C0", "N0", "B0"])
def test_zero_size_inputs_give_empty_results_on_every_backend(request, backend, shape):
    """Issue 13, item 6: the same empty (or zero-gradient) result on ref and triton."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    batch, tokens, channels = shape
    x = torch.randn(shape, device=device, requires_grad=True)
    y = torch.randn(shape, device=device, requires_grad=True)
    mod = [torch.randn(batch, 2, channels, device=device, requires_grad=True) for _ in range(3)]
    affine = [torch.randn(channels, device=device, requires_grad=True) for _ in range(2)]
    out = kernels.adaln_modulate(x, mod[0], mod[1], weight=affine[0], bias=affine[1],
                                 backend=backend)
    gated = kernels.gated_residual(x, y, mod[2], backend=backend)
    assert out.shape == gated.shape == x.shape
    total = out.sum() + gated.sum()
    grads = torch.autograd.grad(total, [x, y, *mod, *affine])
    for leaf, grad in zip([x, y, *mod, *affine], grads):
        assert grad.shape == leaf.shape and (grad == 0).all()


def test_torch_compile_traces_triton_path(triton_device):
    x, shift, scale = _leaves(*_inputs(2, 8, 2, 16, torch.float32, triton_device))
    weight, bias = _leaves(torch.randn(16, device=triton_device),
                           torch.randn(16, device=triton_device))

    def f(a, b, c, w, bb):
        h = kernels.adaln_modulate(a, b, c, weight=w, bias=bb, backend="triton")
        return kernels.gated_residual(a, h, c, backend="triton").sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, shift, scale, weight, bias)
    out.backward()
    expected = gated_residual_ref(x, adaln_modulate_ref(x, shift, scale, 1e-6, weight, bias),
                                  scale).sum()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert all(t.grad is not None and torch.isfinite(t.grad).all()
               for t in (x, shift, scale, weight, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(2, 1024, 4, 1152, True), (1, 600, 3, 5120, True),
                                  (2, 77, 1, 320, False)])
@pytest.mark.parametrize("variant", ["plain", "affine-fp32-all"])
def test_gpu_bf16_real_shapes(case, variant):
    """bf16 at DiT-XL (C = 1152) and Wan 14B (C = 5120) widths, per-frame modulation, with and
    without the affine parameters and fp32 modulation (Wan / CogVideoX), against fp64."""
    _check_adaln(case, torch.bfloat16, "cuda", variant, floor=1e-3)
    x, gate, _ = _inputs(*case[:4], torch.bfloat16, "cuda", case[4])
    y = torch.randn_like(x)
    gated = kernels.gated_residual(x, y, gate.float(), backend="triton")
    expected = gated_residual_ref(x.double(), y.double(), gate.double())
    torch.testing.assert_close(gated.double(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bad, match", [
    (lambda x, s: (x[0], s, s), "x must be 3-D"),
    (lambda x, s: (x, s[:, :, :5], s[:, :, :5]), r"shift must have shape \[2, \*, 8\]"),
    (lambda x, s: (x, s[:, :2], s[:, :2]), "multiple of the frame count T"),
    (lambda x, s: (x, s.half(), s.half()), r"shift must have float32 \(that of x\), got float16"),
    (lambda x, s: (x.half(), s.bfloat16(), s.bfloat16()),
     r"shift must have the dtype of x \(float16\) or float32, got bfloat16"),
    (lambda x, s: (x.half(), s, s.half()), "scale must have the same dtype as shift"),
    (lambda x, s: (x.int(), s, s), "x must have dtype in"),
    (lambda x, s: (x, s[0], s[0]), r"shift must have shape \[2, 8\]"),
])
def test_bad_input_is_named(bad, match):
    x = torch.randn(2, 9, 8)
    s = torch.randn(2, 3, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.adaln_modulate(*bad(x, s))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(eps="a"), TypeError, "eps must be a real number .*got str 'a'"),
    (dict(eps=True), TypeError, "eps must be a real number .*got bool True"),
    (dict(eps=float("inf")), ValueError, "eps must be a finite number > 0, got inf"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0, got nan"),
    (dict(eps=-1e-6), ValueError, "eps must be a finite number > 0, got -1e-06"),
    (dict(eps=0), ValueError, "eps must be a finite number > 0, got 0.0"),
    (dict(weight=torch.ones(7)), ValueError, r"weight must have shape \[8\] \(\[C\] of x\)"),
    (dict(bias=torch.ones(1, 8)), ValueError, "bias must be 1-D, got 2-D"),
    (dict(weight=torch.ones(8, dtype=torch.float16)), TypeError,
     r"weight must have float32 \(that of x\), got float16"),
    (dict(bias=torch.ones(8, device="meta")), ValueError, "bias must be on the same device as x"),
])
def test_bad_eps_and_affine_are_named(kwargs, exc, match):
    x, s = torch.randn(2, 9, 8), torch.randn(2, 3, 8)
    with pytest.raises(exc, match=match):
        kernels.adaln_modulate(x, s, s, **kwargs)


def test_eps_accepts_numpy_and_int():
    np = pytest.importorskip("numpy")
    x, s = torch.randn(1, 2, 8), torch.randn(1, 8)
    expected = kernels.adaln_modulate(x, s, s, eps=1e-5, backend="ref")
    torch.testing.assert_close(kernels.adaln_modulate(x, s, s, eps=np.float32(1e-5)), expected)
    kernels.adaln_modulate(x, s, s, eps=1)  # an int is a real number


def test_gated_residual_bad_input():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"y must have shape \[2, 4, 8\]"):
        kernels.gated_residual(x, torch.randn(2, 4, 7), torch.randn(2, 8))
    with pytest.raises(ValueError, match="gate must be 2-D or 3-D"):
        kernels.gated_residual(x, x, torch.randn(8))
    with pytest.raises(TypeError, match=r"gate must have float32 \(that of x\), got float16"):
        kernels.gated_residual(x, x, torch.randn(2, 8).half())
    with pytest.raises(TypeError, match=r"y must have the same dtype as x \(float32\)"):
        kernels.gated_residual(x, x.half(), torch.randn(2, 8))


_AOT_SCRIPT = """
import sys
from kernels.adaln import triton_impl as ti
from kernels.testing import compile_for_gpu
F32 = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "eps": "fp32", "sum_dy_ptr": "*fp32",
       "sum_dyx_ptr": "*fp32", "dgate_part_ptr": "*fp32"}
MOD = ("shift_ptr", "scale_ptr", "gate_ptr", "weight_ptr", "bias_ptr")
ROWS = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "out_ptr", "a_ptr")
# (kernel, flags set to `affine`, fixed constexprs)
KERNELS = ((ti._adaln_fwd_kernel, ("HAS_WEIGHT", "HAS_BIAS"), {}),
           (ti._adaln_bwd_kernel, ("HAS_WEIGHT",), {}),
           (ti._gated_residual_kernel, (), {"BACKWARD": False}),
           (ti._gated_residual_kernel, (), {"BACKWARD": True}))


def compile_all(arch, dt, mod_dt, channels, block_r, num_warps, affine, stages=2):
    head, tail = ti.channel_pieces(channels)
    types = {**F32, **{n: dt for n in ROWS}, **{n: mod_dt for n in MOD}}
    for kernel, flags, fixed in KERNELS:
        consts = {**{name: affine for name in flags}, **fixed, "BLOCK_C": head,
                  "BLOCK_T": tail, "ROWS_PER_PROGRAM": 16, "BLOCK_R": block_r,
                  "LOOP_STAGES": stages}
        yield kernel, compile_for_gpu(kernel, types, consts, arch=arch, num_warps=num_warps,
                                      aligned=("channels", "tokens_per_frame"))
"""

_AOT_COMPILE = _AOT_SCRIPT + """
n = 0
# (arch, x dtype, modulation dtype, C, rows per tile, warps, affine, loop stages): head + tail
# pieces (1152 = 1024 + 128, 5120 = 4096 + 1024), one piece (2048), fp32 modulation with bf16 x,
# pipelined and plain row loops
for case in ((80, "*bf16", "*bf16", 1152, 2, 8, True, 2),
             (80, "*fp16", "*fp16", 2048, 4, 8, False, 1),
             (90, "*bf16", "*fp32", 5120, 1, 16, True, 2),
             (90, "*fp16", "*fp32", 40, 8, 2, False, 1)):
    for kernel, compiled in compile_all(*case):
        assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"]
        n += 1
print("compiled", n)
"""


@pytest.mark.slow
def test_kernels_compile_for_a100_and_hopper():
    """The compiled path (not the interpreter) lowers every adaLN kernel to sm_80 and sm_90 PTX
    and cubin in bf16 and fp16, with and without the tail piece and the affine parameters, and
    with fp32 modulation, with no GPU present."""
    done = run_compiled_mode(_AOT_COMPILE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["compiled", "16"], done.stdout


_INT64_CHECK = _AOT_SCRIPT + r"""
import re

def multiplies(ptx, kernel_name, params):
    # registers holding the int parameters (and their 64-bit sign extensions), and every
    # mul / mad instruction reading one of them
    names = [n for n in kernel_name.arg_names if n not in kernel_name.constexprs_names]
    out = {}
    for param in params:
        index = names.index(param)
        reg = re.search(rf"ld\.param\.[bsu]32\s+(%rd?\d+),\s*\[\w+_param_{index}\]", ptx)
        regs = {reg.group(1)} | set(re.findall(
            rf"cvt\.[su]64\.[su]32\s+(%rd\d+),\s*{re.escape(reg.group(1))};", ptx))
        out[param] = [line.split()[0] for line in ptx.splitlines() for r in regs
                      if re.match(r"\s*(mul|mad)", line) and re.search(rf"{re.escape(r)}\b", line)]
    return out

for kernel, compiled in compile_all(90, "*bf16", "*bf16", 1152, 2, 8, True):
    fn = kernel.fn
    fn.constexprs_names = [fn.arg_names[i] for i in fn.constexprs]
    found = multiplies(compiled.asm["ptx"], fn, sys.argv[1:])
    print(fn.__name__, *(f"{p}:{','.join(sorted(set(ops)))}" for p, ops in found.items()))
"""


@pytest.mark.slow
def test_row_offsets_are_64_bit_in_compiled_code():
    """B*N*C >= 2**31 elements (Wan 14B: C = 5120, N = 75.6k, B >= 6) must address correctly: in
    the sm_90 PTX of every kernel, each multiply that reads the channel count or the tokens per
    frame (row * C, segment * N/T) is a 64-bit one (mul.lo.s64 / mul.wide), never mul.lo.s32.
    A 2**31-element tensor is too large for the CPU lane, so this checks the compiled code."""
    done = run_compiled_mode(_INT64_CHECK, "channels", "tokens_per_frame")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4, done.stdout
    for line in lines:
        name, *params = line.split()
        ops = dict(p.split(":") for p in params)
        channel_ops = set(ops["channels"].split(","))
        assert channel_ops and channel_ops <= {"mul.lo.s64", "mad.lo.s64", "mul.wide.s32"}, line
        assert "mul.lo.s64" in channel_ops or "mad.lo.s64" in channel_ops, line
        token_ops = set(filter(None, ops["tokens_per_frame"].split(",")))
        assert not any(op.endswith("32") and "wide" not in op for op in token_ops), line
