"""Triton kernels for 3D attention with anchor-token override and in-kernel 3D RoPE.

Layouts: q [B, Nq, H, D], k/v [B, Nk, H, D] with any batch/token/head strides and a contiguous head
dim; outputs and gradients contiguous [B, N, H, D]; the softmax log-sum-exp (base 2, in units of
``score * scale * log2(e)``) and ``delta = rowsum(dO * O)`` are fp32 [B, H, Nq]. The head dim is
padded to BLOCK_D = next_pow2(D) (>= 16) and masked.

RoPE on load. Per column j of the head dim the host builds (once per rope config) a signed
frequency f_j (negative in the first half of each part, zero past the rotated parts), the position
axis a_j in {t, y, x} and the partner column p_j (j +- d/2). Then, with angle_j = pos[a_j] * f_j,
    rot(x)_j = x_j cos(angle_j) + x_{p_j} sin(angle_j)
which is exactly the issue's pair rotation; the inverse (for gradients) is the same formula with
f negated. A tile is rotated from two loads of the same rows (columns j and p_j; the second hits
L1/L2). In the backward, dq / dk accumulate in registers in the rotated basis; the one-time
un-rotation needs column p_j of a register tile: an exact ``tl.gather`` along the head dim.

Anchor override without copies: a key/value row n of sequence b != source with
starts[b] <= n < starts[b] + length is loaded from row n - starts[b] + starts[source] of sequence
source (pointer redirection per row), and rotated with b's own position of row n. Query tiles come
from a host-built list of (b, row_start, row_end) that leaves out the anchor rows of every
b != source, so those rows get no program; the programs of source that cover its anchor rows also
store their output into the anchor rows of every other sequence.

Backward is one kernel: programs [0, n_kv_tiles) own a key tile of one sequence and loop over its
query rows (skipping the anchor rows of b != source) to produce dk, dv; the remaining programs own
one query tile from the list and loop over the keys to produce dq. Gradients of redirected key rows
are written to b's own rows and summed into source's rows in torch afterwards (deterministic).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.registry import interpreter_enabled

LOG2E = 1.4426950408889634
_TWO_PI_HI = 6.28125                      # 8 significant bits: k * _TWO_PI_HI is exact in fp32
_TWO_PI_LO = 2.0 * math.pi - 6.28125

# Work counters of the last launches (read by tests: the anchor skip is structural, not timed).
LAUNCH_STATS: dict[str, int] = {}

# Block sizes under TRITON_INTERPRET=1 (small, few programs); tests may override.
INTERPRET_BLOCKS = {"fwd": (32, 32), "bwd": (32, 32, 32, 32)}


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def fwd_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward: the query tile held in registers and the key step."""
    if interpreter_enabled():
        return INTERPRET_BLOCKS["fwd"]
    bd = block_d(head_dim)
    if dtype == torch.float32:
        return (64, 32) if bd <= 128 else (32, 32)
    return (128, 64) if bd <= 128 else (64, 32)


def bwd_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2): query step / key tile of the dk-dv programs and
    query tile / key step of the dq programs."""
    if interpreter_enabled():
        return INTERPRET_BLOCKS["bwd"]
    bd = block_d(head_dim)
    if dtype == torch.float32 or bd > 128:
        return 32, 64, 64, 32
    return 64, 64, 64, 64


def _configs(stages: tuple[int, ...]) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in stages]


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
def _cos_sin(angle):
    """cos and sin of fp32 angles of any size: Cody-Waite reduction to [-pi, pi] first."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = angle - k * 6.28125
    r = r - k * 0.0019353071795864769
    return tl.cos(r), tl.sin(r)


@triton.jit
def _rope_angles(pos_ptr, pos_off, row_mask, freq, axis):
    """[R, BLOCK_D] fp32 angles pos[row, axis_j] * freq_j; pos_off [R] points at (t, y, x)."""
    pt = tl.load(pos_ptr + pos_off, mask=row_mask, other=0.0)
    py = tl.load(pos_ptr + pos_off + 1, mask=row_mask, other=0.0)
    px = tl.load(pos_ptr + pos_off + 2, mask=row_mask, other=0.0)
    p = tl.where(axis[None, :] == 0, pt[:, None],
                 tl.where(axis[None, :] == 1, py[:, None], px[:, None]))
    return p * freq[None, :]


