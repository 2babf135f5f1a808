"""frame_causal_attention: reference vs independent fp64 math, gradcheck on the reference, Triton
(interpreter on CPU, compiled on GPU) vs reference for the output and every gradient, tile skipping,
the O(N) metadata, validation and torch.compile.

CPU lane: unaligned frames of 13, 27 and 45 tokens (never a multiple of the 16/32-token tiles);
GPU lane (`-m gpu`): the real 1350- and 1560-token frames."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels.frame_causal.ref import frame_causal_attention_ref, frame_causal_mask, rope_1d_ref
from kernels.testing import (
    assert_within_tolerance,
    eager_and_graph_replay,
    nan_empty,
    run_compiled_mode,
)

THETA = 10000.0


def _ids(sizes, first=0, device="cpu"):
    """Sorted ids: frame first+t repeated sizes[t] times."""
    return torch.cat([torch.full((s,), first + t, dtype=torch.int64) for t, s in
                      enumerate(sizes)]).to(device)


def _shuffled(ids):
    return ids[torch.randperm(ids.shape[-1], device=ids.device)]


def _qkv(batch, tokens, heads, head_dim, dtype, device):
    return [torch.randn(batch, tokens, heads, head_dim, dtype=dtype, device=device)
            for _ in range(3)]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _independent(q, k, v, ids, theta, scale):
    """fp64, one query at a time over an explicit list of visible keys; RoPE as a complex
    rotation of the pairs (x_i, x_{i+D/2})."""
    q, k, v = q.double(), k.double(), v.double()
    batch, tokens, _, d = q.shape
    ids = ids.expand(batch, tokens) if ids.dim() == 2 else ids[None].expand(batch, tokens)
    if theta is not None:
        inv = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)]).float()

        def rot(x):
            z = torch.complex(x[..., : d // 2], x[..., d // 2:])
            ang = (ids.float()[..., None] * inv).double()[:, :, None, :]
            z = z * torch.polar(torch.ones_like(ang), ang)
            return torch.cat((z.real, z.imag), dim=-1)
        q, k = rot(q), rot(k)
    out = torch.empty_like(q)
    for b in range(batch):
        for i in range(tokens):
            keys = [j for j in range(tokens) if ids[b, j] <= ids[b, i]]
            s = torch.einsum("hd,jhd->hj", q[b, i], k[b, keys]) * scale
            out[b, i] = torch.einsum("hj,jhd->hd", torch.softmax(s, -1), v[b, keys])
    return out


def _low_precision(q, k, v, ids, theta, scale):
    """Plain PyTorch in the inputs' dtype (the tolerance rule's baseline)."""
    ids2 = ids if ids.dim() == 2 else ids[None]
    if theta is not None:
        q, k = rope_1d_ref(q, ids2, theta).to(q.dtype), rope_1d_ref(k, ids2, theta).to(k.dtype)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~frame_causal_mask(ids2)[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)


# ----------------------------------------------------------------------------------------------
# reference


@pytest.mark.parametrize("theta", [None, THETA])
def test_ref_matches_independent_fp64_math(theta):
    ids = torch.stack([_ids([3, 5, 2], first=4), _shuffled(_ids([4, 4, 2]))])
    q, k, v = _qkv(2, 10, 2, 8, torch.float64, "cpu")
    for frame_ids in (ids, ids[1]):
        out = frame_causal_attention_ref(q, k, v, frame_ids, theta, 0.3)
        expected = _independent(q, k, v, frame_ids, theta, 0.3)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_ref_special_cases_equal_sdpa():
    q, k, v = _qkv(2, 11, 3, 16, torch.float64, "cpu")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t = (lambda x: x.transpose(1, 2))
    full = frame_causal_attention_ref(q, k, v, torch.full((11,), 7))
    torch.testing.assert_close(full, t(sdpa(t(q), t(k), t(v))), rtol=0, atol=1e-12)
    causal = frame_causal_attention_ref(q, k, v, torch.arange(11) * 3 + 2)
    torch.testing.assert_close(causal, t(sdpa(t(q), t(k), t(v), is_causal=True)), rtol=0,
                               atol=1e-12)


def test_ref_gradcheck():
    q, k, v = _leaves(*_qkv(1, 6, 2, 8, torch.float64, "cpu"))
    ids = torch.tensor([2, 0, 2, 1, 1, 0])
    assert torch.autograd.gradcheck(
        lambda a, b, c: frame_causal_attention_ref(a, b, c, ids, THETA), (q, k, v))


# ----------------------------------------------------------------------------------------------
# Triton vs reference: output and every gradient

CASES = {  # name: (B, H, D, ids builder, rope_theta)
    "sorted_unaligned": (2, 2, 32, lambda: _ids([13, 27, 45]), None),
    "sorted_rope": (2, 2, 32, lambda: _ids([13, 27, 45], first=3), THETA),
    "unsorted_repeated_rope": (1, 2, 16, lambda: _shuffled(_ids([27, 13, 45])), THETA),
    "gaps_not_from_zero": (2, 1, 24, lambda: torch.cat([_ids([13], 5), _ids([27], 9),
                                                         _ids([19], 6)]), None),
    "single_frame": (1, 2, 40, lambda: torch.full((37,), 4), THETA),
    "token_causal": (1, 2, 16, lambda: torch.arange(41), None),
    "per_batch_ids": (2, 1, 8, lambda: torch.stack([_ids([13, 27, 19]),
                                                    _shuffled(_ids([27, 13, 19]))]), THETA),
    "odd_n_b1_d72": (1, 1, 72, lambda: _ids([1, 13, 45]), THETA),
}


def _check_against_reference(q, k, v, ids, theta, scale=None):
    scale_v = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    leaves = _leaves(q, k, v)
    out = kernels.frame_causal_attention(*leaves, frame_ids=ids, rope_theta=theta, scale=scale,
                                         backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = _leaves(q.double(), k.double(), v.double())
    ref = frame_causal_attention_ref(*ref_leaves, ids, theta, scale_v)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = _leaves(q, k, v)
    low = _low_precision(*low_leaves, ids, theta, scale_v)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_within_tolerance(out, ref, low, name="out")
    for name, g, rg, lg in zip("qkv", grads, ref_grads, low_grads):
        assert g.dtype == q.dtype
        assert_within_tolerance(g, rg, lg, factor=3.0, floor=1e-4, name=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(triton_device, dtype, case):
    batch, heads, head_dim, make_ids, theta = CASES[case]
    ids = make_ids().to(triton_device)
    q, k, v = _qkv(batch, ids.shape[-1], heads, head_dim, dtype, triton_device)
    _check_against_reference(q, k, v, ids, theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_deterministic_mode_matches_reference_and_repeats_bitwise(triton_device, dtype):
    """Under torch.use_deterministic_algorithms the backward computes dq in its own pass (no
    atomics): same tolerance as the atomic default, and two runs agree bit for bit."""
    ids = _shuffled(_ids([13, 27, 19])).to(triton_device)
    q, k, v = _qkv(2, ids.shape[-1], 2, 16, dtype, triton_device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check_against_reference(q, k, v, ids, THETA)
        runs = []
        for _ in range(2):
            leaves = _leaves(q, k, v)
            out = kernels.frame_causal_attention(*leaves, frame_ids=ids, backend="triton")
            runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_negative_and_unsorted_frame_ids_match_reference(triton_device):
    """Ids are ordering keys with no host-side value check: negative ids order before 0."""
    ids = _shuffled(torch.cat([_ids([13], -4), _ids([27], 2), _ids([9], -1)])).to(triton_device)
    q, k, v = _qkv(1, ids.shape[-1], 2, 16, torch.float32, triton_device)
    _check_against_reference(q, k, v, ids, THETA)


def test_triton_strided_inputs_and_custom_scale(triton_device):
    """q, k, v as views of a packed [B, N, 3, H, D] projection; a transposed (non-unit D stride)
    input; an explicit scale."""
    ids = _shuffled(_ids([13, 27])).to(triton_device)
    qkv = torch.randn(2, 40, 3, 2, 16, device=triton_device)
    q, k, v = qkv.unbind(2)
    _check_against_reference(q, k, v, ids, THETA, scale=0.2)
    vt = torch.randn(2, 40, 16, 2, device=triton_device).transpose(2, 3)
    _check_against_reference(q, k, vt, ids, None)


# ----------------------------------------------------------------------------------------------
# tiles, metadata, written memory


def _tile_classes(mask, block_m, block_n):
    """Independent count from the dense mask [N, N]: (fully visible, partial) tile pairs. A
    fully visible tile lies inside [0, N) on the key side."""
    tokens = mask.shape[0]
    full = partial = 0
    for q0 in range(0, tokens, block_m):
        for k0 in range(0, tokens, block_n):
            tile = mask[q0:q0 + block_m, k0:k0 + block_n]
            if tile.all() and k0 + block_n <= tokens:
                full += 1
            elif tile.any():
                partial += 1
    return full, partial


def _run_with_stats(ids, device, heads=1, head_dim=16):
    from kernels.frame_causal import triton_impl

    ids2 = ids[None]
    q, k, v = _qkv(1, ids.shape[0], heads, head_dim, torch.float32, device)
    permute = bool((ids.diff() < 0).any())
    kv_end, q_begin, perm = triton_impl.frame_causal_meta(ids2, permute)
    fwd_stats = torch.zeros(2, dtype=torch.int32, device=device)
    o, lse = triton_impl.frame_causal_fwd(q, k, v, kv_end, perm, 0.25, stats=fwd_stats)
    bwd_stats = torch.zeros(4, dtype=torch.int32, device=device)
    triton_impl.frame_causal_bwd(torch.randn_like(o), q, k, v, o, lse, kv_end, q_begin, perm,
                                 0.25, stats=bwd_stats, deterministic=True)
    bwd_cfg = triton_impl.tile_config("bwd")
    # The atomic mode: the same key-tile sweep (its own autotuned tiles), and no dq pass.
    atomic_stats = torch.zeros(4, dtype=torch.int32, device=device)
    triton_impl.frame_causal_bwd(torch.randn_like(o), q, k, v, o, lse, kv_end, q_begin, perm,
                                 0.25, stats=atomic_stats, deterministic=False)
    atomic_cfg = triton_impl.tile_config("bwd")
    mask = frame_causal_mask(ids.sort().values[None].cpu())[0]   # tiles are in frame order
    nonempty = sum(_tile_classes(mask, atomic_cfg["BLOCK_M"], atomic_cfg["BLOCK_N"]))
    assert sum(atomic_stats.tolist()[:2]) == nonempty and atomic_stats.tolist()[2:] == [0, 0]
    return fwd_stats.tolist(), triton_impl.tile_config("fwd"), bwd_stats.tolist(), bwd_cfg


def test_fully_masked_tiles_are_skipped(triton_device):
    """Sorted ids, 15 frames of 27 tokens: the kernels process exactly the non-empty tiles
    (about half of the dense grid) and leave the fully visible ones unmasked; shuffling the
    tokens changes nothing since the kernels work in frame order."""
    ids = _ids([27] * 15).to(triton_device)
    mask = frame_causal_mask(ids[None])[0].cpu()
    fwd, fcfg, bwd, bcfg = _run_with_stats(ids, triton_device)
    bm, bn = fcfg["BLOCK_M"], fcfg["BLOCK_N"]
    assert tuple(fwd) == _tile_classes(mask, bm, bn)
    dense = math.ceil(405 / bm) * math.ceil(405 / bn)
    assert 0.45 < sum(fwd) / dense < 0.62
    nonempty = sum(_tile_classes(mask, bcfg["BLOCK_M"], bcfg["BLOCK_N"]))
    assert sum(bwd[:2]) == nonempty and sum(bwd[2:]) == nonempty  # dk/dv pass, dq pass
    assert _run_with_stats(_shuffled(ids), triton_device)[::2] == (fwd, bwd)


@pytest.mark.parametrize("sizes", [[1], [64], [65], [3, 1, 60, 7], [200, 1, 55]])
def test_metadata_matches_searchsorted(triton_device, sizes):
    from kernels.frame_causal import triton_impl

    ids = torch.stack([_ids(sizes, first=2), _shuffled(_ids(sizes))]).to(triton_device)
    kv_end, q_begin, perm = triton_impl.frame_causal_meta(ids, permute=True)
    ordered, order = torch.sort(ids, dim=-1, stable=True)
    assert torch.equal(perm.long(), order)
    assert torch.equal(kv_end.long(), torch.searchsorted(ordered, ordered, right=True))
    assert torch.equal(q_begin.long(), torch.searchsorted(ordered, ordered, right=False))
    kv_end0, _, perm0 = triton_impl.frame_causal_meta(ids[:1], permute=False)
    assert perm0.shape == (1, 0) and torch.equal(kv_end0, kv_end[:1])


def test_triton_writes_every_element(triton_device, monkeypatch):
    """Every buffer the launchers allocate starts as NaN (-1 for integers) and must come back
    fully written."""
    from kernels.frame_causal import triton_impl

    real_empty = torch.empty

    def poisoned(*shape, dtype=torch.float32, device=None, **kw):
        if len(shape) == 1 and not isinstance(shape[0], int):
            shape = tuple(shape[0])
        if dtype.is_floating_point:
            return nan_empty(*shape, dtype=dtype, device=device)
        return real_empty(*shape, dtype=dtype, device=device, **kw).fill_(-1)

    monkeypatch.setattr(triton_impl.torch, "empty", poisoned)
    ids = torch.stack([_ids([13, 20]), _shuffled(_ids([20, 13]))]).to(triton_device)
    q, k, v = _leaves(*_qkv(2, 33, 2, 24, torch.float32, triton_device))
    out = kernels.frame_causal_attention(q, k, v, frame_ids=ids, rope_theta=THETA,
                                         backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for t in (out, *grads):
        assert torch.isfinite(t).all()
    kv_end, q_begin, _ = triton_impl.frame_causal_meta(ids, permute=True)
    assert (kv_end >= 1).all() and (q_begin >= 0).all()


def test_torch_compile_traces_triton_path(triton_device):
    ids = _ids([5, 9, 4]).to(triton_device)
    q, k, v = _leaves(*_qkv(1, 18, 2, 16, torch.float32, triton_device))

    def f(a, b, c):
        return kernels.frame_causal_attention(a, b, c, frame_ids=ids, rope_theta=THETA,
                                              backend="triton").square().sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    out.backward()
    ref_leaves = _leaves(q, k, v)
    expected = frame_causal_attention_ref(*ref_leaves, ids, THETA).square().sum()
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip((q, k, v), ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


_AOT_SCRIPT = """
import re, subprocess, tempfile
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.frame_causal import triton_impl

