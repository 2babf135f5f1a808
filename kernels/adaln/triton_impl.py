"""Triton kernels for adaLN modulation and the gated residual.

Kernels: _adaln_fwd_kernel, _adaln_bwd_kernel, and _gated_residual_kernel (flag BACKWARD).

Layout: x is viewed as rows [B*N, C] (contiguous); modulation vectors as rows [B*T, C]. Frame
segment s = b*T + t owns the N/T consecutive rows [s*N/T, (s+1)*N/T) of x, so every kernel runs on
a grid (B*T, chunks): program (s, k) owns rows [k*ROWS_PER_PROGRAM, (k+1)*ROWS_PER_PROGRAM) of
segment s. It loads that frame's modulation (and the LayerNorm affine) once, then walks its rows
in [BLOCK_R, C] register tiles; BLOCK_R and num_warps are autotuned per channel count, so small C
packs several rows into one warp group and large C spreads one row over many warps.

A row is held as two power-of-two pieces: a head of BLOCK_C = the largest power of two <= C
(always fully in range, no column mask) and, when C is not a power of two, a tail of
BLOCK_T = next_pow2(C - BLOCK_C) columns. C = 1152 = 1024 + 128 and C = 5120 = 4096 + 1024 use
every lane; next_pow2(C) would leave 44% and 37.5% of them masked off.

Statistics are fp32 and overflow-safe: each row is scaled by a power of two 2^-k with
2^k <= max|x| < 2^(k+1) (k clamped to [0, 126]) before the mean and variance. The scaling is
exact, so ordinary rows (max|x| < 2) give bit-for-bit the textbook two-pass result, while rows of
magnitude 1e20 no longer overflow (x - mean)^2 to inf (which would silently return ``shift``).

Backward: the parameter gradients are sums over the tokens of one frame. Instead of atomics
(non-deterministic, and fp16/bf16 atomics are slow), each program accumulates, in fp32 registers,
sum(dy) and sum(dy * x_hat) over its rows and writes one partial row each; torch sums the
[B*T, n_chunks, C] partials and derives d shift, d scale, d weight and d bias from them (see
op.py): deterministic, and the partials are ROWS_PER_PROGRAM times smaller than x.

All element offsets are int64 (row * C exceeds 2**31 at Wan scale: B*N*C >= 2**31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.registry import interpreter_enabled

MAX_C = 8192
MAX_ROWS_PER_PROGRAM = 16
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32: floor of var + eps


def channel_pieces(channels: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_T): the power-of-two head and tail a row of C channels is held in."""
    head = 1 << (max(channels, 1).bit_length() - 1)
    rest = channels - head
    return head, (triton.next_power_of_2(rest) if rest > 0 else 0)


def rows_per_program(tokens_per_frame: int) -> int:
    """Rows of one frame per program: enough to amortise the modulation load and the partial-sum
    write (<= 1/16 of x's bytes), few enough that a 256-token frame still spreads over several
    programs."""
    return min(MAX_ROWS_PER_PROGRAM, triton.next_power_of_2(max(tokens_per_frame, 1)))


def _configs() -> list[triton.Config]:
    if interpreter_enabled():  # no timing under the interpreter; 4-row tiles exercise the masks
        return [triton.Config({"BLOCK_R": 4, "LOOP_STAGES": 1}, num_warps=4)]
    return [triton.Config({"BLOCK_R": r, "LOOP_STAGES": s}, num_warps=w)
            for r in (1, 2, 4, 8, 16) for w in (2, 4, 8, 16) for s in (1, 2)]


def _pruner(max_per_thread: int):
    """Keep tiles of 4 to ``max_per_thread`` fp32 values per thread and per loaded tensor
    (16-byte vectors at the low end; no spills at the high end: the backward holds four such
    tiles, the forward two) that fit in one program's rows. 16 warps (512 threads) leave a
    thread at most 128 registers: there the bound is 16 (the forward's 4 x 3072 tile, 24 per
    thread, with a 2-stage loop reached the cap and spilled 12 B; compile-only, sm_90a)."""

    def prune(configs, named_args, **kwargs):
        width = kwargs["BLOCK_C"] + kwargs["BLOCK_T"]
        rows = kwargs["ROWS_PER_PROGRAM"]
        kept = []
        for cfg in configs:
            per_thread = cfg.kwargs["BLOCK_R"] * width / (32 * cfg.num_warps)
            bound = min(max_per_thread, 16) if cfg.num_warps >= 16 else max_per_thread
            if cfg.kwargs["BLOCK_R"] <= rows and 4 <= per_thread <= bound:
                kept.append(cfg)
        if not kept:  # tiny C or one-row frames: the config with the fewest idle lanes
            kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_R"] > rows, c.num_warps,
                                                -c.kwargs["BLOCK_R"], c.kwargs["LOOP_STAGES"]))]
        return kept

    return prune