@triton.jit
def _load_rotated(x_ptr, row_off, row_mask, cols, col_mask, partner, pos_ptr, pos_off, freq, axis,
                  HAS_ROPE: tl.constexpr):
    """Load rows x[row_off + cols] ([R, BLOCK_D], zero where masked), rotated when HAS_ROPE, in
    x's dtype (the dtype the tensor cores consume, as eager RoPE + SDPA would see it)."""
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_ROPE:
        xp = tl.load(x_ptr + row_off[:, None] + partner[None, :], mask=mask, other=0.0)
        c, s = _cos_sin(_rope_angles(pos_ptr, pos_off, row_mask, freq, axis))
        x = (x.to(tl.float32) * c + xp.to(tl.float32) * s).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _unrotate(g, partner, pos_ptr, pos_off, row_mask, freq, axis):
    """Gradient through the rotation: g_j cos(angle_j) - g_{p_j} sin(angle_j) (fp32 [R, BD]).
    Column p_j of the register tile is an exact in-register gather along the head dim."""
    g_p = tl.gather(g, tl.broadcast_to(partner[None, :], g.shape), axis=1)
    c, s = _cos_sin(_rope_angles(pos_ptr, pos_off, row_mask, freq, axis))
    return g * c - g_p * s


@triton.jit
def _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_b, stride_n,
             HAS_ANCHOR: tl.constexpr):
    """Row offsets (int64 [BLOCK_N]) of keys/values of sequence b: anchor rows of b != source
    are redirected to the matching rows of sequence source."""
    kv_b = tl.zeros_like(offs_n) + b
    kv_n = offs_n
    if HAS_ANCHOR:
        inside = (offs_n >= s_b) & (offs_n < s_b + anchor_len) & (b != anchor_src)
        kv_b = tl.where(inside, anchor_src, kv_b)
        kv_n = tl.where(inside, offs_n - s_b + s_src, offs_n)
    return kv_b.to(tl.int64) * stride_b + kv_n.to(tl.int64) * stride_n


# ----------------------------------------------------------------------------------------------
# Forward


