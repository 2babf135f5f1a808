"""Anchored Diffusion sampling (Algorithm 1): long videos from B anchored non-uniform sequences.

1. :func:`samplers.nonuniform.nonuniform_plan` picks B sorted sequences of T driving frames that
   share the central anchor frame and together cover the video (Eq. 1);
2. the guidance signals are gathered per slot (G for every sequence, L_t per frame);
3. every diffusion step: ``Q' = sDiT(C, Q_k)`` with the anchor override inside every layer (the
   denoiser receives the anchor slots), ``Q~ = Override(Q')`` (Eq. 3: the anchor of every sequence
   := sequence 0's), ``Q_{k-1} = Update(Q~)`` through the diffusers scheduler, and the override
   once more so the update's noise cannot split the anchor;
4. decode (each driving frame once) and 5. reorder chronologically.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from samplers.nonuniform import SequencePlan, override_anchor, reorder
from samplers.schedules import Denoiser, guided, initial_noise, scheduler_step


def anchored_sample(denoise: Denoiser, scheduler, plan: SequencePlan,
                    frame_shape: tuple[int, int, int], *,
                    generator: torch.Generator | None = None, device="cpu",
                    noise: torch.Tensor | None = None, progress: bool = True,
                    callback: Callable[[int, int, torch.Tensor], None] | None = None
                    ) -> torch.Tensor:
    """Run the anchored loop; returns the final latents [B, T, C, H, W] (Q~_0).

    Args:
        denoise: ``denoise(x [B, T, C, H, W], t [B], anchor_pos [B]) -> [B, T, C or 2C, H, W]``;
            it should apply the anchor override in every layer (see :func:`sdit_denoiser`).
        scheduler: a diffusers scheduler with timesteps set (:func:`samplers.schedules.
            make_scheduler`).
        plan: the sequences (:func:`samplers.nonuniform.nonuniform_plan`).
        frame_shape: (C, H, W) of one latent frame.
        noise: optional initial noise [B, T, C, H, W] (its anchor slots are overridden).
        callback: ``callback(i, t, x)`` after every step with the overridden latents.
    """
    from tqdm.auto import tqdm

    shape = (plan.batch, plan.frames, *frame_shape)
    x = initial_noise(shape, generator, device, scheduler=scheduler) if noise is None else noise
    pos = plan.anchor_pos.to(x.device)
    x = override_anchor(x, pos)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="anchored", disable=not progress)):
        tt = torch.full((plan.batch,), int(t), device=x.device)
        out = denoise(scheduler.scale_model_input(x, t), tt, pos)      # Q'
        out = override_anchor(out, pos)                                # Q~ (Eq. 3)
        x = scheduler_step(scheduler, out, t, x, generator)            # Q_{k-1}
        x = override_anchor(x, pos)
        if callback is not None:
            callback(i, int(t), x)
    return x


def decode_video(latents: torch.Tensor, plan: SequencePlan,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 chunk: int = 8) -> torch.Tensor:
    """Reorder [B, T, C, H, W] into [N, C, H, W] (each driving frame once, chronological) and
    decode it in chunks (``decode`` maps [n, C, H, W] latents to [n, 3, h, w] images; None keeps
    the latents, e.g. for pixel-space models)."""
    video = reorder(latents, plan)                                     # [N, C, H, W]
    if decode is None:
        return video
    return torch.cat([decode(video[i:i + chunk]) for i in range(0, video.shape[0], chunk)])


def sdit_denoiser(model, cond, *, guidance: float = 1.0, anchor_mode: str = "packed",
                  amp: bool = False) -> Denoiser:
    """Wrap an :class:`avatar_models.anchored_diffusion.SDiT` and per-slot conditions into a
    denoiser. ``cond``: Conditions with global_embed [B, G] and control [B, T, L] (driving
    landmarks gathered with the plan). ``guidance`` > 1 adds classifier-free guidance (a second
    pass with the learned null conditions). ``anchor_pos`` None runs without anchoring (e.g. for
    MultiDiffusion, with ``cond`` gathered per window)."""
    from avatar_models.anchored_diffusion import Conditions

    channels = model.config.in_channels

    @torch.no_grad()
    def denoise(x: torch.Tensor, t: torch.Tensor, anchor_pos: torch.Tensor | None):
        c = cond
        anchor = None if anchor_pos is None else model.make_anchor(
            anchor_pos, frame_size=tuple(x.shape[-2:]))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x, t, c, anchor=anchor, anchor_mode=anchor_mode).float()
            if guidance != 1.0:
                null = Conditions(c.global_embed, c.control,
                                  torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
                out_u = model(x, t, null, anchor=anchor, anchor_mode=anchor_mode).float()
                out = guided(out, out_u, guidance, channels)
        return out

    return denoise