def build(kernel, num_warps=4, num_stages=3, **consts):
    ints = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "kv_end_ptr": "*i32",
            "q_begin_ptr": "*i32", "perm_ptr": "*i32", "stats_ptr": "*i32"}
    if consts.get("DQ_ATOMIC"):
        ints["dq_ptr"] = "*fp32"
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ints.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name.endswith("scale") else "i32"
        if name.endswith("_ptr") or (name.startswith("stride_") and name != "stride_meta_b"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT specialises at run time
    src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})

def ptxas_serialisation_warnings(compiled):
    # ptxas -v reports wgmma serialisation (C7510..C7515) as "info" lines.
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", f.name,
                              "-o", "/dev/null"], capture_output=True, text=True)
    text = log.stdout + log.stderr
    spills = sum(int(n) for n in re.findall(r"([0-9]+) bytes spill stores", text))
    return [line for line in text.splitlines() if "(C751" in line], spills

common = {"HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_D1": 0, "PERMUTED": True, "COUNT_TILES": False,
          "INPUT_PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 64}
kernels = [build(triton_impl._frame_causal_fwd_kernel.fn, **common)]
kernels += [build(triton_impl._frame_causal_bwd_kernel.fn, DQ_PASS=p, DQ_ATOMIC=not p, **common)
            for p in (False, True)]
for k in kernels:
    ir = k.asm["ttgir"]
    print("wgmma" if "warp_group_dot" in ir else "no-wgmma",
          "pipelined" if "async_copy_global_to_local" in ir else "not-pipelined")
# Every dk/dv configuration the autotuner may pick (default atomic mode; the deterministic mode
# at the first), D = 64 and 128: no serialised wgmma (masked tiles first got C7515 in all).
warnings, spills = [], []
for head_dim in (64, 128):
    kept = triton_impl._prune(triton_impl._BWD_CONFIGS, None, BLOCK_D=head_dim, DQ_PASS=False,
                              DQ_ATOMIC=True)
    for cfg in kept:
        for atomic in (True, False) if cfg is kept[0] else (True,):
            consts = {**common, **cfg.kwargs, "HEAD_DIM": head_dim, "BLOCK_D": head_dim,
                      "DQ_PASS": False, "DQ_ATOMIC": atomic}
            compiled = build(triton_impl._frame_causal_bwd_kernel.fn, cfg.num_warps,
                             cfg.num_stages, **consts)
            lines, spilled = ptxas_serialisation_warnings(compiled)
            warnings += [(head_dim, str(cfg), line) for line in lines]
            if spilled:
                spills.append((head_dim, str(cfg), atomic, spilled))
# Every forward configuration the autotuner may pick at D = 64, 72 (split 64 + 16) and 128: no
# spills either.
for head_dim in (64, 72, 128):
    blocks = dict(zip(("BLOCK_D", "BLOCK_D1"), triton_impl.head_blocks(head_dim)))
    for cfg in triton_impl._prune(triton_impl._FWD_CONFIGS, None, **blocks):
        consts = {**common, **cfg.kwargs, "HEAD_DIM": head_dim, **blocks}
        compiled = build(triton_impl._frame_causal_fwd_kernel.fn, cfg.num_warps, cfg.num_stages,
                         **consts)
        lines, spilled = ptxas_serialisation_warnings(compiled)
        warnings += [(head_dim, str(cfg), line) for line in lines]
        if spilled:
            spills.append((head_dim, "fwd " + str(cfg), spilled))
print("serialised", len(warnings), warnings)
print("spilling", len(spills), spills)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_with_pipelined_loads():
    """Ahead-of-time compile (no GPU needed; a subprocess without the interpreter) of the forward
    and both backward passes for sm_90 in bf16, D=64: catches compiled-path errors the
    interpreter cannot see, and checks that the tile loads are software-pipelined (async copies)
    and the products use wgmma, which the performance depends on; and that ptxas serialises the
    wgmma of no dk/dv configuration the autotuner can choose (D = 64 and 128), and none of them
    spills."""
    done = run_compiled_mode(_AOT_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[:6] == ["wgmma", "pipelined"] * 3, done.stdout
    assert done.stdout.split()[6:8] == ["serialised", "0"], done.stdout
    # ... and that none of them spills registers (the pruner's per-D register budget)
    assert "spilling 0 []" in done.stdout, done.stdout


def test_default_backend_on_plain_cpu_is_ref(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(1, 9, 1, 8, torch.float32, "cpu")
    ids = _ids([4, 5])
    out = kernels.frame_causal_attention(q, k, v, frame_ids=ids)
    torch.testing.assert_close(out, frame_causal_attention_ref(q, k, v, ids))
    assert kernels.available_backends("frame_causal_attention", device="cpu")["ref"] == []


# ----------------------------------------------------------------------------------------------
# bad input


def _call(arg, value):
    base = torch.randn(2, 9, 2, 8)
    inputs = {"q": base, "k": base, "v": base, "frame_ids": _ids([4, 5])}
    if arg == "D":
        inputs.update(q=value, k=value, v=value)
    else:
        inputs[arg] = value
    return kernels.frame_causal_attention(**inputs)


@pytest.mark.parametrize("arg, value, exc, match", [
    ("frame_ids", torch.zeros(8, dtype=torch.long), ValueError,
     r"frame_ids must have shape \[9\] \(\[N\], N = q.shape\[1\]\), got \[8\]"),
    ("frame_ids", torch.zeros(3, 9, dtype=torch.long), ValueError,
     r"frame_ids must have shape \[2, 9\] \(\[B, N\] of q\), got \[3, 9\]"),
    ("frame_ids", torch.zeros(9), TypeError, "frame_ids must have an integer dtype .* got float32"),
    ("frame_ids", torch.zeros(9, dtype=torch.bool), TypeError, "got bool"),
    ("frame_ids", [0] * 9, TypeError, "frame_ids must be a torch.Tensor, got list"),
    ("frame_ids", torch.zeros(1, 1, 9, dtype=torch.long), ValueError, "frame_ids must be 1-D"),
    ("frame_ids", torch.zeros(9, dtype=torch.long, device="meta"), ValueError,
     r"frame_ids must be on the same device as q \(cpu\), got meta"),
    ("k", torch.randn(2, 8, 2, 8), ValueError, r"k must have shape \[2, 9, 2, 8\]"),
    ("v", torch.randn(2, 9, 2, 8).half(), TypeError, "v must have the same dtype as q"),
    ("q", torch.randn(9, 2, 8), ValueError, "q must be 4-D, got 3-D"),
    ("D", torch.randn(2, 9, 2, 12), ValueError, "multiple of 8 up to 256, got D=12"),
    ("rope_theta", -1.0, ValueError, "rope_theta must be a finite number > 0, got -1.0"),
    ("rope_theta", "1e4", TypeError, "rope_theta must be a real number or None, got str"),
    ("scale", float("nan"), ValueError, "scale must be a finite number, got nan"),
])
def test_bad_input_is_named(arg, value, exc, match):
    with pytest.raises(exc, match=match):
        _call(arg, value)


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("shape", [(0, 9, 2, 8), (2, 0, 2, 8), (2, 9, 0, 8)])
def test_zero_size_inputs_raise_the_same_error_on_every_backend(triton_device, backend, shape):
    q = torch.randn(*shape, device=triton_device)
    ids = torch.zeros(shape[1], dtype=torch.long, device=triton_device)
    with pytest.raises(ValueError, match=rf"q must be non-empty, got shape \{list(shape)}"):
        kernels.frame_causal_attention(q, q, q, frame_ids=ids, backend=backend)


def test_bad_device_mix_is_named():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="k must be on the same device as q"):
        kernels.frame_causal_attention(q, q.to("meta"), q, frame_ids=torch.zeros(4, dtype=int))


# ----------------------------------------------------------------------------------------------
# GPU lane: the papers' frame sizes (1350 tokens: LaVieID TAM; 1560 tokens: Wan / Self-Forcing)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, sizes, head_dim, shuffle, theta", [
    ("lavieid_tam", [1350] * 5, 64, False, THETA),
    ("lavieid_tam_unsorted", [1350] * 5, 64, True, THETA),
    ("wan_1560", [1560] * 4, 128, False, None),
])
def test_gpu_real_frame_sizes(dtype, name, sizes, head_dim, shuffle, theta):
    ids = _ids(sizes, first=3, device="cuda")
    ids = _shuffled(ids) if shuffle else ids
    q, k, v = _qkv(1, ids.shape[0], 2, head_dim, dtype, "cuda")
    _check_against_reference(q, k, v, ids, theta)


