"""Triton kernels for 3D attention with anchor-token override and 3D RoPE.

Layouts: q [B, Nq, H, D], k/v [B, Nk, H, D] with any batch/token/head strides and a contiguous head
dim; outputs and gradients contiguous [B, N, H, D]; the softmax log-sum-exp (base 2, in units of
``score * scale * log2(e)``) and ``delta = rowsum(dO * O)`` are fp32 [B, H, Nq]. The head dim is
masked: the forward covers it with one or two power-of-two column blocks (72 = 64 + 16, see
:func:`head_blocks`), the other kernels with BLOCK_D = next_pow2(D) (>= 16).

RoPE without trigonometry in any kernel. Per call, torch builds fp32 tables cos[., N, D] and
sin[., N, D] (one row per token, per sequence only when positions differ per sequence) from the fp32
angle p * f exactly as the reference rounds it, with cos/sin evaluated in fp64 (exact range
reduction, so t = 1e4 or 1e7 loses nothing beyond the fp32 angle itself). The sign of sin is folded
in per column, so for every part and both pair conventions
    rot(x)_j = x_j cos_j + x_{p_j} sin_j,        rot^-1(x)_j = x_j cos_j - x_{p_j} sin_j
with partner p_j = j +- d/2 (rotate-half: an exact in-register ``tl.gather`` along the head dim) or
j ^ 1 (INTERLEAVED: a reshape / split / join pair swap in registers).

Where each rotation happens (nothing rotates inside an N^2 loop):
- K is rotated once per call by the memory-bound ``_rope3d_kernel`` into a contiguous k_rot (the
  anchor's redirected rows are read from source's rows and rotated with b's own positions).
- Q is rotated once per program, when its tile is loaded, outside the key loop (forward, one
  column block of 128 or more); at D <= 64 and with a split head dim by the same pass as K. The
  backward rotates Q once per call (its key-tile programs stream every query tile).
- dK is rotated back once per program (epilogue), dQ once per call (the pass that also scales and
  casts the fp32 atomic accumulator).

Anchor override without copies: a value row n of sequence b != source with starts[b] <= n <
starts[b] + length is loaded from row n - starts[b] + starts[source] of sequence source (pointer
redirection per row); keys likewise when there is no RoPE (with RoPE, k_rot already holds them).
Query programs of b != source never cover b's anchor rows: program slots are mapped to row ranges
on the device from starts (no host table, no sync); the programs of source that cover its anchor
rows also store their output into the anchor rows of every other sequence.

Backward (FA2 structure): one program per key tile of one sequence loops over the query rows of
that sequence (skipping b's anchor rows when b != source) with five products per tile pair:
S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q, dQ_part = dS K, the last added to an fp32
dq accumulator by relaxed atomics. Gradients of redirected key rows are written to b's own rows and
summed into source's rows in torch afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.registry import interpreter_enabled

LOG2E = 1.4426950408889634

# Work counters of the last launches (read by tests: the anchor skip is structural, not timed).
LAUNCH_STATS: dict[str, int] = {}

# Block sizes under TRITON_INTERPRET=1 (small, few programs); tests may override.
INTERPRET_BLOCKS = {"fwd": (32, 32), "bwd": (32, 32)}


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def head_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D1): the attention kernels' head-dim column blocks. Tile shapes must be
    powers of two, so instead of padding D to next_pow2(D) the kernels split D = 72 into
    64 + 16 (8 of the 16 masked: 80 columns of tensor-core work instead of 128), D = 40 into
    32 + 16 and D = 96 into 64 + 32: a second block whenever the remainder past the largest power
    of two is at most half of it. BLOCK_D1 = 0: one block."""
    first = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - first
    if rest <= 0 or rest > first // 2:
        return block_d(head_dim), 0
    return first, max(16, triton.next_power_of_2(rest))


def rope_block_rows(head_dim: int) -> int:
    """Rows per program of the rotation pass (4 warps): 2048 elements, 16 per thread. The
    rotate-half partner gather holds the whole tile in registers several times over; at 8192
    elements per program it spilled (compile-only profile, sm_90)."""
    return max(1, 2048 // block_d(head_dim))


def fwd_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the query tile held in registers (launcher-fixed: the grid depends on
    it) and the key step used by the AOT checks (on GPU BLOCK_N is autotuned, see
    :func:`_fwd_configs`)."""
    if interpreter_enabled():
        return INTERPRET_BLOCKS["fwd"]
    bd = block_d(head_dim)
    if dtype == torch.float32:
        return (64, 32) if bd <= 128 else (32, 32)
    return (128, 64) if bd <= 128 else (64, 32)


def bwd_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the query step of the loop and the key tile of one program (on GPU
    BLOCK_M is autotuned, see :func:`_bwd_configs`; this is the AOT checks' value)."""
    if interpreter_enabled():
        return INTERPRET_BLOCKS["bwd"]
    bd = block_d(head_dim)
    if dtype == torch.float32 or bd > 128:
        return 32, 64
    return 64, 64


def _pruner(name: str, small_sizes: tuple[int, ...], large_sizes: tuple[int, ...],
            large_warps: tuple[int, ...] = (4, 8), fp32_budget: int | None = None):
    """Autotune pruning by operand size: fp32 (IEEE dots) and BLOCK_D = 256 tiles hold twice the
    registers, so they keep the narrow sizes of ``name``; 16-bit tiles keep ``large_sizes`` with
    ``large_warps``, and with ``fp32_budget`` only the configs whose fp32 accumulator and score
    tiles (:func:`_fwd_fp32_per_thread`) hold at most that many values per thread and that give
    each warpgroup at most 64 query rows (128 rows on 4 warps: ptxas serialised the wgmma,
    C7515, in frame_causal's forward of the same structure)."""
    def prune(configs, nargs, **kwargs):
        small = nargs["q_ptr"].dtype == torch.float32 or kwargs.get(
            "BLOCK_D", nargs.get("BLOCK_D", 0)) > 128
        keep = [c for c in configs if c.kwargs[name] in small_sizes] if small else [
            c for c in configs if c.kwargs[name] in large_sizes and c.num_warps in large_warps
            and (fp32_budget is None or (_fwd_fp32_per_thread(c, kwargs) <= fp32_budget
                                         and kwargs["BLOCK_M"] <= 16 * c.num_warps))]
        return keep or configs[:1]
    return prune


def _fwd_fp32_per_thread(config: triton.Config, kwargs: dict) -> int:
    """fp32 values one thread of the forward holds in the key loop: the accumulator
    [BLOCK_M, D] and the scores [BLOCK_M, BLOCK_N]."""
    width = kwargs["BLOCK_D"] + kwargs.get("BLOCK_D1", 0) + config.kwargs["BLOCK_N"]
    return kwargs["BLOCK_M"] * width // (32 * config.num_warps)


def _configs(name: str, sizes: tuple[int, ...], stages: tuple[int, ...]) -> list[triton.Config]:
    if interpreter_enabled():  # (the interpreter's single config: 32, like INTERPRET_BLOCKS)
        return [triton.Config({name: 32}, num_warps=4, num_stages=1)]
    return [triton.Config({name: n}, num_warps=w, num_stages=s)
            for n in sizes for w in (4, 8) for s in stages]


# ----------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _mult8(x):
    """x, which the launcher checked is a multiple of 8, as (x // 8) * 8: the same value, but one
    the compiler's divisibility analysis can see is a multiple of 8 (the JIT only specialises
    integer arguments that are multiples of 16). Row offsets built from such strides and the mask
    `cols < head_dim` are then uniform over groups of 8 columns: 16-byte vector loads/stores and
    asynchronous (pipelined) tile copies."""
    return x // 8 * 8


@triton.jit
def _partner_values(x, partner, INTERLEAVED: tl.constexpr):
    """x[:, p_j] of a register tile [R, BLOCK_D]: the pair swap j ^ 1 (INTERLEAVED) or an exact
    gather along the head dim (rotate-half; partner [BLOCK_D] int32)."""
    if INTERLEAVED:
        even, odd = tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))
        return tl.reshape(tl.join(odd, even), [x.shape[0], x.shape[1]])
    else:
        return tl.gather(x, tl.broadcast_to(partner[None, :], x.shape), axis=1)


