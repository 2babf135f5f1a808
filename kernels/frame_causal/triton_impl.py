"""Triton kernels for frame-causal attention (forward, backward), its metadata and frame RoPE.

Token i sees token j iff f[j] <= f[i]. The kernels work in *frame order*: tokens sorted by frame id
(stably). The op always sorts on the device (no host check of the order); for the usual sorted
ids the permutation is the identity and rows still load contiguously. The kernels read and write
rows through the permutation (flag PERMUTED; off for callers that pass sorted ids directly), so
the output never needs a separate gather/scatter pass. In frame order the visible keys of
query n are the prefix [0, kv_end[n]) and the queries that see key j are the suffix
[q_begin[j], N), with

    kv_end[n]  = #{m : f[m] <= f[n]}      q_begin[j] = #{m : f[m] < f[j]}

(O(N) int32 metadata, one small kernel). A query tile [s, e) then splits the keys into
    fully visible tiles  [0, kv_end[s])    (every key <= every query's frame: no mask)
    partial tiles        [.., kv_end[e-1]) (masked by  key < kv_end[row])
    skipped              the rest          (never loaded).
The dk/dv pass does the same over query tiles with q_begin. Softmax statistics are fp32, scores use
exp2 with log2(e) folded into the scale; the backward is FlashAttention-2 style: a program owns
a key tile and computes dk, dv and its share of dq (fp32 atomics), five products per tile pair;
in deterministic mode dq gets its own launch (a program owns a query tile) instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.triton_impl import head_blocks
from kernels.frame_causal.ref import rope_inv_freq
from kernels.registry import interpreter_enabled

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (the tolerance rule compares against fp32 PyTorch);
    # fp16/bf16 ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# fp32 tile elements per thread (accumulators and score tiles, see _fp32_per_thread) above which
# ptxas spills on sm_90a in bf16 (compile-only profile, D = 64 / 72 / 128): the forward spilled at
# 160 and 192 (128-row query tiles on 4 warps at D = 128), the dk/dv pass at 176 and more;
# 128 (forward) and 144 (dk/dv at D = 64, 233 registers) compiled without spills.
_MAX_FP32_PER_THREAD = {"fwd": 128, "bwd": 144}


def _fp32_per_thread(bm: int, bn: int, block_d: int, num_warps: int, dq_pass: bool | None,
                     dq_atomic: bool) -> int:
    """fp32 elements one thread holds in the loop: forward (dq_pass None) acc [M, D] + scores
    [M, N]; dk/dv pass dk, dv [N, D] + S^T, dP^T [N, M] (+ the dq share [M, D] with atomics);
    dq pass dq [M, D] + S, dP [M, N]."""
    if dq_pass is None:
        elements = bm * block_d + bm * bn
    elif dq_pass:
        elements = bm * block_d + 2 * bm * bn
    else:
        elements = 2 * bn * block_d + 2 * bm * bn + (bm * block_d if dq_atomic else 0)
    return elements // (32 * num_warps)


def _prune(configs, named_args, **kwargs):
    """Drop configs whose K/V pipeline does not fit in Hopper's shared memory (~227 KiB), and at
    D <= 128 those that would spill registers or miss wgmma (a tile whose wgmma M side, the query
    tile in the forward and dq pass, the key tile in the dk/dv pass and also the query tile of
    its atomic dq share, is under 64 rows falls back to mma.sync)."""
    # a split head dim (BLOCK_D1 > 0, see head_blocks) holds BLOCK_D + BLOCK_D1 columns
    split = kwargs.get("BLOCK_D1", 0) > 0
    block_d = kwargs["BLOCK_D"] + kwargs.get("BLOCK_D1", 0)
    dq_pass = kwargs.get("DQ_PASS")      # None: the forward
    budget = _MAX_FP32_PER_THREAD["fwd" if dq_pass is None else "bwd"]
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        smem = 2 * block_d * (bm + bn + cfg.num_stages * 2 * min(bm, bn))
        if smem > 200 * 1024:
            continue
        if block_d >= 256:
            # D=256 keeps only small tiles: the fp32 accumulators ([tile, D], two of them in the
            # dk/dv pass) must stay in registers
            if bm * bn <= 2048:
                kept.append(cfg)
            continue
        if dq_pass is not False and bm > 16 * cfg.num_warps:
            # 128-row query tiles on 4 warps (one warpgroup, two m64 wgmma per product):
            # ptxas serialises the wgmma (C7515) at D = 64, in the forward and the dq pass
            continue
        wgmma_rows = bn if dq_pass is False else bm
        if dq_pass is False and bm > bn:
            # query steps longer than the key tile: with atomics, the [BM, D] fp32 dq share and
            # the atomics' addresses outweigh the budget's estimate (128 x 64 spilled 316 B at
            # D = 64 and 1180 B at D = 128, ptxas), and without (deterministic mode) the
            # [BN, BM] score tiles do (128 x 64 spilled 856 B at D = 128)
            continue
        if dq_pass is False and kwargs.get("DQ_ATOMIC", False):
            wgmma_rows = min(bn, bm)  # the dq share dS^T K has the query tile as its M side
        streamed = bm if dq_pass is False else bn  # rows of the tiles loaded per loop step
        if split and streamed * block_d > 32 * 32 * cfg.num_warps:
            # a split head dim loads each streamed tile as two column blocks with their own
            # masks: above 32 elements per thread and step it spilled at D = 72 (64 + 16;
            # 128 x 128 on 8 warps 192 B, 64 x 64 on 4 warps 20 B; 20 per thread did not)
            continue
        if wgmma_rows >= 64 and _fp32_per_thread(bm, bn, block_d, cfg.num_warps, dq_pass,
                                                 kwargs.get("DQ_ATOMIC", False)) <= budget:
            kept.append(cfg)
    return kept or configs[-1:]


def _configs(interpret_blocks: tuple[int, int], gpu: list[tuple[int, int, int, int]]):
    if interpreter_enabled():  # one small config: the interpreter is slow and never tunes
        return [triton.Config({"BLOCK_M": interpret_blocks[0], "BLOCK_N": interpret_blocks[1]})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in gpu]


# (BLOCK_M, BLOCK_N, num_warps, num_stages); the last entry is the small-D / D=256 fallback.
# _prune keeps, per D, the ones that compile for sm_90a without spills and with wgmma.
_FWD_CONFIGS = _configs((32, 16), [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3),
                                   (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)])
# dk/dv programs own BLOCK_N keys, dq programs own BLOCK_M queries.
# (32, 128, 4 warps) is left out: its [128, D] dk, dv accumulators over 128 threads make ptxas
# serialise the wgmma (C7515 at D=64, C7512 at D=128).
_BWD_CONFIGS = _configs((16, 32), [(64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2),
                                   (128, 32, 4, 3), (64, 64, 4, 3), (32, 64, 8, 2), (32, 32, 4, 2)])
_KEY = ["tokens", "HEAD_DIM", "PERMUTED"]


@triton.jit
def _frame_causal_meta_kernel(ids_ptr, kv_end_ptr, q_begin_ptr, tokens, stride_ids_b,
                              SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """kv_end[n] = #{m: f[m] <= f[n]}, q_begin[n] = #{m: f[m] < f[n]} over sorted ids f, by a
    branchless binary search (SEARCH_STEPS = bit length of N) vectorised over BLOCK tokens."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1)
    ok = offs < tokens
    ids = ids_ptr + row.to(tl.int64) * stride_ids_b
    x = tl.load(ids + offs, mask=ok, other=0)
    le = tl.zeros([BLOCK], dtype=tl.int32)
    lt = tl.zeros([BLOCK], dtype=tl.int32)
    for s in tl.static_range(SEARCH_STEPS):
        step = 1 << (SEARCH_STEPS - 1 - s)
        c_le = le + step
        v_le = tl.load(ids + c_le - 1, mask=c_le <= tokens, other=0)
        le = tl.where((c_le <= tokens) & (v_le <= x), c_le, le)
        c_lt = lt + step
        v_lt = tl.load(ids + c_lt - 1, mask=c_lt <= tokens, other=0)
        lt = tl.where((c_lt <= tokens) & (v_lt < x), c_lt, lt)
    out = row.to(tl.int64) * tokens + offs
    tl.store(kv_end_ptr + out, le, mask=ok)
    tl.store(q_begin_ptr + out, lt, mask=ok)


