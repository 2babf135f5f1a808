"""Exponential moving average of a model's weights (DiT keeps one for sampling)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    With ``warmup`` the decay is ``min(decay, (1 + n) / (10 + n))`` at update n, so short runs
    (tiny models, demos) get a usable average instead of the initial weights.

    The average lives in ``shadow`` (parameter and buffer name -> tensor, the same kind of tensor
    as the model's: under FSDP2 each rank averages only its own shards, as DTensors).
    ``copy=True`` also keeps ``model``, a frozen copy of the module that :meth:`update` keeps in
    sync (convenient for sampling during single-process training).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, *,
                 copy_model: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False) if copy_model else None
        source = self.model if self.model is not None else model
        params = {n: p if copy_model else p.detach().clone()
                  for n, p in source.named_parameters()}
        self.param_names = tuple(params)
        self.shadow = {**params, **{n: b if copy_model else b.detach().clone()
                                    for n, b in source.named_buffers()}}

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, p in model.named_parameters():
            e = self.shadow[name]
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
        for name, b in model.named_buffers():
            self.shadow[name].copy_(b)
        self.updates += 1

    @torch.no_grad()
    def load_shadow(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved averages (full tensors) into the shadow (sharded as the shadow is);
        every parameter must be there, buffers are copied when present."""
        missing = sorted(set(self.param_names) - set(tensors))
        if missing:
            raise ValueError(f"the saved EMA lacks {len(missing)} parameter(s), e.g. "
                             f"{missing[:3]}")
        for name, e in self.shadow.items():
            if name in tensors:
                e.copy_(_like(tensors[name], e))


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``target``: a DTensor target gets its local shard of ``full``."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements)
    return full.to(device=target.device, dtype=target.dtype)
