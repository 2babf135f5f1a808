"""Triton kernels for Performer (FAVOR+) attention, forward and backward, causal and non-causal.

Layout: q, k, v, out are [B, N, H, D] with a unit last stride (any other strides are passed in);
features w are [M, D] contiguous. The sequence is processed in chunks of BLOCK_N tokens and the
features in blocks of BLOCK_M (the last block masked), and every program loops over all feature
blocks itself, so per-row results are merged in registers and nothing of size N x M or
n_blocks x N x D ever reaches global memory. States are [B*H, M, D] fp32 (O(M D) per head):

- non-causal: ``_performer_state_kernel`` (one program per head and feature block) sums the key
  state S, z (forward) or the query-side state R, zeta (backward) over the whole sequence; the
  chunk kernels (``_performer_fwd_kernel`` / ``_performer_bwd_kernel`` with CAUSAL=False, one
  program per chunk and head) then read it for every feature block.
- causal: one program per head scans the chunks in order (forward, dq) or in reverse (dk, dv);
  the state of every feature block lives in a per-head fp32 scratch [M, D] (L2-resident: the
  program reads and writes only its own head's slice) between chunks.

The math, the stabilisers and why every exponential stays <= 1 (or below a stated cap):
README.md. Matmul operands: logits (q @ w^T, k @ w^T) use the input dtype; products of features
(phi tiles, states) use bf16 for bf16 inputs and fp32 (tf32 tensor cores: fp16 precision with
fp32 range, so a state summed over 8192 tokens cannot overflow) for fp16 inputs; fp32 inputs use
tf32x3 (about fp32 accuracy). Accumulators are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.attention.triton_impl import _mult8, aligned_8
from kernels.registry import interpreter_enabled

MAX_D = 128
# Cap on the exponent of the causal backward's pair factor exp(alpha_i + s_j - L_i), the only
# factor that can exceed 1 (by at most 1 / den_i of the forward, see README): exact whenever
# den_i > e^-60, and e^60 * M * BLOCK_N * |dO . v| stays inside bf16/fp32 range (< 3.4e38) for
# |dO . v| up to 1e5.
GRAD_EXP_CAP = tl.constexpr(60.0)


@dataclass(frozen=True)
class Config:
    block_n: int
    block_m: int
    block_d: int
    n_mblocks: int
    num_warps: int
    num_stages: int


def config(seq_len: int, head_dim: int, n_features: int, causal: bool = False) -> Config:
    """Chunk and feature-block sizes. BLOCK_N = 64 and BLOCK_M = 64 (non-causal) or 16 (causal):
    every product has an m64 side (the logits [64, BM], the pair matrix [64, 64], the state
    update [BM, D], which the causal kernels compute transposed, [D, BM], so its M side is D),
    so all of them are wgmma on sm_90. M is padded to a multiple of BLOCK_M only (266 -> 320 or
    272), the last block masked."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Interpreter: small tiles so CPU tests cover several chunks and feature blocks.
    block_n = block_m = 16 if interpreter_enabled() else 64
    block_n = min(block_n, max(16, triton.next_power_of_2(seq_len)))
    # 8 warps: with 4, every kernel but the forward spills (ptxas, sm_90a, D = 64; 16 warps cap
    # a thread at 128 registers and spill more). The causal kernels keep the [64, 64] pair
    # matrix and [64, D] accumulators live across the feature loop, so the feature block's own
    # [64, BM] temporaries decide what spills (compile-only profile, sm_90a, bf16, D = 64):
    # 64-feature blocks spilled 336-820 B, 32-feature blocks 12-20 B in the forward and
    # 180-528 B in the backward, 16-feature blocks none in the forward and none inside the
    # backward's feature loop. m64n16 products keep every product on wgmma; the price is twice
    # the feature-loop iterations (row maxima and state loads per 16 features).
    if causal:  # (interpreter: 32-token chunks over 16-feature blocks, the GPU's 2:1 ratio)
        block_n, block_m = (block_n * 2, block_m) if interpreter_enabled() else (block_n, 16)
        block_n = min(block_n, max(16, triton.next_power_of_2(seq_len)))
    stages = 2 if causal else 3
    return Config(block_n, block_m, block_d, triton.cdiv(n_features, block_m), 8, stages)


def _dot_modes(dtype: torch.dtype) -> tuple[bool, str]:
    """(feature operands in bf16?, input precision of fp32 dots). fp32 inputs use tf32x3 (three
    tf32 products, about fp32 accuracy on tensor cores; "ieee" FMA dots spill heavily)."""
    if dtype == torch.bfloat16:
        return True, "tf32"
    return False, "tf32x3" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# Helpers


@triton.jit
def _mm(a, b, FEAT_BF16: tl.constexpr, PREC: tl.constexpr):
    """a @ b for products of features: bf16 operands, or fp32 at precision PREC."""
    if FEAT_BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _logits(x, w, scale, PREC: tl.constexpr):
    """x [BN, BD], w [BM, BD] in the input dtype -> scale * x @ w^T [BN, BM] fp32; scale =
    D^(-1/4) is applied in fp32 after the dot."""
    return tl.dot(x, tl.trans(w), input_precision=PREC) * scale