@triton.jit
def _frame_causal_rope_kernel(
    x_ptr, y_ptr, ids_ptr, inv_freq_ptr,
    stride_x_b, stride_x_n, stride_x_h, stride_y_b, stride_y_n, stride_y_h, stride_ids_b,
    tokens, heads,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr,
):
    """y = R(f) x for every head of BLOCK_T tokens of one sequence: (x1, x2) = (x[:D/2], x[D/2:])
    -> (x1 cos - x2 sin, x2 cos + x1 sin), angle = f * inv_freq in fp32; INVERSE applies
    R(f)^T = R(-f). The angles depend on the token only, so a program computes cos and sin once,
    on [BLOCK_T, D/2] (half the tile, no partner gather), and loops over the heads."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    t_ok = offs_t < tokens
    i_ok = offs_i < HALF
    mask = t_ok[:, None] & i_ok[None, :]
    inv_freq = tl.load(inv_freq_ptr + offs_i, mask=i_ok, other=0.0)
    pos = tl.load(ids_ptr + b * stride_ids_b + offs_t, mask=t_ok, other=0).to(tl.float32)
    angle = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin
    rows = offs_t.to(tl.int64)[:, None]
    x_head = x_ptr + b * stride_x_b + rows * stride_x_n + offs_i[None, :]
    y_head = y_ptr + b * stride_y_b + rows * stride_y_n + offs_i[None, :]
    for _ in range(heads):
        x1 = tl.load(x_head, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_head, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_head + HALF, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)
        x_head += stride_x_h
        y_head += stride_y_h


@triton.jit
def _columns_ok(offs_d, HEAD_DIM: tl.constexpr):
    """Head-dim columns inside D. A block that lies inside D entirely (D a power of two, or the
    first block of a split head dim) gets a constant mask, which the compiler folds away: at
    D = 72 the computed one kept a mask per tile element live and spilled."""
    if offs_d.shape[0] + 0 <= HEAD_DIM:
        return tl.full(offs_d.shape, 1, tl.int1)
    return offs_d < HEAD_DIM


@triton.jit
def _rows(perm_ptr, idx, ok, PERMUTED: tl.constexpr):
    """Frame-order positions -> token rows of the caller's tensors."""
    if PERMUTED:
        idx = tl.load(perm_ptr + idx, mask=ok, other=0)
    return idx.to(tl.int64)  # row * stride_n in 64 bits: N * stride may pass 2^31


