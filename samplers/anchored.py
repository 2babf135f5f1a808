"""Anchored Diffusion sampling (Algorithm 1): long videos from B anchored non-uniform sequences.

1. :func:`samplers.nonuniform.nonuniform_plan` picks B sorted sequences of T driving frames that
   share the central anchor frame and together cover the video (Eq. 1);
2. the guidance signals are gathered per slot (G for every sequence, L_t per frame);
3. every diffusion step: ``Q' = sDiT(C, Q_k)`` with the anchor override inside every layer (the
   denoiser receives the anchor slots), ``Q~ = Override(Q')`` (Eq. 3: the anchor of every sequence
   := sequence 0's), ``Q_{k-1} = Update(Q~)`` through the diffusers scheduler, and the override
   once more so the update's noise cannot split the anchor;
4. decode (each driving frame once) and 5. reorder chronologically.

Anchor-parallel sampling (``torchrun ... sample anchored --parallel``): every rank runs this same
loop on the same latents with the same generator, but :func:`sharded_sdit_denoiser` evaluates the
sDiT only on this rank's share of the B sequences; the rank holding the source sequence
broadcasts the anchor frame's hidden states in every layer (:class:`avatar_models.
anchored_diffusion.SharedAnchor`) and the outputs are all-gathered, so every rank continues with
the full, identical Q' and the result equals single-process sampling. The latents themselves
(B x T latent frames, a few MB) are replicated; the model, which is all the cost, is split.
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


def sharded_sdit_denoiser(model, cond, *, guidance: float = 1.0, amp: bool = False,
                          group=None) -> Denoiser:
    """Like :func:`sdit_denoiser`, for anchor-parallel sampling over the ranks of ``group`` (None:
    the default process group): ``cond`` holds all B sequences' conditions; each rank runs the
    model on its contiguous share (:func:`avatar_models.training.distributed.shard_range`) and
    the outputs are all-gathered, so the returned [B, T, C_out, H, W] is the same on every rank.
    Sequence 0 is the source. Every rank must call the denoiser together."""
    import torch.distributed as dist

    from avatar_models.anchored_diffusion import Conditions, SharedAnchor
    from avatar_models.training.distributed import shard_range

    channels = model.config.in_channels
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    @torch.no_grad()
    def denoise(x: torch.Tensor, t: torch.Tensor, anchor_pos: torch.Tensor | None):
        b = x.shape[0]
        if anchor_pos is None:
            raise ValueError("sharded_sdit_denoiser needs anchor positions (anchored sampling)")
        if b < size:
            raise ValueError(f"anchor-parallel sampling needs at least one sequence per rank: "
                             f"B={b} sequences, {size} ranks")
        lo, hi = shard_range(b, rank, size)
        anchor = SharedAnchor(tuple(int(a) for a in anchor_pos[lo:hi].tolist()), source_rank=0,
                              source_local=0, group=group)
        local = Conditions(cond.global_embed[lo:hi], cond.control[lo:hi])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x[lo:hi], t[lo:hi], local, anchor=anchor).float()
            if guidance != 1.0:
                null = Conditions(local.global_embed, local.control,
                                  torch.ones(hi - lo, dtype=torch.bool, device=x.device))
                out = guided(out, model(x[lo:hi], t[lo:hi], null, anchor=anchor).float(),
                             guidance, channels)
        return _all_gather_rows(out, b, size, group)

    return denoise


def _all_gather_rows(local: torch.Tensor, total: int, size: int, group) -> torch.Tensor:
    """Concatenate every rank's contiguous rows (shares from ``shard_range``) on every rank."""
    import torch.distributed as dist

    from avatar_models.training.distributed import shard_range

    width = -(-total // size)                       # collectives need equal shapes: pad
    padded = local.new_zeros(width, *local.shape[1:])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: hi - lo] for p, (lo, hi) in
                      zip(parts, (shard_range(total, r, size) for r in range(size)))])
