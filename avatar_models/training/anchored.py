"""Training loop of Anchored Diffusion (sDiT + mapping network).

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
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from avatar_models.anchored_diffusion import Conditions, SDiT, SDiTConfig
from avatar_models.checkpoint import save_checkpoint
from avatar_models.training.diffusion import DiffusionSchedule, GaussianDiffusion
from avatar_models.training.ema import EMA
from avatar_models.training.losses import dit_loss, expressive_weights


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
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
    num_workers: int = 0
    attention_backend: str | None = None
    schedule: DiffusionSchedule = field(default_factory=DiffusionSchedule)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    model: SDiT
    ema: SDiT | None
    losses: list[float]
    checkpoint: Path | None


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def batches(dataset, batch_size: int, *, seed: int = 0, num_workers: int = 0) -> Iterator[dict]:
    """Endless batches from a map-style Dataset (shuffled), an IterableDataset, or any iterable
    of sample dicts that can be iterated repeatedly (or never ends)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        if isinstance(dataset, (Dataset, IterableDataset)):
            shuffle = not isinstance(dataset, IterableDataset)
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True,
                                generator=gen if shuffle else None, collate_fn=_collate,
                                num_workers=num_workers)
            got = False
            for batch in loader:
                got = True
                yield batch
        else:
            got, buf = False, []
            for item in dataset:
                buf.append(item)
                if len(buf) == batch_size:
                    got = True
                    yield _collate(buf)
                    buf = []
        if not got:
            raise ValueError(f"the dataset yielded fewer than batch_size={batch_size} samples")


def param_groups(model: SDiT, train: TrainConfig) -> list[dict]:
    mapping = list(model.mapping.parameters())
    ids = {id(p) for p in mapping}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": train.lr, "name": "sdit"},
            {"params": mapping, "lr": train.lr * train.mapping_lr_scale, "name": "mapping"}]


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        span = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine
    return fn


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


def train_anchored(model_config: SDiTConfig | str, dataset: Iterable[dict],
                   train: TrainConfig | None = None, *, device: str | torch.device | None = None,
                   out: str | Path | None = None, extra: dict | None = None,
                   model: SDiT | None = None, progress: bool = True,
                   callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train an sDiT on ``dataset`` (see the module docstring for the sample format).

    Args:
        model_config: an :class:`SDiTConfig` or a name for :meth:`SDiTConfig.from_name`.
        train: hyperparameters (paper defaults).
        device: default "cuda" when available, else "cpu".
        out: checkpoint path (.safetensors), written every ``save_every`` steps and at the end;
            metadata holds the model config, the diffusion schedule, the train config and
            ``extra``; put ``{"conditioner": "MODULE:FUNCTION"}`` there so that
            ``avatar-kernels sample anchored`` knows how to build G and L_t (see docs/anchored.md).
        model: continue training this model instead of a fresh one.
        callback: called as ``callback(step, {"loss": float, "mse": ..., "vb": ...})``.
    """
    from tqdm.auto import tqdm

    train = train or TrainConfig()
    if isinstance(model_config, str):
        model_config = SDiTConfig.from_name(model_config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(train.seed)
    if model is None:
        model = SDiT(model_config, attention_backend=train.attention_backend)
    model = model.to(device).train()
    ema = EMA(model, train.ema_decay, train.ema_warmup) if train.ema_decay > 0 else None
    opt = torch.optim.AdamW(param_groups(model, train), lr=train.lr, betas=train.betas,
                            weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    diffusion = GaussianDiffusion(train.schedule)
    amp = device.type == "cuda" and train.amp in ("auto", "bf16") or train.amp == "bf16"
    gen = torch.Generator().manual_seed(train.seed + 1)
    data = batches(dataset, train.batch_size, seed=train.seed, num_workers=train.num_workers)
    meta = {"diffusion": train.schedule.to_dict(), "train": train.to_dict(), **(extra or {})}

    def save(step: int) -> Path | None:
        if out is None:
            return None
        return save_checkpoint(out, model, system="anchored", config=model.config.to_dict(),
                               ema=None if ema is None else ema.model,
                               extra={**meta, "step": step})

    losses: list[float] = []
    bar = tqdm(range(train.steps), desc="train anchored", disable=not progress)
    smooth, start = None, time.perf_counter()
    path = None
    for step in bar:
        terms = train_step_loss(model, diffusion, next(data), train, device, gen, amp)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        values = {k: float(v.detach()) for k, v in terms.items()}
        losses.append(values["loss"])
        smooth = values["loss"] if smooth is None else 0.9 * smooth + 0.1 * values["loss"]
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if callback is not None:
            callback(step, values)
        if train.save_every and (step + 1) % train.save_every == 0:
            path = save(step + 1)
    path = save(train.steps) or path
    rate = train.steps / max(1e-9, time.perf_counter() - start)
    if train.steps and progress:
        bar.write(f"trained {train.steps} steps ({rate:.2f} it/s), final loss {smooth:.4f}"
                  + (f", checkpoint {path}" if path else ""))
    return TrainResult(model, None if ema is None else ema.model, losses, path)
