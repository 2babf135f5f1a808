"""Gaussian diffusion math for training (DiT / improved-DDPM conventions).

The beta schedule is described by the same keyword arguments as a diffusers scheduler
(``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``), so the checkpoint's
schedule dict builds both this training object and the samplers' DDPM/DDIM schedulers. Default:
DiT's linear schedule, 1000 steps, betas 1e-4 .. 0.02. Tensors are [B, ...] with one timestep per
sample; coefficients are kept in float64 and cast at use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DiffusionSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # "linear" or "scaled_linear" (diffusers names)
    # What the model's first C output channels predict (diffusers names): "epsilon" (the
    # papers' DiT/ADM choice) or "v_prediction" (v = sqrt(abar) eps - sqrt(1 - abar) x0,
    # Salimans & Ho 2022): at high noise epsilon's x0 estimate divides the network's error by
    # sqrt(abar) (~156x at t = 999 on the linear schedule), v's does not (docs/demo.md, "Why
    # the fidelity target is missed"). Samplers pass it to the diffusers scheduler.
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got "
                             f"{self.prediction_type!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def betas(self) -> torch.Tensor:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n,
                                  dtype=torch.float64) ** 2
        raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got "
                         f"{self.beta_schedule!r}")


def _at(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coef[t] as [B, 1, ..., 1] in like's dtype/device."""
    out = coef.to(t.device)[t.long()].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), the learned-range p(x_{t-1} | x_t)."""

    def __init__(self, schedule: DiffusionSchedule | None = None):
        self.schedule = schedule or DiffusionSchedule()
        betas = self.schedule.betas()
        self.num_timesteps = betas.shape[0]
        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.betas = betas
        self.alphas_cumprod = acp
        self.sqrt_acp = acp.sqrt()
        self.sqrt_one_minus_acp = (1.0 - acp).sqrt()
        self.sqrt_recip_acp = (1.0 / acp).sqrt()
        self.sqrt_recipm1_acp = (1.0 / acp - 1.0).sqrt()
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_var_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.posterior_coef_x0 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_coef_xt = (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _at(self.sqrt_acp, t, x0) * x0 + _at(self.sqrt_one_minus_acp, t, x0) * noise

    def training_target(self, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output for ``q_sample(x0, t, noise)``."""
        if self.schedule.prediction_type == "v_prediction":
            return _at(self.sqrt_acp, t, x0) * noise - _at(self.sqrt_one_minus_acp, t, x0) * x0
        return noise

    def epsilon(self, prediction: torch.Tensor, xt: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        """The noise estimate of a model ``prediction`` (its first C channels) at ``xt``."""
        if self.schedule.prediction_type == "v_prediction":
            return (_at(self.sqrt_acp, t, xt) * prediction
                    + _at(self.sqrt_one_minus_acp, t, xt) * xt)
        return prediction

    def predict_x0(self, prediction: torch.Tensor, xt: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate of a model ``prediction`` at ``xt``."""
        if self.schedule.prediction_type == "v_prediction":
            return (_at(self.sqrt_acp, t, xt) * xt
                    - _at(self.sqrt_one_minus_acp, t, xt) * prediction)
        return (_at(self.sqrt_recip_acp, t, xt) * xt
                - _at(self.sqrt_recipm1_acp, t, xt) * prediction)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _at(self.posterior_coef_x0, t, xt) * x0 + _at(self.posterior_coef_xt, t, xt) * xt
        return mean, _at(self.posterior_log_var_clipped, t, xt)

    def p_mean_logvar(self, prediction: torch.Tensor, var_interp: torch.Tensor,
                      xt: torch.Tensor, t: torch.Tensor):
        """Learned-range p(x_{t-1} | x_t) from the model's ``prediction`` (epsilon or v, per the
        schedule): log-var interpolates between the clipped posterior log-variance
        (var_interp = -1) and log beta_t (+1). Returns mean, log-var, predicted x_0."""
        min_log = _at(self.posterior_log_var_clipped, t, xt)
        max_log = _at(torch.log(self.betas), t, xt)
        frac = (var_interp + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        x0 = self.predict_x0(prediction, xt, t)
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_var, x0


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor,
                             log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x) for x in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)), in nats."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs
