"""Triton kernels for Performer (FAVOR+) attention, forward and backward, causal and non-causal.

Layout: q, k, v, out are [B, N, H, D] with a unit last stride (any other strides are passed in);
features w are [M, D] contiguous. One program owns one (batch, head) pair and one block of
BLOCK_M features, and scans the sequence in chunks of BLOCK_N tokens with an fp32 state
S [BLOCK_M, D] and z [BLOCK_M] in registers, so phi(q) and phi(k) never reach global memory.
When M needs several feature blocks, each block writes a partial output normalised by its own
sum plus that sum's log (lse) and torch merges them exactly (log-sum-exp weights), as split-K
flash attention does. The math, the stabilisers and why they cancel: README.md.

Matmul operands: logits (q @ w^T, k @ w^T) use the input dtype; products of features (phi tiles,
state) use bf16 for bf16 inputs and fp32 (tf32 tensor cores: fp16 precision with fp32 range, so
the state cannot overflow) for fp16 inputs; fp32 inputs use exact fp32 ("ieee") everywhere.
Accumulators are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.registry import interpreter_enabled

MAX_D = 128
# Cap for exponents that are <= 0 in exact math but may exceed it by one chunk's spread.
EXP_CLAMP = tl.constexpr(80.0)


@dataclass(frozen=True)
class Config:
    block_n: int
    block_m: int
    block_d: int
    n_mblocks: int
    num_warps: int


def _feature_blocking(n_features: int, max_block: int) -> tuple[int, int]:
    """(BLOCK_M, number of feature blocks): the least padding, each extra block charged 64 lanes
    (it re-reads q, k, v and adds a partial output to merge)."""
    best = None
    for block in (16, 32, 64, 128, 256):
        if block > max_block:
            break
        blocks = triton.cdiv(n_features, block)
        cost = blocks * block + 64 * (blocks - 1)
        if best is None or cost < best[0]:
            best = (cost, block, blocks)
    return best[1], best[2]


def config(seq_len: int, head_dim: int, n_features: int, *, backward: bool = False,
           fp32: bool = False) -> Config:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreter_enabled():
        # Small tiles so CPU tests cover several chunks and several feature blocks.
        block_m, n_mblocks = _feature_blocking(n_features, 32)
        return Config(16, block_m, block_d, n_mblocks, 4)
    # The fp32 state [BLOCK_M, D] lives in registers next to [BLOCK_N, BLOCK_M] feature tiles:
    # at most 16K elements forward (256 x 64), 8K backward (it carries two more tiles), half that
    # for fp32 inputs (4-byte operands). Checked with ptxas for sm_90a: spills stay < 2 KB.
    budget = (8192 if backward else 16384) // (2 if fp32 else 1)
    block_m, n_mblocks = _feature_blocking(n_features, max(16, min(256, budget // block_d)))
    state = block_m * block_d
    block_n = 64 if state <= 64 * 64 and not backward else 32
    block_n = min(block_n, max(16, triton.next_power_of_2(seq_len)))
    return Config(block_n, block_m, block_d, n_mblocks, 8)


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
    """x [BN, BD], w [BM, BD] in the input dtype -> (scale * x @ w^T [BN, BM] fp32,
    scale^2 |x|^2 / 2 [BN]); scale = D^(-1/4) is applied in fp32 after the dot."""
    raw = tl.dot(x, tl.trans(w), input_precision=PREC) * scale
    xf = x.to(tl.float32)
    return raw, tl.sum(xf * xf, axis=1) * (0.5 * scale * scale)


@triton.jit
def _load(base, offs_n, stride_n, offs_d, mask):
    return tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store(base, offs_n, stride_n, offs_d, value, mask):
    tl.store(base + offs_n[:, None] * stride_n + offs_d[None, :],
             value.to(base.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _performer_fwd_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, o_ptr, lse_ptr, cmax_ptr,
    stride_q_b, stride_q_n, stride_q_h, stride_k_b, stride_k_n, stride_k_h,
    stride_v_b, stride_v_n, stride_v_h, stride_o_blk, stride_o_b, stride_o_n, stride_o_h,
    n_heads, seq_len, head_dim, n_features, scale,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    FEAT_BF16: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    o_base = o_ptr + blk.to(tl.int64) * stride_o_blk + b * stride_o_b + h * stride_o_h
    lse_base = lse_ptr + (blk.to(tl.int64) * tl.num_programs(0) + pid_bh) * seq_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_features
    w = tl.load(w_ptr + offs_m[:, None] * head_dim + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)          # [BM, BD]
    state = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)               # S = sum phi(k) v^T
    norm = tl.zeros([BLOCK_M], dtype=tl.float32)                         # z = sum phi(k)
    n_chunks = tl.cdiv(seq_len, BLOCK_N)
    if CAUSAL:
        # Scalar running max c of the key logits of past chunks; state is scaled by exp(-c).
        c = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
        for t in range(n_chunks):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seq_len
            tile_ok = n_ok[:, None] & d_ok[None, :]
            q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
            k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
            v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
            a, _ = _logits(q, w, scale, PREC)
            a = tl.where(m_ok[None, :], a, float("-inf"))
            alpha = tl.max(a, axis=1)                                    # per-query max
            qa = tl.exp(a - alpha[:, None])                              # [BN, BM] <= 1
            kb, half = _logits(k, w, scale, PREC)
            kb = tl.where(m_ok[None, :], kb - half[:, None], float("-inf"))
            s = tl.max(kb, axis=1)                                       # per-key max
            kw = tl.exp(kb - s[:, None])                                 # [BN, BM] <= 1
            s = tl.where(n_ok, s, float("-inf"))
            tri = offs_n[None, :] <= offs_n[:, None]                     # [i, j]: j <= i
            # Row stabiliser: max of the past state's c and of s_j over keys j <= i only.
            sigma = tl.maximum(tl.max(tl.where(tri, s[None, :], float("-inf")), axis=1), c)
            pair = tl.exp(tl.where(tri, s[None, :] - sigma[:, None], float("-inf")))
            intra = _mm(qa, tl.trans(kw), FEAT_BF16, PREC) * pair        # [BN, BN]
            inter = tl.exp(c - sigma)                                    # [BN]
            num = _mm(qa, state, FEAT_BF16, PREC) * inter[:, None] \
                + _mm(intra, v, FEAT_BF16, PREC)
            den = tl.sum(qa * norm[None, :], axis=1) * inter + tl.sum(intra, axis=1)
            _store(o_base, offs_n, stride_o_n, offs_d, num / den[:, None], tile_ok)
            tl.store(lse_base + offs_n, alpha + sigma + tl.log(den), mask=n_ok)
            # Fold the chunk into the state, rescaled to the new running max.
            c_new = tl.maximum(c, tl.max(s, axis=0))
            kw = kw * tl.exp(s - c_new)[:, None]
            decay = tl.exp(c - c_new)
            state = state * decay + _mm(tl.trans(kw), v, FEAT_BF16, PREC)
            norm = norm * decay + tl.sum(kw, axis=0)
            c = c_new
    else:
        # Per-feature running max c_m of the key logits: the largest key of each feature weighs 1.
        c = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for t in range(n_chunks):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seq_len
            tile_ok = n_ok[:, None] & d_ok[None, :]
            k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
            v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
            kb, half = _logits(k, w, scale, PREC)
            kb = tl.where(n_ok[:, None], kb - half[:, None], float("-inf"))
            c_new = tl.maximum(c, tl.max(kb, axis=0))
            kw = tl.exp(kb - c_new[None, :])
            decay = tl.exp(c - c_new)
            state = state * decay[:, None] + _mm(tl.trans(kw), v, FEAT_BF16, PREC)
            norm = norm * decay + tl.sum(kw, axis=0)
            c = c_new
        tl.store(cmax_ptr + pid_bh * n_features + offs_m, c, mask=m_ok)
        for t in range(n_chunks):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seq_len
            tile_ok = n_ok[:, None] & d_ok[None, :]
            q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
            a, _ = _logits(q, w, scale, PREC)
            a = tl.where(m_ok[None, :], a + c[None, :], float("-inf"))
            r = tl.max(a, axis=1)
            qw = tl.exp(a - r[:, None])                                  # [BN, BM] <= 1
            num = _mm(qw, state, FEAT_BF16, PREC)
            den = tl.sum(qw * norm[None, :], axis=1)                     # >= 1
            _store(o_base, offs_n, stride_o_n, offs_d, num / den[:, None], tile_ok)
            tl.store(lse_base + offs_n, r + tl.log(den), mask=n_ok)


# ----------------------------------------------------------------------------------------------
# Backward. With the saved row log-normaliser L_i = log sum_{j, m} exp(a_im + b_jm) (over j <= i
# if causal), every pair weight is w_ijm = exp(a_im + b_jm - L_i) <= 1 and, with
# delta_i = dO_i . O_i, the logit gradients are those of softmax attention over pairs (j, m):
#     G_im = sum_j w_ijm (dO_i . v_j - delta_i)      (query side)
#     H_jm = sum_i w_ijm (dO_i . v_j - delta_i)      (key side)
#     dv_j = sum_{i, m} w_ijm dO_i
#     dqh_i = G_i @ w - qh_i * sum_m G_im,  dkh_j = H_j @ w - kh_j * sum_m H_jm.
# Causal: one program scans forward for dq (recomputing the forward state chunk by chunk), a
# second launch scans backward for dk, dv carrying the reverse state R = sum_i w dO^T; no
# per-chunk state is ever stored. Non-causal: one program does both scans.


@triton.jit
def _performer_bwd_kernel(
    do_ptr, q_ptr, k_ptr, v_ptr, w_ptr, o_ptr, lse_ptr, cmax_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_do_b, stride_do_n, stride_do_h, stride_q_b, stride_q_n, stride_q_h,
    stride_k_b, stride_k_n, stride_k_h, stride_v_b, stride_v_n, stride_v_h,
    stride_o_b, stride_o_n, stride_o_h,
    stride_g_blk, stride_g_b, stride_g_n, stride_g_h,   # dq, dk, dv share one layout
    n_heads, seq_len, head_dim, n_features, scale,
    CAUSAL: tl.constexpr, KEY_GRADS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FEAT_BF16: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    o_base = o_ptr + b * stride_o_b + h * stride_o_h
    g_off = blk.to(tl.int64) * stride_g_blk + b * stride_g_b + h * stride_g_h
    lse_base = lse_ptr + pid_bh.to(tl.int64) * seq_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_features
    w = tl.load(w_ptr + offs_m[:, None] * head_dim + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)          # [BM, BD]
    n_chunks = tl.cdiv(seq_len, BLOCK_N)
    state = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    norm = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CAUSAL:
        if not KEY_GRADS:
            # dq: forward scan; the state is rescaled per feature to the running max c_m, which
            # here may include the whole chunk (bitwise causality only matters for the output).
            c = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for t in range(n_chunks):
                offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < seq_len
                tile_ok = n_ok[:, None] & d_ok[None, :]
                q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
                k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
                v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
                do = _load(do_base, offs_n, stride_do_n, offs_d, tile_ok)
                o = _load(o_base, offs_n, stride_o_n, offs_d, tile_ok)
                lse = tl.load(lse_base + offs_n, mask=n_ok, other=0.0)
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
                a, _ = _logits(q, w, scale, PREC)
                kb, half = _logits(k, w, scale, PREC)
                kb = tl.where(n_ok[:, None], kb - half[:, None], float("-inf"))
                c_new = tl.maximum(c, tl.max(kb, axis=0))
                decay = tl.exp(c - c_new)
                state = state * decay[:, None]
                norm = norm * decay
                kw = tl.exp(kb - c_new[None, :])                         # <= 1
                qw = tl.exp(tl.minimum(a + c_new[None, :] - lse[:, None], EXP_CLAMP))
                qw = tl.where(m_ok[None, :] & n_ok[:, None], qw, 0.0)
                tri = offs_n[None, :] <= offs_n[:, None]                 # [i, j]: j <= i
                dov = tl.dot(do, tl.trans(v), input_precision=PREC)      # [i, j] dO_i . v_j
                tmat = tl.where(tri, dov - delta[:, None], 0.0)
                g = qw * (_mm(tmat, kw, FEAT_BF16, PREC)
                          + _mm(do, tl.trans(state), FEAT_BF16, PREC)
                          - delta[:, None] * norm[None, :])
                dqh = _mm(g, w, FEAT_BF16, PREC) \
                    - q.to(tl.float32) * (scale * tl.sum(g, axis=1))[:, None]
                _store(dq_ptr + g_off, offs_n, stride_g_n, offs_d, dqh * scale, tile_ok)
                state += _mm(tl.trans(kw), v, FEAT_BF16, PREC)
                norm += tl.sum(kw, axis=0)
                c = c_new
        else:
            # dk, dv: reverse scan; R = sum_{i later} exp(a_im - L_i - d_m) dO_i with d_m the
            # running max of a_im - L_i over the rows seen so far.
            d = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for tt in range(n_chunks):
                offs_n = (n_chunks - 1 - tt) * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < seq_len
                tile_ok = n_ok[:, None] & d_ok[None, :]
                q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
                k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
                v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
                do = _load(do_base, offs_n, stride_do_n, offs_d, tile_ok)
                o = _load(o_base, offs_n, stride_o_n, offs_d, tile_ok)
                lse = tl.load(lse_base + offs_n, mask=n_ok, other=0.0)
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
                a, _ = _logits(q, w, scale, PREC)
                a = tl.where(n_ok[:, None], a - lse[:, None], float("-inf"))
                d_new = tl.maximum(d, tl.max(a, axis=0))
                decay = tl.exp(d - d_new)
                state = state * decay[:, None]
                norm = norm * decay
                qw = tl.where(m_ok[None, :], tl.exp(a - d_new[None, :]), 0.0)   # <= 1
                kb, half = _logits(k, w, scale, PREC)
                kw = tl.exp(tl.minimum(kb - half[:, None] + d_new[None, :], EXP_CLAMP))
                kw = tl.where(m_ok[None, :] & n_ok[:, None], kw, 0.0)
                tri_t = offs_n[None, :] >= offs_n[:, None]               # [j, i]: i >= j
                pt = tl.where(tri_t, _mm(kw, tl.trans(qw), FEAT_BF16, PREC), 0.0)
                dv = _mm(pt, do, FEAT_BF16, PREC) + _mm(kw, state, FEAT_BF16, PREC)
                vdo = tl.dot(v, tl.trans(do), input_precision=PREC)      # [j, i] v_j . dO_i
                tmat = tl.where(tri_t, vdo - delta[None, :], 0.0)
                hk = kw * (_mm(tmat, qw, FEAT_BF16, PREC)
                           + _mm(v, tl.trans(state), FEAT_BF16, PREC) - norm[None, :])
                dkh = _mm(hk, w, FEAT_BF16, PREC) \
                    - k.to(tl.float32) * (scale * tl.sum(hk, axis=1))[:, None]
                _store(dk_ptr + g_off, offs_n, stride_g_n, offs_d, dkh * scale, tile_ok)
                _store(dv_ptr + g_off, offs_n, stride_g_n, offs_d, dv, tile_ok)
                state += _mm(tl.trans(qw), do, FEAT_BF16, PREC)
                norm += tl.sum(qw * delta[:, None], axis=0)
                d = d_new
    else:
        # Non-causal: the forward's per-feature maxima c_m make every factor <= 1 exactly:
        # exp(b_jm - c_m) and exp(a_im + c_m - L_i) (L_i >= a_im + b_jm for every j).
        c = tl.load(cmax_ptr + pid_bh * n_features + offs_m, mask=m_ok, other=0.0)
        for t in range(n_chunks):  # S, z over all keys
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seq_len
            tile_ok = n_ok[:, None] & d_ok[None, :]
            k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
            v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
            kb, half = _logits(k, w, scale, PREC)
            kw = tl.exp(tl.minimum(kb - half[:, None] - c[None, :], EXP_CLAMP))
            kw = tl.where(m_ok[None, :] & n_ok[:, None], kw, 0.0)
            state += _mm(tl.trans(kw), v, FEAT_BF16, PREC)
            norm += tl.sum(kw, axis=0)
        rstate = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        rnorm = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in range(n_chunks):  # dq; R, zeta over all queries
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seq_len
            tile_ok = n_ok[:, None] & d_ok[None, :]
            q = _load(q_base, offs_n, stride_q_n, offs_d, tile_ok)
            do = _load(do_base, offs_n, stride_do_n, offs_d, tile_ok)
            o = _load(o_base, offs_n, stride_o_n, offs_d, tile_ok)
            lse = tl.load(lse_base + offs_n, mask=n_ok, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            a, _ = _logits(q, w, scale, PREC)
            qw = tl.exp(tl.minimum(a + c[None, :] - lse[:, None], EXP_CLAMP))
            qw = tl.where(m_ok[None, :] & n_ok[:, None], qw, 0.0)
            g = qw * (_mm(do, tl.trans(state), FEAT_BF16, PREC) - delta[:, None] * norm[None, :])
            dqh = _mm(g, w, FEAT_BF16, PREC) \
                - q.to(tl.float32) * (scale * tl.sum(g, axis=1))[:, None]
            _store(dq_ptr + g_off, offs_n, stride_g_n, offs_d, dqh * scale, tile_ok)
            rstate += _mm(tl.trans(qw), do, FEAT_BF16, PREC)
            rnorm += tl.sum(qw * delta[:, None], axis=0)
        for t in range(n_chunks):  # dk, dv
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seq_len
            tile_ok = n_ok[:, None] & d_ok[None, :]
            k = _load(k_base, offs_n, stride_k_n, offs_d, tile_ok)
            v = _load(v_base, offs_n, stride_v_n, offs_d, tile_ok)
            kb, half = _logits(k, w, scale, PREC)
            kw = tl.exp(tl.minimum(kb - half[:, None] - c[None, :], EXP_CLAMP))
            kw = tl.where(m_ok[None, :] & n_ok[:, None], kw, 0.0)
            dv = _mm(kw, rstate, FEAT_BF16, PREC)
            hk = kw * (_mm(v, tl.trans(rstate), FEAT_BF16, PREC) - rnorm[None, :])
            dkh = _mm(hk, w, FEAT_BF16, PREC) \
                - k.to(tl.float32) * (scale * tl.sum(hk, axis=1))[:, None]
            _store(dk_ptr + g_off, offs_n, stride_g_n, offs_d, dkh * scale, tile_ok)
            _store(dv_ptr + g_off, offs_n, stride_g_n, offs_d, dv, tile_ok)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs arrive validated: q, k, v, do, o [B, N, H, D] with unit last stride,
# features [M, D] contiguous, all of one dtype.


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def performer_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: torch.Tensor,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [B, N, H, D], lse [B, H, N] fp32, cmax [B*H, M] fp32; cmax is only written
    for the non-causal case and empty otherwise)."""
    batch, seq_len, heads, head_dim = q.shape
    n_features = features.shape[0]
    cfg = config(seq_len, head_dim, n_features, fp32=q.dtype == torch.float32)
    feat_bf16, prec = _dot_modes(q.dtype)
    dev = q.device
    lse = torch.empty(cfg.n_mblocks, batch, heads, seq_len, device=dev, dtype=torch.float32)
    cmax = torch.empty(0 if causal else batch * heads, n_features, device=dev,
                       dtype=torch.float32)
    if cfg.n_mblocks == 1:
        out = torch.empty(q.shape, device=dev, dtype=q.dtype)
        o_buf, blk_stride = out, 0
    else:
        o_buf = torch.empty(cfg.n_mblocks, *q.shape, device=dev, dtype=torch.float32)
        blk_stride = o_buf.stride(0)                                     # [nb, B, N, H, D]
    o_strides = _strides(o_buf if cfg.n_mblocks == 1 else o_buf[0])
    _performer_fwd_kernel[(batch * heads, cfg.n_mblocks)](
        q, k, v, features, o_buf, lse, cmax if not causal else lse,
        *_strides(q), *_strides(k), *_strides(v), blk_stride, *o_strides,
        heads, seq_len, head_dim, n_features, head_dim ** -0.25,
        CAUSAL=causal, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d,
        FEAT_BF16=feat_bf16, PREC=prec, num_warps=cfg.num_warps)
    if cfg.n_mblocks == 1:
        return out, lse[0], cmax
    # Exact merge of the feature blocks: block b holds out_b = num_b / den_b and lse_b.
    total = torch.logsumexp(lse, dim=0)                                  # [B, H, N]
    weight = torch.exp(lse - total).permute(0, 1, 3, 2)[..., None]       # [nb, B, N, H, 1]
    out = (o_buf * weight).sum(dim=0).to(q.dtype)
    return out, total, cmax


