"""Diffusion losses: DiT's learned-sigma loss with an optional per-pixel weight map."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avatar_models.training.diffusion import GaussianDiffusion, discretized_gaussian_nll, normal_kl


def expressive_weights(mask: torch.Tensor, size: tuple[int, int],
                       lambda_ex: float = 1.0) -> torch.Tensor:
    """Per-pixel loss weights ``1 + lambda_ex * mask`` at the model's (latent) resolution.

    mask: [..., 1, h, w] in [0, 1] (1 on the expressive regions: mouth, eyes), any resolution;
    it is area-resized to ``size`` (so a mask made at pixel resolution averages into latent cells).
    Returns [..., 1, H, W].
    """
    lead = mask.shape[:-3]
    m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="area")
    return (1.0 + lambda_ex * m).reshape(*lead, 1, *size)


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def dit_loss(diffusion: GaussianDiffusion, model_out: torch.Tensor, x0: torch.Tensor,
             xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DiT learned-sigma loss per sample: weighted MSE of the schedule's prediction target
    (epsilon, or v) + variational bound term.

    Args:
        model_out: [B, T, 2C, H, W] (the prediction: epsilon or v per the schedule, and the
            variance interpolation in [-1, 1]) on channel dim 2
            (or [B, 2C, H, W] with channel dim 1: any layout whose channel dim is ``x0.dim()-3``).
        x0, xt, noise: [B, T, C, H, W]; t: [B] timesteps.
        weight: per-pixel weights broadcastable to x0 (e.g. [B, T, 1, H, W]); MSE only.

    Returns:
        dict of [B] tensors: ``loss`` = ``mse`` + ``vb``. The vb term (bits/dim) trains only the
        variance: the mean enters it detached, as in improved-DDPM / DiT.
    """
    cdim = x0.dim() - 3
    pred, var_interp = model_out.float().chunk(2, dim=cdim)
    x0, xt, noise = x0.float(), xt.float(), noise.float()
    err = (diffusion.training_target(x0, t, noise) - pred) ** 2
    if weight is not None:
        err = err * weight.to(err.dtype)
    mse = _mean_per_sample(err)
    true_mean, true_logvar = diffusion.q_posterior(x0, xt, t)
    mean, logvar, _ = diffusion.p_mean_logvar(pred.detach(), var_interp, xt, t)
    kl = _mean_per_sample(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
    nll = _mean_per_sample(discretized_gaussian_nll(x0, mean, 0.5 * logvar)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