def _tuning(max_per_thread: int) -> dict:
    return dict(configs=_configs(), key=["BLOCK_C", "BLOCK_T", "ROWS_PER_PROGRAM"],
                prune_configs_by={"early_config_prune": _pruner(max_per_thread)})


# ----------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _tile_rows(segment, chunk, it, tokens_per_frame, channels,
               BLOCK_R: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    """int64 row indices and element offsets of the rows of tile ``it`` of program
    (segment, chunk), and their mask (rows past the chunk or the frame are off)."""
    in_chunk = it * BLOCK_R + tl.arange(0, BLOCK_R)
    local = chunk * ROWS_PER_PROGRAM + in_chunk
    rmask = (in_chunk < ROWS_PER_PROGRAM) & (local < tokens_per_frame)
    row = segment.to(tl.int64) * tokens_per_frame + local
    return row, row * channels, rmask


@triton.jit
def _load_tile(ptr, row_off, rmask, col0, channels, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """[BLOCK_R, BLOCK] fp32 tile of columns [col0, col0 + BLOCK); only the tail piece needs a
    column mask (the head piece lies inside C by construction)."""
    cols = col0 + tl.arange(0, BLOCK)
    mask = rmask[:, None]
    if TAIL:
        mask = mask & (cols < channels)[None, :]
    return tl.load(ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, row_off, rmask, col0, channels, BLOCK: tl.constexpr,
                TAIL: tl.constexpr):
    cols = col0 + tl.arange(0, BLOCK)
    mask = rmask[:, None]
    if TAIL:
        mask = mask & (cols < channels)[None, :]
    tl.store(ptr + row_off[:, None] + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_vec(ptr, offset, col0, channels, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """fp32 [BLOCK] vector of one modulation row (or the affine parameters, offset 0)."""
    cols = col0 + tl.arange(0, BLOCK)
    if TAIL:
        return tl.load(ptr + offset + cols, mask=cols < channels, other=0.0).to(tl.float32)
    return tl.load(ptr + offset + cols).to(tl.float32)


@triton.jit
def _folded_modulation(shift_ptr, scale_ptr, weight_ptr, bias_ptr, mod_off, col0, channels,
                       BLOCK: tl.constexpr, TAIL: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(a, c) with y = x_hat * a + c: a = w (1 + scale), c = b (1 + scale) + shift. Computed once
    per program, so the per-element work is one FMA."""
    one_plus_scale = 1.0 + _load_vec(scale_ptr, mod_off, col0, channels, BLOCK, TAIL)
    shift = _load_vec(shift_ptr, mod_off, col0, channels, BLOCK, TAIL)
    a = one_plus_scale
    c = shift
    if HAS_WEIGHT:
        a = a * _load_vec(weight_ptr, 0, col0, channels, BLOCK, TAIL)
    if HAS_BIAS:
        c = c + one_plus_scale * _load_vec(bias_ptr, 0, col0, channels, BLOCK, TAIL)
    return a, c


@triton.jit
def _pow2_scale(peak):
    """(2^k, 2^-k) with 2^k <= peak < 2^(k+1), k clamped to [0, 126]: built from the exponent
    bits, so the scaling is exact and both factors are normal fp32 numbers."""
    biased = (peak.to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.minimum(tl.maximum(biased - 127, 0), 126)
    up = ((127 + k) << 23).to(tl.float32, bitcast=True)
    down = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return up, down


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.autotune(**_tuning(max_per_thread=32))
@triton.jit
def _adaln_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr,
    tokens_per_frame, channels, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_R: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    segment = tl.program_id(0)  # = b * T + t: one frame of one sample
    chunk = tl.program_id(1)
    mod_off = segment.to(tl.int64) * channels
    a_h, c_h = _folded_modulation(shift_ptr, scale_ptr, weight_ptr, bias_ptr, mod_off, 0,
                                  channels, BLOCK_C, False, HAS_WEIGHT, HAS_BIAS)
    if BLOCK_T > 0:
        a_t, c_t = _folded_modulation(shift_ptr, scale_ptr, weight_ptr, bias_ptr, mod_off,
                                      BLOCK_C, channels, BLOCK_T, True, HAS_WEIGHT, HAS_BIAS)
    # LOOP_STAGES > 1: the loads of the next tiles are issued as cp.async into shared memory
    # while this tile computes (software pipelining of the row loop)
    for it in tl.range(0, (ROWS_PER_PROGRAM + BLOCK_R - 1) // BLOCK_R, num_stages=LOOP_STAGES):
        row, row_off, rmask = _tile_rows(segment, chunk, it, tokens_per_frame, channels,
                                    BLOCK_R, ROWS_PER_PROGRAM)
        x_h = _load_tile(x_ptr, row_off, rmask, 0, channels, BLOCK_C, False)
        peak = tl.max(tl.abs(x_h), axis=1)
        if BLOCK_T > 0:
            x_t = _load_tile(x_ptr, row_off, rmask, BLOCK_C, channels, BLOCK_T, True)
            peak = tl.maximum(peak, tl.max(tl.abs(x_t), axis=1))
        up, down = _pow2_scale(peak)
        u_h = x_h * down[:, None]
        total = tl.sum(u_h, axis=1)
        if BLOCK_T > 0:
            u_t = x_t * down[:, None]
            total += tl.sum(u_t, axis=1)
        mean_u = total / channels
        d_h = u_h - mean_u[:, None]
        sq = tl.sum(d_h * d_h, axis=1)
        if BLOCK_T > 0:
            cols_t = BLOCK_C + tl.arange(0, BLOCK_T)
            d_t = tl.where((cols_t < channels)[None, :], u_t - mean_u[:, None], 0.0)
            sq += tl.sum(d_t * d_t, axis=1)
        # var + eps in the scaled domain; the floor keeps a constant row of huge values (var 0,
        # eps * 4^-k below fp32 range) at x_hat = 0 instead of 0 * inf
        rstd_u = 1.0 / tl.sqrt(tl.maximum(sq / channels + eps * down * down, FLT_MIN))
        _store_tile(y_ptr, d_h * rstd_u[:, None] * a_h[None, :] + c_h[None, :], row_off, rmask,
                    0, channels, BLOCK_C, False)
        if BLOCK_T > 0:
            _store_tile(y_ptr, d_t * rstd_u[:, None] * a_t[None, :] + c_t[None, :], row_off,
                        rmask, BLOCK_C, channels, BLOCK_T, True)
        tl.store(mean_ptr + row, mean_u * up, mask=rmask)
        tl.store(rstd_ptr + row, rstd_u * down, mask=rmask)


@triton.autotune(**_tuning(max_per_thread=16))
@triton.jit
def _adaln_bwd_kernel(
    dy_ptr, x_ptr, scale_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, sum_dy_ptr, sum_dyx_ptr,
    tokens_per_frame, channels, n_chunks,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_R: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    segment = tl.program_id(0)
    chunk = tl.program_id(1)
    mod_off = segment.to(tl.int64) * channels
    # g = dy * (1 + scale) * w: the gradient reaching x_hat; gw_* is its per-column factor
    gw_h = 1.0 + _load_vec(scale_ptr, mod_off, 0, channels, BLOCK_C, False)
    if HAS_WEIGHT:
        gw_h = gw_h * _load_vec(weight_ptr, 0, 0, channels, BLOCK_C, False)
    acc_dy_h = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dyx_h = tl.zeros([BLOCK_C], dtype=tl.float32)
    if BLOCK_T > 0:
        gw_t = 1.0 + _load_vec(scale_ptr, mod_off, BLOCK_C, channels, BLOCK_T, True)
        if HAS_WEIGHT:
            gw_t = gw_t * _load_vec(weight_ptr, 0, BLOCK_C, channels, BLOCK_T, True)
        acc_dy_t = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_dyx_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    for it in tl.range(0, (ROWS_PER_PROGRAM + BLOCK_R - 1) // BLOCK_R, num_stages=LOOP_STAGES):
        row, row_off, rmask = _tile_rows(segment, chunk, it, tokens_per_frame, channels,
                                    BLOCK_R, ROWS_PER_PROGRAM)
        mean = tl.load(mean_ptr + row, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)
        x_h = _load_tile(x_ptr, row_off, rmask, 0, channels, BLOCK_C, False)
        dy_h = _load_tile(dy_ptr, row_off, rmask, 0, channels, BLOCK_C, False)
        xhat_h = tl.where(rmask[:, None], (x_h - mean[:, None]) * rstd[:, None], 0.0)
        g_h = dy_h * gw_h[None, :]
        sum_g = tl.sum(g_h, axis=1)
        sum_gx = tl.sum(g_h * xhat_h, axis=1)
        if BLOCK_T > 0:
            x_t = _load_tile(x_ptr, row_off, rmask, BLOCK_C, channels, BLOCK_T, True)
            dy_t = _load_tile(dy_ptr, row_off, rmask, BLOCK_C, channels, BLOCK_T, True)
            cols_t = BLOCK_C + tl.arange(0, BLOCK_T)
            xhat_t = tl.where(rmask[:, None] & (cols_t < channels)[None, :],
                              (x_t - mean[:, None]) * rstd[:, None], 0.0)
            g_t = dy_t * gw_t[None, :]
            sum_g += tl.sum(g_t, axis=1)
            sum_gx += tl.sum(g_t * xhat_t, axis=1)
        # d/dx of LayerNorm: rstd * (g - mean(g) - x_hat * mean(g * x_hat))
        mean_g = (sum_g / channels)[:, None]
        mean_gx = (sum_gx / channels)[:, None]
        _store_tile(dx_ptr, rstd[:, None] * (g_h - mean_g - xhat_h * mean_gx), row_off, rmask,
                    0, channels, BLOCK_C, False)
        acc_dy_h += tl.sum(dy_h, axis=0)
        acc_dyx_h += tl.sum(dy_h * xhat_h, axis=0)
        if BLOCK_T > 0:
            _store_tile(dx_ptr, rstd[:, None] * (g_t - mean_g - xhat_t * mean_gx), row_off,
                        rmask, BLOCK_C, channels, BLOCK_T, True)
            acc_dy_t += tl.sum(dy_t, axis=0)
            acc_dyx_t += tl.sum(dy_t * xhat_t, axis=0)
    part = (segment.to(tl.int64) * n_chunks + chunk) * channels
    cols_h = tl.arange(0, BLOCK_C)
    tl.store(sum_dy_ptr + part + cols_h, acc_dy_h)
    tl.store(sum_dyx_ptr + part + cols_h, acc_dyx_h)
    if BLOCK_T > 0:
        cols_t = BLOCK_C + tl.arange(0, BLOCK_T)
        tl.store(sum_dy_ptr + part + cols_t, acc_dy_t, mask=cols_t < channels)
        tl.store(sum_dyx_ptr + part + cols_t, acc_dyx_t, mask=cols_t < channels)


@triton.autotune(**_tuning(max_per_thread=32))
@triton.jit
def _gated_residual_kernel(
    a_ptr, y_ptr, gate_ptr, out_ptr, dgate_part_ptr,
    tokens_per_frame, channels, n_chunks,
    BACKWARD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_R: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    """Forward (a = x): out = x + gate * y. Backward (a = dout): out = d y = gate * dout, and the
    per-program partial sum of dout * y (d gate) into dgate_part."""
    segment = tl.program_id(0)
    chunk = tl.program_id(1)
    mod_off = segment.to(tl.int64) * channels
    gate_h = _load_vec(gate_ptr, mod_off, 0, channels, BLOCK_C, False)
    acc_h = tl.zeros([BLOCK_C], dtype=tl.float32)
    if BLOCK_T > 0:
        gate_t = _load_vec(gate_ptr, mod_off, BLOCK_C, channels, BLOCK_T, True)
        acc_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    for it in tl.range(0, (ROWS_PER_PROGRAM + BLOCK_R - 1) // BLOCK_R, num_stages=LOOP_STAGES):
        row, row_off, rmask = _tile_rows(segment, chunk, it, tokens_per_frame, channels,
                                    BLOCK_R, ROWS_PER_PROGRAM)
        a_h = _load_tile(a_ptr, row_off, rmask, 0, channels, BLOCK_C, False)
        y_h = _load_tile(y_ptr, row_off, rmask, 0, channels, BLOCK_C, False)
        if BACKWARD:
            out_h = gate_h[None, :] * a_h
            acc_h += tl.sum(a_h * y_h, axis=0)
        else:
            out_h = a_h + gate_h[None, :] * y_h
        _store_tile(out_ptr, out_h, row_off, rmask, 0, channels, BLOCK_C, False)
        if BLOCK_T > 0:
            a_t = _load_tile(a_ptr, row_off, rmask, BLOCK_C, channels, BLOCK_T, True)
            y_t = _load_tile(y_ptr, row_off, rmask, BLOCK_C, channels, BLOCK_T, True)
            if BACKWARD:
                out_t = gate_t[None, :] * a_t
                acc_t += tl.sum(a_t * y_t, axis=0)
            else:
                out_t = a_t + gate_t[None, :] * y_t
            _store_tile(out_ptr, out_t, row_off, rmask, BLOCK_C, channels, BLOCK_T, True)
    if BACKWARD:
        part = (segment.to(tl.int64) * n_chunks + chunk) * channels
        tl.store(dgate_part_ptr + part + tl.arange(0, BLOCK_C), acc_h)
        if BLOCK_T > 0:
            cols_t = BLOCK_C + tl.arange(0, BLOCK_T)
            tl.store(dgate_part_ptr + part + cols_t, acc_t, mask=cols_t < channels)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs arrive validated and contiguous: x [B, N, C], modulation [B, T, C], weight
# and bias [C] or None. Zero-size inputs return empty (or zero) results without a launch.


def _geometry(batch: int, tokens: int, channels: int, frames: int) -> dict:
    tokens_per_frame = tokens // frames
    rows = rows_per_program(tokens_per_frame)
    head, tail = channel_pieces(channels)
    return dict(grid=(batch * frames, triton.cdiv(tokens_per_frame, rows)),
                tokens_per_frame=tokens_per_frame,
                consts=dict(BLOCK_C=head, BLOCK_T=tail, ROWS_PER_PROGRAM=rows))


def adaln_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y like x, mean [B*N] fp32, rstd [B*N] fp32)."""
    batch, tokens, channels = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(batch * tokens, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    geo = _geometry(batch, tokens, channels, shift.shape[1])
    _adaln_fwd_kernel[geo["grid"]](
        x, shift, scale, x if weight is None else weight, x if bias is None else bias, y, mean,
        rstd, geo["tokens_per_frame"], channels, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **geo["consts"])
    return y, mean, rstd


def adaln_modulate_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                       weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, sum of dy and sum of dy * x_hat over each frame's tokens, [B, T, C] fp32)."""
    batch, tokens, channels = x.shape
    frames = scale.shape[1]
    dx = torch.empty_like(x)
    geo = _geometry(batch, tokens, channels, frames)
    sum_dy = torch.empty(*geo["grid"], channels, device=x.device, dtype=torch.float32)
    sum_dyx = torch.empty_like(sum_dy)
    if sum_dy.numel() > 0:
        _adaln_bwd_kernel[geo["grid"]](
            dy, x, scale, x if weight is None else weight, mean, rstd, dx, sum_dy, sum_dyx,
            geo["tokens_per_frame"], channels, geo["grid"][1],
            HAS_WEIGHT=weight is not None, **geo["consts"])
    shape = (batch, frames, channels)
    return dx, sum_dy.sum(dim=1).view(shape), sum_dyx.sum(dim=1).view(shape)


def gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    batch, tokens, channels = x.shape
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    geo = _geometry(batch, tokens, channels, gate.shape[1])
    _gated_residual_kernel[geo["grid"]](
        x, y, gate, out, out, geo["tokens_per_frame"], channels, geo["grid"][1],
        BACKWARD=False, **geo["consts"])
    return out


def gated_residual_bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d y, d gate); d x is d out itself."""
    batch, tokens, channels = y.shape
    frames = gate.shape[1]
    dy = torch.empty_like(y)
    geo = _geometry(batch, tokens, channels, frames)
    dgate_part = torch.empty(*geo["grid"], channels, device=y.device, dtype=torch.float32)
    if dgate_part.numel() > 0:
        _gated_residual_kernel[geo["grid"]](
            dout, y, gate, dy, dgate_part, geo["tokens_per_frame"], channels, geo["grid"][1],
            BACKWARD=True, **geo["consts"])
    dgate = dgate_part.sum(dim=1).view(batch, frames, channels).to(gate.dtype)
    return dy, dgate
