"""Diffusers schedulers built from a checkpoint's schedule, and the generic denoising helpers.

The long-video strategies (anchored, MultiDiffusion, ...) live in their own modules and use only
what is here: a scheduler (DDPM with learned variance, or DDIM), :func:`scheduler_step` (one
update of a [..., C, H, W] batch of frames with a learned-sigma model output), classifier-free
guidance (:func:`guided`) and the plain loop (:func:`plain_sample`).

A *denoiser* is any callable ``denoise(x [B, T, C, H, W], t [B], anchor_frames [B] | None)
-> [B, T, C_out, H, W]`` with ``C_out = 2C`` (epsilon, learned-range variance) or ``C``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
SCHEDULERS = ("ddpm", "ddim")
DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                    "beta_schedule": "linear"}


def make_scheduler(kind: str = "ddim", schedule: dict | None = None,
                   num_inference_steps: int = 50, *, eta: float = 0.0):
    """A diffusers scheduler with timesteps set.

    kind: "ddpm" (ancestral, learned-range variance as in DiT) or "ddim" (deterministic for
    ``eta=0``; uses the epsilon half of a learned-sigma output). ``schedule`` holds the training
    betas (``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``), e.g. the
    ``diffusion`` entry of a checkpoint's metadata.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    sched = {**DEFAULT_SCHEDULE, **(schedule or {})}
    if kind == "ddpm":
        scheduler = DDPMScheduler(**sched, variance_type="learned_range", clip_sample=False)
    elif kind == "ddim":
        scheduler = DDIMScheduler(**sched, clip_sample=False, set_alpha_to_one=False)
    else:
        raise ValueError(f"scheduler kind must be one of {SCHEDULERS}, got {kind!r}")
    if not 0 < num_inference_steps <= sched["num_train_timesteps"]:
        raise ValueError(f"num_inference_steps must be in [1, {sched['num_train_timesteps']}], "
                         f"got {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps)
    scheduler.avatar_eta = eta  # read by scheduler_step for DDIM
    return scheduler


def _learned_variance(scheduler) -> bool:
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


def scheduler_step(scheduler, model_out: torch.Tensor, t, sample: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """x_{t-1} from x_t = ``sample`` [..., C, H, W] and the model output [..., C or 2C, H, W].

    Frames are flattened into the scheduler's batch dimension (every update is elementwise), so
    any leading shape works. A 2C output is split: DDPM with learned variance consumes both halves,
    other schedulers the epsilon half.
    """
    c = sample.shape[-3]
    flat_x = sample.reshape(-1, *sample.shape[-3:])
    flat_o = model_out.reshape(-1, *model_out.shape[-3:])
    if flat_o.shape[1] == 2 * c and not _learned_variance(scheduler):
        flat_o = flat_o[:, :c]
    elif flat_o.shape[1] != c and flat_o.shape[1] != 2 * c:
        raise ValueError(f"model output must have C={c} or 2C={2 * c} channels, got "
                         f"{flat_o.shape[1]}")
    kwargs = {"generator": generator}
    if hasattr(scheduler, "avatar_eta") and "eta" in _step_params(scheduler):
        kwargs["eta"] = scheduler.avatar_eta
    prev = scheduler.step(flat_o.float(), t, flat_x.float(), **kwargs).prev_sample
    return prev.to(sample.dtype).reshape(sample.shape)


def _step_params(scheduler) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(scheduler.step).parameters)


def guided(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float,
           channels: int) -> torch.Tensor:
    """Classifier-free guidance on the epsilon channels (dim -3, first ``channels``); the learned
    variance channels are taken from the conditional output (as DiT does)."""
    eps_c, rest = cond_out[..., :channels, :, :], cond_out[..., channels:, :, :]
    eps_u = uncond_out[..., :channels, :, :]
    return torch.cat([eps_u + scale * (eps_c - eps_u), rest], dim=-3)


def initial_noise(shape: tuple[int, ...], generator: torch.Generator | None,
                  device: torch.device | str, dtype: torch.dtype = torch.float32,
                  scheduler=None) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (reproducible across devices), scaled for the
    scheduler."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    sigma = 1.0 if scheduler is None else float(scheduler.init_noise_sigma)
    return noise * sigma


def plain_sample(denoise: Denoiser, scheduler, shape: tuple[int, ...], *,
                 generator: torch.Generator | None = None, device="cpu",
                 noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """The ordinary loop over independent clips: shape [B, T, C, H, W]."""
    from tqdm.auto import tqdm

    x = initial_noise(shape, generator, device, scheduler=scheduler) if noise is None else noise
    for t in tqdm(scheduler.timesteps, desc="sample", disable=not progress):
        tt = torch.full((shape[0],), int(t), device=x.device)
        out = denoise(scheduler.scale_model_input(x, t), tt, None)
        x = scheduler_step(scheduler, out, t, x, generator)
    return x