@pytest.mark.gpu
def test_gpu_fp32_and_per_batch_ids():
    ids = torch.stack([_ids([1350, 1350, 301], device="cuda"),
                       _shuffled(_ids([1350, 1350, 301], device="cuda"))])
    q, k, v = _qkv(2, ids.shape[-1], 2, 64, torch.float32, "cuda")
    _check_against_reference(q, k, v, ids, THETA)


@pytest.mark.gpu
def test_gpu_wan_21_frames_forward_and_tile_count():
    ids = _ids([1560] * 21, device="cuda")
    q, k, v = _qkv(1, ids.shape[0], 1, 128, torch.bfloat16, "cuda")
    out = kernels.frame_causal_attention(q, k, v, frame_ids=ids, backend="triton")
    ref = frame_causal_attention_ref(q, k, v, ids)  # fp32 inside
    assert (out.float() - ref.float()).abs().max() < 2e-2
    fwd, cfg, _, _ = _run_with_stats(ids, "cuda", head_dim=128)
    dense = math.ceil(32760 / cfg["BLOCK_M"]) * math.ceil(32760 / cfg["BLOCK_N"])
    assert sum(fwd) / dense < 0.56  # 11/21 of the pairs are visible


@pytest.mark.gpu
def test_gpu_inductor_compile():
    ids = _ids([1350, 1350], device="cuda")
    q, k, v = _leaves(*_qkv(1, 2700, 4, 64, torch.bfloat16, "cuda"))
    f = torch.compile(lambda a, b, c: kernels.frame_causal_attention(
        a, b, c, frame_ids=ids, rope_theta=THETA, backend="triton"), fullgraph=True)
    out = f(q, k, v)
    out.float().sum().backward()
    ref = frame_causal_attention_ref(q, k, v, ids, THETA)
    assert (out.float() - ref.float()).abs().max() < 2e-2 and torch.isfinite(q.grad).all()


