"""Triton kernels for adaLN modulation and the gated residual.

Layout: x is viewed as rows [B*N, C] (contiguous); modulation vectors as rows [B*T, C]. Row r of x
belongs to sample b = r // N and frame t = (r % N) // (N // T), so its modulation row is b*T + t.

Forward: one program per token row, the whole row in registers (BLOCK_C = next_pow2(C) <= 8192), so
x is read once and y written once: the byte floor of the op. Statistics in fp32.

Backward: the parameter gradients (d shift, d scale, d gate) are sums over the tokens of one frame.
Instead of atomics (non-deterministic, and fp16/bf16 atomics are slow), each program owns one chunk
of ROWS_PER_PROGRAM rows inside one frame segment, accumulates fp32 partial sums in registers and
writes them to a [B*T, n_chunks, C] buffer that torch sums afterwards: deterministic, and the
partial buffer is at most ROWS_PER_PROGRAM times smaller than x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_C = 8192


def _block_c(channels: int) -> int:
    return triton.next_power_of_2(channels)


def _num_warps(block_c: int) -> int:
    # ~8 fp32 values per thread keeps register pressure low at C=8192 (16 warps) while small C
    # still gets a full warp.
    return max(1, min(16, block_c // 256))


def _rows_per_program(tokens_per_frame: int) -> int:
    # Enough rows to amortise the partial-sum write (<= 1/16 of x's bytes), few enough that a
    # 256-token frame still spreads over several programs.
    return min(16, triton.next_power_of_2(tokens_per_frame))


@triton.jit
def _adaln_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr,
    tokens, tokens_per_frame, frames, channels, eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // tokens
    t = (row % tokens) // tokens_per_frame
    mod_row = b * frames + t
    cols = tl.arange(0, BLOCK_C)
    mask = cols < channels
    x = tl.load(x_ptr + row * channels + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / channels
    centered = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / channels
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(shift_ptr + mod_row * channels + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + mod_row * channels + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * (1.0 + scale) + shift
    tl.store(y_ptr + row * channels + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _adaln_bwd_kernel(
    dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
    tokens_per_frame, channels, n_chunks,
    BLOCK_C: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    segment = tl.program_id(0)  # = b * T + t: one frame of one sample
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < channels
    one_plus_scale = 1.0 + tl.load(scale_ptr + segment * channels + cols, mask=mask,
                                   other=0.0).to(tl.float32)
    dshift_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dscale_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):  # constexpr bound: see DESIGN.md's interpreter pitfall
        local = chunk * ROWS_PER_PROGRAM + i
        row_ok = local < tokens_per_frame
        row = segment * tokens_per_frame + local
        lmask = mask & row_ok
        x = tl.load(x_ptr + row * channels + cols, mask=lmask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * channels + cols, mask=lmask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        x_hat = tl.where(lmask, (x - mean) * rstd, 0.0)
        g = dy * one_plus_scale
        # d/dx of LayerNorm: rstd * (g - mean(g) - x_hat * mean(g * x_hat))
        mean_g = tl.sum(g, axis=0) / channels
        mean_gx = tl.sum(g * x_hat, axis=0) / channels
        dx = rstd * (g - mean_g - x_hat * mean_gx)
        tl.store(dx_ptr + row * channels + cols, dx.to(dx_ptr.dtype.element_ty), mask=lmask)
        dshift_acc += dy
        dscale_acc += dy * x_hat
    part = (segment * n_chunks + chunk) * channels + cols
    tl.store(dshift_part_ptr + part, dshift_acc, mask=mask)
    tl.store(dscale_part_ptr + part, dscale_acc, mask=mask)


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    tokens, tokens_per_frame, frames, channels,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    mod_row = (row // tokens) * frames + (row % tokens) // tokens_per_frame
    cols = tl.arange(0, BLOCK_C)
    mask = cols < channels
    x = tl.load(x_ptr + row * channels + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * channels + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + mod_row * channels + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * channels + cols, (x + gate * y).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    dout_ptr, y_ptr, gate_ptr, dy_ptr, dgate_part_ptr,
    tokens_per_frame, channels, n_chunks,
    BLOCK_C: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    segment = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < channels
    gate = tl.load(gate_ptr + segment * channels + cols, mask=mask, other=0.0).to(tl.float32)
    dgate_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        local = chunk * ROWS_PER_PROGRAM + i
        row = segment * tokens_per_frame + local
        lmask = mask & (local < tokens_per_frame)
        dout = tl.load(dout_ptr + row * channels + cols, mask=lmask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * channels + cols, mask=lmask, other=0.0).to(tl.float32)
        tl.store(dy_ptr + row * channels + cols, (gate * dout).to(dy_ptr.dtype.element_ty),
                 mask=lmask)
        dgate_acc += dout * y
    tl.store(dgate_part_ptr + (segment * n_chunks + chunk) * channels + cols, dgate_acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs arrive validated and contiguous: x [B, N, C], modulation [B, T, C].


def adaln_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, tokens, channels = x.shape
    frames = shift.shape[1]
    y = torch.empty_like(x)
    mean = torch.empty(batch * tokens, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_c = _block_c(channels)
    _adaln_fwd_kernel[(batch * tokens,)](
        x, shift, scale, y, mean, rstd, tokens, tokens // frames, frames, channels, eps,
        BLOCK_C=block_c, num_warps=_num_warps(block_c))
    return y, mean, rstd


def adaln_modulate_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                       mean: torch.Tensor, rstd: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, tokens, channels = x.shape
    frames = scale.shape[1]
    tokens_per_frame = tokens // frames
    rows = _rows_per_program(tokens_per_frame)
    n_chunks = triton.cdiv(tokens_per_frame, rows)
    dx = torch.empty_like(x)
    dshift_part = torch.empty(batch * frames, n_chunks, channels, device=x.device,
                              dtype=torch.float32)
    dscale_part = torch.empty_like(dshift_part)
    block_c = _block_c(channels)
    _adaln_bwd_kernel[(batch * frames, n_chunks)](
        dy, x, scale, mean, rstd, dx, dshift_part, dscale_part, tokens_per_frame, channels,
        n_chunks, BLOCK_C=block_c, ROWS_PER_PROGRAM=rows, num_warps=_num_warps(block_c))
    shape = (batch, frames, channels)
    dshift = dshift_part.sum(dim=1).view(shape).to(scale.dtype)
    dscale = dscale_part.sum(dim=1).view(shape).to(scale.dtype)
    return dx, dshift, dscale


def gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    batch, tokens, channels = x.shape
    frames = gate.shape[1]
    out = torch.empty_like(x)
    block_c = _block_c(channels)
    _gated_residual_fwd_kernel[(batch * tokens,)](
        x, y, gate, out, tokens, tokens // frames, frames, channels,
        BLOCK_C=block_c, num_warps=_num_warps(block_c))
    return out


def gated_residual_bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d y, d gate); d x is d out itself."""
    batch, tokens, channels = y.shape
    frames = gate.shape[1]
    tokens_per_frame = tokens // frames
    rows = _rows_per_program(tokens_per_frame)
    n_chunks = triton.cdiv(tokens_per_frame, rows)
    dy = torch.empty_like(y)
    dgate_part = torch.empty(batch * frames, n_chunks, channels, device=y.device,
                             dtype=torch.float32)
    block_c = _block_c(channels)
    _gated_residual_bwd_kernel[(batch * frames, n_chunks)](
        dout, y, gate, dy, dgate_part, tokens_per_frame, channels, n_chunks,
        BLOCK_C=block_c, ROWS_PER_PROGRAM=rows, num_warps=_num_warps(block_c))
    dgate = dgate_part.sum(dim=1).view(batch, frames, channels).to(gate.dtype)
    return dy, dgate