def performer_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  features: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  cmax: torch.Tensor, causal: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq_len, heads, head_dim = q.shape
    n_features = features.shape[0]
    cfg = config(seq_len, head_dim, n_features, backward=True, fp32=q.dtype == torch.float32)
    feat_bf16, prec = _dot_modes(q.dtype)
    if cfg.n_mblocks == 1:
        grads = [torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3)]
        views, blk_stride = grads, 0
    else:
        grads = [torch.empty(cfg.n_mblocks, *q.shape, device=q.device, dtype=torch.float32)
                 for _ in range(3)]
        views, blk_stride = [g[0] for g in grads], grads[0].stride(0)
    passes = (False, True) if causal else (False,)
    for key_grads in passes:
        _performer_bwd_kernel[(batch * heads, cfg.n_mblocks)](
            do, q, k, v, features, out, lse, cmax if not causal else lse, *grads,
            *_strides(do), *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            blk_stride, *_strides(views[0]),
            heads, seq_len, head_dim, n_features, head_dim ** -0.25,
            CAUSAL=causal, KEY_GRADS=key_grads, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d, FEAT_BF16=feat_bf16, PREC=prec, num_warps=cfg.num_warps)
    if cfg.n_mblocks == 1:
        return tuple(grads)
    return tuple(g.sum(dim=0).to(q.dtype) for g in grads)
