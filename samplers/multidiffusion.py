"""MultiDiffusion baseline for long videos: overlapping uniform windows averaged every step.

Windows of T consecutive frames with a stride (default T//2, the last window flush with the end)
cover the N-frame video. Every step each window is denoised on its own; the model outputs of
frames shared by several windows are averaged (which, for DDIM, equals averaging the windows'
updates as in MultiDiffusion; for DDPM it keeps a single noise draw per frame), then one scheduler
update runs on the whole video.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from samplers.schedules import Denoiser, initial_noise, scheduler_step


def uniform_windows(num_frames: int, frames_per_window: int, stride: int | None = None
                    ) -> torch.Tensor:
    """[W, T] frame indices of overlapping windows covering ``num_frames`` frames."""
    n, t = num_frames, frames_per_window
    if n < 1 or t < 1:
        raise ValueError(f"need num_frames >= 1 and frames_per_window >= 1, got {n}, {t}")
    t = min(t, n)
    stride = max(1, t // 2) if stride is None else stride
    if not 1 <= stride <= t:
        raise ValueError(f"stride must be in [1, T={t}] so windows overlap or touch, got {stride}")
    starts = list(range(0, n - t + 1, stride))
    if starts[-1] != n - t:
        starts.append(n - t)
    return torch.tensor([list(range(s, s + t)) for s in starts], dtype=torch.long)


def independent_windows(num_frames: int, frames_per_window: int) -> torch.Tensor:
    """[W, T] windows that only touch (stride T): each frame is denoised by one window, so
    windows share nothing (the floor baseline); when T does not divide N the last window, flush
    with the end, overlaps its neighbour and those frames are averaged as in MultiDiffusion."""
    t = min(frames_per_window, num_frames)
    return uniform_windows(num_frames, t, stride=t)


def multidiffusion_sample(denoise: Denoiser, scheduler, windows: torch.Tensor, num_frames: int,
                          frame_shape: tuple[int, int, int], *,
                          generator: torch.Generator | None = None, device="cpu",
                          noise: torch.Tensor | None = None, progress: bool = True,
                          callback: Callable[[int, int, torch.Tensor], None] | None = None
                          ) -> torch.Tensor:
    """Returns the final latents [N, C, H, W]. ``denoise(x [W, T, C, H, W], t [W], None)``."""
    from tqdm.auto import tqdm

    covered = torch.bincount(windows.flatten(), minlength=num_frames)
    if windows.max() >= num_frames or bool((covered == 0).any()):
        raise ValueError(f"windows must cover every one of the {num_frames} frames")
    shape = (num_frames, *frame_shape)
    x = initial_noise(shape, generator, device, scheduler=scheduler) if noise is None else noise
    win = windows.to(x.device)
    count = covered.to(x.device, x.dtype).view(-1, 1, 1, 1)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="multidiffusion", disable=not progress)):
        tt = torch.full((win.shape[0],), int(t), device=x.device)
        out = denoise(scheduler.scale_model_input(x, t)[win], tt, None)   # [W, T, Co, H, W]
        total = torch.zeros(num_frames, *out.shape[2:], device=x.device, dtype=out.dtype)
        total.index_add_(0, win.flatten(), out.flatten(0, 1))
        x = scheduler_step(scheduler, total / count.to(out.dtype), t, x, generator)
        if callback is not None:
            callback(i, int(t), x)
    return x