@triton.autotune(configs=_configs((2, 3, 4)), key=["head_dim", "n_k", "ALIGNED_8"])
@triton.jit
def _attention3d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    q_pos_ptr, k_pos_ptr, freq_ptr, meta_ptr, tiles_ptr, starts_ptr,
    stride_q_b, stride_q_n, stride_q_h,
    stride_k_b, stride_k_n, stride_k_h,
    stride_v_b, stride_v_n, stride_v_h,
    stride_o_b, stride_o_n, stride_o_h,
    stride_qp_b, stride_qp_n, stride_kp_b, stride_kp_n,
    n_batch, heads, n_q, n_k, head_dim, qk_scale, anchor_len, anchor_src,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_ANCHOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGNED_8: tl.constexpr,
):
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
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(tiles_ptr + tile * 3)
    m_start = tl.load(tiles_ptr + tile * 3 + 1)
    m_end = tl.load(tiles_ptr + tile * 3 + 2)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < m_end
    cols = tl.arange(0, BLOCK_D)
    d_mask = cols < head_dim
    freq = tl.load(freq_ptr + cols)
    axis = tl.load(meta_ptr + cols)
    partner = tl.load(meta_ptr + BLOCK_D + cols)
    s_b = 0
    s_src = 0
    if HAS_ANCHOR:
        s_b = tl.load(starts_ptr + b)
        s_src = tl.load(starts_ptr + anchor_src)

    q_rows = b.to(tl.int64) * stride_q_b + offs_m.to(tl.int64) * stride_q_n + h * stride_q_h
    q = _load_rotated(q_ptr, q_rows, m_mask, cols, d_mask, partner, q_pos_ptr,
                      b * stride_qp_b + offs_m * stride_qp_n, freq, axis, HAS_ROPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, n_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_k
        k_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_k_b, stride_k_n,
                          HAS_ANCHOR) + h * stride_k_h
        k = _load_rotated(k_ptr, k_rows, n_mask, cols, d_mask, partner, k_pos_ptr,
                          b * stride_kp_b + offs_n * stride_kp_n, freq, axis, HAS_ROPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_v_b, stride_v_n,
                          HAS_ANCHOR) + h * stride_v_h
        v = tl.load(v_ptr + v_rows[:, None] + cols[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = (acc / l_i[:, None]).to(o_ptr.dtype.element_ty)
    o_mask = m_mask[:, None] & d_mask[None, :]
    o_cols = h * stride_o_h + cols[None, :]
    tl.store(o_ptr + b.to(tl.int64) * stride_o_b + offs_m[:, None].to(tl.int64) * stride_o_n
             + o_cols, out, mask=o_mask)
    tl.store(lse_ptr + (b * heads + h).to(tl.int64) * n_q + offs_m, m_i + tl.log2(l_i),
             mask=m_mask)
    if HAS_ANCHOR:
        # source's anchor rows are also the output of every other sequence's anchor rows
        in_anchor = m_mask & (offs_m >= s_src) & (offs_m < s_src + anchor_len)
        if (b == anchor_src) & (m_start < s_src + anchor_len) & (m_end > s_src):
            for bb in range(n_batch):  # out is contiguous: row bb*Nq + m
                if bb != anchor_src:
                    dst = bb * n_q + tl.load(starts_ptr + bb) + offs_m - s_src
                    tl.store(o_ptr + dst[:, None].to(tl.int64) * stride_o_n + o_cols, out,
                             mask=in_anchor[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention3d_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, n_rows, heads, n_q, head_dim,
                                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                                       ALIGNED_8: tl.constexpr):
    """delta[b, h, m] = sum_d dO * O over rows r = (b*Nq + m)*H + h of contiguous [B, Nq, H, D]."""
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


@triton.jit
def _dkdv_segment(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, q_pos_ptr, b, h, lo, hi,
                  cols, d_mask, freq, axis, partner,
                  stride_q_b, stride_q_n, stride_q_h, stride_o_b, stride_o_n, stride_o_h,
                  stride_qp_b, stride_qp_n, heads, n_q, qk_scale,
                  BLOCK_M: tl.constexpr, HAS_ROPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk, dv ([BLOCK_N, BLOCK_D] fp32, rotated basis) over query rows [lo, hi)."""
    stats = (b * heads + h).to(tl.int64) * n_q
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < hi
        q_rows = b.to(tl.int64) * stride_q_b + offs_m.to(tl.int64) * stride_q_n + h * stride_q_h
        q = _load_rotated(q_ptr, q_rows, m_mask, cols, d_mask, partner, q_pos_ptr,
                          b * stride_qp_b + offs_m * stride_qp_n, freq, axis, HAS_ROPE)
        do_rows = b.to(tl.int64) * stride_o_b + offs_m.to(tl.int64) * stride_o_n + h * stride_o_h
        do = tl.load(do_ptr + do_rows[:, None] + cols[None, :],
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(lse_ptr + stats + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + stats + offs_m, mask=m_mask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale   # [BN, BM]
        p_t = tl.where(m_mask[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_configs((2, 3)), key=["head_dim", "n_k", "ALIGNED_8"])
@triton.jit
def _attention3d_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    q_pos_ptr, k_pos_ptr, freq_ptr, meta_ptr, tiles_ptr, starts_ptr,
    stride_q_b, stride_q_n, stride_q_h,
    stride_k_b, stride_k_n, stride_k_h,
    stride_v_b, stride_v_n, stride_v_h,
    stride_o_b, stride_o_n, stride_o_h,
    stride_dk_b, stride_dk_n, stride_dk_h,
    stride_qp_b, stride_qp_n, stride_kp_b, stride_kp_n,
    heads, n_q, n_k, head_dim, sm_scale, qk_scale, anchor_len, anchor_src, n_kv_tiles,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_ANCHOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGNED_8: tl.constexpr,
):
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
    pid = tl.program_id(0)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    d_mask = cols < head_dim
    freq = tl.load(freq_ptr + cols)
    axis = tl.load(meta_ptr + cols)
    partner = tl.load(meta_ptr + BLOCK_D + cols)

    if pid < n_kv_tiles:
        # ---- dk, dv of one key tile of sequence b
        tiles_per_b = tl.cdiv(n_k, BLOCK_N1)
        b = pid // tiles_per_b
        offs_n = (pid % tiles_per_b) * BLOCK_N1 + tl.arange(0, BLOCK_N1)
        n_mask = offs_n < n_k
        s_b = 0
        s_src = 0
        hi1 = tl.zeros_like(b) + n_q  # a tensor even when Triton specialises n_q == 1
        lo2 = tl.zeros_like(b) + n_q
        if HAS_ANCHOR:
            s_b = tl.load(starts_ptr + b)
            s_src = tl.load(starts_ptr + anchor_src)
            if b != anchor_src:  # b's anchor query rows are not computed: skip them
                hi1 = s_b
                lo2 = s_b + anchor_len
        k_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_k_b, stride_k_n,
                          HAS_ANCHOR) + h * stride_k_h
        kp_off = b * stride_kp_b + offs_n * stride_kp_n
        k = _load_rotated(k_ptr, k_rows, n_mask, cols, d_mask, partner, k_pos_ptr, kp_off,
                          freq, axis, HAS_ROPE)
        v_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_v_b, stride_v_n,
                          HAS_ANCHOR) + h * stride_v_h
        v = tl.load(v_ptr + v_rows[:, None] + cols[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        dk, dv = _dkdv_segment(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, q_pos_ptr, b, h,
                               0, hi1, cols, d_mask, freq, axis, partner,
                               stride_q_b, stride_q_n, stride_q_h, stride_o_b, stride_o_n,
                               stride_o_h, stride_qp_b, stride_qp_n, heads, n_q, qk_scale,
                               BLOCK_M1, HAS_ROPE, DOT_PRECISION)
        dk, dv = _dkdv_segment(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, q_pos_ptr, b, h,
                               lo2, n_q, cols, d_mask, freq, axis, partner,
                               stride_q_b, stride_q_n, stride_q_h, stride_o_b, stride_o_n,
                               stride_o_h, stride_qp_b, stride_qp_n, heads, n_q, qk_scale,
                               BLOCK_M1, HAS_ROPE, DOT_PRECISION)
        dk = dk * sm_scale
        if HAS_ROPE:
            dk = _unrotate(dk, partner, k_pos_ptr, kp_off, n_mask, freq, axis)
        # b's own rows (redirected ones included); op.py folds those into source's rows
        out_rows = (b.to(tl.int64) * stride_dk_b + offs_n.to(tl.int64) * stride_dk_n
                    + h * stride_dk_h)
        mask = n_mask[:, None] & d_mask[None, :]
        tl.store(dk_ptr + out_rows[:, None] + cols[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(dv_ptr + out_rows[:, None] + cols[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=mask)
    else:
        # ---- dq of one query tile from the list
        tile = pid - n_kv_tiles
        b = tl.load(tiles_ptr + tile * 3)
        m_start = tl.load(tiles_ptr + tile * 3 + 1)
        m_end = tl.load(tiles_ptr + tile * 3 + 2)
        offs_m = m_start + tl.arange(0, BLOCK_M2)
        m_mask = offs_m < m_end
        s_b = 0
        s_src = 0
        if HAS_ANCHOR:
            s_b = tl.load(starts_ptr + b)
            s_src = tl.load(starts_ptr + anchor_src)
        q_rows = b.to(tl.int64) * stride_q_b + offs_m.to(tl.int64) * stride_q_n + h * stride_q_h
        qp_off = b * stride_qp_b + offs_m * stride_qp_n
        q = _load_rotated(q_ptr, q_rows, m_mask, cols, d_mask, partner, q_pos_ptr, qp_off,
                          freq, axis, HAS_ROPE)
        o_rows = b.to(tl.int64) * stride_o_b + offs_m.to(tl.int64) * stride_o_n + h * stride_o_h
        mask = m_mask[:, None] & d_mask[None, :]
        do = tl.load(do_ptr + o_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        stats = (b * heads + h).to(tl.int64) * n_q
        lse = tl.load(lse_ptr + stats + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + stats + offs_m, mask=m_mask, other=0.0)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
        for n0 in range(0, n_k, BLOCK_N2):
            offs_n = n0 + tl.arange(0, BLOCK_N2)
            n_mask = offs_n < n_k
            k_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_k_b,
                              stride_k_n, HAS_ANCHOR) + h * stride_k_h
            k = _load_rotated(k_ptr, k_rows, n_mask, cols, d_mask, partner, k_pos_ptr,
                              b * stride_kp_b + offs_n * stride_kp_n, freq, axis, HAS_ROPE)
            v_rows = _kv_rows(b, offs_n, s_b, s_src, anchor_len, anchor_src, stride_v_b,
                              stride_v_n, HAS_ANCHOR) + h * stride_v_h
            v = tl.load(v_ptr + v_rows[:, None] + cols[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.where(n_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dq = dq * sm_scale
        if HAS_ROPE:
            dq = _unrotate(dq, partner, q_pos_ptr, qp_off, m_mask, freq, axis)
        tl.store(dq_ptr + o_rows[:, None] + cols[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=mask)


# ----------------------------------------------------------------------------------------------
# Standalone RoPE


@triton.jit
def _rope3d_kernel(x_ptr, y_ptr, pos_ptr, freq_ptr, meta_ptr, n_rows, heads, n_tokens, head_dim,
                   stride_p_b, stride_p_n,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED_8: tl.constexpr):
    """y = rot(x) over rows r = (b*N + n)*H + h of contiguous [B, N, H, D]. The backward is the
    same kernel with the frequencies negated (the inverse rotation)."""
    if ALIGNED_8:
        head_dim = _mult8(head_dim)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    d_mask = cols < head_dim
    freq = tl.load(freq_ptr + cols)
    axis = tl.load(meta_ptr + cols)
    partner = tl.load(meta_ptr + BLOCK_D + cols)
    tok = rows // heads
    pos_off = (tok // n_tokens) * stride_p_b + (tok % n_tokens) * stride_p_n
    row_off = rows.to(tl.int64) * head_dim
    y = _load_rotated(x_ptr, row_off, r_mask, cols, d_mask, partner, pos_ptr, pos_off, freq, axis,
                      True)
    tl.store(y_ptr + row_off[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=r_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Host-side metadata (small, cached per configuration)

_META_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_TILE_CACHE: dict[tuple, torch.Tensor] = {}
_CACHE_LIMIT = 64


def _cache_put(cache: dict, key, value):
    if len(cache) >= _CACHE_LIMIT:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def rope_tables(rope_dims, rope_theta: float, head_dim: int, device, inverse: bool = False,
                interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(freq fp32 [BLOCK_D], meta int32 [2, BLOCK_D] = (axis, partner)) for the kernels. A part's
    pairs are (c+i, c+i+d/2) (rotate-half) or (c+2i, c+2i+1) (``interleaved``)."""
    key = (tuple(rope_dims), float(rope_theta), head_dim, str(device), inverse, interleaved)
    if key in _META_CACHE:
        return _META_CACHE[key]
    from kernels.attention.ref import rope_inv_freq

    bd = block_d(head_dim)
    freq = torch.zeros(bd, dtype=torch.float32)
    axis = torch.zeros(bd, dtype=torch.int32)
    partner = torch.arange(bd, dtype=torch.int32)
    col = 0
    for a, d in enumerate(rope_dims):
        half = d // 2
        inv = rope_inv_freq(d, rope_theta, torch.float32)
        first = torch.arange(col, col + d, 2) if interleaved else torch.arange(col, col + half)
        second = first + (1 if interleaved else half)
        freq[first] = -inv                             # x_j1 cos - x_j2 sin
        freq[second] = inv                             # x_j2 cos + x_j1 sin
        axis[col:col + d] = a
        partner[first] = second.to(torch.int32)
        partner[second] = first.to(torch.int32)
        col += d
    if inverse:
        freq = -freq
    value = (freq.to(device), torch.stack([axis, partner]).to(device))
    return _cache_put(_META_CACHE, key, value)


def query_tiles(batch: int, n_q: int, block_m: int, anchor, device) -> torch.Tensor:
    """int32 [T, 3] of (b, row_start, row_end): the query tiles that get a program. Anchor rows of
    every b != source are left out, so the count scales with B*(T-1)+1 frames, not B*T."""
    key = (batch, n_q, block_m, None if anchor is None else (tuple(anchor[0]), *anchor[1:]),
           str(device))
    if key in _TILE_CACHE:
        return _TILE_CACHE[key]
    tiles = []
    for b in range(batch):
        ranges = [(0, n_q)]
        if anchor is not None and b != anchor[2]:
            s, length = anchor[0][b], anchor[1]
            ranges = [(0, s), (s + length, n_q)]
        for lo, hi in ranges:
            tiles += [(b, m, min(m + block_m, hi)) for m in range(lo, hi, block_m)]
    table = torch.tensor(tiles or [(0, 0, 0)], dtype=torch.int32).reshape(-1, 3)[:len(tiles)]
    return _cache_put(_TILE_CACHE, key, table.to(device))


def positions_f32(pos: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """[B, N, 3] positions as fp32 with a unit last stride (a batch-broadcast view stays a view);
    a 1-element dummy when there is no RoPE."""
    if pos is None:
        return torch.zeros(3, dtype=torch.float32, device=like.device)
    if pos.stride(0) == 0:
        return pos[0].to(torch.float32).contiguous().expand(pos.shape)
    return pos.to(torch.float32).contiguous()


def _starts_tensor(anchor, device) -> torch.Tensor:
    starts = anchor[0] if anchor is not None else [0]
    return torch.tensor(starts, dtype=torch.int32).to(device)


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


# ----------------------------------------------------------------------------------------------
# Launchers


def attention3d_fwd(q, k, v, q_pos, k_pos, rope_dims, rope_theta, anchor, scale,
                    interleaved=False):
    """out [B, Nq, H, D] (q's dtype) and lse [B, H, Nq] fp32. anchor: (starts, length, source)."""
    q, k, v = _head_contiguous(q), _head_contiguous(k), _head_contiguous(v)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    bm, bn = fwd_blocks(head_dim, q.dtype)
    bd = block_d(head_dim)
    has_anchor = anchor is not None and batch > 1
    anchor = anchor if has_anchor else None
    tiles = query_tiles(batch, n_q, bm, anchor, q.device)
    freq, meta = rope_tables(rope_dims, rope_theta, head_dim, q.device,
                             interleaved=interleaved)
    qp, kp = positions_f32(q_pos, q), positions_f32(k_pos, q)
    starts = _starts_tensor(anchor, q.device)
    out = torch.empty(batch, n_q, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, n_q, dtype=torch.float32, device=q.device)
    aligned = aligned_8(head_dim, q, k, v, out)
    LAUNCH_STATS.update(fwd_query_tiles=tiles.shape[0],
                        fwd_dense_query_tiles=batch * triton.cdiv(n_q, bm),
                        fwd_programs=tiles.shape[0] * heads, fwd_block_m=bm, fwd_aligned_8=aligned)
    if tiles.shape[0] == 0:
        return out, lse
    qp_strides = (qp.stride(0), qp.stride(1)) if q_pos is not None else (0, 0)
    kp_strides = (kp.stride(0), kp.stride(1)) if k_pos is not None else (0, 0)
    _attention3d_fwd_kernel[(tiles.shape[0], heads)](
        q, k, v, out, lse, qp, kp, freq, meta, tiles, starts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *qp_strides, *kp_strides,
        batch, heads, n_q, n_k, head_dim, scale * LOG2E,
        anchor[1] if anchor else 0, anchor[2] if anchor else 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HAS_ROPE=q_pos is not None,
        HAS_ANCHOR=has_anchor, DOT_PRECISION=_dot_precision(q.dtype), ALIGNED_8=aligned,
    )
    return out, lse


def _anchor_rows(anchor, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices [B-1, L] of the anchor rows of every b != source, and [L] of source."""
    starts, length, src = anchor
    ar = torch.arange(length)
    others = [b * n + starts[b] + ar for b in range(len(starts)) if b != src]
    return torch.stack(others).to(device), (src * n + starts[src] + ar).to(device)


def attention3d_bwd(dout, q, k, v, out, lse, q_pos, k_pos, rope_dims, rope_theta, anchor, scale,
                    interleaved=False):
    """(dq, dk, dv) in the input dtypes, following the anchor semantics of the reference."""
    q, k, v = _head_contiguous(q), _head_contiguous(k), _head_contiguous(v)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    bm1, bn1, bm2, bn2 = bwd_blocks(head_dim, q.dtype)
    bd = block_d(head_dim)
    has_anchor = anchor is not None and batch > 1
    anchor = anchor if has_anchor else None
    dout = dout.contiguous()
    if has_anchor:
        # out[b, anchor_b] = out[source, anchor_src]: fold those gradients into source's rows
        others, src_rows = _anchor_rows(anchor, n_q, q.device)
        flat = dout.reshape(batch * n_q, heads, head_dim)
        folded = flat[src_rows].float() + flat[others].float().sum(0)
        dout = dout.clone()
        dout.view(batch * n_q, heads, head_dim)[src_rows] = folded.to(dout.dtype)
    delta = torch.empty_like(lse)
    n_rows = batch * n_q * heads
    _attention3d_bwd_preprocess_kernel[(triton.cdiv(n_rows, 64),)](
        out, dout, delta, n_rows, heads, n_q, head_dim, BLOCK_R=64, BLOCK_D=bd,
        ALIGNED_8=aligned_8(head_dim, out, dout))

    tiles = query_tiles(batch, n_q, bm2, anchor, q.device)
    n_kv_tiles = batch * triton.cdiv(n_k, bn1)
    freq, meta = rope_tables(rope_dims, rope_theta, head_dim, q.device,
                             interleaved=interleaved)
    qp, kp = positions_f32(q_pos, q), positions_f32(k_pos, q)
    starts = _starts_tensor(anchor, q.device)
    dq = torch.empty(batch, n_q, heads, head_dim, dtype=q.dtype, device=q.device)
    dk = torch.empty(batch, n_k, heads, head_dim, dtype=k.dtype, device=q.device)
    dv = torch.empty(batch, n_k, heads, head_dim, dtype=v.dtype, device=q.device)
    aligned = aligned_8(head_dim, q, k, v, dout, dq, dk, dv)
    LAUNCH_STATS.update(bwd_query_tiles=tiles.shape[0], bwd_kv_tiles=n_kv_tiles,
                        bwd_aligned_8=aligned)
    qp_strides = (qp.stride(0), qp.stride(1)) if q_pos is not None else (0, 0)
    kp_strides = (kp.stride(0), kp.stride(1)) if k_pos is not None else (0, 0)
    _attention3d_bwd_kernel[(n_kv_tiles + tiles.shape[0], heads)](
        q, k, v, dout, lse, delta, dq, dk, dv, qp, kp, freq, meta, tiles, starts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        *qp_strides, *kp_strides,
        heads, n_q, n_k, head_dim, scale, scale * LOG2E,
        anchor[1] if anchor else 0, anchor[2] if anchor else 0, n_kv_tiles,
        BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2, BLOCK_D=bd,
        HAS_ROPE=q_pos is not None, HAS_ANCHOR=has_anchor, DOT_PRECISION=_dot_precision(q.dtype),
        ALIGNED_8=aligned,
    )
    if has_anchor:
        # redirected key rows: b's contributions belong to source's rows; q rows whose output was
        # copied from source get no gradient
        dq.view(batch * n_q, heads, head_dim)[others.reshape(-1)] = 0
        for grad in (dk, dv):
            flat = grad.view(batch * n_k, heads, head_dim)
            total = flat[src_rows].float() + flat[others].float().sum(0)
            flat[src_rows] = total.to(grad.dtype)
            flat[others.reshape(-1)] = 0
    return dq, dk, dv


def rope3d_fwd(x, positions, rope_dims, rope_theta, inverse: bool = False,
               interleaved: bool = False):
    """Rotate x [B, N, H, D] (any strides) with positions [B, N, 3]; inverse=True undoes it."""
    x = x.contiguous()
    batch, n, heads, head_dim = x.shape
    bd = block_d(head_dim)
    freq, meta = rope_tables(rope_dims, rope_theta, head_dim, x.device, inverse=inverse,
                             interleaved=interleaved)
    pos = positions_f32(positions, x)
    y = torch.empty_like(x)
    n_rows = batch * n * heads
    block_r = 32 if interpreter_enabled() else max(1, min(128, 8192 // bd))
    _rope3d_kernel[(triton.cdiv(n_rows, block_r),)](
        x, y, pos, freq, meta, n_rows, heads, n, head_dim, pos.stride(0), pos.stride(1),
        BLOCK_R=block_r, BLOCK_D=bd, ALIGNED_8=aligned_8(head_dim, x, y), num_warps=4)
    return y


def rope3d_bwd(dy, positions, rope_dims, rope_theta, interleaved: bool = False):
    return rope3d_fwd(dy, positions, rope_dims, rope_theta, inverse=True,
                      interleaved=interleaved)
