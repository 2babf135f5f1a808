"""Autoregressive chaining with frame replacement: an extra long-video baseline (not in the
Anchored Diffusion paper, which compares with MultiDiffusion).

Windows of T consecutive frames are sampled one after another; window w starts ``T - context``
frames after window w-1 (the last window flush with the end), so its first frames were already
generated. Those *known* frames are imposed by replacement (the "replacement" conditioning of
video diffusion models): before every denoising step their slots are set to the known clean
frames noised to the current timestep (``scheduler.add_noise`` with one noise draw per window),
and after the last step to the known frames themselves. Appearance can only travel forwards,
through the context frames, so it may drift with distance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from samplers.multidiffusion import uniform_windows
from samplers.schedules import Denoiser, initial_noise, scheduler_step


def chained_windows(num_frames: int, frames_per_window: int, context: int) -> torch.Tensor:
    """[W, T] windows where each overlaps the previous one by at least ``context`` frames."""
    t = min(frames_per_window, num_frames)
    if not 0 <= context < t:
        raise ValueError(f"context: expected 0 <= context < T={t}, got {context}")
    return uniform_windows(num_frames, t, stride=t - context)


def autoregressive_sample(window_denoiser: Callable[[int], Denoiser], scheduler,
                          windows: torch.Tensor, num_frames: int,
                          frame_shape: tuple[int, int, int], *,
                          generator: torch.Generator | None = None, device="cpu",
                          progress: bool = True) -> torch.Tensor:
    """Returns the final latents [N, C, H, W].

    Args:
        window_denoiser: ``window_denoiser(w)`` -> the denoiser of window w (its conditions
            gathered for ``windows[w]``), called as ``denoise(x [1, T, C, H, W], t [1], None)``.
        scheduler: a diffusers scheduler with timesteps set; it is re-run for every window.
        windows: [W, T] frame indices in generation order (:func:`chained_windows`); every
            frame must be covered.
    """
    from tqdm.auto import tqdm

    if windows.ndim != 2 or int(windows.max()) >= num_frames or int(windows.min()) < 0:
        raise ValueError(f"windows: expected [W, T] indices in [0, {num_frames}), got shape "
                         f"{tuple(windows.shape)}")
    if bool((torch.bincount(windows.flatten(), minlength=num_frames) == 0).any()):
        raise ValueError(f"windows must cover every one of the {num_frames} frames")
    video = torch.zeros(num_frames, *frame_shape, device=device)
    done = torch.zeros(num_frames, dtype=torch.bool)
    for w in tqdm(range(windows.shape[0]), desc="autoregressive", disable=not progress):
        idx = windows[w]
        known = done[idx].to(device)                                       # [T] bool
        denoise = window_denoiser(w)
        shape = (1, idx.numel(), *frame_shape)
        x = initial_noise(shape, generator, device, scheduler=scheduler)
        ref_noise = initial_noise(shape, generator, device)
        clean = video[idx.to(device)][None]                                # [1, T, C, H, W]
        for t in scheduler.timesteps:
            if known.any():
                noised = scheduler.add_noise(clean, ref_noise, torch.tensor([int(t)]))
                x = torch.where(known.view(1, -1, 1, 1, 1), noised.to(x.dtype), x)
            tt = torch.full((1,), int(t), device=x.device)
            out = denoise(scheduler.scale_model_input(x, t), tt, None)
            x = scheduler_step(scheduler, out, t, x, generator)
        x = torch.where(known.view(1, -1, 1, 1, 1), clean, x)
        new = ~done[idx]
        video[idx[new].to(device)] = x[0][new.to(device)]
        done[idx] = True
    return video