def test_triton_launchers_never_sync_with_the_host(triton_device):
    """Forward and backward (both modes), RoPE, unsorted per-batch ids: no launcher or op code
    reads a tensor value on the host or copies Python data to the device (issue 15, item 7)."""
    from kernels.testing import forbid_host_syncs

    ids = torch.stack([_ids([9, 7]), _shuffled(_ids([7, 9]))]).to(triton_device)
    q, k, v = _leaves(*_qkv(2, 16, 2, 16, torch.float32, triton_device))

    def run():
        out = kernels.frame_causal_attention(q, k, v, frame_ids=ids, rope_theta=THETA,
                                             backend="triton")
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    expected = run()  # first call: one-time caches (inverse frequencies) may be filled
    for deterministic in (False, True):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            with forbid_host_syncs():
                grads = run()
        finally:
            torch.use_deterministic_algorithms(previous)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)
    # The guard itself catches such a call made from a module of the package.
    probe = {"torch": torch, "__name__": "kernels.probe"}
    with pytest.raises(AssertionError, match="host sync: __int__ called from kernels.probe"), \
            forbid_host_syncs():
        exec("int(torch.ones(1))", probe)


@pytest.mark.gpu
def test_gpu_forward_and_backward_capture_in_a_cuda_graph():
    """No host sync anywhere in the call: forward and backward record into a CUDA graph and the
    replay reproduces the eager result (dq by atomics: equal up to summation order)."""
    ids = _shuffled(_ids([300, 300, 100], device="cuda"))
    q, k, v = _leaves(*_qkv(1, 700, 2, 64, torch.bfloat16, "cuda"))
    dout = torch.randn_like(q)

    def step():
        out = kernels.frame_causal_attention(q, k, v, frame_ids=ids, rope_theta=THETA,
                                             backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    eager, captured = eager_and_graph_replay(step)
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