@triton.jit
def _fwd_tile(acc, acc1, m_i, l_i, q, q1, k_base, v_base, stride_k_n, stride_v_n, perm, start_n,
              offs_n, offs_d, d_ok, offs_d1, d_ok1, kv_end_m, tokens, qk_scale,
              MASKED: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_D1: tl.constexpr):
    """One key tile; with BLOCK_D1 > 0 the head dim's second column block (q1, acc1 over
    offs_d1) adds its share to S and has its own P V product."""
    cols = start_n + offs_n
    col_ok = cols < tokens
    tok_n = _rows(perm, cols, col_ok, PERMUTED)
    if MASKED:
        kv_mask = col_ok[:, None] & d_ok[None, :]
        kv_mask1 = col_ok[:, None] & d_ok1[None, :]
    else:  # fully visible tiles lie inside [0, N): no key bound needed
        kv_mask = d_ok[None, :]
        kv_mask1 = d_ok1[None, :]
    k = tl.load(k_base + tok_n[:, None] * stride_k_n + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        k1 = tl.load(k_base + tok_n[:, None] * stride_k_n + offs_d1[None, :], mask=kv_mask1,
                     other=0.0)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=INPUT_PRECISION)
    s = s * qk_scale
    if MASKED:
        s = tl.where(cols[None, :] < kv_end_m[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + tok_n[:, None] * stride_v_n + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        v1 = tl.load(v_base + tok_n[:, None] * stride_v_n + offs_d1[None, :], mask=kv_mask1,
                     other=0.0)
        acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=INPUT_PRECISION)
    return acc, acc1, m_new, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["stats_ptr"])
