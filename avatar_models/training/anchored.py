"""Anchored Diffusion (sDiT + mapping network) as a system of the training engine.

Data: any source of samples, each a dict of tensors for ONE sequence (the loader batches them):
    "frames":  [T, C, H, W] clean frames: VAE latents (scaled) or pixels in [-1, 1]
    "control": [T, L] per-frame control vectors (flattened normalised landmarks)
    "global":  [G] global embedding (CLIP embedding of the source frame, or any identity vector)
    "mask":    optional [T, 1, h, w] expressive-region mask in [0, 1] (mouth, eyes; any
               resolution, area-resized to H x W); loss weight = 1 + lambda_ex * mask
    "weight":  optional [T, 1, H, W] explicit per-pixel loss weights (used as given)
The real-video pipeline (non-uniform sequences plus the farthest source frame) produces such
dicts; so can any procedural dataset.

Paper defaults (section 4.1 / supplementary D): AdamW (default betas, weight decay 0.01), lr
6.4e-5 for the denoiser and 10x smaller for the mapping network, cosine schedule, DiT's
learned-sigma loss with lambda_ex = 1, EMA of the weights. Conditions are dropped with
probability ``cond_drop`` (DiT's 0.1) so that classifier-free guidance is available at sampling.

:func:`anchored_system` hands the model, :func:`train_step_loss`, :func:`param_groups` and the
dataset to :func:`avatar_models.training.engine.train`, which owns the loop, precision,
distribution, EMA and checkpoints; :func:`train_anchored` is the one-call entry point.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avatar_models.anchored_diffusion import Conditions, SDiT, SDiTConfig
from avatar_models.training import engine
from avatar_models.training.diffusion import DiffusionSchedule, GaussianDiffusion
from avatar_models.training.engine import EngineConfig, TrainingSystem, warmup_cosine
from avatar_models.training.losses import dit_loss, expressive_weights
from avatar_models.training.sharding import ShardedBatches


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16               # global batch (all ranks, all accumulation micro-steps)
    lr: float = 6.4e-5
    mapping_lr_scale: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0          # cosine decays to lr * min_lr_ratio
    lambda_ex: float = 1.0
    cond_drop: float = 0.1
    ema_decay: float = 0.9999          # 0 disables the EMA
    ema_warmup: bool = True
    grad_clip: float = 0.0             # 0 disables clipping
    amp: str = "auto"                  # "auto" (bf16 on CUDA), "bf16", "off"
    seed: int = 0
    save_every: int = 0                # steps between checkpoints (0: only at the end)
    keep_last: int = 3                 # resumable checkpoints kept
    grad_accum: int = 1
    activation_checkpointing: bool = False
    fsdp: bool = False                 # FSDP2 under torchrun (default: DDP)
    num_workers: int = 0
    attention_backend: str | None = None
    schedule: DiffusionSchedule = field(default_factory=DiffusionSchedule)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def engine_config(self, *, device=None, progress: bool = True) -> EngineConfig:
        return EngineConfig(
            steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
            lr=self.lr, weight_decay=self.weight_decay, betas=self.betas,
            warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
            grad_clip=self.grad_clip, ema_decay=self.ema_decay, ema_warmup=self.ema_warmup,
            amp=self.amp, activation_checkpointing=self.activation_checkpointing,
            fsdp=self.fsdp, seed=self.seed, checkpoint_every=self.save_every,
            keep_last=self.keep_last, num_workers=self.num_workers, progress=progress,
            device=None if device is None else str(device))


@dataclass
class TrainResult:
    model: SDiT
    ema: SDiT | None
    losses: list[float]
    checkpoint: Path | None


def batches(dataset, batch_size: int, *, seed: int = 0, num_workers: int = 0) -> Iterator[dict]:
    """Endless batches from a map-style Dataset (shuffled), an IterableDataset, or any iterable
    of sample dicts that can be iterated repeatedly (or never ends); one process's view of
    :class:`avatar_models.training.sharding.ShardedBatches`."""
    return ShardedBatches(dataset, batch_size, seed=seed, num_workers=num_workers)


def param_groups(model: SDiT, train: TrainConfig) -> list[dict]:
    mapping = list(model.mapping.parameters())
    ids = {id(p) for p in mapping}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": train.lr, "name": "sdit"},
            {"params": mapping, "lr": train.lr * train.mapping_lr_scale, "name": "mapping"}]


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    return warmup_cosine(train.steps, train.warmup_steps, train.min_lr_ratio)


def train_step_loss(model: SDiT, diffusion: GaussianDiffusion, batch: dict, train: TrainConfig,
                    device: torch.device, generator: torch.Generator | None = None,
                    amp: bool = False) -> dict[str, torch.Tensor]:
    """One forward pass and the loss terms (mean over the batch) of a batch dict."""
    x0 = batch["frames"].to(device=device, dtype=torch.float32)           # [B, T, C, H, W]
    b = x0.shape[0]
    null = torch.rand(b, generator=generator, device="cpu") < train.cond_drop
    cond = Conditions(batch["global"].to(device, torch.float32),
                      batch["control"].to(device, torch.float32), null.to(device))
    t = torch.randint(0, diffusion.num_timesteps, (b,), generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    xt = diffusion.q_sample(x0, t, noise)
    weight = None
    if "weight" in batch:
        weight = batch["weight"].to(device, torch.float32)
    elif "mask" in batch and train.lambda_ex:
        weight = expressive_weights(batch["mask"].to(device), tuple(x0.shape[-2:]),
                                    train.lambda_ex)                      # [B, T, 1, H, W]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(xt, t, cond)                                          # [B, T, 2C, H, W]
    terms = dit_loss(diffusion, out, x0, xt, t, noise, weight)
    return {k: v.mean() for k, v in terms.items()}


def anchored_system(model: SDiT, dataset: Iterable[dict], train: TrainConfig,
                    extra: dict | None = None) -> TrainingSystem:
    """The engine's view of Anchored Diffusion: the sDiT, its loss, the paper's two parameter
    groups (mapping network at ``lr * mapping_lr_scale``) and the dataset. ``extra`` joins the
    checkpoint metadata (with the diffusion schedule and ``train``)."""
    diffusion = GaussianDiffusion(train.schedule)

    def loss(wrapped, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        return train_step_loss(wrapped, diffusion, batch, train, device, generator)

    meta = {"diffusion": train.schedule.to_dict(), "train": train.to_dict(), **(extra or {})}
    return TrainingSystem("anchored", model, loss, dataset,
                          param_groups=lambda module: param_groups(module, train),
                          config=model.config.to_dict(), metadata=meta)


def train_anchored(model_config: SDiTConfig | str, dataset: Iterable[dict],
                   train: TrainConfig | None = None, *, device: str | torch.device | None = None,
                   out: str | Path | None = None, extra: dict | None = None,
                   model: SDiT | None = None, progress: bool = True,
                   callback: Callable[[int, dict], None] | None = None,
                   resume: str | os.PathLike | None = None) -> TrainResult:
    """Train an sDiT on ``dataset`` (see the module docstring for the sample format).

    Args:
        model_config: an :class:`SDiTConfig` or a name for :meth:`SDiTConfig.from_name`.
        train: hyperparameters (paper defaults).
        device: default "cuda" (``cuda:LOCAL_RANK`` under torchrun) when available, else "cpu".
        out: final checkpoint path (.safetensors); resumable checkpoints every ``save_every``
            steps and at the end go to ``<stem>.checkpoints/``, metrics to
            ``<stem>.metrics.jsonl`` (see :mod:`avatar_models.training.engine`); metadata holds
            the model config, the diffusion schedule, the train config and ``extra``; put
            ``{"conditioner": "MODULE:FUNCTION"}`` there so that ``avatar-kernels sample
            anchored`` knows how to build G and L_t (see docs/anchored.md).
        model: continue training this model instead of a fresh one.
        callback: called as ``callback(step, {"loss": float, "mse": ..., "vb": ...})``.
        resume: continue a run from its checkpoint (model, EMA, optimiser, schedule, RNG, data
            position); the model config must be the checkpoint's.
    """
    train = train or TrainConfig()
    if isinstance(model_config, str):
        model_config = SDiTConfig.from_name(model_config)
    torch.manual_seed(train.seed)
    if model is None:
        model = SDiT(model_config, attention_backend=train.attention_backend)
    model = model.train()
    outcome = engine.train(anchored_system(model, dataset, train, extra),
                           train.engine_config(device=device, progress=progress), out=out,
                           resume=resume, callback=callback)
    return TrainResult(outcome.model, outcome.ema, outcome.losses, outcome.checkpoint)
