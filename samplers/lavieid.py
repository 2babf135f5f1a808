"""LaVieID sampling (paper 004): DDIM (diffusers ``DDIMScheduler``), 50 steps, CFG 6 (ConsisID's).

Per sample: the local encoder runs once on the reference's part crops (its tokens are the same at
every step); every DDIM step evaluates the model twice, text-conditioned and with the null text
(the router runs in both branches, inside the model); the guided v is
``v_u + s (v_c - v_u)``. After the last step the TAM runs ONCE on the guided final latent
(``enhance``), then ``decode`` maps latents to frames in [-1, 1].

Callables: ``model(x [B, F, C, H, W], t [B], text [B, Lt, Ct], reference [B, C, H, W],
identity [B, Ci], parts, *, text_null [B] bool) -> v [B, F, C, H, W]``; ``encode_parts(crops)
-> parts`` (or None without the router); ``enhance(z [B, F, C, H, W]) -> z``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from avatar_models.lavieid import noise_schedule


@dataclass(frozen=True)
class LaVieIDSettings:
    steps: int = 50
    guidance: float = 6.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")


def ddim_scheduler(steps: int):
    """diffusers DDIMScheduler on the training betas, v-prediction, trailing timesteps
    (CogVideoX's), eta 0."""
    from diffusers import DDIMScheduler

    sched = noise_schedule()
    scheduler = DDIMScheduler(num_train_timesteps=sched.num_train_timesteps,
                              trained_betas=sched.betas().numpy(), prediction_type="v_prediction",
                              clip_sample=False, set_alpha_to_one=True,
                              timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def lavieid_sample(model: Callable, *, text: torch.Tensor, reference: torch.Tensor,
                   identity: torch.Tensor, crops: torch.Tensor | None,
                   latent_shape: tuple[int, int, int, int],
                   encode_parts: Callable | None = None, enhance: Callable | None = None,
                   settings: LaVieIDSettings = LaVieIDSettings(),
                   generator: torch.Generator | None = None, device="cpu",
                   progress: bool = False) -> torch.Tensor:
    """One video per row of ``text`` [B, Lt, Ct]: the final (TAM-enhanced) latent
    [B, F, C, H, W]. ``latent_shape`` = (F, C, H, W)."""
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (F, C, H, W), got {latent_shape}")
    b = text.shape[0]
    for name, value in (("reference", reference), ("identity", identity)):
        if value.shape[0] != b:
            raise ValueError(f"{name} must have batch {b} (text's), got {list(value.shape)}")
    scheduler = ddim_scheduler(settings.steps)
    x = torch.randn((b, *latent_shape), generator=generator).to(device)
    text, reference, identity = (v.to(device) for v in (text, reference, identity))
    parts = None
    if encode_parts is not None and crops is not None:
        parts = encode_parts(crops.to(device))
    guided = settings.guidance != 1.0
    cond = torch.zeros(b, dtype=torch.bool, device=device)
    null = torch.ones(b, dtype=torch.bool, device=device)
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="DDIM", unit="step")
    for t in steps:
        tt = torch.full((b,), float(t), device=device)
        v = model(x, tt, text, reference, identity, parts, text_null=cond)   # [B, F, C, H, W]
        if guided:
            v_null = model(x, tt, text, reference, identity, parts, text_null=null)
            v = v_null + settings.guidance * (v - v_null)
        x = scheduler.step(v, t, x).prev_sample
    return x if enhance is None else enhance(x)                               # TAM: once
