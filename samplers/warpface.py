"""WarpFace inference (paper 003): DDIM reenactment and motion-space editing.

The denoiser callable is ``denoise(z_t [n, C, H, W], t [n], theta [n, Dm]) -> eps [n, C, H, W]``;
:func:`render_conditions` builds it from a :class:`~avatar_models.warpface.WarpFace` with the
ReferenceNet features of the source computed ONCE and reused at every step of every frame.

- :func:`ddim_sample`: diffusers ``DDIMScheduler`` (eta = 0) on the model's training schedule,
  classifier-free guidance ``eps_u + g (eps_c - eps_u)`` whose unconditional branch is theta = 0
  (what training drops to), frames in batches of ``batch`` and ONE initial noise shared by every
  frame (fixed noise seed across frames: the frames differ only through their motion).
- :func:`motion_conditions`: theta_(s->d_i) = theta_(r->d_i) - theta_(r->s) (Eq. 4), or in
  relative mode theta_(r->d_i) - theta_(r->d_1) (the first driving frame's pose maps to the
  source's own).
- editing: :func:`edit_conditions` sweeps one subspace's coefficients (or one vector's) by
  multiples of the standard deviation of that image's alpha_k (this project's choice of unit,
  the paper gives none; 1 when that std is 0) and returns
  theta_(s->s') = theta_(r->s') - theta_(r->s), non-zero only in group k;
  :func:`canonical_condition` is theta_(s->r) (appendix E).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from avatar_models.warpface import MotionCode, WarpFace, transfer


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 40           # DDIM steps (paper)
    guidance: float = 2.5     # CFG scale (paper); 1 turns CFG off
    batch: int = 8            # frames denoised together

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got steps={self.steps}, "
                             f"batch={self.batch}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")


def make_scheduler(config):
    """A DDIMScheduler on the schedule the model was trained with (eps prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=config.num_train_timesteps,
                         beta_start=config.beta_start, beta_end=config.beta_end,
                         beta_schedule=config.beta_schedule, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def ddim_sample(denoise: Callable, conditions: torch.Tensor, latent_shape: Sequence[int],
                scheduler, settings: SampleSettings = SampleSettings(), *,
                generator: torch.Generator | None = None, device="cpu",
                progress: bool = False) -> torch.Tensor:
    """One latent [L, C, H, W] per motion condition [L, Dm] (see the module docstring)."""
    from tqdm.auto import tqdm

    if conditions.dim() != 2:
        raise ValueError(f"conditions must be [L, Dm], got {list(conditions.shape)}")
    noise = torch.randn((1, *latent_shape), generator=generator).to(device)  # shared by frames
    scheduler.set_timesteps(settings.steps, device=device)
    guided = settings.guidance != 1.0
    out = []
    for first in tqdm(range(0, conditions.shape[0], settings.batch), desc="frames",
                      disable=not progress):
        theta = conditions[first:first + settings.batch].to(device)      # [n, Dm]
        n = theta.shape[0]
        z = noise.expand(n, *latent_shape).clone()                        # [n, C, H, W]
        for t in scheduler.timesteps:
            with torch.no_grad():
                if guided:
                    tt = t.expand(2 * n).to(device)
                    eps = denoise(torch.cat([z, z]), tt,
                                  torch.cat([theta, torch.zeros_like(theta)])).float()
                    cond, uncond = eps.chunk(2)
                    eps = uncond + settings.guidance * (cond - uncond)
                else:
                    eps = denoise(z, t.expand(n).to(device), theta).float()
            z = scheduler.step(eps, t, z).prev_sample
        out.append(z)
    return torch.cat(out)


def motion_conditions(source: MotionCode, driving: MotionCode, relative: bool = False
                      ) -> torch.Tensor:
    """[L, Dm]: theta_(r->d_i) - theta_(r->s), or theta_(r->d_i) - theta_(r->d_1) (relative)."""
    base = driving.theta_rs[:1] if relative else source.theta_rs[:1]
    return transfer(driving.theta_rs, base)


def encode_motion(model: WarpFace, latents: torch.Tensor, batch: int = 8) -> MotionCode:
    """MGME on latents [L, C, H, W] in batches (no gradient)."""
    codes = []
    with torch.no_grad():
        for first in range(0, latents.shape[0], batch):
            codes.append(model.motion(latents[first:first + batch]))
    return MotionCode(*(torch.cat([getattr(c, f) for c in codes])
                        for f in ("theta_sr", "theta_rs", "alpha", "groups")))


def render_conditions(model: WarpFace, source: torch.Tensor, conditions: torch.Tensor,
                      settings: SampleSettings = SampleSettings(), *,
                      generator: torch.Generator | None = None, device="cpu",
                      progress: bool = False) -> torch.Tensor:
    """Latents [L, C, H, W] of the source latent [C, H, W] under motion conditions [L, Dm];
    ReferenceNet runs once here and its features serve every step and frame."""
    source = source.to(device)[None]                                      # [1, C, H, W]
    with torch.no_grad():
        reference = model.reference_features(source)                     # cached

    def denoise(z, t, theta):
        return model(z, t, theta, reference)

    return ddim_sample(denoise, conditions, source.shape[1:], make_scheduler(model.config),
                       settings, generator=generator, device=device, progress=progress)


def reenact(model: WarpFace, source: torch.Tensor, driving: torch.Tensor, *,
            source_motion: torch.Tensor | None = None, relative: bool = False,
            settings: SampleSettings = SampleSettings(), generator: torch.Generator | None = None,
            device="cpu", progress: bool = False) -> torch.Tensor:
    """Reenact the source latent [C, H, W] with driving latents [L, C, H, W] (an image: L = 1,
    a video: one per frame) -> [L, C, H, W]. ``source_motion``: MGME's view of the source
    (default: the source latent itself)."""
    src_motion = source if source_motion is None else source_motion
    code_s = encode_motion(model, src_motion.to(device)[None], settings.batch)
    code_d = encode_motion(model, driving.to(device), settings.batch)
    conditions = motion_conditions(code_s, code_d, relative)
    return render_conditions(model, source, conditions, settings, generator=generator,
                             device=device, progress=progress)


def edit_conditions(code: MotionCode, codebooks: torch.Tensor, group: int,
                    values: Sequence[float], vector: int | None = None) -> torch.Tensor:
    """theta_(s->s') [V, Dm] for alpha_k (one image's code, batch index 0) shifted by each of
    ``values`` x std(alpha_k), on every coefficient of group k or only on ``vector``.

    ``codebooks``: the orthonormal C^orth [K, D_k, N_k] (``MotionEncoder.orthonormal_codebooks``).
    """
    k_groups, d_k, n_k = codebooks.shape
    if not 0 <= group < k_groups:
        raise ValueError(f"group must be in [0, {k_groups}), got {group}")
    if vector is not None and not 0 <= vector < n_k:
        raise ValueError(f"vector must be in [0, {n_k}), got {vector}")
    alpha = code.alpha[0, group]                                          # [Nk]
    std = float(alpha.std()) if n_k > 1 else 0.0
    std = std if std > 0 else 1.0      # an untrained or constant alpha_k: unit steps
    rows = []
    for value in values:
        shift = torch.zeros_like(alpha)
        if vector is None:
            shift += float(value) * std
        else:
            shift[vector] = float(value) * std
        delta = torch.zeros(k_groups, d_k, dtype=alpha.dtype, device=alpha.device)
        delta[group] = codebooks[group].to(alpha.dtype) @ shift           # g'_k - g_k
        rows.append(delta.flatten())
    return torch.stack(rows)


def canonical_condition(code: MotionCode) -> torch.Tensor:
    """theta = theta_(s->r) [1, Dm]: drives the source to the canonical pose (appendix E)."""
    return code.theta_sr[:1]