@triton.jit
def _frame_causal_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kv_end_ptr, perm_ptr, stats_ptr,
    stride_q_b, stride_q_n, stride_q_h, stride_k_b, stride_k_n, stride_k_h,
    stride_v_b, stride_v_n, stride_v_h, stride_o_b, stride_o_n, stride_o_h, stride_meta_b,
    tokens, heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PERMUTED: tl.constexpr, COUNT_TILES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The head dim is one column block of BLOCK_D or, with BLOCK_D1 > 0, two ([0, BLOCK_D) and
    [BLOCK_D, BLOCK_D + BLOCK_D1), see head_blocks): D = 72 as 64 + 16 instead of 128 columns."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # most keys first: better tail balance
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    meta = b * stride_meta_b
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < tokens
    d_ok = _columns_ok(offs_d, HEAD_DIM)
    tok_m = _rows(perm_ptr + meta, offs_m, row_ok, PERMUTED)
    q_rows = q_ptr + b * stride_q_b + h * stride_q_h + tok_m[:, None] * stride_q_n
    q = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    offs_d1 = BLOCK_D + tl.arange(0, max(BLOCK_D1, 16))  # (a 16-wide placeholder when unused)
    d_ok1 = offs_d1 < HEAD_DIM
    q1 = tl.zeros([BLOCK_M, max(BLOCK_D1, 16)], q_ptr.dtype.element_ty)
    if BLOCK_D1 > 0:
        q1 = tl.load(q_rows + offs_d1[None, :], mask=row_ok[:, None] & d_ok1[None, :], other=0.0)
    kv_end_m = tl.load(kv_end_ptr + meta + offs_m, mask=row_ok, other=tokens)
    first = pid_m * BLOCK_M
    full_end = tl.load(kv_end_ptr + meta + first) // BLOCK_N * BLOCK_N
    kv_stop = tl.load(kv_end_ptr + meta + tl.minimum(first + BLOCK_M, tokens) - 1)
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, max(BLOCK_D1, 16)], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        acc, acc1, m_i, l_i = _fwd_tile(
            acc, acc1, m_i, l_i, q, q1, k_base, v_base, stride_k_n, stride_v_n, perm_ptr + meta,
            start_n, offs_n, offs_d, d_ok, offs_d1, d_ok1, kv_end_m, tokens, qk_scale,
            False, PERMUTED, INPUT_PRECISION, BLOCK_D1)
    for start_n in range(full_end, kv_stop, BLOCK_N):
        acc, acc1, m_i, l_i = _fwd_tile(
            acc, acc1, m_i, l_i, q, q1, k_base, v_base, stride_k_n, stride_v_n, perm_ptr + meta,
            start_n, offs_n, offs_d, d_ok, offs_d1, d_ok1, kv_end_m, tokens, qk_scale,
            True, PERMUTED, INPUT_PRECISION, BLOCK_D1)
    if COUNT_TILES:
        tl.atomic_add(stats_ptr, full_end // BLOCK_N)
        tl.atomic_add(stats_ptr + 1, tl.cdiv(kv_stop - full_end, BLOCK_N))
    o_rows = o_ptr + b * stride_o_b + h * stride_o_h + tok_m[:, None] * stride_o_n
    tl.store(o_rows + offs_d[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if BLOCK_D1 > 0:
        tl.store(o_rows + offs_d1[None, :], (acc1 / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok1[None, :])
    # log2-domain logsumexp of the scaled scores, in frame order, for the backward
    tl.store(lse_ptr + pid_bh.to(tl.int64) * tokens + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _frame_causal_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, perm_ptr, dq_acc_ptr,
    stride_o_b, stride_o_n, stride_o_h, stride_do_b, stride_do_n, stride_do_h,
    stride_acc_b, stride_acc_n, stride_acc_h, stride_meta_b,
    tokens, heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PERMUTED: tl.constexpr, BLOCK: tl.constexpr,
    ZERO_DQ: tl.constexpr,
):
    """delta = rowsum(o * do) in fp32, stored in frame order; with ZERO_DQ also zeroes the fp32
    dq accumulator rows (no separate memset launch)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs < tokens
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tok = _rows(perm_ptr + b * stride_meta_b, offs, ok, PERMUTED)
    o = tl.load(o_ptr + b * stride_o_b + h * stride_o_h + tok[:, None] * stride_o_n
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + tok[:, None] * stride_do_n
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * tokens + offs, tl.sum(o * do, 1), mask=ok)
    if ZERO_DQ:
        tl.store(dq_acc_ptr + b * stride_acc_b + h * stride_acc_h + tok[:, None] * stride_acc_n
                 + offs_d[None, :], tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32), mask=mask)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, dk1, dv1, k1, v1, q_base, do_base, dq_acc_base, stride_q_n,
                   stride_do_n, stride_acc_n, lse_row, delta_row, perm, start_m, offs_m, offs_d,
                   d_ok, offs_d1, d_ok1, q_begin_n, tokens, qk_scale, sm_scale,
                   MASKED: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   DQ_ATOMIC: tl.constexpr, BLOCK_D1: tl.constexpr):
    """One query tile against the program's key tile; with BLOCK_D1 > 0 the second head-dim
    column block (k1, v1, dk1, dv1 over offs_d1) adds its share to S^T and dP^T and has its own
    dV, dK and dQ products."""
    rows = start_m + offs_m
    row_ok = rows < tokens
    tok_m = _rows(perm, rows, row_ok, PERMUTED)
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + tok_m[:, None] * stride_q_n + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + tok_m[:, None] * stride_do_n + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(lse_row + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_row + rows, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # [keys, queries]
    if BLOCK_D1 > 0:
        mask1 = row_ok[:, None] & d_ok1[None, :]
        q1 = tl.load(q_base + tok_m[:, None] * stride_q_n + offs_d1[None, :], mask=mask1,
                     other=0.0)
        do1 = tl.load(do_base + tok_m[:, None] * stride_do_n + offs_d1[None, :], mask=mask1,
                      other=0.0)
        s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=INPUT_PRECISION)
    s_t = s_t * qk_scale
    if MASKED:
        s_t = tl.where((rows[None, :] >= q_begin_n[:, None]) & row_ok[None, :], s_t,
                       float("-inf"))
    p_t = tl.exp2(s_t - lse[None, :])  # padded query rows: q = do = 0, so they add nothing
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        dv1 += tl.dot(p_t.to(do1.dtype), do1, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v1, tl.trans(do1), input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), dp_t, input_precision=INPUT_PRECISION)
    else:
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        dk1 += tl.dot(ds_t, q1, input_precision=INPUT_PRECISION)
    if DQ_ATOMIC:  # the fifth product: this key tile's share of dq, summed in fp32 by atomics
        dq_rows = dq_acc_base + tok_m[:, None] * stride_acc_n
        dq = tl.dot(tl.trans(ds_t), k, input_precision=INPUT_PRECISION) * sm_scale
        tl.atomic_add(dq_rows + offs_d[None, :], dq, mask=mask, sem="relaxed")
        if BLOCK_D1 > 0:
            dq1 = tl.dot(tl.trans(ds_t), k1, input_precision=INPUT_PRECISION) * sm_scale
            tl.atomic_add(dq_rows + offs_d1[None, :], dq1, mask=mask1, sem="relaxed")
    return dk, dv, dk1, dv1


@triton.jit
def _bwd_dq_tile(dq, q, do, dq1, q1, do1, lse, delta, k_base, v_base, stride_k_n, stride_v_n,
                 perm, start_n, offs_n, offs_d, d_ok, offs_d1, d_ok1, kv_end_m, tokens, qk_scale,
                 MASKED: tl.constexpr, PERMUTED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_D1: tl.constexpr):
    cols = start_n + offs_n
    col_ok = cols < tokens
    tok_n = _rows(perm, cols, col_ok, PERMUTED)
    if MASKED:
        kv_mask = col_ok[:, None] & d_ok[None, :]
        kv_mask1 = col_ok[:, None] & d_ok1[None, :]
    else:
        kv_mask = d_ok[None, :]
        kv_mask1 = d_ok1[None, :]
    k = tl.load(k_base + tok_n[:, None] * stride_k_n + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + tok_n[:, None] * stride_v_n + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        k1 = tl.load(k_base + tok_n[:, None] * stride_k_n + offs_d1[None, :], mask=kv_mask1,
                     other=0.0)
        v1 = tl.load(v_base + tok_n[:, None] * stride_v_n + offs_d1[None, :], mask=kv_mask1,
                     other=0.0)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=INPUT_PRECISION)
        dp = tl.dot(do1, tl.trans(v1), dp, input_precision=INPUT_PRECISION)
    s = s * qk_scale
    if MASKED:
        s = tl.where(cols[None, :] < kv_end_m[:, None], s, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        dq1 += tl.dot(ds.to(k1.dtype), k1, input_precision=INPUT_PRECISION)
    return dq, dq1


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY + ["DQ_PASS", "DQ_ATOMIC"],
                 prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["stats_ptr", "dq_ptr"])  # dq: the atomic accumulator
@triton.jit
def _frame_causal_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    kv_end_ptr, q_begin_ptr, perm_ptr, stats_ptr,
    stride_q_b, stride_q_n, stride_q_h, stride_k_b, stride_k_n, stride_k_h,
    stride_v_b, stride_v_n, stride_v_h, stride_do_b, stride_do_n, stride_do_h,
    stride_g_b, stride_g_n, stride_g_h, stride_meta_b,
    tokens, heads, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    PERMUTED: tl.constexpr, COUNT_TILES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DQ_PASS: tl.constexpr, DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DQ_PASS=False: a program owns BLOCK_N keys and sweeps the query tiles that see them
    (dk, dv); with DQ_ATOMIC it also adds each tile's dS^T K to dq (then an fp32 accumulator,
    zeroed by the preprocess kernel) with relaxed fp32 atomics: five products per tile pair, as
    FlashAttention-2, and no dq launch. DQ_PASS=True: a program owns BLOCK_M queries and sweeps
    their keys (dq; the deterministic mode, seven products per tile pair in all). The gradient
    tensors dq/dk/dv are contiguous [B, N, H, D] and share stride_g_*. The head dim is one
    column block or two (BLOCK_D1 > 0), as in the forward."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    meta = b * stride_meta_b
    perm = perm_ptr + meta
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _columns_ok(offs_d, HEAD_DIM)
    offs_d1 = BLOCK_D + tl.arange(0, max(BLOCK_D1, 16))  # (a 16-wide placeholder when unused)
    d_ok1 = offs_d1 < HEAD_DIM
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    lse_row = lse_ptr + pid_bh.to(tl.int64) * tokens
    delta_row = delta_ptr + pid_bh.to(tl.int64) * tokens
    g_off = b * stride_g_b + h * stride_g_h
    if DQ_PASS:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        rows = pid_m * BLOCK_M + offs_m
        row_ok = rows < tokens
        mask = row_ok[:, None] & d_ok[None, :]
        tok_m = _rows(perm, rows, row_ok, PERMUTED)
        q = tl.load(q_base + tok_m[:, None] * stride_q_n + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_base + tok_m[:, None] * stride_do_n + offs_d[None, :], mask=mask,
                     other=0.0)
        mask1 = row_ok[:, None] & d_ok1[None, :]
        q1 = tl.zeros([BLOCK_M, max(BLOCK_D1, 16)], q_ptr.dtype.element_ty)
        do1 = q1
        if BLOCK_D1 > 0:
            q1 = tl.load(q_base + tok_m[:, None] * stride_q_n + offs_d1[None, :], mask=mask1,
                         other=0.0)
            do1 = tl.load(do_base + tok_m[:, None] * stride_do_n + offs_d1[None, :], mask=mask1,
                          other=0.0)
        lse = tl.load(lse_row + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_row + rows, mask=row_ok, other=0.0)
        kv_end_m = tl.load(kv_end_ptr + meta + rows, mask=row_ok, other=tokens)
        first = pid_m * BLOCK_M
        full_end = tl.load(kv_end_ptr + meta + first) // BLOCK_N * BLOCK_N
        kv_stop = tl.load(kv_end_ptr + meta + tl.minimum(first + BLOCK_M, tokens) - 1)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq1 = tl.zeros([BLOCK_M, max(BLOCK_D1, 16)], dtype=tl.float32)
        for start_n in range(0, full_end, BLOCK_N):
            dq, dq1 = _bwd_dq_tile(dq, q, do, dq1, q1, do1, lse, delta, k_base, v_base,
                                   stride_k_n, stride_v_n, perm, start_n, offs_n, offs_d, d_ok,
                                   offs_d1, d_ok1, kv_end_m, tokens, qk_scale,
                                   False, PERMUTED, INPUT_PRECISION, BLOCK_D1)
        for start_n in range(full_end, kv_stop, BLOCK_N):
            dq, dq1 = _bwd_dq_tile(dq, q, do, dq1, q1, do1, lse, delta, k_base, v_base,
                                   stride_k_n, stride_v_n, perm, start_n, offs_n, offs_d, d_ok,
                                   offs_d1, d_ok1, kv_end_m, tokens, qk_scale,
                                   True, PERMUTED, INPUT_PRECISION, BLOCK_D1)
        if COUNT_TILES:
            tl.atomic_add(stats_ptr, full_end // BLOCK_N)
            tl.atomic_add(stats_ptr + 1, tl.cdiv(kv_stop - full_end, BLOCK_N))
        dq_rows = dq_ptr + g_off + tok_m[:, None] * stride_g_n
        tl.store(dq_rows + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
                 mask=mask)
        if BLOCK_D1 > 0:
            tl.store(dq_rows + offs_d1[None, :], (dq1 * sm_scale).to(dq_ptr.dtype.element_ty),
                     mask=mask1)
    else:
        cols = tl.program_id(0) * BLOCK_N + offs_n
        col_ok = cols < tokens
        mask = col_ok[:, None] & d_ok[None, :]
        tok_n = _rows(perm, cols, col_ok, PERMUTED)
        k = tl.load(k_base + tok_n[:, None] * stride_k_n + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(v_base + tok_n[:, None] * stride_v_n + offs_d[None, :], mask=mask, other=0.0)
        mask1 = col_ok[:, None] & d_ok1[None, :]
        k1 = tl.zeros([BLOCK_N, max(BLOCK_D1, 16)], k_ptr.dtype.element_ty)
        v1 = k1
        if BLOCK_D1 > 0:
            k1 = tl.load(k_base + tok_n[:, None] * stride_k_n + offs_d1[None, :], mask=mask1,
                         other=0.0)
            v1 = tl.load(v_base + tok_n[:, None] * stride_v_n + offs_d1[None, :], mask=mask1,
                         other=0.0)
        q_begin_n = tl.load(q_begin_ptr + meta + cols, mask=col_ok, other=tokens)
        first = tl.program_id(0) * BLOCK_N
        q_start = tl.load(q_begin_ptr + meta + first) // BLOCK_M * BLOCK_M
        full_from = tl.load(q_begin_ptr + meta + tl.minimum(first + BLOCK_N, tokens) - 1)
        full_start = tl.cdiv(full_from, BLOCK_M) * BLOCK_M
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk1 = tl.zeros([BLOCK_N, max(BLOCK_D1, 16)], dtype=tl.float32)
        dv1 = dk1
        dq_acc = dq_ptr + g_off  # fp32 accumulator when DQ_ATOMIC
        # Fully visible query tiles first, then the masked ones: in the opposite order ptxas
        # serialises the wgmma of this loop (warning C7515) in every tile configuration.
        for start_m in range(full_start, tokens, BLOCK_M):
            dk, dv, dk1, dv1 = _bwd_dkdv_tile(
                dk, dv, k, v, dk1, dv1, k1, v1, q_base, do_base, dq_acc, stride_q_n, stride_do_n,
                stride_g_n, lse_row, delta_row, perm, start_m, offs_m, offs_d, d_ok, offs_d1,
                d_ok1, q_begin_n, tokens, qk_scale, sm_scale,
                False, PERMUTED, INPUT_PRECISION, DQ_ATOMIC, BLOCK_D1)
        for start_m in range(q_start, full_start, BLOCK_M):
            dk, dv, dk1, dv1 = _bwd_dkdv_tile(
                dk, dv, k, v, dk1, dv1, k1, v1, q_base, do_base, dq_acc, stride_q_n, stride_do_n,
                stride_g_n, lse_row, delta_row, perm, start_m, offs_m, offs_d, d_ok, offs_d1,
                d_ok1, q_begin_n, tokens, qk_scale, sm_scale,
                True, PERMUTED, INPUT_PRECISION, DQ_ATOMIC, BLOCK_D1)
        if COUNT_TILES:
            tl.atomic_add(stats_ptr, tl.cdiv(tl.maximum(tokens - full_start, 0), BLOCK_M))
            tl.atomic_add(stats_ptr + 1, (full_start - q_start) // BLOCK_M)
        out = g_off + tok_n[:, None] * stride_g_n + offs_d[None, :]
        tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=mask)
        if BLOCK_D1 > 0:
            out1 = g_off + tok_n[:, None] * stride_g_n + offs_d1[None, :]
            tl.store(dk_ptr + out1, (dk1 * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask1)
            tl.store(dv_ptr + out1, dv1.to(dv_ptr.dtype.element_ty), mask=mask1)


# ----------------------------------------------------------------------------------------------
# Launchers. q, k, v: [B, N, H, D] with unit stride in D (other strides free); frame metadata
# [B', N] with B' in {1, B}. Outputs are contiguous.

_META_BLOCK = 128
_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _meta_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def frame_causal_meta(frame_ids: torch.Tensor, permute: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """frame_ids [B', N] (int32/int64, sorted along N unless ``permute``) ->
    (kv_end, q_begin, perm): int32 [B', N] each; perm is [B', 0] when not permuting."""
    ids = frame_ids.contiguous()
    rows, tokens = ids.shape
    if permute:
        ids, perm = torch.sort(ids, dim=-1, stable=True)
        perm = perm.to(torch.int32)
    else:
        perm = torch.empty(rows, 0, dtype=torch.int32, device=ids.device)
    kv_end = torch.empty(rows, tokens, dtype=torch.int32, device=ids.device)
    q_begin = torch.empty_like(kv_end)
    _frame_causal_meta_kernel[(triton.cdiv(tokens, _META_BLOCK), rows)](
        ids, kv_end, q_begin, tokens, ids.stride(0),
        SEARCH_STEPS=max(1, tokens.bit_length()), BLOCK=_META_BLOCK)
    return kv_end, q_begin, perm


def frame_rope(x: torch.Tensor, frame_ids: torch.Tensor, theta: float,
               inverse: bool = False) -> torch.Tensor:
    """Rotate x [B, N, H, D] by its tokens' frame ids [B', N]; ``inverse`` rotates back (used on
    the gradients, since R(f)^T = R(-f))."""
    batch, tokens, heads, head_dim = x.shape
    key = (head_dim, float(theta), str(x.device))
    if key not in _INV_FREQ:
        _INV_FREQ[key] = rope_inv_freq(head_dim, theta).to(x.device)
    ids = frame_ids.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    # [BLOCK_T, D/2] tiles of 2048 elements on 4 warps (16 per thread): cos, sin and the two
    # halves stay in registers; 64 x 128 full-width tiles spilled 472 B (compile-only, sm_90a)
    block_t = 16 if interpreter_enabled() else max(1, 2048 // block_half)
    _frame_causal_rope_kernel[(triton.cdiv(tokens, block_t), batch)](
        x, y, ids, _INV_FREQ[key], x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2), _meta_stride(ids), tokens, heads,
        HALF=half, BLOCK_T=block_t, BLOCK_HALF=block_half, INVERSE=inverse, num_warps=4)
    return y


_UNUSED_STATS: dict[str, torch.Tensor] = {}


def _unused_stats(device: torch.device) -> torch.Tensor:
    """The stats argument when COUNT_TILES is off (never read or written by the kernel): one
    buffer per device for the process, not an allocation and memset per call."""
    key = str(device)
    if key not in _UNUSED_STATS:
        _UNUSED_STATS[key] = torch.zeros(4, dtype=torch.int32, device=device)
    return _UNUSED_STATS[key]


def frame_causal_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_end: torch.Tensor,
                     perm: torch.Tensor, scale: float, stats: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, N, H, D] contiguous, lse [B, H, N] fp32 log2-domain, frame order).
    ``stats`` (int32 [2], optional) accumulates (fully visible, partial) key tiles processed."""
    batch, tokens, heads, head_dim = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device)
    permuted = perm.shape[-1] > 0
    meta_stride = _meta_stride(kv_end)
    block_d, block_d1 = head_blocks(head_dim)

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)

    _frame_causal_fwd_kernel[grid](
        q, k, v, o, lse, kv_end, perm if permuted else kv_end,
        _unused_stats(q.device) if stats is None else stats,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        meta_stride, tokens, heads, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_D1=block_d1, PERMUTED=permuted,
        COUNT_TILES=stats is not None, INPUT_PRECISION=_input_precision(q.dtype))
    return o, lse


def frame_causal_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     o: torch.Tensor, lse: torch.Tensor, kv_end: torch.Tensor,
                     q_begin: torch.Tensor, perm: torch.Tensor, scale: float,
                     stats: torch.Tensor | None = None, deterministic: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), contiguous [B, N, H, D] in q's dtype. ``stats`` (int32 [4], optional)
    accumulates (full, partial) query tiles of the dk/dv pass, then (full, partial) key tiles of
    the dq pass (zero in the atomic mode, which has none). ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``) computes dq in its own pass instead of by
    fp32 atomics: bitwise reproducible, two more products per tile pair."""
    batch, tokens, heads, head_dim = q.shape
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    permuted = perm.shape[-1] > 0
    perm_arg = perm if permuted else kv_end
    meta_stride = _meta_stride(kv_end)
    block_d = _block_d(head_dim)
    block_d_mma, block_d1 = head_blocks(head_dim)
    delta = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device)
    dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    # The atomic mode sums dq in fp32: the output itself for fp32 inputs, else a buffer.
    dq_dtype = q.dtype if deterministic else torch.float32
    dq = torch.empty(q.shape, dtype=dq_dtype, device=q.device)
    block = 16 if interpreter_enabled() else 64
    _frame_causal_bwd_preprocess_kernel[(triton.cdiv(tokens, block), batch * heads)](
        o, do, delta, perm_arg, dq, o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        meta_stride, tokens, heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, PERMUTED=permuted, BLOCK=block,
        ZERO_DQ=not deterministic)
    count = stats is not None
    stats = _unused_stats(q.device) if stats is None else stats
    for dq_pass in (False, True) if deterministic else (False,):
        def grid(meta, _dq=dq_pass):
            return (triton.cdiv(tokens, meta["BLOCK_M" if _dq else "BLOCK_N"]), batch * heads)

        _frame_causal_bwd_kernel[grid](
            q, k, v, do, lse, delta, dq, dk, dv, kv_end, q_begin, perm_arg,
            stats[2:] if dq_pass else stats[:2],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), meta_stride,
            tokens, heads, scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d_mma, BLOCK_D1=block_d1, PERMUTED=permuted,
            COUNT_TILES=count,
            INPUT_PRECISION=_input_precision(q.dtype), DQ_PASS=dq_pass,
            DQ_ATOMIC=not deterministic)
    return dq.to(q.dtype), dk, dv


def tile_config(kernel: str) -> dict:
    """Block sizes the last launch of ``kernel`` ("fwd" or "bwd") used (tests, bench)."""
    tuner = _frame_causal_fwd_kernel if kernel == "fwd" else _frame_causal_bwd_kernel
    return dict(tuner.best_config.kwargs)