@triton.jit
def _half_sq_norm(x, scale):
    """scale^2 |x|^2 / 2 [BN] of x [BN, BD]. It does not depend on the feature block: computed
    once per chunk, outside the feature loops (inside them it kept an fp32 copy of the tile
    live in registers)."""
    xf = x.to(tl.float32)
    return tl.sum(xf * xf, axis=1) * (0.5 * scale * scale)


@triton.jit
def _load(base, offs_n, stride_n, offs_d, mask):
    # Row offsets in int64: N * stride_n passes 2^31 for long packed sequences.
    rows = offs_n.to(tl.int64)[:, None] * stride_n
    return tl.load(base + rows + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store(base, offs_n, stride_n, offs_d, value, mask):
    rows = offs_n.to(tl.int64)[:, None] * stride_n
    tl.store(base + rows + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _chunk(t, seq_len, d_ok, BLOCK_N: tl.constexpr):
    """Chunk t: (token offsets [BN], valid tokens [BN], valid [BN, BD] tile elements)."""
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seq_len
    return offs_n, n_ok, n_ok[:, None] & d_ok[None, :]


@triton.jit
def _features(w_ptr, mb, n_features, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Feature block mb: (w [BM, BD] in the input dtype, feature offsets [BM], valid [BM])."""
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_features
    w = tl.load(w_ptr + offs_m[:, None] * head_dim + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    return w, offs_m, m_ok


@triton.jit
def _finite_or_minus_inf(x):
    """-inf where x is -inf, else 0: the stabiliser to subtract when the running max may still
    be -inf (nothing seen yet), so exp(x - safe) is 0 instead of exp(-inf + inf) = NaN."""
    return tl.where(x == float("-inf"), 0.0, x)


@triton.jit
def _mult8_strides(stride_b, stride_n, stride_h):
    """A tensor's three strides through attention3d's _mult8 (ALIGNED_8: launcher-checked
    multiples of 8 elements, now visible to the compiler's divisibility analysis)."""
    return _mult8(stride_b), _mult8(stride_n), _mult8(stride_h)


@triton.jit
def _head(pid_bh, n_heads):
    """(batch, head) as int64, so batch * stride never wraps at 2^31 elements."""
    return (pid_bh // n_heads).to(tl.int64), (pid_bh % n_heads).to(tl.int64)


# ----------------------------------------------------------------------------------------------
# Non-causal state: one program per (feature block, batch * head) scans the whole sequence.


@triton.jit
def _performer_state_kernel(
    x_ptr, y_ptr, o_ptr, w_ptr, lse_ptr, cmax_ptr, state_ptr, norm_ptr,
    stride_x_b, stride_x_n, stride_x_h, stride_y_b, stride_y_n, stride_y_h,
    stride_o_b, stride_o_n, stride_o_h,
    n_heads, seq_len, head_dim, n_features, scale,
    QUERY_SIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, FEAT_BF16: tl.constexpr, PREC: tl.constexpr, ALIGNED_8: tl.constexpr,
):
    """Key side (forward; x = k, y = v): c_m = max_j b_jm (running), S_m = sum_j exp(b_jm - c_m)
    v_j, z_m = sum_j exp(b_jm - c_m); writes S, z and c. Query side (backward; x = q, y = dO,
    o = out): with the forward's c and L, R_m = sum_i exp(a_im + c_m - L_i) dO_i and
    zeta_m = sum_i exp(a_im + c_m - L_i) delta_i (exponent <= 0 exactly: L_i >= a_im + c_m)."""
    if ALIGNED_8:  # (launcher-checked, see aligned_8) 16-byte rows: vector and async tile loads
        head_dim = _mult8(head_dim)
        stride_x_b, stride_x_n, stride_x_h = _mult8_strides(stride_x_b, stride_x_n, stride_x_h)
        stride_y_b, stride_y_n, stride_y_h = _mult8_strides(stride_y_b, stride_y_n, stride_y_h)
        stride_o_b, stride_o_n, stride_o_h = _mult8_strides(stride_o_b, stride_o_n, stride_o_h)
    mb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = _head(pid_bh, n_heads)
    x_base = x_ptr + b * stride_x_b + h * stride_x_h
    y_base = y_ptr + b * stride_y_b + h * stride_y_h
    w, offs_m, m_ok = _features(w_ptr, mb, n_features, head_dim, BLOCK_M, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    feat = pid_bh.to(tl.int64) * n_features
    # The state is summed transposed, [BD, BM] = y^T @ weights (stored back as [M, D] rows): as
    # [BM, BD] = weights^T @ y, ptxas serialised its wgmma (C7515) at D = 64 in bf16
    state = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
    norm = tl.zeros([BLOCK_M], dtype=tl.float32)
    if QUERY_SIDE:
        o_base = o_ptr + b * stride_o_b + h * stride_o_h
        lse_base = lse_ptr + pid_bh.to(tl.int64) * seq_len
        c = tl.load(cmax_ptr + feat + offs_m, mask=m_ok, other=0.0)
    else:
        c = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for t in range(tl.cdiv(seq_len, BLOCK_N)):
        offs_n, n_ok, tile_ok = _chunk(t, seq_len, d_ok, BLOCK_N)
        x = _load(x_base, offs_n, stride_x_n, offs_d, tile_ok)
        y = _load(y_base, offs_n, stride_y_n, offs_d, tile_ok)
        if QUERY_SIDE:
            o = _load(o_base, offs_n, stride_o_n, offs_d, tile_ok)
            lse = tl.load(lse_base + offs_n, mask=n_ok, other=0.0)
            delta = tl.sum(y.to(tl.float32) * o.to(tl.float32), axis=1)
            a = _logits(x, w, scale, PREC)
            qw = tl.exp(tl.minimum(a + c[None, :] - lse[:, None], 0.0))
            qw = tl.where(m_ok[None, :] & n_ok[:, None], qw, 0.0)
            state += _mm(tl.trans(y), qw, FEAT_BF16, PREC)
            norm += tl.sum(qw * delta[:, None], axis=0)
        else:
            kb = _logits(x, w, scale, PREC) - _half_sq_norm(x, scale)[:, None]
            kb = tl.where(n_ok[:, None], kb, float("-inf"))
            c_new = tl.maximum(c, tl.max(kb, axis=0))    # finite: every chunk has a valid row
            kw = tl.exp(kb - c_new[None, :])
            decay = tl.exp(c - c_new)
            state = state * decay[None, :] + _mm(tl.trans(y), kw, FEAT_BF16, PREC)
            norm = norm * decay + tl.sum(kw, axis=0)
            c = c_new
    offs, state_mask = _state_offsets(feat, offs_m, m_ok, offs_d, d_ok, head_dim, True)
    tl.store(state_ptr + offs, state, mask=state_mask)
    tl.store(norm_ptr + feat + offs_m, norm, mask=m_ok)
    if not QUERY_SIDE:
        tl.store(cmax_ptr + feat + offs_m, c, mask=m_ok)


@triton.jit
def _state_offsets(feat, offs_m, m_ok, offs_d, d_ok, head_dim, TRANSPOSED: tl.constexpr):
    """Offsets and mask of state block [BM, BD] (rows = features) of an [M, D] state, or with
    TRANSPOSED the same elements as a [BD, BM] tile."""
    if TRANSPOSED:
        offs = feat * head_dim + offs_m[None, :] * head_dim + offs_d[:, None]
        mask = m_ok[None, :] & d_ok[:, None]
    else:
        offs = feat * head_dim + offs_m[:, None] * head_dim + offs_d[None, :]
        mask = m_ok[:, None] & d_ok[None, :]
    return offs, mask


@triton.jit
def _load_state(state_ptr, norm_ptr, extra_ptr, feat, offs_m, m_ok, offs_d, d_ok, head_dim,
                extra_other, TRANSPOSED: tl.constexpr):
    """State block [BM, BD] ([BD, BM] if TRANSPOSED), its norm [BM] and one more per-feature row
    (a running max) [BM]."""
    offs, mask = _state_offsets(feat, offs_m, m_ok, offs_d, d_ok, head_dim, TRANSPOSED)
    state = tl.load(state_ptr + offs, mask=mask, other=0.0)
    norm = tl.load(norm_ptr + feat + offs_m, mask=m_ok, other=0.0)
    extra = tl.load(extra_ptr + feat + offs_m, mask=m_ok, other=extra_other)
    return state, norm, extra


@triton.jit
def _store_state(state_ptr, norm_ptr, extra_ptr, feat, offs_m, m_ok, offs_d, d_ok, head_dim,
                 state, norm, extra, TRANSPOSED: tl.constexpr):
    offs, mask = _state_offsets(feat, offs_m, m_ok, offs_d, d_ok, head_dim, TRANSPOSED)
    tl.store(state_ptr + offs, state, mask=mask)
    tl.store(norm_ptr + feat + offs_m, norm, mask=m_ok)
    tl.store(extra_ptr + feat + offs_m, extra, mask=m_ok)


@triton.jit
def _reset_state(state_ptr, norm_ptr, extra_ptr, feat, n_mblocks, n_features, head_dim,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scratch state of one head: S = 0, z = 0, running max = -inf (nothing seen yet)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    for mb in range(n_mblocks):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_features
        _store_state(state_ptr, norm_ptr, extra_ptr, feat, offs_m, m_ok, offs_d, d_ok, head_dim,
                     tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                     tl.zeros([BLOCK_M], dtype=tl.float32),
                     tl.full([BLOCK_M], float("-inf"), tl.float32), False)
    tl.debug_barrier()  # the scratch is re-read by other threads of this program


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _performer_fwd_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, o_ptr, lse_ptr, rowmax_ptr, state_ptr, norm_ptr, cmax_ptr,
    stride_q_b, stride_q_n, stride_q_h, stride_k_b, stride_k_n, stride_k_h,
    stride_v_b, stride_v_n, stride_v_h, stride_o_b, stride_o_n, stride_o_h,
    n_heads, seq_len, head_dim, n_features, n_mblocks, scale,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    FEAT_BF16: tl.constexpr, PREC: tl.constexpr, ALIGNED_8: tl.constexpr,
):
    """Non-causal: one program per (chunk, batch * head) reads the state written by
    ``_performer_state_kernel``. Causal: one program per head scans every chunk; state, norm and
    cmax are then this head's scratch (S'_m, z'_m over past chunks with per-feature max c_m).
    ALIGNED_8: as in the state kernel (D = 40 is not a multiple of 16, so without it the JIT sees
    no alignment: scalar loads, whose addresses spilled 212-304 B in the causal forward)."""
    if ALIGNED_8:
        head_dim = _mult8(head_dim)
        stride_q_b, stride_q_n, stride_q_h = _mult8_strides(stride_q_b, stride_q_n, stride_q_h)
        stride_k_b, stride_k_n, stride_k_h = _mult8_strides(stride_k_b, stride_k_n, stride_k_h)
        stride_v_b, stride_v_n, stride_v_h = _mult8_strides(stride_v_b, stride_v_n, stride_v_h)
        stride_o_b, stride_o_n, stride_o_h = _mult8_strides(stride_o_b, stride_o_n, stride_o_h)
    pid_bh = tl.program_id(1)
    b, h = _head(pid_bh, n_heads)
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    o_base = o_ptr + b * stride_o_b + h * stride_o_h
    lse_base = lse_ptr + pid_bh.to(tl.int64) * seq_len
    feat = pid_bh.to(tl.int64) * n_features
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if not CAUSAL:
        offs_n, n_ok, tile_ok = _chunk(tl.program_id(0), seq_len, d_ok, BLOCK_N)
        q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
        # Online max over feature blocks of r_i = max_m (a_im + c_m), as in flash attention.
        r = tl.full([BLOCK_N], float("-inf"), tl.float32)
        # num transposed, [BD, BN] = S^T @ qw^T (the state loaded as [BD, BM]): as [BN, BD] =
        # qw @ S, ptxas serialised the wgmma (C7515) in fp16 (tf32 products) at D = 64
        num = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        den = tl.zeros([BLOCK_N], dtype=tl.float32)
        for mb in range(n_mblocks):
            w, offs_m, m_ok = _features(w_ptr, mb, n_features, head_dim, BLOCK_M, BLOCK_D)
            state, norm, c = _load_state(state_ptr, norm_ptr, cmax_ptr, feat, offs_m, m_ok,
                                         offs_d, d_ok, head_dim, 0.0, True)
            a = _logits(q, w, scale, PREC)
            a = tl.where(m_ok[None, :], a + c[None, :], float("-inf"))
            r_new = tl.maximum(r, tl.max(a, axis=1))    # finite: block 0 has a valid feature
            decay = tl.exp(r - r_new)
            qw = tl.exp(a - r_new[:, None])                                  # [BN, BM] <= 1
            num = num * decay[None, :] + _mm(state, tl.trans(qw), FEAT_BF16, PREC)
            den = den * decay + tl.sum(qw * norm[None, :], axis=1)          # >= 1 at the end
            r = r_new
        _store(o_base, offs_n, stride_o_n, offs_d, tl.trans(num / den[None, :]), tile_ok)
        tl.store(lse_base + offs_n, r + tl.log(den), mask=n_ok)
    else:
        k_base = k_ptr + b * stride_k_b + h * stride_k_h
        v_base = v_ptr + b * stride_v_b + h * stride_v_h
        alpha_base = rowmax_ptr + pid_bh.to(tl.int64) * seq_len
        s_base = alpha_base + tl.num_programs(1).to(tl.int64) * seq_len
        _reset_state(state_ptr, norm_ptr, cmax_ptr, feat, n_mblocks, n_features, head_dim,
                     BLOCK_M, BLOCK_D)
        for t in range(tl.cdiv(seq_len, BLOCK_N)):
            offs_n, n_ok, tile_ok = _chunk(t, seq_len, d_ok, BLOCK_N)
            q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
            k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
            v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
            k_half = _half_sq_norm(k, scale)
            # Past chunks (state): inter_i = sum_m exp(a_im + c_m - rho_i) S'_m, rho_i its max.
            rho = tl.full([BLOCK_N], float("-inf"), tl.float32)
            inter_num = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            inter_den = tl.zeros([BLOCK_N], dtype=tl.float32)
            # This chunk: P_ij = sum_m exp(a_im - alpha_i) exp(b_jm - s_j) with alpha_i, s_j
            # the row maxima over all features, kept online over the feature blocks.
            alpha = tl.full([BLOCK_N], float("-inf"), tl.float32)
            s = tl.full([BLOCK_N], float("-inf"), tl.float32)
            pair = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
            for mb in range(n_mblocks):
                w, offs_m, m_ok = _features(w_ptr, mb, n_features, head_dim, BLOCK_M, BLOCK_D)
                a = _logits(q, w, scale, PREC)
                a = tl.where(m_ok[None, :], a, float("-inf"))
                kb = _logits(k, w, scale, PREC) - k_half[:, None]
                kb = tl.where(m_ok[None, :] & n_ok[:, None], kb, float("-inf"))
                state_t, norm, c = _load_state(state_ptr, norm_ptr, cmax_ptr, feat, offs_m, m_ok,
                                               offs_d, d_ok, head_dim, float("-inf"), True)
                e = a + c[None, :]                      # -inf for features with no past key
                rho_new = tl.maximum(rho, tl.max(e, axis=1))
                rho_safe = _finite_or_minus_inf(rho_new)
                qe = tl.exp(e - rho_safe[:, None])
                f = tl.exp(rho - rho_safe)
                inter_num = inter_num * f[:, None] + _mm(qe, tl.trans(state_t), FEAT_BF16, PREC)
                inter_den = inter_den * f + tl.sum(qe * norm[None, :], axis=1)
                rho = rho_new
                alpha_new = tl.maximum(alpha, tl.max(a, axis=1))
                s_new = tl.maximum(s, tl.max(kb, axis=1))    # -inf on padded rows
                s_safe = _finite_or_minus_inf(s_new)
                qa = tl.exp(a - alpha_new[:, None])
                kw = tl.exp(kb - s_safe[:, None])
                rescale = tl.exp(alpha - alpha_new)[:, None] * tl.exp(s - s_safe)[None, :]
                pair = pair * rescale + _mm(qa, tl.trans(kw), FEAT_BF16, PREC)
                alpha = alpha_new
                s = s_new
                # Fold this chunk into block mb's state (read by later chunks only).
                c_new = tl.maximum(c, tl.max(kb, axis=0))
                c_safe = _finite_or_minus_inf(c_new)
                kwc = tl.exp(kb - c_safe[None, :])
                decay = tl.exp(c - c_safe)
                # (transposed, [BD, BM]: the M side of the product is the head dim, so it stays
                # a wgmma with 32-feature blocks)
                state_t = state_t * decay[None, :] + _mm(tl.trans(v), kwc, FEAT_BF16, PREC)
                norm = norm * decay + tl.sum(kwc, axis=0)
                _store_state(state_ptr, norm_ptr, cmax_ptr, feat, offs_m, m_ok, offs_d, d_ok,
                             head_dim, state_t, norm, c_new, True)
            # Row stabiliser from past chunks and keys j <= i only: nothing after i can change
            # any rounding of row i. Masked entries are selected away (tl.where), never
            # multiplied by 0, and v enters the product only where finite, so a NaN or inf in
            # a later k_j or v_j cannot reach row i either.
            tri = offs_n[None, :] <= offs_n[:, None]                     # [i, j]: j <= i
            sigma = tl.maximum(rho, alpha + tl.max(tl.where(tri, s[None, :], float("-inf")),
                                                   axis=1))
            weight = tl.where(tri, pair * tl.exp(alpha[:, None] + s[None, :] - sigma[:, None]),
                              0.0)
            v_finite = tl.abs(v.to(tl.float32)) < float("inf")
            v_bad = tl.max(tl.where(v_finite, 0, 1), axis=1)             # [BN] row has NaN/inf
            poisoned = tl.max(tl.where(tri, v_bad[None, :], 0), axis=1) > 0
            inter = tl.exp(rho - sigma)
            num = inter_num * inter[:, None] \
                + _mm(weight, tl.where(v_finite, v, 0.0), FEAT_BF16, PREC)
            den = inter_den * inter + tl.sum(weight, axis=1)
            out = tl.where(poisoned[:, None], float("nan"), num / den[:, None])
            _store(o_base, offs_n, stride_o_n, offs_d, out, tile_ok)
            tl.store(lse_base + offs_n, sigma + tl.log(den), mask=n_ok)
            tl.store(alpha_base + offs_n, alpha, mask=n_ok)
            tl.store(s_base + offs_n, s, mask=n_ok)
            tl.debug_barrier()  # the scratch state written above is read by the next chunk


# ----------------------------------------------------------------------------------------------
# Backward. With the saved row log-normaliser L_i = log sum_{j, m} exp(a_im + b_jm) (over j <= i
# if causal), every pair weight is w_ijm = exp(a_im + b_jm - L_i) <= 1 and, with
# delta_i = dO_i . O_i, the logit gradients are those of softmax attention over pairs (j, m):
#     G_im = sum_j w_ijm (dO_i . v_j - delta_i)      (query side)
#     H_jm = sum_i w_ijm (dO_i . v_j - delta_i)      (key side)
#     dv_j = sum_{i, m} w_ijm dO_i
#     dqh_i = G_i @ w - qh_i * sum_m G_im,  dkh_j = H_j @ w - kh_j * sum_m H_jm.
# Feature blocks are summed in registers (dqh, dkh, dv are [BN, BD] accumulators).


@triton.jit
def _performer_bwd_kernel(
    do_ptr, q_ptr, k_ptr, v_ptr, w_ptr, o_ptr, lse_ptr, rowmax_ptr,
    state_ptr, norm_ptr, cmax_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_do_b, stride_do_n, stride_do_h, stride_q_b, stride_q_n, stride_q_h,
    stride_k_b, stride_k_n, stride_k_h, stride_v_b, stride_v_n, stride_v_h,
    stride_o_b, stride_o_n, stride_o_h, stride_g_b, stride_g_n, stride_g_h,
    n_heads, seq_len, head_dim, n_features, n_mblocks, scale,
    CAUSAL: tl.constexpr, KEY_GRADS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FEAT_BF16: tl.constexpr, PREC: tl.constexpr,
    ALIGNED_8: tl.constexpr,
):
    """Non-causal: one program per (chunk, batch * head); state/norm/cmax hold the forward's
    S, z, c (dq) or the query-side R, zeta with c (dk, dv). Causal: one program per head scans
    forward (dq, recomputing S', z' into the scratch) or backward (dk, dv, carrying R', zeta'
    with per-feature max d_m of a_im - L_i over later rows). The gradient tensors dq, dk, dv
    share one layout (stride_g_*). ALIGNED_8: as in the forward."""
    if ALIGNED_8:
        head_dim = _mult8(head_dim)
        stride_do_b, stride_do_n, stride_do_h = _mult8_strides(stride_do_b, stride_do_n,
                                                               stride_do_h)
        stride_q_b, stride_q_n, stride_q_h = _mult8_strides(stride_q_b, stride_q_n, stride_q_h)
        stride_k_b, stride_k_n, stride_k_h = _mult8_strides(stride_k_b, stride_k_n, stride_k_h)
        stride_v_b, stride_v_n, stride_v_h = _mult8_strides(stride_v_b, stride_v_n, stride_v_h)
        stride_o_b, stride_o_n, stride_o_h = _mult8_strides(stride_o_b, stride_o_n, stride_o_h)
        stride_g_b, stride_g_n, stride_g_h = _mult8_strides(stride_g_b, stride_g_n, stride_g_h)
    pid_bh = tl.program_id(1)
    b, h = _head(pid_bh, n_heads)
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    o_base = o_ptr + b * stride_o_b + h * stride_o_h
    g_off = b * stride_g_b + h * stride_g_h
    lse_base = lse_ptr + pid_bh.to(tl.int64) * seq_len
    feat = pid_bh.to(tl.int64) * n_features
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if not CAUSAL:
        offs_n, n_ok, tile_ok = _chunk(tl.program_id(0), seq_len, d_ok, BLOCK_N)
        grad = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)   # dqh or dkh
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)           # sum_m G_im or sum_m H_jm
        if KEY_GRADS:
            x = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
            v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
        else:
            x = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
            do = _load(do_base, offs_n, stride_do_n, offs_d, tile_ok)
            o = _load(o_base, offs_n, stride_o_n, offs_d, tile_ok)
            lse = tl.load(lse_base + offs_n, mask=n_ok, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        half = _half_sq_norm(x, scale)   # (used by the key side only)
        for mb in range(n_mblocks):
            w, offs_m, m_ok = _features(w_ptr, mb, n_features, head_dim, BLOCK_M, BLOCK_D)
            state, norm, c = _load_state(state_ptr, norm_ptr, cmax_ptr, feat, offs_m, m_ok,
                                         offs_d, d_ok, head_dim, 0.0, False)
            logit = _logits(x, w, scale, PREC)
            ok = m_ok[None, :] & n_ok[:, None]
            if KEY_GRADS:
                # exp(b_jm - c_m) <= 1: c_m is the max over all keys. state = R, norm = zeta.
                kw = tl.where(ok, tl.exp(tl.minimum(logit - half[:, None] - c[None, :], 0.0)),
                              0.0)
                dv += _mm(kw, state, FEAT_BF16, PREC)
                g = kw * (_mm(v, tl.trans(state), FEAT_BF16, PREC) - norm[None, :])
            else:
                # exp(a_im + c_m - L_i) <= 1: L_i >= a_im + b_jm for every j. state = S.
                qw = tl.where(ok, tl.exp(tl.minimum(logit + c[None, :] - lse[:, None], 0.0)),
                              0.0)
                g = qw * (_mm(do, tl.trans(state), FEAT_BF16, PREC)
                          - delta[:, None] * norm[None, :])
            grad += _mm(g, w, FEAT_BF16, PREC)
            total += tl.sum(g, axis=1)
        grad = (grad - x.to(tl.float32) * (scale * total)[:, None]) * scale
        if KEY_GRADS:
            _store(dk_ptr + g_off, offs_n, stride_g_n, offs_d, grad, tile_ok)
            _store(dv_ptr + g_off, offs_n, stride_g_n, offs_d, dv, tile_ok)
        else:
            _store(dq_ptr + g_off, offs_n, stride_g_n, offs_d, grad, tile_ok)
    else:
        alpha_base = rowmax_ptr + pid_bh.to(tl.int64) * seq_len
        s_base = alpha_base + tl.num_programs(1).to(tl.int64) * seq_len
        _reset_state(state_ptr, norm_ptr, cmax_ptr, feat, n_mblocks, n_features, head_dim,
                     BLOCK_M, BLOCK_D)
        n_chunks = tl.cdiv(seq_len, BLOCK_N)
        for tt in range(n_chunks):
            t = (n_chunks - 1 - tt) if KEY_GRADS else tt
            offs_n, n_ok, tile_ok = _chunk(t, seq_len, d_ok, BLOCK_N)
            q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
            k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
            v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
            do = _load(do_base, offs_n, stride_do_n, offs_d, tile_ok)
            o = _load(o_base, offs_n, stride_o_n, offs_d, tile_ok)
            lse = tl.load(lse_base + offs_n, mask=n_ok, other=0.0)
            alpha = tl.load(alpha_base + offs_n, mask=n_ok, other=0.0)
            s = tl.load(s_base + offs_n, mask=n_ok, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            k_half = _half_sq_norm(k, scale)
            # Within the chunk w_ijm = exp(a_im - alpha_i) exp(b_jm - s_j) E_ij with
            # E_ij = exp(alpha_i + s_j - L_i) <= 1 / den_i (the forward's sigma_i >= alpha_i +
            # s_j), capped at e^GRAD_EXP_CAP; the first two factors are <= 1.
            if KEY_GRADS:   # [j, i] orientation: keys own the rows
                vis = (offs_n[None, :] >= offs_n[:, None]) & n_ok[None, :]
                pair_exp = tl.exp(tl.minimum(alpha[None, :] + s[:, None] - lse[None, :],
                                             GRAD_EXP_CAP))
                vdo = tl.dot(v, tl.trans(do), input_precision=PREC)   # [j, i] v_j . dO_i
                et = tl.where(vis, pair_exp * (vdo - delta[None, :]), 0.0)
                pair = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)  # [j, i]
            else:
                vis = offs_n[None, :] <= offs_n[:, None]                  # [i, j]: j <= i
                pair_exp = tl.exp(tl.minimum(alpha[:, None] + s[None, :] - lse[:, None],
                                             GRAD_EXP_CAP))
                dov = tl.dot(do, tl.trans(v), input_precision=PREC)   # [i, j] dO_i . v_j
                et = tl.where(vis, pair_exp * (dov - delta[:, None]), 0.0)
            grad = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for mb in range(n_mblocks):
                w, offs_m, m_ok = _features(w_ptr, mb, n_features, head_dim, BLOCK_M, BLOCK_D)
                a = _logits(q, w, scale, PREC)
                kb = _logits(k, w, scale, PREC) - k_half[:, None]
                ok = m_ok[None, :] & n_ok[:, None]
                qa = tl.where(ok, tl.exp(tl.minimum(a - alpha[:, None], 0.0)), 0.0)
                kw = tl.where(ok, tl.exp(tl.minimum(kb - s[:, None], 0.0)), 0.0)
                state_t, norm, c = _load_state(state_ptr, norm_ptr, cmax_ptr, feat, offs_m, m_ok,
                                               offs_d, d_ok, head_dim, float("-inf"), True)
                if KEY_GRADS:
                    # Later chunks: exp(b_jm + d_m) <= 1 since d_m = max (a_im - L_i) over
                    # rows i > j. state = R', norm = zeta', c = d.
                    ki = tl.where(ok, tl.exp(tl.minimum(kb + c[None, :], 0.0)), 0.0)
                    pair += _mm(kw, tl.trans(qa), FEAT_BF16, PREC)
                    g = kw * _mm(et, qa, FEAT_BF16, PREC) \
                        + ki * (_mm(v, state_t, FEAT_BF16, PREC) - norm[None, :])
                    dv += _mm(ki, tl.trans(state_t), FEAT_BF16, PREC)
                    grad += _mm(g, w, FEAT_BF16, PREC)
                    # Fold this chunk's queries into the reverse state.
                    ad = tl.where(ok, a - lse[:, None], float("-inf"))
                    c_new = tl.maximum(c, tl.max(ad, axis=0))
                    c_safe = _finite_or_minus_inf(c_new)
                    qd = tl.exp(ad - c_safe[None, :])
                    decay = tl.exp(c - c_safe)
                    state_t = state_t * decay[None, :] + _mm(tl.trans(do), qd, FEAT_BF16, PREC)
                    norm = norm * decay + tl.sum(qd * delta[:, None], axis=0)
                else:
                    # Past chunks: exp(a_im + c_m - L_i) <= 1 (c_m: max over past keys).
                    qc = tl.where(ok, tl.exp(tl.minimum(a + c[None, :] - lse[:, None], 0.0)),
                                  0.0)
                    g = qa * _mm(et, kw, FEAT_BF16, PREC) \
                        + qc * (_mm(do, state_t, FEAT_BF16, PREC)
                                - delta[:, None] * norm[None, :])
                    grad += _mm(g, w, FEAT_BF16, PREC)
                    # Fold this chunk's keys into the forward state.
                    kbm = tl.where(ok, kb, float("-inf"))
                    c_new = tl.maximum(c, tl.max(kbm, axis=0))
                    c_safe = _finite_or_minus_inf(c_new)
                    kwc = tl.exp(kbm - c_safe[None, :])
                    decay = tl.exp(c - c_safe)
                    state_t = state_t * decay[None, :] + _mm(tl.trans(v), kwc, FEAT_BF16, PREC)
                    norm = norm * decay + tl.sum(kwc, axis=0)
                total += tl.sum(g, axis=1)
                _store_state(state_ptr, norm_ptr, cmax_ptr, feat, offs_m, m_ok, offs_d, d_ok,
                             head_dim, state_t, norm, c_new, True)
            if KEY_GRADS:
                # pair_exp again (from row vectors): kept from before the feature loop it held
                # a [64, 64] fp32 tile in registers across the loop
                vis = (offs_n[None, :] >= offs_n[:, None]) & n_ok[None, :]
                pair_exp = tl.where(vis, tl.exp(tl.minimum(alpha[None, :] + s[:, None]
                                                           - lse[None, :], GRAD_EXP_CAP)), 0.0)
                dv += _mm(pair * pair_exp, do, FEAT_BF16, PREC)
                # k again (an L1/L2 hit) rather than a copy in the accumulator layout kept live
                # across the feature loop: that copy pushed the chunk code over the registers
                k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
                grad = (grad - k.to(tl.float32) * (scale * total)[:, None]) * scale
                _store(dk_ptr + g_off, offs_n, stride_g_n, offs_d, grad, tile_ok)
                _store(dv_ptr + g_off, offs_n, stride_g_n, offs_d, dv, tile_ok)
            else:
                q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)  # (as k above)
                grad = (grad - q.to(tl.float32) * (scale * total)[:, None]) * scale
                _store(dq_ptr + g_off, offs_n, stride_g_n, offs_d, grad, tile_ok)
            tl.debug_barrier()  # the scratch state written above is read by the next chunk


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs arrive validated: q, k, v, do, o [B, N, H, D] with unit last stride,
# features [M, D] contiguous, all of one dtype.


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _state_buffers(heads_total: int, n_features: int, head_dim: int, device: torch.device):
    """(state [B*H, M, D], norm [B*H, M], running max [B*H, M]), all fp32 and written by the
    kernels before they are read."""
    state = torch.empty(heads_total, n_features, head_dim, device=device, dtype=torch.float32)
    stats = torch.empty(2, heads_total, n_features, device=device, dtype=torch.float32)
    return state, stats


def performer_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: torch.Tensor,
                  causal: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [B, N, H, D], lse [B, H, N] fp32, state [B*H, M, D] fp32, feature_stats
    [2, B*H, M] fp32 (z, c), row_max [2, B*H, N] fp32 (alpha, s)). Non-causal: state and
    feature_stats are the key state the backward reuses, row_max is empty. Causal: state and
    feature_stats were scratch and are returned empty; row_max holds the per-query and per-key
    logit maxima the backward needs."""
    batch, seq_len, heads, head_dim = q.shape
    n_features = features.shape[0]
    cfg = config(seq_len, head_dim, n_features, causal)
    feat_bf16, prec = _dot_modes(q.dtype)
    dev = q.device
    heads_total = batch * heads
    out = torch.empty(q.shape, device=dev, dtype=q.dtype)
    lse = torch.empty(batch, heads, seq_len, device=dev, dtype=torch.float32)
    state, stats = _state_buffers(heads_total, n_features, head_dim, dev)
    row_max = torch.empty(2 if causal else 0, heads_total, seq_len, device=dev,
                          dtype=torch.float32)
    consts = dict(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
                  FEAT_BF16=feat_bf16, PREC=prec, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, ALIGNED_8=aligned_8(head_dim, q, k, v, out, features))
    sizes = (heads, seq_len, head_dim, n_features)
    if not causal:
        _performer_state_kernel[(cfg.n_mblocks, heads_total)](
            k, v, v, features, lse, stats[1], state, stats[0],
            *_strides(k), *_strides(v), *_strides(v), *sizes, head_dim ** -0.25,
            QUERY_SIDE=False, **consts)
    n_chunks = 1 if causal else triton.cdiv(seq_len, cfg.block_n)
    _performer_fwd_kernel[(n_chunks, heads_total)](
        q, k, v, features, out, lse, row_max if causal else lse, state, stats[0], stats[1],
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        *sizes, cfg.n_mblocks, head_dim ** -0.25, CAUSAL=causal, **consts)
    if causal:  # scratch only: fresh empty tensors (a [:0] view would keep it alive)
        state, stats = state.new_empty(0, n_features, head_dim), stats.new_empty(2, 0, n_features)
    return out, lse, state, stats, row_max


def performer_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  features: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  state: torch.Tensor, feature_stats: torch.Tensor, row_max: torch.Tensor,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq_len, heads, head_dim = q.shape
    n_features = features.shape[0]
    cfg = config(seq_len, head_dim, n_features, causal)
    feat_bf16, prec = _dot_modes(q.dtype)
    heads_total = batch * heads
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    consts = dict(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
                  FEAT_BF16=feat_bf16, PREC=prec, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages,
                  ALIGNED_8=aligned_8(head_dim, do, q, k, v, out, dq, features))
    sizes = (heads, seq_len, head_dim, n_features)
    scale = head_dim ** -0.25
    if causal:  # one scratch state per head, reset by each pass
        scratch, scratch_stats = _state_buffers(heads_total, n_features, head_dim, q.device)
        buffers = {False: (scratch, *scratch_stats), True: (scratch, *scratch_stats)}
        grid = (1, heads_total)
    else:
        # dq reads the forward's S, z, c; dk, dv read R, zeta (summed here) with c.
        reverse = torch.empty_like(state)
        reverse_norm = torch.empty_like(feature_stats[0])
        _performer_state_kernel[(cfg.n_mblocks, heads_total)](
            q, do, out, features, lse, feature_stats[1], reverse, reverse_norm,
            *_strides(q), *_strides(do), *_strides(out), *sizes, scale,
            QUERY_SIDE=True, **consts)
        buffers = {False: (state, *feature_stats), True: (reverse, reverse_norm,
                                                          feature_stats[1])}
        grid = (triton.cdiv(seq_len, cfg.block_n), heads_total)
    for key_grads in (False, True):
        _performer_bwd_kernel[grid](
            do, q, k, v, features, out, lse, row_max if causal else lse, *buffers[key_grads],
            dq, dk, dv, *_strides(do), *_strides(q), *_strides(k), *_strides(v),
            *_strides(out), *_strides(dq), *sizes, cfg.n_mblocks, scale,
            CAUSAL=causal, KEY_GRADS=key_grads, **consts)
    return dq, dk, dv