@triton.jit
def _rotate(x, partner, cos_ptr, sin_ptr, tab_off, row_mask, cols, col_mask,
            INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr):
    """rot(x) (or rot^-1) of a register tile x [R, BLOCK_D] in fp32; tab_off [R] int64 points at
    each row's table row. Masked columns have cos 1 and sin 0 (x passes through)."""
    mask = row_mask[:, None] & col_mask[None, :]
    offs = tab_off[:, None] + cols[None, :]
    c = tl.load(cos_ptr + offs, mask=mask, other=1.0)
    s = tl.load(sin_ptr + offs, mask=mask, other=0.0)
    x = x.to(tl.float32)
    xp = _partner_values(x, partner, INTERLEAVED)
    if INVERSE:
        return x * c - xp * s
    else:
        return x * c + xp * s


@triton.jit
def _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_b, stride_n,
             REDIRECT: tl.constexpr):
    """Row offsets (int64 [BLOCK_N]) of keys/values of sequence b: with REDIRECT, anchor rows of
    b != source are redirected to the matching rows of sequence source."""
    kv_b = tl.zeros_like(offs_n) + b
    kv_n = offs_n
    if REDIRECT:
        inside = (offs_n >= s_b) & (offs_n < s_b + anchor_len) & (b != anchor_src)
        kv_b = tl.where(inside, anchor_src, kv_b)
        kv_n = tl.where(inside, offs_n - s_b + s_src, offs_n)
    return kv_b.to(tl.int64) * stride_b + kv_n.to(tl.int64) * stride_n


@triton.jit
def _anchor_start(starts_ptr, b, n_tokens, anchor_len):
    """starts[b] clamped to [0, N - length]: device-resident starts are not range-checked on the
    host (that would synchronise), so an out-of-range value can never address out of bounds."""
    s = tl.load(starts_ptr + b)
    return tl.minimum(tl.maximum(s, 0), n_tokens - anchor_len)


# ----------------------------------------------------------------------------------------------
# Standalone RoPE (also the once-per-call rotation of K / Q and the un-rotation of dQ)


