"""Safetensors checkpoints: weights plus JSON metadata, no pickle anywhere.

One file holds ``model.<name>`` tensors (the trained weights) and optionally ``ema.<name>``
tensors (their exponential moving average); the safetensors header metadata (string -> string)
holds ``format``, ``system`` (e.g. "anchored"), ``config`` (the model config as JSON) and
``extra`` (any JSON: diffusion schedule, conditioning setup, training step ...). Writes are atomic
(temporary file, then rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "avatar-kernels/1"


@dataclass
class Checkpoint:
    system: str
    config: dict
    extra: dict = field(default_factory=dict)
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)

    def weights(self, which: str = "ema") -> dict[str, torch.Tensor]:
        """``"ema"`` (falls back to the raw weights when the file has no EMA) or ``"model"``."""
        if which not in ("ema", "model"):
            raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
        return self.ema if which == "ema" and self.ema else self.model


def _state(module_or_dict) -> dict[str, torch.Tensor]:
    sd = module_or_dict if isinstance(module_or_dict, dict) else module_or_dict.state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(path: str | os.PathLike, model, *, system: str, config: dict,
                    ema=None, extra: dict | None = None) -> Path:
    """Write ``model`` (an nn.Module or a state dict), optional ``ema``, config and extra."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in _state(model).items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in _state(ema).items()})
    metadata = {"format": FORMAT, "system": system, "config": json.dumps(config),
                "extra": json.dumps(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates 0600; give what open() would
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, *, system: str | None = None,
                    device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``system`` checked when given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an avatar-kernels checkpoint (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        if system is not None and meta.get("system") != system:
            raise ValueError(f"{path} holds a {meta.get('system')!r} model, expected {system!r}")
        ckpt = Checkpoint(meta["system"], json.loads(meta["config"]),
                          json.loads(meta.get("extra", "{}")))
        for key in f.keys():
            group, _, name = key.partition(".")
            getattr(ckpt, group)[name] = f.get_tensor(key)
    return ckpt