@triton.jit
def _rope3d_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, meta_ptr, starts_ptr,
                   n_rows, heads, n_tokens, head_dim,
                   stride_x_b, stride_x_n, stride_x_h, stride_y_b, stride_y_n, stride_y_h,
                   stride_t_b, stride_t_n, anchor_len, anchor_src, scale,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr,
                   INTERLEAVED: tl.constexpr, HAS_ANCHOR: tl.constexpr, ALIGNED_8: tl.constexpr):
    """y[b, n, h] = scale * rot(x[b', n', h]) over rows r = (b*N + n)*H + h, with the table row of
    (b, n); (b', n') = (b, n) except, with HAS_ANCHOR, the anchor rows of b != source, which read
    source's rows. INVERSE applies rot^-1."""
    if ALIGNED_8:
        head_dim = _mult8(head_dim)
        stride_x_b, stride_x_n, stride_x_h = _mult8(stride_x_b), _mult8(stride_x_n), \
            _mult8(stride_x_h)
        stride_y_b, stride_y_n, stride_y_h = _mult8(stride_y_b), _mult8(stride_y_n), \
            _mult8(stride_y_h)
        stride_t_b, stride_t_n = _mult8(stride_t_b), _mult8(stride_t_n)  # (tables: D columns)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    d_mask = cols < head_dim
    partner = tl.load(meta_ptr + cols)
    h = rows % heads
    tok = rows // heads
    b = tok // n_tokens
    n = tok % n_tokens
    src_b = b
    src_n = n
    if HAS_ANCHOR:
        s_src = _anchor_start(starts_ptr, anchor_src, n_tokens, anchor_len)
        s_b = _anchor_start(starts_ptr, b, n_tokens, anchor_len)
        inside = (n >= s_b) & (n < s_b + anchor_len) & (b != anchor_src)
        src_b = tl.where(inside, anchor_src, b)
        src_n = tl.where(inside, n - s_b + s_src, n)
    x_off = (src_b.to(tl.int64) * stride_x_b + src_n.to(tl.int64) * stride_x_n
             + h.to(tl.int64) * stride_x_h)
    mask = r_mask[:, None] & d_mask[None, :]
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0)
    tab = b.to(tl.int64) * stride_t_b + n.to(tl.int64) * stride_t_n
    y = _rotate(x, partner, cos_ptr, sin_ptr, tab, r_mask, cols, d_mask, INTERLEAVED, INVERSE)
    y_off = (b.to(tl.int64) * stride_y_b + n.to(tl.int64) * stride_y_n
             + h.to(tl.int64) * stride_y_h)
    tl.store(y_ptr + y_off[:, None] + cols[None, :], (y * scale).to(y_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------
# Forward


@triton.autotune(configs=_configs("BLOCK_N", (32, 64, 128), (2, 3, 4)),
                 key=["head_dim", "n_k", "ALIGNED_8", "HAS_ROPE", "HAS_ANCHOR", "INTERLEAVED"],
                 # 16-bit: at most 128 fp32 values per thread in the loop (128-row query
                 # tiles on 4 warps at D = 128 hold 192 and spilled 96 B; compile-only, sm_90a)
                 prune_configs_by={"early_config_prune": _pruner("BLOCK_N", (32, 64), (64, 128),
                                                                 fp32_budget=128)})
@triton.jit
def _attention3d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_cos_ptr, q_sin_ptr, meta_ptr, starts_ptr,
    stride_q_b, stride_q_n, stride_q_h,
    stride_k_b, stride_k_n, stride_k_h,
    stride_v_b, stride_v_n, stride_v_h,
    stride_o_b, stride_o_n, stride_o_h,
    stride_t_b, stride_t_n,
    n_batch, heads, n_q, n_k, head_dim, qk_scale, anchor_len, anchor_src,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D1: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_ANCHOR: tl.constexpr,
    INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGNED_8: tl.constexpr,
):
    """k_ptr is k (HAS_ROPE False: anchor rows redirected here) or the rotated, already
    redirected k_rot (HAS_ROPE True). The head dim is one column block of BLOCK_D, or with
    BLOCK_D1 > 0 two (see :func:`head_blocks`); then, and when BLOCK_D <= 64, q_ptr is also
    already rotated."""
    if ALIGNED_8:  # (launcher-checked) so the tile loads/stores are 16-byte vectors
        head_dim = _mult8(head_dim)
        stride_q_b, stride_q_n, stride_q_h = _mult8(stride_q_b), _mult8(stride_q_n), \
            _mult8(stride_q_h)
        stride_k_b, stride_k_n, stride_k_h = _mult8(stride_k_b), _mult8(stride_k_n), \
            _mult8(stride_k_h)
        stride_v_b, stride_v_n, stride_v_h = _mult8(stride_v_b), _mult8(stride_v_n), \
            _mult8(stride_v_h)
        stride_o_b, stride_o_n, stride_o_h = _mult8(stride_o_b), _mult8(stride_o_n), \
            _mult8(stride_o_h)
        stride_t_b, stride_t_n = _mult8(stride_t_b), _mult8(stride_t_n)
    slot = tl.program_id(0)
    h = tl.program_id(1)
    full_tiles = tl.cdiv(n_q, BLOCK_M)
    # program slot -> (b, [m_start, m_end)), on the device from starts
    b = slot // full_tiles
    m_start = (slot % full_tiles) * BLOCK_M
    m_end = tl.minimum(m_start + BLOCK_M, n_q)
    s_b = 0
    s_src = 0
    if HAS_ANCHOR:
        # source: every tile; each other b: the tiles of [0, s_b) then of [s_b + length, N), in
        # at most cdiv(N - length, BLOCK_M) + 1 slots (trailing empty slots exit at once)
        s_src = _anchor_start(starts_ptr, anchor_src, n_q, anchor_len)
        other_slots = tl.cdiv(n_q - anchor_len, BLOCK_M) + 1
        j = slot - full_tiles
        b_other = j // other_slots
        b_other = b_other + (b_other >= anchor_src).to(tl.int32)
        b = tl.where(slot < full_tiles, anchor_src, b_other)
        s_b = _anchor_start(starts_ptr, b, n_q, anchor_len)
        k_slot = j % other_slots
        before = tl.cdiv(s_b, BLOCK_M)
        other_start = tl.where(k_slot < before, k_slot * BLOCK_M,
                               s_b + anchor_len + (k_slot - before) * BLOCK_M)
        other_end = tl.where(k_slot < before, tl.minimum(other_start + BLOCK_M, s_b),
                             tl.minimum(other_start + BLOCK_M, n_q))
        m_start = tl.where(slot < full_tiles, slot * BLOCK_M, other_start)
        m_end = tl.where(slot < full_tiles, tl.minimum(slot * BLOCK_M + BLOCK_M, n_q), other_end)
    if m_start < m_end:
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        cols = tl.arange(0, BLOCK_D)
        d_mask = cols < head_dim
        q_rows = (b.to(tl.int64) * stride_q_b + offs_m.to(tl.int64) * stride_q_n
                  + h * stride_q_h)
        q = tl.load(q_ptr + q_rows[:, None] + cols[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if BLOCK_D1 > 0:  # the head dim's second column block [BLOCK_D, BLOCK_D + BLOCK_D1)
            cols1 = BLOCK_D + tl.arange(0, BLOCK_D1)
            d_mask1 = cols1 < head_dim
            q1 = tl.load(q_ptr + q_rows[:, None] + cols1[None, :],
                         mask=m_mask[:, None] & d_mask1[None, :], other=0.0)
            acc1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)
        if HAS_ROPE and BLOCK_D1 == 0 and BLOCK_D >= 128:  # once per program, outside the key
            # loop. A split head dim gets q already rotated (the partner of a column may lie in
            # the other block), and so does BLOCK_D <= 64: q rotated in registers becomes the
            # wgmma's register operand, and ptxas serialised the key loop's wgmma (C7515)
            partner = tl.load(meta_ptr + cols)
            tab = b.to(tl.int64) * stride_t_b + offs_m.to(tl.int64) * stride_t_n
            q = _rotate(q, partner, q_cos_ptr, q_sin_ptr, tab, m_mask, cols, d_mask,
                        INTERLEAVED, False).to(q_ptr.dtype.element_ty)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, n_k, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_k
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_k_b,
                              stride_k_n, HAS_ANCHOR and not HAS_ROPE) + h * stride_k_h
            k = tl.load(k_ptr + k_rows[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if BLOCK_D1 > 0:
                kv_mask1 = n_mask[:, None] & d_mask1[None, :]
                k1 = tl.load(k_ptr + k_rows[:, None] + cols1[None, :], mask=kv_mask1, other=0.0)
                s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
            s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_v_b,
                              stride_v_n, HAS_ANCHOR) + h * stride_v_h
            v = tl.load(v_ptr + v_rows[:, None] + cols[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            if BLOCK_D1 > 0:
                v1 = tl.load(v_ptr + v_rows[:, None] + cols1[None, :], mask=kv_mask1, other=0.0)
                acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v.dtype), v1,
                                                      input_precision=DOT_PRECISION)
            m_i = m_new

        out = (acc / l_i[:, None]).to(o_ptr.dtype.element_ty)
        o_mask = m_mask[:, None] & d_mask[None, :]
        o_cols = h * stride_o_h + cols[None, :]
        o_rows = b.to(tl.int64) * stride_o_b + offs_m[:, None].to(tl.int64) * stride_o_n
        tl.store(o_ptr + o_rows + o_cols, out, mask=o_mask)
        if BLOCK_D1 > 0:
            out1 = (acc1 / l_i[:, None]).to(o_ptr.dtype.element_ty)
            o_cols1 = h * stride_o_h + cols1[None, :]
            tl.store(o_ptr + o_rows + o_cols1, out1, mask=m_mask[:, None] & d_mask1[None, :])
        tl.store(lse_ptr + (b * heads + h).to(tl.int64) * n_q + offs_m, m_i + tl.log2(l_i),
                 mask=m_mask)
        if HAS_ANCHOR:
            # source's anchor rows are also the output of every other sequence's anchor rows
            in_anchor = m_mask & (offs_m >= s_src) & (offs_m < s_src + anchor_len)
            if (b == anchor_src) & (m_start < s_src + anchor_len) & (m_end > s_src):
                for bb in range(n_batch):  # out is contiguous: row bb*Nq + m
                    if bb != anchor_src:
                        dst = (bb * n_q + _anchor_start(starts_ptr, bb, n_q, anchor_len)
                               + offs_m - s_src)
                        tl.store(o_ptr + dst[:, None].to(tl.int64) * stride_o_n + o_cols, out,
                                 mask=in_anchor[:, None] & d_mask[None, :])
                        if BLOCK_D1 > 0:
                            tl.store(o_ptr + dst[:, None].to(tl.int64) * stride_o_n + o_cols1,
                                     out1, mask=in_anchor[:, None] & d_mask1[None, :])


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention3d_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, dq_acc_ptr, n_rows, heads, n_q,
                                       head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                                       ALIGNED_8: tl.constexpr):
    """delta[b, h, m] = sum_d dO * O over rows r = (b*Nq + m)*H + h of contiguous [B, Nq, H, D],
    and the fp32 dq accumulator's rows set to zero (saves a separate memset)."""
    if ALIGNED_8:
        head_dim = _mult8(head_dim)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
    offs = rows[:, None].to(tl.int64) * head_dim + cols[None, :]
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = rows % heads
    bm = rows // heads
    dst = ((bm // n_q) * heads + h).to(tl.int64) * n_q + bm % n_q
    tl.store(delta_ptr + dst, tl.sum(o * do, axis=1), mask=rows < n_rows)
    tl.store(dq_acc_ptr + offs, tl.zeros([BLOCK_R, BLOCK_D], tl.float32), mask=mask)


@triton.jit
def _bwd_query_segment(dk, dv, k, v, dk1, dv1, k1, v1, q_ptr, do_ptr, lse_ptr, delta_ptr,
                       dq_acc_ptr, b, h, lo, hi, cols, d_mask, cols1, d_mask1, head_dim,
                       stride_q_b, stride_q_n, stride_q_h,
                       stride_o_b, stride_o_n, stride_o_h, heads, n_q, qk_scale,
                       BLOCK_M: tl.constexpr, BLOCK_D1: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Query rows [lo, hi) of sequence b against one key tile: five products per step. dk, dv
    ([BLOCK_N, BLOCK_D] fp32) accumulate in registers; dS K goes to the fp32 dq accumulator
    (contiguous [B, Nq, H, D]) by relaxed atomics (unscaled, rotated basis). With BLOCK_D1 > 0
    the head dim's second column block (k1, v1, dk1, dv1 over cols1) adds a second product to
    each of the five (two-block sums for S and dP, separate blocks for dV, dK, dQ)."""
    stats = (b * heads + h).to(tl.int64) * n_q
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < hi
        mask = m_mask[:, None] & d_mask[None, :]
        q_rows = b.to(tl.int64) * stride_q_b + offs_m.to(tl.int64) * stride_q_n + h * stride_q_h
        q = tl.load(q_ptr + q_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        do_rows = b.to(tl.int64) * stride_o_b + offs_m.to(tl.int64) * stride_o_n + h * stride_o_h
        do = tl.load(do_ptr + do_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        lse = tl.load(lse_ptr + stats + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + stats + offs_m, mask=m_mask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)               # [BN, BM]
        if BLOCK_D1 > 0:
            mask1 = m_mask[:, None] & d_mask1[None, :]
            q1 = tl.load(q_ptr + q_rows[:, None] + cols1[None, :], mask=mask1, other=0.0)
            do1 = tl.load(do_ptr + do_rows[:, None] + cols1[None, :], mask=mask1, other=0.0)
            s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=DOT_PRECISION)
        p_t = tl.where(m_mask[None, :], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            dv1 += tl.dot(p_t.to(do.dtype), do1, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)            # [BM, BD]
        acc_rows = ((b * n_q + offs_m) * heads + h).to(tl.int64) * head_dim
        tl.atomic_add(dq_acc_ptr + acc_rows[:, None] + cols[None, :], dq, mask=mask,
                      sem="relaxed")
        if BLOCK_D1 > 0:
            dk1 += tl.dot(ds_t, q1, input_precision=DOT_PRECISION)
            dq1 = tl.dot(tl.trans(ds_t), k1, input_precision=DOT_PRECISION)
            tl.atomic_add(dq_acc_ptr + acc_rows[:, None] + cols1[None, :], dq1, mask=mask1,
                          sem="relaxed")
    return dk, dv, dk1, dv1


@triton.autotune(configs=_configs("BLOCK_M", (16, 32, 64), (2, 3)),
                 key=["head_dim", "n_k", "ALIGNED_8", "HAS_ROPE", "HAS_ANCHOR", "INTERLEAVED"],
                 # 16-bit, D <= 128: a 64 x 64 tile pair on 8 warps is the largest that compiles
                 # for sm_90 with no spills and every product on wgmma (compile-only profile;
                 # 128-row key tiles or query steps spill, 32-row steps fall back to mma.sync)
                 prune_configs_by={"early_config_prune": _pruner("BLOCK_M", (16, 32), (64,),
                                                                 large_warps=(8,))},
                 reset_to_zero=["dq_acc_ptr"])
@triton.jit
def _attention3d_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_acc_ptr, dk_ptr, dv_ptr,
    k_cos_ptr, k_sin_ptr, meta_ptr, starts_ptr,
    stride_q_b, stride_q_n, stride_q_h,
    stride_k_b, stride_k_n, stride_k_h,
    stride_v_b, stride_v_n, stride_v_h,
    stride_o_b, stride_o_n, stride_o_h,
    stride_dk_b, stride_dk_n, stride_dk_h,
    stride_t_b, stride_t_n,
    heads, n_q, n_k, head_dim, sm_scale, qk_scale, anchor_len, anchor_src,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D1: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_ANCHOR: tl.constexpr,
    INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGNED_8: tl.constexpr,
):
    """q_ptr / k_ptr are the rotated q_rot / k_rot when HAS_ROPE (k_rot already redirected);
    dq_acc is fp32 contiguous [B, Nq, H, D] (zeroed by the preprocess kernel). The head dim is
    one column block of BLOCK_D or two (BLOCK_D1 > 0, :func:`head_blocks`); with two and RoPE,
    dk_ptr is an fp32 buffer that receives dk in the rotated basis (the launcher rotates it
    back: a rotate-half partner may lie in the other block)."""
    if ALIGNED_8:  # (launcher-checked) so the tile loads/stores are 16-byte vectors
        head_dim = _mult8(head_dim)
        stride_q_b, stride_q_n, stride_q_h = _mult8(stride_q_b), _mult8(stride_q_n), \
            _mult8(stride_q_h)
        stride_k_b, stride_k_n, stride_k_h = _mult8(stride_k_b), _mult8(stride_k_n), \
            _mult8(stride_k_h)
        stride_v_b, stride_v_n, stride_v_h = _mult8(stride_v_b), _mult8(stride_v_n), \
            _mult8(stride_v_h)
        stride_o_b, stride_o_n, stride_o_h = _mult8(stride_o_b), _mult8(stride_o_n), \
            _mult8(stride_o_h)
        stride_dk_b, stride_dk_n, stride_dk_h = _mult8(stride_dk_b), _mult8(stride_dk_n), \
            _mult8(stride_dk_h)
        stride_t_b, stride_t_n = _mult8(stride_t_b), _mult8(stride_t_n)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    d_mask = cols < head_dim
    tiles_per_b = tl.cdiv(n_k, BLOCK_N)
    b = pid // tiles_per_b
    offs_n = (pid % tiles_per_b) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_k
    s_b = 0
    s_src = 0
    hi1 = tl.zeros_like(b) + n_q  # a tensor even when Triton specialises n_q == 1
    lo2 = tl.zeros_like(b) + n_q
    if HAS_ANCHOR:
        s_b = _anchor_start(starts_ptr, b, n_q, anchor_len)
        s_src = _anchor_start(starts_ptr, anchor_src, n_q, anchor_len)
        if b != anchor_src:  # b's anchor query rows are not computed: skip them
            hi1 = s_b
            lo2 = s_b + anchor_len
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_k_b, stride_k_n,
                      HAS_ANCHOR and not HAS_ROPE) + h * stride_k_h
    k = tl.load(k_ptr + k_rows[:, None] + cols[None, :], mask=kv_mask, other=0.0)
    v_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_v_b, stride_v_n,
                      HAS_ANCHOR) + h * stride_v_h
    v = tl.load(v_ptr + v_rows[:, None] + cols[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    cols1 = BLOCK_D + tl.arange(0, max(BLOCK_D1, 16))  # (a 16-wide placeholder when unused)
    d_mask1 = cols1 < head_dim
    kv_mask1 = n_mask[:, None] & d_mask1[None, :]
    k1 = tl.zeros([BLOCK_N, max(BLOCK_D1, 16)], k_ptr.dtype.element_ty)
    v1 = k1
    if BLOCK_D1 > 0:
        k1 = tl.load(k_ptr + k_rows[:, None] + cols1[None, :], mask=kv_mask1, other=0.0)
        v1 = tl.load(v_ptr + v_rows[:, None] + cols1[None, :], mask=kv_mask1, other=0.0)
    dk1 = tl.zeros([BLOCK_N, max(BLOCK_D1, 16)], tl.float32)
    dv1 = dk1
    dk, dv, dk1, dv1 = _bwd_query_segment(
        dk, dv, k, v, dk1, dv1, k1, v1, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_acc_ptr, b, h,
        0, hi1, cols, d_mask, cols1, d_mask1, head_dim, stride_q_b, stride_q_n, stride_q_h,
        stride_o_b, stride_o_n, stride_o_h, heads, n_q, qk_scale, BLOCK_M, BLOCK_D1,
        DOT_PRECISION)
    dk, dv, dk1, dv1 = _bwd_query_segment(
        dk, dv, k, v, dk1, dv1, k1, v1, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_acc_ptr, b, h,
        lo2, n_q, cols, d_mask, cols1, d_mask1, head_dim, stride_q_b, stride_q_n, stride_q_h,
        stride_o_b, stride_o_n, stride_o_h, heads, n_q, qk_scale, BLOCK_M, BLOCK_D1,
        DOT_PRECISION)
    dk = dk * sm_scale
    if HAS_ROPE and BLOCK_D1 == 0:  # back to k's basis, once per program
        partner = tl.load(meta_ptr + cols)
        tab = b.to(tl.int64) * stride_t_b + offs_n.to(tl.int64) * stride_t_n
        dk = _rotate(dk, partner, k_cos_ptr, k_sin_ptr, tab, n_mask, cols, d_mask, INTERLEAVED,
                     True)
    # b's own rows (redirected ones included); the launcher folds those into source's rows
    out_rows = (b.to(tl.int64) * stride_dk_b + offs_n.to(tl.int64) * stride_dk_n
                + h * stride_dk_h)
    tl.store(dk_ptr + out_rows[:, None] + cols[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_ptr + out_rows[:, None] + cols[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=kv_mask)
    if BLOCK_D1 > 0:
        tl.store(dk_ptr + out_rows[:, None] + cols1[None, :],
                 (dk1 * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask1)
        tl.store(dv_ptr + out_rows[:, None] + cols1[None, :], dv1.to(dv_ptr.dtype.element_ty),
                 mask=kv_mask1)


# ----------------------------------------------------------------------------------------------
# Host-side metadata: built on the device, with no synchronisation and no per-call host-to-device
# copy (the O(D) column tables and list starts are cached per configuration and device)

_COLUMN_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_STARTS_CACHE: dict[tuple, torch.Tensor] = {}
_CACHE_LIMIT = 64


def _cache_put(cache: dict, key, value):
    if len(cache) >= _CACHE_LIMIT:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def rope_columns(rope_dims, rope_theta: float, head_dim: int, device, interleaved: bool = False):
    """Per head-dim column j < D: (axis int64, inverse frequency fp32, sign of sin fp32, partner
    int32 [BLOCK_D]). Pairs are (c+i, c+i+d/2) (rotate-half) or (c+2i, c+2i+1) (interleaved),
    pair i of a part of size d with frequency theta^(-2i/d); the first column of a pair gets sign
    -1. Columns past the rotated parts: frequency 0 (angle 0: cos 1, sin 0), partner itself."""
    key = (tuple(rope_dims), float(rope_theta), head_dim, str(device), interleaved)
    if key in _COLUMN_CACHE:
        return _COLUMN_CACHE[key]
    from kernels.attention.ref import rope_inv_freq

    axis = torch.zeros(head_dim, dtype=torch.int64)
    freq = torch.zeros(head_dim, dtype=torch.float32)
    sign = torch.ones(head_dim, dtype=torch.float32)
    partner = torch.arange(block_d(head_dim), dtype=torch.int32)
    col = 0
    for a, d in enumerate(rope_dims):
        half = d // 2
        first = torch.arange(col, col + d, 2) if interleaved else torch.arange(col, col + half)
        second = first + (1 if interleaved else half)
        inv = rope_inv_freq(d, rope_theta, torch.float32)
        freq[first], freq[second] = inv, inv
        sign[first] = -1.0                             # x_j1 cos - x_j2 sin; x_j2 cos + x_j1 sin
        axis[col:col + d] = a
        partner[first], partner[second] = second.to(torch.int32), first.to(torch.int32)
        col += d
    value = tuple(t.to(device) for t in (axis, freq, sign, partner))
    return _cache_put(_COLUMN_CACHE, key, value)


def rope_cos_sin(pos: torch.Tensor, rope_dims, rope_theta: float, head_dim: int,
                 interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and signed sin tables [B, N, D] of positions [B, N, 3] (computed once and
    expanded with batch stride 0 when the positions are a batch-broadcast view). The angle is the
    fp32 product p * f, rounded exactly as the reference rounds it; cos and sin of it are
    evaluated in fp64 (exact range reduction at any magnitude) and rounded once."""
    axis, freq, sign, _ = rope_columns(rope_dims, rope_theta, head_dim, pos.device, interleaved)
    batch = pos.shape[0]
    if pos.stride(0) == 0:
        pos = pos[:1]
    angle = (pos.to(torch.float32).index_select(-1, axis) * freq).double()       # [Bp, N, D]
    cos, sin = angle.cos().float(), (angle.sin() * sign).float()
    return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)


def starts_tensor(starts, device) -> torch.Tensor:
    """int32 [B] starts on ``device``: a device tensor is converted there (no synchronisation);
    a list is cached per (values, device), so repeated calls copy nothing."""
    if isinstance(starts, torch.Tensor):
        return starts.to(device=device, dtype=torch.int32)
    key = (tuple(starts), str(device))
    if key in _STARTS_CACHE:
        return _STARTS_CACHE[key]
    return _cache_put(_STARTS_CACHE, key, torch.tensor(list(starts), dtype=torch.int32,
                                                       device=device))


def _dummy(device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


def _head_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def aligned_8(head_dim: int, *tensors: torch.Tensor) -> bool:
    """The ALIGNED_8 flag: every tensor's data pointer is 16-byte aligned and all its strides but
    the (unit) head-dim one, like head_dim, are multiples of 8 elements, so every tile row starts
    on a 16-byte boundary and the kernels may tell the compiler so. False selects the generic
    path (scalar, unpipelined loads), which is correct for any layout."""
    return head_dim % 8 == 0 and all(
        t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:-1]) for t in tensors)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _rope_launch(x, y, cos, sin, partner, starts, anchor_len: int, anchor_src: int,
                 inverse: bool, interleaved: bool, scale: float = 1.0):
    """y[b, n, h] = scale * rot(x[b', n', h]) (rot^-1 when inverse) over [B, N, H, D] views; the
    anchor's redirection applies when ``starts`` is a tensor."""
    batch, n, heads, head_dim = x.shape
    n_rows = batch * n * heads
    if n_rows == 0:
        return y
    bd = block_d(head_dim)
    # half the rows for fp32 inputs (the dq accumulator's inverse rotation): the same elements
    # per program as 16-bit tiles; 32 x 64 fp32 tiles spilled 8 B (compile-only, sm_90a)
    rows = max(1, rope_block_rows(head_dim) * 2 // x.element_size())
    block_r = 32 if interpreter_enabled() else rows
    has_anchor = starts is not None
    _rope3d_kernel[(triton.cdiv(n_rows, block_r),)](
        x, y, cos, sin, partner, starts if has_anchor else partner,
        n_rows, heads, n, head_dim, *x.stride()[:3], *y.stride()[:3],
        cos.stride(0), cos.stride(1), anchor_len, anchor_src, scale,
        BLOCK_R=block_r, BLOCK_D=bd, INVERSE=inverse, INTERLEAVED=interleaved,
        HAS_ANCHOR=has_anchor, ALIGNED_8=aligned_8(head_dim, x, y), num_warps=4)
    return y


class _RopeTables:
    """cos / sin tables of the q and k positions of one call (shared when they are the same
    tensor) and the partner column table."""

    def __init__(self, q_pos, k_pos, rope_dims, rope_theta, head_dim, interleaved, device):
        self.partner = rope_columns(rope_dims, rope_theta, head_dim, device, interleaved)[3]
        self.q = rope_cos_sin(q_pos, rope_dims, rope_theta, head_dim, interleaved)
        self.k = self.q if k_pos is q_pos else rope_cos_sin(k_pos, rope_dims, rope_theta,
                                                            head_dim, interleaved)


# ----------------------------------------------------------------------------------------------
# Launchers


def _anchor_args(anchor, batch: int, device):
    """(has_anchor, starts int32 device tensor or None, length, source)."""
    if anchor is None or batch <= 1:
        return False, None, 0, 0
    return True, starts_tensor(anchor[0], device), int(anchor[1]), int(anchor[2])


def _aligned_copy(v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """v, or a contiguous copy when its rows are not 16-byte aligned. Used with RoPE, where q and
    k are already rewritten by the rotation pass: with v copied too (one O(N D) pass) the N^2
    kernels run their aligned path; on the generic one the RoPE forward spilled 32-160 B at
    D = 128 and the backward 120 B at D = 72 (compile-only profile, sm_90a)."""
    return v if aligned_8(head_dim, v) else v.clone(memory_format=torch.contiguous_format)


def attention3d_fwd(q, k, v, q_pos, k_pos, rope_dims, rope_theta, anchor, scale,
                    interleaved=False):
    """out [B, Nq, H, D] (q's dtype) and lse [B, H, Nq] fp32. anchor: (starts, length, source),
    starts a list of ints or an integer tensor [B] on q's device (read by the kernels only)."""
    q, k, v = _head_contiguous(q), _head_contiguous(k), _head_contiguous(v)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    bm, _ = fwd_blocks(head_dim, q.dtype)
    has_anchor, starts, length, source = _anchor_args(anchor, batch, q.device)
    out = torch.empty(batch, n_q, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, n_q, dtype=torch.float32, device=q.device)
    full_tiles = triton.cdiv(n_q, bm)
    slots = (full_tiles + (batch - 1) * (triton.cdiv(n_q - length, bm) + 1) if has_anchor
             else batch * full_tiles)
    LAUNCH_STATS.update(fwd_query_tiles=slots, fwd_dense_query_tiles=batch * full_tiles,
                        fwd_programs=slots * heads, fwd_block_m=bm)
    if out.numel() == 0:
        return out, lse
    has_rope = q_pos is not None
    cos = sin = partner = _dummy(q.device)
    t_strides = (0, 0)
    q_in, k_in = q, k
    bd, bd1 = head_blocks(head_dim)
    if has_rope:
        tables = _RopeTables(q_pos, k_pos, rope_dims, rope_theta, head_dim, interleaved,
                             q.device)
        partner = tables.partner
        k_in = torch.empty(*k.shape, dtype=k.dtype, device=k.device)
        _rope_launch(k, k_in, *tables.k, partner, starts, length, source, False, interleaved)
        (cos, sin), t_strides = tables.q, tables.q[0].stride()[:2]
        if bd1 or bd < 128 or not aligned_8(head_dim, q):  # q rotated by the same pass (see
            # _attention3d_fwd_kernel; an unaligned q is copied by it anyway, see below)
            q_in = torch.empty(*q.shape, dtype=q.dtype, device=q.device)
            _rope_launch(q, q_in, *tables.q, partner, None, 0, 0, False, interleaved)
        v = _aligned_copy(v, head_dim)
    aligned = aligned_8(head_dim, q_in, k_in, v, out)
    LAUNCH_STATS.update(fwd_aligned_8=aligned)
    _attention3d_fwd_kernel[(slots, heads)](
        q_in, k_in, v, out, lse, cos, sin, partner, starts if has_anchor else partner,
        *q_in.stride()[:3], *k_in.stride()[:3], *v.stride()[:3], *out.stride()[:3], *t_strides,
        batch, heads, n_q, n_k, head_dim, scale * LOG2E, length, source,
        BLOCK_M=bm, BLOCK_D=bd, BLOCK_D1=bd1, HAS_ROPE=has_rope, HAS_ANCHOR=has_anchor,
        INTERLEAVED=interleaved, DOT_PRECISION=_dot_precision(q.dtype), ALIGNED_8=aligned,
    )
    return out, lse


def _anchor_rows(starts: torch.Tensor, length: int, source: int, batch: int, n: int):
    """Flat row indices (int64, on the device) [B-1, L] of the anchor rows of every b != source
    and [L] of source's, built from the device starts without synchronising."""
    device = starts.device
    others = torch.cat([torch.arange(source, device=device),
                        torch.arange(source + 1, batch, device=device)])
    clamped = starts.long().clamp(0, n - length)
    ar = torch.arange(length, device=device)
    return ((others * n + clamped[others])[:, None] + ar,
            source * n + clamped[source] + ar)


def attention3d_bwd(dout, q, k, v, out, lse, q_pos, k_pos, rope_dims, rope_theta, anchor, scale,
                    interleaved=False):
    """(dq, dk, dv) in the input dtypes, following the anchor semantics of the reference."""
    q, k, v = _head_contiguous(q), _head_contiguous(k), _head_contiguous(v)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    bm, bn = bwd_blocks(head_dim, q.dtype)
    bd = block_d(head_dim)
    bd0, bd1 = head_blocks(head_dim)
    has_anchor, starts, length, source = _anchor_args(anchor, batch, q.device)
    dout = dout.contiguous()
    dk = torch.empty(batch, n_k, heads, head_dim, dtype=k.dtype, device=q.device)
    dv = torch.empty(batch, n_k, heads, head_dim, dtype=v.dtype, device=q.device)
    n_kv_tiles = batch * triton.cdiv(n_k, bn)
    visited = batch * n_q - (batch - 1) * length if has_anchor else batch * n_q
    LAUNCH_STATS.update(bwd_kv_tiles=n_kv_tiles, bwd_query_rows=visited,
                        bwd_dense_query_rows=batch * n_q)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    if has_anchor:
        # out[b, anchor_b] = out[source, anchor_src]: fold those gradients into source's rows
        others, src_rows = _anchor_rows(starts, length, source, batch, n_q)
        flat = dout.reshape(batch * n_q, heads, head_dim)
        folded = flat[src_rows].float() + flat[others].float().sum(0)
        dout = dout.clone()
        dout.view(batch * n_q, heads, head_dim)[src_rows] = folded.to(dout.dtype)
    delta = torch.empty_like(lse)
    dq_acc = torch.empty(batch, n_q, heads, head_dim, dtype=torch.float32, device=q.device)
    n_rows = batch * n_q * heads
    _attention3d_bwd_preprocess_kernel[(triton.cdiv(n_rows, 64),)](
        out, dout, delta, dq_acc, n_rows, heads, n_q, head_dim, BLOCK_R=64, BLOCK_D=bd,
        ALIGNED_8=aligned_8(head_dim, out, dout))

    has_rope = q_pos is not None
    cos = sin = partner = _dummy(q.device)
    t_strides = (0, 0)
    q_in, k_in = q, k
    if has_rope:  # rotate Q and K once per call (memory-bound passes)
        tables = _RopeTables(q_pos, k_pos, rope_dims, rope_theta, head_dim, interleaved,
                             q.device)
        partner = tables.partner
        q_in = torch.empty(*q.shape, dtype=q.dtype, device=q.device)
        _rope_launch(q, q_in, *tables.q, partner, None, 0, 0, False, interleaved)
        k_in = torch.empty(*k.shape, dtype=k.dtype, device=k.device)
        _rope_launch(k, k_in, *tables.k, partner, starts, length, source, False, interleaved)
        (cos, sin), t_strides = tables.k, tables.k[0].stride()[:2]
        v = _aligned_copy(v, head_dim)
    # two column blocks with RoPE: dk leaves the kernel in the rotated basis, in fp32
    dk_out = torch.empty(*dk.shape, dtype=torch.float32, device=q.device) if (
        has_rope and bd1) else dk
    aligned = aligned_8(head_dim, q_in, k_in, v, dout, dk_out, dv)
    LAUNCH_STATS.update(bwd_aligned_8=aligned)
    _attention3d_bwd_kernel[(n_kv_tiles, heads)](
        q_in, k_in, v, dout, lse, delta, dq_acc, dk_out, dv, cos, sin, partner,
        starts if has_anchor else partner,
        *q_in.stride()[:3], *k_in.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        *dk_out.stride()[:3], *t_strides,
        heads, n_q, n_k, head_dim, scale, scale * LOG2E, length, source,
        BLOCK_N=bn, BLOCK_D=bd0, BLOCK_D1=bd1, HAS_ROPE=has_rope, HAS_ANCHOR=has_anchor,
        INTERLEAVED=interleaved, DOT_PRECISION=_dot_precision(q.dtype), ALIGNED_8=aligned,
    )
    if has_rope:  # scale, rotate back and cast the dq accumulator in one pass
        dq = torch.empty(*q.shape, dtype=q.dtype, device=q.device)
        _rope_launch(dq_acc, dq, *tables.q, partner, None, 0, 0, True, interleaved, scale)
        if bd1:
            _rope_launch(dk_out, dk, *tables.k, partner, None, 0, 0, True, interleaved)
    else:
        dq = (dq_acc * scale).to(q.dtype)
    if has_anchor:
        # redirected key rows: b's contributions belong to source's rows
        for grad in (dk, dv):
            flat = grad.view(batch * n_k, heads, head_dim)
            total = flat[src_rows].float() + flat[others].float().sum(0)
            flat[src_rows] = total.to(grad.dtype)
            flat[others.reshape(-1)] = 0
    return dq, dk, dv


def rope3d_fwd(x, positions, rope_dims, rope_theta, inverse: bool = False,
               interleaved: bool = False):
    """Rotate x [B, N, H, D] (any strides, unit head-dim stride or not) with positions
    [B, N, 3]; inverse=True undoes it. Returns a contiguous tensor in x's dtype."""
    x = _head_contiguous(x)
    y = torch.empty(*x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    partner = rope_columns(rope_dims, rope_theta, x.shape[-1], x.device, interleaved)[3]
    cos, sin = rope_cos_sin(positions, rope_dims, rope_theta, x.shape[-1], interleaved)
    return _rope_launch(x, y, cos, sin, partner, None, 0, 0, inverse, interleaved)


def rope3d_bwd(dy, positions, rope_dims, rope_theta, interleaved: bool = False):
    return rope3d_fwd(dy, positions, rope_dims, rope_theta, inverse=True,
                      interleaved=interleaved)
